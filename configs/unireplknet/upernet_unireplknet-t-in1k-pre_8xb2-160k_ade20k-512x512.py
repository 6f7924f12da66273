# UperNet + UniRepLKNet-T (ImageNet-1K pretrained), ADE20K 512x512. The authors'
# recipe (AILab-CVC/UniRepLKNet, segmentation/configs/ade20k/
# upernet_unireplknet_t_512_160k_ade20k.py, mmseg 0.27), ported to mmseg 1.x:
# - 8 GPUs x 2 images, 160k iterations, drop_path 0.2, no checkpointing;
# - AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 except on 1-D
#   parameters and biases, their layer-wise lr decay (for T: rate 1.0, i.e.
#   none, over 9 layers), linear warm-up 1500 iterations from 1e-6, then poly
#   (power 1.0) to 0;
# - SyncBN in the backbone and the heads, UperNet with 512 channels and an
#   FCN auxiliary head (loss weight 0.4) on stage 3;
# - whole-image test at (2048, 512), resized to a multiple of 32.
# Validation and checkpoints every 4k iterations (best mIoU kept), as theirs.
# Reported (authors, single scale): 48.6 mIoU, 61M parameters.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/unireplknet_t_in1k_224_acc83.21.pth
# (the file name of the authors' release; nothing is downloaded).
_base_ = [
    'mmseg::_base_/models/upernet_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py',
    '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/unireplknet_t_in1k_224_acc83.21.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='UniRepLKNet',
        arch='T',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        with_cp=False,
        small_kernel_merged=False,
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(
        in_channels=[80, 160, 320, 640], num_classes=150, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=320, num_classes=150, norm_cfg=norm_cfg),
    test_cfg=dict(mode='whole'))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='UniRepLKNetLayerDecayOptimizerConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=1.0, decay_type='layer_wise', num_layers=9))

max_iters = 160000
warmup_iters = 1500
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
train_cfg = dict(max_iters=max_iters, val_interval=4000)
default_hooks = dict(
    checkpoint=dict(interval=4000, max_keep_ckpts=20, save_best='mIoU'))
