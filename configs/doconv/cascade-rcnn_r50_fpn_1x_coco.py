# Plain-conv baseline of the DO-Conv comparison: mmdet's own
# cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py (8 GPUs x 2 images, 12 epochs;
# mmdet reports 40.3 box AP) plus this project's FusedEvalHook. The ImageNet
# ResNet-50 (torchvision) weights are read from a local file, never
# downloaded (mmdet's torchvision://resnet50 is the file
# resnet50-0676ba61.pth). Set it (edit checkpoint_file, or
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50-0676ba61.pth)
_base_ = [
    'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
    '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/resnet50-0676ba61.pth'
model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
