# DO-Conv in the neck and heads only ("head" in the DO-Conv paper's backbone /
# head / both comparison): the FPN convs, the RPN's 3x3 conv (ConvCfgRPNHead,
# an RPNHead that honours conv_cfg) and the 4 convs of the conv RoI box head
# (Shared4Conv1FCBBoxHead) are DO-Conv; the ResNet-50 backbone is plain.
# 1x1 convs have no D and stay plain convs in effect. Compare with the plain
# faster-rcnn_r50_fpn_4conv1fc_1x_coco.py, which it extends.
_base_ = ['./faster-rcnn_r50_fpn_4conv1fc_1x_coco.py']
doconv_cfg = dict(type='DOConv')
model = dict(
    neck=dict(conv_cfg=doconv_cfg),
    rpn_head=dict(type='ConvCfgRPNHead', conv_cfg=doconv_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=doconv_cfg)))
