# Cascade Mask R-CNN FPN + UniRepLKNet-S (ImageNet-1K pretrained), COCO, the
# authors' 3x recipe (AILab-CVC/UniRepLKNet, detection/configs/coco/
# casc_mask_rcnn_unireplknet_s_in1k_fpn_3x_coco.py, mmdet 2.28), ported to
# mmdet 3.x:
# - box heads: 4 shared convs + 1 FC with SyncBN, GIoU loss (weight 10) on
#   decoded boxes, the three cascade stages' usual target stds;
# - training: random flip, then either multi-scale resize (short side
#   480-800, long side <= 1333) or resize / absolute crop (384-600) / resize
#   (the DETR augmentation); 8 GPUs x 2 images; 36 epochs, lr x0.1 at
#   epochs 27 and 33, linear warm-up 500 iterations from 0.001;
# - AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 except on 1-D
#   parameters and biases, their layer-wise lr decay 0.8 over 12 layers;
#   drop_path 0.5, SyncBN, checkpointing (with_cp).
# Their config leaves the backbone checkpoint to the user; the ImageNet-1K
# file of their release is named below.
# Reported (authors): 53.0 box AP / 45.9 mask AP, 113M parameters.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/unireplknet_s_in1k_224_acc83.91.pth
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py', '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/unireplknet_s_in1k_224_acc83.91.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)
stage_target_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                     [0.033, 0.033, 0.067, 0.067]]
model = dict(
    backbone=dict(
        _delete_=True,
        type='UniRepLKNet',
        arch='S',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.5,
        with_cp=True,
        small_kernel_merged=False,
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=[
        dict(
            type='ConvFCBBoxHead',
            num_shared_convs=4,
            num_shared_fcs=1,
            in_channels=256,
            conv_out_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0., 0., 0., 0.],
                target_stds=stds),
            reg_class_agnostic=False,
            reg_decoded_bbox=True,
            norm_cfg=norm_cfg,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
        for stds in stage_target_stds
    ]))

multi_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True)
        ],
                    [
                        dict(
                            type='RandomChoiceResize',
                            scales=[(400, 1333), (500, 1333), (600, 1333)],
                            keep_ratio=True),
                        dict(
                            type='RandomCrop',
                            crop_type='absolute_range',
                            crop_size=(384, 600),
                            allow_negative_crop=True),
                        dict(
                            type='RandomChoiceResize',
                            scales=multi_scales,
                            keep_ratio=True)
                    ]]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1)
]
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='UniRepLKNetLayerDecayOptimizerConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12))
default_hooks = dict(
    checkpoint=dict(interval=1, max_keep_ckpts=5, save_best='auto'))
auto_scale_lr = dict(enable=False, base_batch_size=16)
