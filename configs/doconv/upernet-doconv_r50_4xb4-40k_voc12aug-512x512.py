# DO-Conv in the heads only: every conv of UperNet (PPM, lateral, FPN and
# bottleneck convs) and of the FCN auxiliary head is DO-Conv (1x1 convs have
# no D and stay plain convs in effect); the ResNet-50-V1c backbone is plain.
# Everything else is the plain baseline
# upernet_r50_4xb4-40k_voc12aug-512x512.py beside it.
_base_ = ['./upernet_r50_4xb4-40k_voc12aug-512x512.py']
doconv_cfg = dict(type='DOConv')
model = dict(
    decode_head=dict(conv_cfg=doconv_cfg),
    auxiliary_head=dict(conv_cfg=doconv_cfg))
