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
                               r"MobileNetV2; its k>1 convs are named like \['conv1.conv', "
                               r"'layer1\.0\.conv\.0\.conv', 'layer2\.0\.conv\.1\.conv'\] and 15 more\.$"),
    (dict(exclude=['stem']), r"exclude pattern\(s\) \['stem'\] match no k>1 conv"),
    (dict(include=['layer1', 7]), r"include=\['layer1', 7\] must be a list of module-name patterns"),
    (dict(exclude=['']), r"exclude=\[''\] must be a list of module-name patterns"),
    (dict(include='layer1', doconv_cfg='DOConv'),
     "doconv_cfg='DOConv' must be a dict with a 'type'"),
    (dict(doconv_cfg=dict(type='DOConv', D_mul=4)),
     r"^WithDOConv on MobileNetV2: 'conv1\.conv' \(3x3 conv\): DOConv2d: D_mul=4 is invalid for "
     r'a 3x3 kernel'),
    (dict(doconv_cfg=dict(type='DOConvv')),
     r"doconv_cfg type 'DOConvv' is not a registered conv layer: use type='DOConv' \(optionally "
     r'with D_mul\)\.$'),
    (dict(include=['layer2'], exclude=['layer2']),
     r"include=\['layer2'\] and exclude=\['layer2'\] together select none of the 18 k>1 convs of "
     r'MobileNetV2: every conv include selects, exclude keeps plain; narrow exclude\.$'),
    (dict(include=['layer2.0.conv.2']),  # its 1x1 projection
     r"include pattern\(s\) \['layer2\.0\.conv\.2'\] match no k>1 conv of MobileNetV2 \(only "
     r"1x1 convs such as 'layer2\.0\.conv\.2\.conv', which DO-Conv leaves plain: a 1x1 kernel has "
     r'nothing to over-parameterise\)'),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    from reparam_mm.cli import input_error_message
    from reparam_mm.scope import ConfigError
    with pytest.raises(ConfigError, match=match) as err:  # a ValueError, printed as one line
        build('mmseg', dict(type='WithDOConv', module=MOBILENET, **kwargs))
    assert input_error_message(err.value) == str(err.value)


def test_wrapped_head_starts_as_the_plain_head_with_its_own_init():
    """RetinaHead initialises its convs with std 0.01 and its classifier's bias at the focal-loss
    prior (-4.6) through init_cfg keyed on layer='Conv2d', which DO layers do not match, and
    mmengine then re-ran their own Kaiming init: RetinaNet started with 70x its plain loss. The
    wrapped head is initialised as the plain module before its convs are converted, so it starts
    as the plain head does with the same seed, and the model's init_weights leaves it there."""
    head = dict(type='RetinaHead', num_classes=3, in_channels=8, stacked_convs=2, feat_channels=8,
                anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                      scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                      strides=[8, 16]),
                bbox_coder=dict(type='DeltaXYWHBBoxCoder'))
    plain = build('mmdet', head, seed=3)
    plain.init_weights()
    wrapped = build('mmdet', dict(type='WithDOConv', module=head), seed=3)
    assert doconv_kinds(wrapped) == {'DO-Conv': 6}
    wrapped.init_weights()  # as the runner does: nothing left to do
    assert wrapped.retina_cls.bias.detach().eq(plain.retina_cls.bias.detach()).all()
    assert wrapped.retina_cls.bias[0].item() == pytest.approx(-4.59512, abs=1e-4)
    assert wrapped.retina_cls.composed_weight().std().item() == pytest.approx(0.01, rel=0.2)
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    for got, want in zip(*(sum(m(feats), []) for m in (wrapped, plain))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_pretrained_entry_still_loads_when_the_model_is_initialised(tmp_path):
    """The wrapped module's own initialisation runs at build time without its Pretrained
    entry (a test run never reads that file), which loads when the model initialises."""
    plain = build('mmseg', MOBILENET, seed=5)
    plain.eval()  # MobileNetV2's train() returns None
    random_bn(plain)
    ckpt = tmp_path / 'plain.pth'
    torch.save({'state_dict': plain.state_dict()}, ckpt)
    cfg = dict(MOBILENET, init_cfg=[dict(type='Kaiming', layer='Conv2d'),
                                    dict(type='Pretrained', checkpoint=str(ckpt))])
    wrapped = build('mmseg', dict(type='WithDOConv', module=cfg), seed=6)
    assert wrapped.init_cfg == dict(type='Pretrained', checkpoint=str(ckpt))  # what is left
    wrapped.init_weights()
    wrapped.eval()
    x = torch.randn(1, 3, 32, 32)
    for got, want in zip(wrapped(x), plain(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_converting_a_built_module_keeps_what_it_computes_and_aliases():
    """convert_to_doconv starts each DO layer as the conv it replaces (a trained module keeps its
    function); a conv registered under two names is replaced under both, by one layer."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, dilation=1)
            self.body = nn.Sequential(self.conv, nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 2, 2, 2))

        def forward(self, x):
            return self.body(x) + self.conv(x)[..., ::2, ::2][..., :self.body(x).shape[-1]]

    model = Aliased().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ref = model(x)
    assert convert_to_doconv(model, doconv_cfg=dict(type='DOConv', D_mul=12)) == ['conv', 'body.2']
    assert model.conv is model.body[0] and isinstance(model.conv, DOConv2d)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)
    model(x).sum().backward()
    assert model.conv.D.grad is not None and model.conv.D.grad.abs().sum() > 0


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
