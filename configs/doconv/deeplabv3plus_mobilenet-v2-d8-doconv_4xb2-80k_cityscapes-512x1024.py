# DO-Conv in a backbone not written for it: every k>1 conv of mmseg's
# MobileNetV2 (the 3x3 stem: DO-Conv; the 17 depthwise 3x3: DO-DConv) is
# converted at build time by WithDOConv; DeepLabV3+ heads stay plain.
# Everything else is the plain baseline
# deeplabv3plus_mobilenet-v2-d8_4xb2-80k_cityscapes-512x1024.py beside it
# (mmseg reports 75.2 mIoU for it). The wrapped MobileNetV2 keeps its class and
# keys, so the same ImageNet checkpoint loads (only the D keys are missing,
# D starts at zero) and the start point is the baseline's. Evaluated fused:
# the fused model is the plain DeepLabV3+ MobileNetV2.
# The checkpoint path is the baseline's checkpoint_file; on the command line it is
#   --cfg-options model.backbone.module.init_cfg.checkpoint=/path/to/it.pth
_base_ = ['./deeplabv3plus_mobilenet-v2-d8_4xb2-80k_cityscapes-512x1024.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='WithDOConv',
        module=_base_.model.backbone,
        doconv_cfg=dict(type='DOConv')))
