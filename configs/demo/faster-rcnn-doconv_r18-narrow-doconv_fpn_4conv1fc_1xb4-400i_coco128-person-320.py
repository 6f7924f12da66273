# Small-scale real-data detection run (CPU): Faster R-CNN with DO-Conv in backbone, neck
# and heads, on the 128 COCO train2017 images of ../shared/data/coco128 with their official
# annotations, scored with pycocotools' COCO bbox mAP on the fused model (FusedEvalHook;
# tools/test.py fuses too, --no-fuse for the unfused model).
# There is no held-out split of coco128 and no ImageNet initialisation here, so it trains
# and evaluates on the same images: it checks that the whole detection pipeline learns and
# that the fused model scores what the unfused one does. It is not a COCO result.
# One class, person (254 boxes in 61 images): with all 80 classes, 400 iterations from
# scratch left the box head predicting background (COCO mAP 0.000). Training reads the 61
# images with a person; evaluation runs over all 128 with the official json, person only.
# Sized for a CPU: ResNet-18 at half width (32 base channels, every stage DO-Conv), 64-channel
# FPN / RPN / conv box head, 128 sampled RoIs per image, images resized to at most 512x320.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/reparam_mm.py',
]
doconv_cfg = dict(type='DOConv')
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(
        type='DOResNet',
        depth=18,
        base_channels=32,
        stem_channels=32,
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        stage_with_doconv=(True, True, True, True),
        doconv_cfg=doconv_cfg,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64, conv_cfg=doconv_cfg),
    rpn_head=dict(type='ConvCfgRPNHead', in_channels=64, feat_channels=64,
                  conv_cfg=doconv_cfg),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', in_channels=64, conv_out_channels=64,
                       fc_out_channels=256, norm_cfg=norm_cfg, conv_cfg=doconv_cfg,
                       num_classes=1)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))))

data_root = '../shared/data/coco128/'
scale = (512, 320)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=scale, keep_ratio=True),
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
coco128 = dict(data_root=data_root, ann_file='annotations/instances_train2017.json',
               data_prefix=dict(img='train2017/'), metainfo=dict(classes=('person', )))
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(**coco128, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(**coco128, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_train2017.json')
test_evaluator = val_evaluator

max_iters = 400
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=40),
    dict(type='CosineAnnealingLR', T_max=max_iters - 40, eta_min=1e-5, by_epoch=False,
         begin=40, end=max_iters),
]
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
