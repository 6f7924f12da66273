# DO-Conv in the neck and heads only ("head" in the DO-Conv paper's backbone /
# head / both comparison): the FPN convs, the RPN's 3x3 conv (ConvCfgRPNHead,
# an RPNHead that honours conv_cfg) and the 4 convs of each of the three conv
# RoI box heads (Shared4Conv1FCBBoxHead) are DO-Conv; the ResNet-50 backbone
# is plain. 1x1 convs have no D and stay plain convs in effect. Compare with
# the plain cascade-rcnn_r50_fpn_4conv1fc_1x_coco.py, which it extends.
_base_ = ['./cascade-rcnn_r50_fpn_4conv1fc_1x_coco.py']
doconv_cfg = dict(type='DOConv')
stage_target_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                     [0.033, 0.033, 0.067, 0.067]]
model = dict(
    neck=dict(conv_cfg=doconv_cfg),
    rpn_head=dict(type='ConvCfgRPNHead', conv_cfg=doconv_cfg),
    # a list replaces the base's whole: the base's three heads plus conv_cfg
    roi_head=dict(bbox_head=[
        dict(
            type='Shared4Conv1FCBBoxHead',
            in_channels=256,
            conv_out_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            conv_cfg=doconv_cfg,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0., 0., 0., 0.],
                target_stds=stds),
            reg_class_agnostic=True,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
        for stds in stage_target_stds
    ]))
