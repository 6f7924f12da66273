# UperNet on ADE20K (mmseg) with mmpretrain's RepVGG-A0 backbone (its plain
# baseline is the mmseg UperNet R-50 recipe it inherits; mmseg reports 42.05
# mIoU for it), trained in its multi-branch form and validated / tested fused by
# FusedEvalHook: reparam_mm.fuse calls mmpretrain's switch_to_deploy() on every
# block (children first, so DO-Conv layers inside, e.g. from WithDOConv, are
# fused before the block reads their kernels). tools/fuse.py writes the deploy
# config with deploy=True on the backbone and the fused weights, checked against
# the unfused model. No downstream number is reported for this combination by
# mmseg / mmdet; the backbone's ImageNet-1k top-1 in mmpretrain's model zoo is
# 72.37 (repvgg-A0_8xb32_in1k_20221213-60ae8e23.pth). norm_cfg is BN:
# mmpretrain's switch_to_deploy() refuses other norm types. NEEDS mmpretrain
# 1.x, which imports torchvision: a stack where torchvision matches torch (e.g.
# CUDA torch + torchvision + mmpretrain); the CPU stack of this project cannot
# import it (see README), there the config only parses (make test-ecosystem
# trains it a step and exports it, in a venv where mmpretrain imports). The ImageNet weights are
# read from a local file, never downloaded; the classifier checkpoint's backbone
# keys start with 'backbone.'.
_base_ = [
    'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py',
    '../_base_/reparam_mm.py'
]
custom_imports = dict(imports=['reparam_mm', 'mmpretrain.models'], allow_failed_imports=False)
checkpoint_file = 'work_dirs/pretrained/repvgg-A0_8xb32_in1k_20221213-60ae8e23.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmpretrain.RepVGG',
        arch='A0',
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file, prefix='backbone.')),
    decode_head=dict(in_channels=[48, 96, 192, 1280]),
    auxiliary_head=dict(in_channels=192))
