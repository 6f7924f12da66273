# DO-Conv in a detection backbone other than ResNet: every k>1 conv of mmdet's
# RegNetX-3.2GF (the 3x3 stem: DO-Conv; the grouped 3x3 of every block:
# DO-GConv) is converted at build time by WithDOConv; FPN, RPN and the RoI head
# stay plain. Everything else is the plain baseline
# faster-rcnn_regnetx-3.2GF_fpn_1x_coco.py beside it (mmdet reports 39.9 box
# AP for it). The wrapped RegNet keeps its class and keys, so the same ImageNet
# checkpoint loads (only the D keys are missing, D starts at zero) and
# frozen_stages=1 freezes the converted stem and stage 1 too.
# The checkpoint path is the baseline's checkpoint_file; on the command line it is
#   --cfg-options model.backbone.module.init_cfg.checkpoint=/path/to/it.pth
_base_ = ['./faster-rcnn_regnetx-3.2GF_fpn_1x_coco.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='WithDOConv',
        module=_base_.model.backbone,
        doconv_cfg=dict(type='DOConv')))
