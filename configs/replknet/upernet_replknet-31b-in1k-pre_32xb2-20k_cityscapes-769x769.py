# UperNet + RepLKNet-31B (ImageNet-1K pretrained), Cityscapes 769x769 crops,
# whole-image test, align_corners=True. As the authors: 32 GPUs x 2 images
# (batch 64), 20k iterations (their single-node default, 80k iterations on 8
# GPUs, in images), drop_path 0.5.
# Reported (authors, single scale): 83.1 mIoU.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-31B_ImageNet-1K_224.pth
_base_ = [
    '../_base_/models/upernet_replknet-31b.py',
    'mmseg::_base_/datasets/cityscapes_769x769.py',
    'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/replknet_adamw-poly-40k.py', '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/RepLKNet-31B_ImageNet-1K_224.pth'
crop_size = (769, 769)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(num_classes=19, align_corners=True),
    auxiliary_head=dict(num_classes=19, align_corners=True),
    test_cfg=dict(mode='whole'))
train_dataloader = dict(batch_size=2)

max_iters = 20000
warmup_iters = 400
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters)
]
train_cfg = dict(max_iters=max_iters, val_interval=2000)
default_hooks = dict(checkpoint=dict(interval=2000))
