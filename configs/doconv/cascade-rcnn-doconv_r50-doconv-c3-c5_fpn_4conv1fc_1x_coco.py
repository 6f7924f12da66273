# DO-Conv in backbone, neck and heads: the neck / head variant beside it
# (FPN, RPN conv, three conv RoI box heads) plus ResNet-50 stages 2-4 (c3-c5)
# in DO-Conv (DOResNet). Compare with cascade-rcnn_r50_fpn_4conv1fc_1x_coco.py.
_base_ = ['./cascade-rcnn-doconv_r50_fpn_4conv1fc_1x_coco.py']
model = dict(
    backbone=dict(
        type='DOResNet',
        stage_with_doconv=(False, True, True, True),
        doconv_cfg={{_base_.doconv_cfg}}))
