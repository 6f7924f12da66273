# UperNet + RepLKNet-31B (ImageNet-22K pretrained), ADE20K 640x640 crops,
# sliding-window test (640 crops, stride 426). As the authors: 64 GPUs x 2
# images, 40k iterations, drop_path 0.3, ADE20K's usual (2048, 512) rescale.
# Reported (authors, single scale): 51.5 mIoU.
# Set the ImageNet-22K weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-31B_ImageNet-22K_224.pth
_base_ = [
    '../_base_/models/upernet_replknet-31b.py',
    'mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/replknet_adamw-poly-40k.py', '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/RepLKNet-31B_ImageNet-22K_224.pth'
crop_size = (640, 640)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(426, 426)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
