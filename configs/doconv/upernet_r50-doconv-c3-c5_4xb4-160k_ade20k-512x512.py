# DO-Conv in the backbone only: ResNet-50-V1c whose stages 2-4 (c3-c5) use
# DO-Conv (DOResNetV1c); UperNet and the FCN auxiliary head stay plain.
# Everything else is the plain baseline
# upernet_r50_4xb4-160k_ade20k-512x512.py beside it.
# Plain ImageNet ResNet-50-V1c weights load into DO-Conv layers exactly
# (W takes the kernel, D starts at zero), so the start point is the baseline's.
_base_ = ['./upernet_r50_4xb4-160k_ade20k-512x512.py']
model = dict(
    backbone=dict(
        type='DOResNetV1c',
        stage_with_doconv=(False, True, True, True),
        doconv_cfg=dict(type='DOConv')))
