# DO-Conv in the backbone only: torchvision-style ResNet-50 whose stages 2-4
# (c3-c5) use DO-Conv (DOResNet); FPN, RPN and the RoI head stay plain.
# Everything else is the plain baseline faster-rcnn_r50_fpn_1x_coco.py.
# Plain ImageNet ResNet-50 weights load into DO-Conv layers exactly (W takes
# the kernel, D starts at zero), so the start point is the baseline's.
_base_ = ['./faster-rcnn_r50_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        type='DOResNet',
        stage_with_doconv=(False, True, True, True),
        doconv_cfg=dict(type='DOConv')))
