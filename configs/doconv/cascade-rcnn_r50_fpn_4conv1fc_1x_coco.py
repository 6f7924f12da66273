# Plain-conv baseline for the DO-Conv *head* variants: the Cascade R-CNN
# baseline beside it with conv RoI box heads (4 shared 3x3 convs + 1 FC,
# mmdet's Shared4Conv1FCBBoxHead) in all three stages instead of 2 FCs, so
# that "DO-Conv in the head" has 3x3 convs to act on. The stages keep mmdet's
# target stds, class-agnostic regression and smooth-L1 loss.
_base_ = ['./cascade-rcnn_r50_fpn_1x_coco.py']
stage_target_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                     [0.033, 0.033, 0.067, 0.067]]
model = dict(
    roi_head=dict(bbox_head=[
        dict(
            type='Shared4Conv1FCBBoxHead',
            in_channels=256,
            conv_out_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
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
