# The demo model (UperNet + RepLKNet 'tiny', DO-Conv in backbone and heads) on CamVid:
# data, schedule and runtime of the plain ResNet-18 CamVid config, backbone and heads of
# the demo. tests/test_camvid_real.py trains it for a shorter schedule.
_base_ = ['./upernet_r18-tiny_1xb8-1k_camvid-128x128.py']

norm_cfg = dict(type='BN', requires_grad=True)
doconv = dict(type='DOConv')
model = dict(
    backbone=dict(
        _delete_=True,
        type='RepLKNet',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        norm_cfg=norm_cfg,
        stage_with_doconv=(True, True, True, True),
        doconv_cfg=doconv),
    decode_head=dict(conv_cfg=doconv),
    auxiliary_head=dict(conv_cfg=doconv))
