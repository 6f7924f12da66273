# Cascade Mask R-CNN FPN + UniRepLKNet-L (ImageNet-22K pretrained), COCO, the
# authors' 3x recipe (casc_mask_rcnn_unireplknet_l_in22k_fpn_3x_coco.py): as
# for S (heads, augmentation, 8 GPUs x 2 images, 36 epochs, AdamW lr 1e-4)
# with drop_path 0.7, layer-wise lr decay 0.7, and an exponential-momentum
# EMA of the weights (momentum 1e-4, buffers too; mmdet 2's
# ExpMomentumEMAHook is mmdet 3's EMAHook with ExpMomentumEMA). FusedEvalHook
# runs after it, so the EMA weights are what gets fused and evaluated.
# Their config leaves the backbone checkpoint to the user; their 22K
# segmentation configs use the 22K->1K 384 file, named below.
# Reported (authors): 55.8 box AP / 48.4 mask AP, 276M parameters.
# Set the weights (edit checkpoint_file, or on the command line
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/FILE)
# with FILE = unireplknet_l_in22k_to_in1k_384_acc87.88.pth (the authors' release).
_base_ = [
    './cascade-mask-rcnn_unireplknet-s-in1k-pre_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py'
]
checkpoint_file = 'work_dirs/pretrained/unireplknet_l_in22k_to_in1k_384_acc87.88.pth'
model = dict(
    backbone=dict(
        arch='L',
        drop_path_rate=0.7,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[192, 384, 768, 1536]))
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.7))
custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0001,
        update_buffers=True,
        priority=49),
    dict(type='FusedEvalHook')
]
