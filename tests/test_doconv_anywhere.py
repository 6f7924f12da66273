"""``type='WithDOConv'``: DO-Conv in backbones, necks and heads that were not written for it.

mmseg's MobileNetV2 (depthwise: DO-DConv) and mmdet's RegNet (grouped: DO-GConv), small widths.
"""
import copy

import pytest
import torch
import torch.nn as nn

import reparam_mm  # noqa: F401  (registers WithDOConv, DOConv)
from reparam_mm.fuse import fuse
from reparam_mm.layers import DOConv2d, convert_to_doconv, doconv_kinds

MOBILENET = dict(type='MobileNetV2', widen_factor=0.25, out_indices=(1, 2, 4, 6))
REGNET = dict(type='RegNet', arch=dict(w0=16, wa=24.0, wm=2.0, group_w=8, depth=5, bot_mul=1.0),
              base_channels=8, stem_channels=8, out_indices=(0, 1, 2, 3))
CASES = {
    # scope, plain config, DO-Conv kinds of the whole backbone
    'mmseg-MobileNetV2': ('mmseg', MOBILENET, {'DO-Conv': 1, 'DO-DConv': 17}),
    'mmdet-RegNet': ('mmdet', REGNET, {'DO-Conv': 1, 'DO-GConv': 5}),
}


def build(scope, cfg, seed=0):
    """Build in ``scope``'s registry; the default scope is set too, since mmengine resolves
    types in the current default scope first (another test may have left mmdet's)."""
    import importlib

    from mmengine.registry import DefaultScope
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(scope):
        return importlib.import_module(f'{scope}.registry').MODELS.build(copy.deepcopy(cfg))


@torch.no_grad()
def random_bn(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('case', CASES)
def test_plain_checkpoint_loads_and_fused_equals_trained(case, tmp_path):
    scope, plain_cfg, kinds = CASES[case]
    plain = random_bn(build(scope, plain_cfg))
    plain.eval()  # (OpenMMLab backbones' train() returns None)
    ckpt = tmp_path / 'plain.pth'
    torch.save({'state_dict': plain.state_dict()}, ckpt)

    cfg = dict(type='WithDOConv', module=dict(
        plain_cfg, init_cfg=dict(type='Pretrained', checkpoint=str(ckpt))))
    do = build(scope, cfg, seed=1)  # another seed: only the checkpoint can make them equal
    assert type(do) is type(plain) and doconv_kinds(do) == kinds
    # state-dict keys: the plain ones, a conv's weight -> W plus D, no prefix
    d_keys = sorted(k for k in do.state_dict() if k.endswith('.D'))
    assert len(d_keys) == sum(kinds.values())
    assert set(do.state_dict()) - set(d_keys) == {
        k[:-len('weight')] + 'W' if k[:-len('.weight')] + '.D' in d_keys else k
        for k in plain.state_dict()}
    result = copy.deepcopy(do).load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == d_keys and result.unexpected_keys == []

    do.init_weights()  # the Pretrained init_cfg of the wrapped module, as the runner does it
    do.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(do(x), plain(x)):  # equal at start: D = 0 composes exactly the plain kernel
            assert rel_err(a, b) < 1e-5

    # one training step moves W and D; the fused (plain) network equals the trained one
    do.train()
    opt = torch.optim.SGD(do.parameters(), lr=0.05)
    loss = sum(o.square().mean() for o in do(x))
    loss.backward()
    opt.step()
    assert all(m.D.abs().max() > 0 for m in do.modules() if isinstance(m, DOConv2d))
    do.eval()
    with torch.no_grad():
        trained = do(x)
        fused = fuse(copy.deepcopy(do))
        assert not any(isinstance(m, DOConv2d) for m in fused.modules())
        for a, b in zip(fused(x), trained):
            assert rel_err(a, b) < 1e-5
        # the fused weights are a checkpoint of the plain architecture (strict load)
        plain.load_state_dict(fused.state_dict(), strict=True)
        for a, b in zip(plain(x), trained):
            assert rel_err(a, b) < 1e-5


def test_include_exclude_and_frozen_stages():
    plain_cfg = dict(MOBILENET, frozen_stages=1)
    model = build('mmseg', dict(type='WithDOConv', module=plain_cfg, exclude=['conv1'],
                                doconv_cfg=dict(type='DOConv', D_mul=12)))
    assert type(model.conv1.conv) is nn.Conv2d  # the stem stays plain
    assert doconv_kinds(model) == {'DO-DConv': 17}
    assert model.layer7[0].conv[1].conv.D_mul == 12
    model.train()  # MobileNetV2 freezes there (mmdet's ResNet already in __init__: DOResNet test)
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    only = build('mmseg', dict(type='WithDOConv', module=MOBILENET, include=['layer7.*.conv.1']))
    converted = [n for n, m in only.named_modules() if isinstance(m, DOConv2d)]
    assert converted == ['layer7.0.conv.1.conv']


def test_a_converted_conv_keeps_requires_grad_mode_dtype_and_padding_mode():
    frozen = nn.Conv2d(3, 4, 3, padding=1, padding_mode='reflect').double().requires_grad_(False)
    model = nn.Sequential(frozen, nn.Conv2d(4, 4, 3, groups=4, bias=False).double()).eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    ref, plain_state = model(x), copy.deepcopy(model.state_dict())
    assert convert_to_doconv(model) == ['0', '1']
    assert all(isinstance(m, DOConv2d) and not m.training for m in model)
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[1].parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model[0].padding_mode == 'reflect'
    missing, unexpected = model.load_state_dict(plain_state, strict=False)
    assert missing == ['0.D', '1.D'] and unexpected == []
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('kwargs,match', [
    (dict(include=['layer9']), r"include pattern\(s\) \['layer9'\] match no k>1 conv of "
                               r"MobileNetV2; its k>1 convs are named like \['conv1.conv'"),
    (dict(exclude=['stem']), r"exclude pattern\(s\) \['stem'\] match no k>1 conv"),
    (dict(include=['layer1', 7]), r"include=\['layer1', 7\] must be a list of module-name patterns"),
    (dict(exclude=['']), r"exclude=\[''\] must be a list of module-name patterns"),
    (dict(include='layer1', doconv_cfg='DOConv'),
     "doconv_cfg='DOConv' must be a dict with a 'type'"),
    (dict(doconv_cfg=dict(type='DOConv', D_mul=4)), r'D_mul=4 is invalid for a 3x3 kernel'),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build('mmseg', dict(type='WithDOConv', module=MOBILENET, **kwargs))


def test_conv_subclasses_are_refused_before_anything_changes():
    from mmcv.cnn.bricks.conv_ws import ConvWS2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ConvWS2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"'1' is a ConvWS2d, but DO-Conv replaces plain "):
        convert_to_doconv(model)
    assert type(model[0]) is nn.Conv2d  # nothing replaced
    assert convert_to_doconv(model, exclude=['1']) == ['0'] and isinstance(model[0], DOConv2d)


def test_segmentor_backbone_and_head_converted_from_the_config(tmp_path):
    """mmseg's MobileNetV2 configs set ``pretrained`` on the model, which mmseg copies into the
    backbone config: it reaches the wrapped module. The same type converts a head."""
    from mmengine.config import Config

    from reparam_mm.apis import build_model, deploy_config

    plain = build('mmseg', MOBILENET)
    ckpt = tmp_path / 'mobilenet.pth'
    torch.save({'state_dict': plain.state_dict()}, ckpt)
    norm = dict(type='BN', requires_grad=True)
    cfg = Config(dict(default_scope='mmseg', model=dict(
        type='EncoderDecoder', pretrained=str(ckpt),
        data_preprocessor=dict(type='SegDataPreProcessor', size=(32, 32)),
        backbone=dict(type='WithDOConv', module=dict(MOBILENET, norm_cfg=norm)),
        decode_head=dict(type='WithDOConv', module=dict(
            type='FCNHead', in_channels=80, channels=16, num_convs=2, num_classes=3,
            in_index=3, norm_cfg=norm)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))))
    model = build_model(cfg)
    assert type(model.backbone).__name__ == 'MobileNetV2'
    assert doconv_kinds(model.decode_head) == {'DO-Conv': 3}  # convs.0, convs.1, conv_cat
    model.init_weights()
    assert torch.equal(model.backbone.layer7[0].conv[1].conv.W[..., :9].flatten(2),
                       plain.layer7[0].conv[1].conv.weight.flatten(2))
    random_bn(model).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, mode='tensor')
        fused = fuse(copy.deepcopy(model))
    # the deploy config builds the wrapped modules plain; the fused weights load strictly
    dcfg, changes = deploy_config(cfg)
    assert 'model.backbone: WithDOConv -> MobileNetV2 (plain convs)' in changes
    assert dcfg.model.backbone.type == 'MobileNetV2' and dcfg.model.decode_head.type == 'FCNHead'
    dcfg.model.pretrained = None
    deploy = build_model(dcfg)
    deploy.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        deploy.eval()
        assert rel_err(deploy(x, mode='tensor'), ref) < 1e-5
