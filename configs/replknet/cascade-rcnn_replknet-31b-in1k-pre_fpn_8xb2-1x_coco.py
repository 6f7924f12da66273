# Cascade R-CNN FPN + RepLKNet-31B (ImageNet-1K pretrained), COCO, mmdet's
# 1x schedule (12 epochs, 8 GPUs x 2 images). Same backbone and optimiser
# choices as the Faster R-CNN 1x config beside it (AdamW lr 1e-4, weight
# decay 0.05 without decay on norms, drop_path 0.3, SyncBN); mmdet's
# standard Cascade R-CNN heads.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-31B_ImageNet-1K_224.pth
_base_ = [
    'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
    '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/RepLKNet-31B_ImageNet-1K_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='RepLKNet',
        arch='31B',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        with_cp=True,
        small_kernel_merged=False,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0))
