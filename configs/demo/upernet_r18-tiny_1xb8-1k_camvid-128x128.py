# Small-scale real-data run, plain-conv baseline: UperNet on the narrow ResNetV1c-18
# of the demo (16 base channels) on CamVid converted to the Cityscapes layout
# (tools/dataset_converters/camvid_to_cityscapes.py -> data/camvid_cityscapes),
# read as its 11 Cityscapes classes. Images are halved (240x180), trained on
# 128x128 crops, and evaluated whole at half size against the full-size labels;
# validation runs on a fused copy (FusedEvalHook). The RepLKNet config of the same
# name builds on this one; `tools/camvid_study.py` trains both with DO-Conv on and off
# (README's CamVid table).
_base_ = ['./upernet_r18-tiny_1xb8-600i_demoade-64x64.py']

dataset_type = 'CityscapesDataset'
data_root = 'data/camvid_cityscapes'
crop_size = (128, 128)
camvid_classes = ('road', 'sidewalk', 'building', 'fence', 'pole', 'traffic sign', 'vegetation',
                  'sky', 'person', 'rider', 'car')
num_classes = len(camvid_classes)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(240, 180), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(240, 180), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
dataset = dict(type=dataset_type, data_root=data_root, img_suffix='_leftImg8bit.jpg',
               metainfo=dict(classes=camvid_classes))
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        **dataset,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    dataset=dict(
        _delete_=True,
        **dataset,
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes))

max_iters = 1000
val_interval = 250
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(checkpoint=dict(interval=max_iters))
