# The `make demo` model: UperNet on RepLKNet 'tiny' (kernels 31/29/27/13, channels
# 16-128) with DO-Conv in the backbone (stem, transitions, 5x5 small kernels of
# every stage) and in the decode and auxiliary heads. Trained on CPU on the
# generated demo set; FusedEvalHook (from the base) validates a fused copy.
# Data, schedule and runtime: the plain-conv baseline config this inherits from.
_base_ = ['./upernet_r18-tiny_1xb8-600i_demoade-64x64.py']

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
