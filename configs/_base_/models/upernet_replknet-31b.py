# RepLKNet-31B + UperNet as in the RepLKNet authors' segmentation configs:
# SyncBN everywhere, UperNet with 512 channels and pool scales (1, 2, 3, 6),
# an FCN auxiliary head on stage 3 with loss weight 0.4. Checkpointing
# (with_cp) trades compute for memory, as the authors did.
# Pretrained weights are set per config (init_cfg=Pretrained, a local file).
_base_ = 'mmseg::_base_/models/upernet_r50.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='RepLKNet',
        arch='31B',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.5,
        with_cp=True,
        small_kernel_merged=False,
        norm_cfg=norm_cfg),
    decode_head=dict(
        in_channels=[128, 256, 512, 1024],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        num_classes=150,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=512,
        in_index=2,
        num_classes=150,
        norm_cfg=norm_cfg,
        loss_decode=dict(loss_weight=0.4)))
