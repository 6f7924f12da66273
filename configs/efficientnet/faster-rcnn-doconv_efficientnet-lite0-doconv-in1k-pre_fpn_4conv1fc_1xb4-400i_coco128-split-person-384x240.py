# The same run with DO-Conv everywhere it applies: the backbone through WithDOConv (its
# depthwise convs become DO-DConv, the stem and other k>1 convs DO-Conv; the ImageNet
# weights load with only D missing, and D starts at zero, so the model starts equal to the
# plain one), and the 3x3 convs of FPN, RPN and the 4conv box head. Evaluation runs fused.
_base_ = ['./faster-rcnn_efficientnet-lite0-in1k-pre_fpn_4conv1fc_1xb4-400i_coco128-split-person-384x240.py']
doconv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(_delete_=True, type='WithDOConv', module=_base_.model.backbone,
                  doconv_cfg=doconv_cfg),
    neck=dict(conv_cfg=doconv_cfg),
    rpn_head=dict(conv_cfg=doconv_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=doconv_cfg)))
