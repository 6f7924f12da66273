# The CamVid run with DO-Conv in the pretrained backbone: WithDOConv turns Lite0's 16 depthwise
# convs into DO-DConv and its 3x3 stem into DO-Conv (1x1 convs have nothing to over-
# parameterise). The ImageNet weights load with only D missing and D starts at zero, so the
# model starts equal to the plain one; validation runs on the fused (plain) model.
_base_ = ['./upernet_efficientnet-lite0-in1k-pre_1xb8-600i_camvid-192x192.py']
model = dict(
    backbone=dict(_delete_=True, type='WithDOConv', module=_base_.model.backbone,
                  doconv_cfg=dict(type='DOConv')))
