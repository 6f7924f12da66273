# Plain-conv baseline of the DO-Conv comparison: mmseg's own
# upernet/upernet_r50_4xb2-80k_cityscapes-512x1024.py
# (Cityscapes, 4 GPUs x 2 images, 80k iterations; mmseg reports 78.19 mIoU)
# plus this project's FusedEvalHook. The ImageNet ResNet-50-V1c weights are
# read from a local file, never downloaded (mmseg's open-mmlab://resnet50_v1c
# is the file resnet50_v1c-2cccc1ad.pth). Set it (edit checkpoint_file, or
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50_v1c-2cccc1ad.pth)
_base_ = [
    'mmseg::upernet/upernet_r50_4xb2-80k_cityscapes-512x1024.py',
    '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/resnet50_v1c-2cccc1ad.pth'
model = dict(
    pretrained=None,
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
