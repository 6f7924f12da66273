# Plain-conv baseline of the DO-Conv comparison on a backbone other than ResNet:
# mmdet's own regnet/faster-rcnn_regnetx-3.2GF_fpn_1x_coco.py (COCO, 8 GPUs x 2
# images, 12 epochs; mmdet reports 39.9 box AP) plus this project's
# FusedEvalHook. The ImageNet RegNetX-3.2GF weights are read from a local file,
# never downloaded (mmdet's open-mmlab://regnetx_3.2gf is the file
# regnetx_3.2gf-c2599b0f.pth). Set it (edit checkpoint_file, or
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/regnetx_3.2gf-c2599b0f.pth)
_base_ = [
    'mmdet::regnet/faster-rcnn_regnetx-3.2GF_fpn_1x_coco.py',
    '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/regnetx_3.2gf-c2599b0f.pth'
model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
