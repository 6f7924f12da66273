# DO-Conv in backbone and heads: stages 2-4 (c3-c5) of ResNet-50-V1c
# (DOResNetV1c) and every conv of UperNet and the FCN auxiliary head.
# Everything else is the plain baseline
# upernet_r50_4xb4-40k_voc12aug-512x512.py beside it.
_base_ = ['./upernet_r50_4xb4-40k_voc12aug-512x512.py']
doconv_cfg = dict(type='DOConv')
model = dict(
    backbone=dict(
        type='DOResNetV1c',
        stage_with_doconv=(False, True, True, True),
        doconv_cfg=doconv_cfg),
    decode_head=dict(conv_cfg=doconv_cfg),
    auxiliary_head=dict(conv_cfg=doconv_cfg))
