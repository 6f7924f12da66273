"""RepLKNet backbone: shapes, official key layout and parameter counts, re-parameterisation,
DO-Conv stages, OpenMMLab training behaviour, and UperNet / Faster / Cascade R-CNN with it."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import downstream
import reparam_mm  # noqa: F401  (registers everything)
from reparam_mm.backbones.replknet import ReparamLargeKernelConv, RepLKNet
from reparam_mm.fuse import fuse
from reparam_mm.layers.doconv import DOConv2d
from reparam_mm.layers.large_kernel import LargeKernelDWConv2d, dispatch_mode
from reparam_mm.scope import ConfigError

OFFICIAL = {  # arch: (large kernels, layers, channels, small kernel, dw_ratio, classifier params)
    '31B': ((31, 29, 27, 13), (2, 2, 18, 2), (128, 256, 512, 1024), 5, 1, 79_864_168),
    '31L': ((31, 29, 27, 13), (2, 2, 18, 2), (192, 384, 768, 1536), 5, 1, 172_671_016),
    'XL': ((27, 27, 27, 13), (2, 2, 18, 2), (256, 512, 1024, 2048), None, 1.5, 335_435_752),
    'tiny': ((31, 29, 27, 13), (1, 1, 2, 1), (16, 32, 64, 128), 5, 1, None),
}


def official_state_shapes(arch, classifier=True, num_classes=1000):
    """Key -> shape of the authors' RepLKNet state dict, written from their module layout."""
    lks, layers, channels, small, dw_ratio, _ = OFFICIAL[arch]
    sd = {}

    def bn(p, c):
        sd.update({f'{p}.weight': (c, ), f'{p}.bias': (c, ), f'{p}.running_mean': (c, ),
                   f'{p}.running_var': (c, ), f'{p}.num_batches_tracked': ()})

    def conv_bn(p, cin, cout, k, groups=1):
        sd[f'{p}.conv.weight'] = (cout, cin // groups, k, k)
        bn(f'{p}.bn', cout)

    c0 = channels[0]
    conv_bn('stem.0', 3, c0, 3)
    conv_bn('stem.1', c0, c0, 3, c0)
    conv_bn('stem.2', c0, c0, 1)
    conv_bn('stem.3', c0, c0, 3, c0)
    for s, (k, n, c) in enumerate(zip(lks, layers, channels)):
        dw = int(c * dw_ratio)
        for i in range(n):
            p = f'stages.{s}.blocks.{2 * i}'
            bn(f'{p}.prelkb_bn', c)
            conv_bn(f'{p}.pw1', c, dw, 1)
            conv_bn(f'{p}.large_kernel.lkb_origin', dw, dw, k, dw)
            if small:
                conv_bn(f'{p}.large_kernel.small_conv', dw, dw, small, dw)
            conv_bn(f'{p}.pw2', dw, c, 1)
            p = f'stages.{s}.blocks.{2 * i + 1}'
            bn(f'{p}.preffn_bn', c)
            conv_bn(f'{p}.pw1', c, 4 * c, 1)
            conv_bn(f'{p}.pw2', 4 * c, c, 1)
        if s + 1 < len(channels):
            conv_bn(f'transitions.{s}.0', c, channels[s + 1], 1)
            conv_bn(f'transitions.{s}.1', channels[s + 1], channels[s + 1], 3, channels[s + 1])
    if classifier:
        bn('norm', channels[-1])
        sd['head.weight'], sd['head.bias'] = (num_classes, channels[-1]), (num_classes, )
    return sd


def n_params(shapes):
    """Parameters of a key->shape table (BN running statistics are buffers)."""
    total = 0
    for k, shape in shapes.items():
        if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            total += torch.Size(shape).numel()
    return total


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith('num_batches_tracked'):
            out[k] = torch.tensor(7)
        elif k.endswith('running_var'):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g) * 0.2
    return out


@torch.no_grad()
def randomize(model, seed=0):
    """Random weights and BN statistics (and non-zero DO-Conv D) so merges are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        elif isinstance(m, DOConv2d) and m.D is not None:
            m.D.copy_(torch.randn(m.D.shape, generator=g) * 0.1)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(**kwargs):
    kwargs.setdefault('arch', 'tiny')
    return RepLKNet(**kwargs)


# -- shapes and arguments -------------------------------------------------------------------------
@pytest.mark.parametrize('size,expected', [((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
                                           ((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)])])
def test_output_shapes_every_stage(size, expected):
    model = tiny(out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape) for o in outs] == [(1, c, *hw) for c, hw in zip((16, 32, 64, 128),
                                                                           expected)]


@pytest.mark.parametrize('out_indices,stages', [((0, ), [0]), ((1, 3), [1, 3]), ((-1, ), [3]),
                                                (2, [2]), ((3, 0), [0, 3])])
def test_out_indices_select_stages(out_indices, stages):
    full = randomize(tiny()).eval()
    part = tiny(out_indices=out_indices).eval()
    part.load_state_dict(full.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, outs = full(x), part(x)
    assert len(outs) == len(stages)
    for o, s in zip(outs, stages):
        torch.testing.assert_close(o, ref[s])


def test_tiny_arch_is_small_and_keeps_the_large_kernels():
    # Speed is measured in `make bench`, never asserted here; size is deterministic.
    model = tiny()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    kernels = sorted({m.kernel_size[0] for m in model.modules()
                      if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size[0] > 5})
    assert kernels == [13, 27, 29, 31]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@dispatch_mode('fixed')
def test_cpu_layout_rule_inside_and_the_callers_layout_outside(monkeypatch, dtype):
    """Fixed rules: fp32: NCHW inside, 31/29/27 through FFTs, 13x13 per call in channels_last.
    bf16 (no FFT): the whole forward in channels_last, every conv in oneDNN's NHWC but the 31x31
    of stage 1, whose 16 channels stall oneDNN's bf16 NHWC depthwise conv on AMD: NCHW."""
    import torch.nn.functional as F

    from reparam_mm.layers import large_kernel
    model = randomize(tiny()).eval().to(dtype)
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    seen, real = [], F.conv2d
    ffts, real_fft = [], large_kernel.fft_depthwise_conv2d

    def spy(inp, weight, *args):
        seen.append((weight.shape[-1], weight.shape[0], weight.shape[1],
                     inp.is_contiguous(memory_format=torch.channels_last)))
        return real(inp, weight, *args)

    with torch.no_grad():
        monkeypatch.setattr(F, 'conv2d', spy)
        monkeypatch.setattr(large_kernel, 'fft_depthwise_conv2d',
                            lambda *a: ffts.append(a[1].shape[-1]) or real_fft(*a))
        outs = model(x)
        monkeypatch.undo()
        if dtype == torch.float32:
            assert sorted(set(ffts)) == [27, 29, 31]
            assert {cl for k, *_, cl in seen if k >= 11} == {True}  # 13x13: per-call channels_last
            assert {cl for k, *_, cl in seen if k < 11} == {False}  # the rest NCHW
        else:
            assert not ffts and len(seen) > 20
            nchw = {(k, c, g) for k, c, g, cl in seen if not cl}
            assert nchw == {(31, 16, 1)}, nchw  # depthwise: (C, 1, k, k)
        assert all(o.is_contiguous() for o in outs)  # NCHW in, NCHW out
        outs_cl = model(x.contiguous(memory_format=torch.channels_last))
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs_cl)
        monkeypatch.setattr(large_kernel, 'backbone_channels_last', lambda t: False)
        monkeypatch.setattr(large_kernel, 'CHANNELS_LAST_MIN_KERNEL', 10 ** 9)
        monkeypatch.setattr(large_kernel, 'FFT_MIN_KERNEL', 10 ** 9)
        ref = model(x)  # all NCHW direct convolution, as the authors' code runs
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for o, c, r in zip(outs, outs_cl, ref):
        assert rel_err(o.float(), r.float()) < tol and rel_err(c.float(), r.float()) < tol


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(arch='31X'), ValueError, "arch '31X' is unknown; use one of 31B, 31L, XL, tiny"),
    (dict(arch=dict(layers=(1, ), channels=(8, ))), ValueError, 'missing'),
    (dict(arch=dict(large_kernel_sizes=(7, ), layers=(1, 1), channels=(8, 16), small_kernel=3,
                    dw_ratio=1)), ValueError, 'same non-zero length'),
    (dict(arch=['31B']), TypeError, 'str or a dict'),
    (dict(out_indices=(4, )), ValueError, r'out_indices=\(4,\) must be'),
    (dict(out_indices=()), ValueError, 'non-empty'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages=5'),
    (dict(stage_with_doconv=(True, False)), ConfigError, 'one bool per stage'),
    # each was a TypeError, a KeyError naming None, or accepted as truthy ('yes'), before
    (dict(stage_with_doconv=True), ConfigError,
     r'^stage_with_doconv=True must hold one bool per stage \(4\), e\.g\. \(True, True, True, True\)'),
    (dict(stage_with_doconv=('yes', 0, 0, 0)), ConfigError, 'one bool per stage'),
    (dict(frozen_stages=None), ConfigError, r'^frozen_stages=None must be an integer in \[-1, 4\]'),
    (dict(stage_with_doconv=(True, ) * 4, doconv_cfg=dict(type='DOConvv')), ConfigError,
     r"^doconv_cfg type 'DOConvv' is not a registered conv layer: use type='DOConv'"),
    (dict(stage_with_doconv=(True, ) * 4, doconv_cfg=dict(type='DOConv', D_mul=4)), ConfigError,
     r'^DOConv2d: D_mul=4 is invalid for a 3x3 kernel'),
    (dict(arch=dict(large_kernel_sizes=(7, ), layers=(1, ), channels=(8, ), small_kernel=4,
                    dw_ratio=1), out_indices=0), ValueError, 'must be odd'),
    (dict(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='a.pth')),
     ValueError, 'not both'),
    (dict(init_cfg=dict(type='Pretrained')), ValueError, "needs a 'checkpoint'"),
    (dict(init_cfg='a.pth'), TypeError, "init_cfg must be a dict"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tiny(**kwargs)


def test_drop_path_is_linearly_spaced():
    model = tiny(drop_path_rate=0.4)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s.blocks[::2]]
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3, 0.4])
    ffn = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s.blocks[1::2]]
    assert ffn == rates


# -- parameter counts and the official key layout ----------------------------------------------------
@pytest.mark.parametrize('arch', ['31B', '31L', 'XL'])
def test_parameter_counts_match_official(arch):
    shapes = official_state_shapes(arch)
    assert n_params(shapes) == OFFICIAL[arch][-1]  # our key table reproduces the published count
    with torch.device('meta'):
        model = RepLKNet(arch=arch, out_indices=(0, 1, 2, 3))
    backbone = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert backbone == official_state_shapes(arch, classifier=False)
    if arch == '31B':
        assert sum(p.numel() for p in model.parameters()) == 78_837_120


def test_xl_intermediate_norms_are_extra_keys():
    with torch.device('meta'):
        model = RepLKNet(arch='XL', norm_intermediate_features=True)
    extra = set(model.state_dict()) - set(official_state_shapes('XL'))
    assert extra == {f'stages.{s}.norm.{n}' for s in range(4)
                     for n in ('weight', 'bias', 'running_mean', 'running_var',
                               'num_batches_tracked')}


def _save(tmp_path, obj, name='ckpt.pth'):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize('wrap', ['model', 'state_dict', 'plain'])
def test_official_checkpoint_loads_with_only_classifier_left_over(tmp_path, wrap):
    state = random_state(official_state_shapes('tiny'))
    assert any(k.startswith('head.') for k in state) and 'norm.weight' in state
    path = _save(tmp_path, state if wrap == 'plain' else {wrap: state, 'epoch': 3})
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    own = model.state_dict()
    leftover = set(state) - set(own)
    assert leftover == {k for k in state if k.startswith(('norm.', 'head.'))}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_checkpoint_with_prefix_and_intermediate_norms(tmp_path):
    state = random_state(official_state_shapes('tiny', classifier=False))
    path = _save(tmp_path, {'state_dict': {f'backbone.{k}': v for k, v in state.items()}})
    model = tiny(norm_intermediate_features=True,
                 init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    norm_before = model.stages[0].norm.weight.clone()
    model.init_weights()  # the new stages.i.norm keep their initial values
    assert torch.equal(model.stages[0].norm.weight, norm_before)
    assert torch.equal(model.stem[0].conv.weight, state['stem.0.conv.weight'])


def test_deprecated_pretrained_argument(tmp_path):
    state = random_state(official_state_shapes('tiny'))
    path = _save(tmp_path, {'model': state})
    with pytest.warns(UserWarning, match='pretrained is deprecated'):
        model = tiny(pretrained=path)
    model.init_weights()
    assert torch.equal(model.stages[3].blocks[0].pw1.conv.weight,
                       state['stages.3.blocks.0.pw1.conv.weight'])


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    state = random_state(official_state_shapes('tiny'))
    del state['stages.1.blocks.0.pw1.bn.running_var']
    state['stages.1.blocks.0.pw3.conv.weight'] = torch.zeros(1)
    state['stem.0.conv.weight'] = torch.zeros(16, 3, 5, 5)
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=_save(tmp_path, state)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        model.init_weights()
    msg = str(err.value)
    for needle in ('1 missing keys (stages.1.blocks.0.pw1.bn.running_var)',
                   '1 unexpected keys (stages.1.blocks.0.pw3.conv.weight)',
                   '1 shape mismatches (stem.0.conv.weight (16, 3, 5, 5) vs (16, 3, 3, 3))'):
        assert needle in msg
    for k, v in model.state_dict().items():  # nothing was partially loaded
        assert torch.equal(v, before[k])


def test_missing_checkpoint_file_and_bad_prefix(tmp_path):
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        model.init_weights()
    path = _save(tmp_path, random_state(official_state_shapes('tiny')))
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone'))
    with pytest.raises(ValueError, match="no key .* starts with prefix 'backbone.'"):
        model.init_weights()


# -- re-parameterisation ---------------------------------------------------------------------------------
def _merge_check(model, x):
    model = randomize(model).eval()
    with torch.no_grad():
        ref = model(x)
        fused = fuse(copy.deepcopy(model))
        outs = fused(x)
    for o, r in zip(outs, ref):
        assert rel_err(o, r) < 1e-5
    return fused, ref


def test_fused_equals_unfused_and_fusing_twice_is_a_no_op():
    x = torch.randn(2, 3, 64, 64)
    fused, ref = _merge_check(tiny(), x)
    blocks = [m for m in fused.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert len(blocks) == 5 and all(b.is_fused for b in blocks)
    assert not any(n.endswith(('lkb_origin', 'small_conv')) for n, _ in fused.named_modules())
    lk = fused.stages[0].blocks[0].large_kernel.lkb_reparam
    assert isinstance(lk, LargeKernelDWConv2d) and lk.bias is not None
    assert lk.weight.shape == (16, 1, 31, 31)
    state = copy.deepcopy(fused.state_dict())
    assert blocks[0].to_fused() is blocks[0]
    fuse(fused)
    assert all(torch.equal(v, state[k]) for k, v in fused.state_dict().items())
    assert set(fused.state_dict()) == set(state)


def test_merge_without_small_kernel_and_dw_ratio():
    arch = dict(large_kernel_sizes=(7, 9), layers=(1, 1), channels=(8, 16), small_kernel=None,
                dw_ratio=1.5)
    _merge_check(RepLKNet(arch=arch, out_indices=(0, 1)), torch.randn(1, 3, 32, 32))


def test_fuse_in_place_and_train_mode_refusal():
    model = randomize(tiny())
    with pytest.raises(RuntimeError, match='eval'):
        model.stages[0].blocks[0].large_kernel.to_fused()
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert fuse(model) is model
        out = model(x)
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(out, ref))
    assert all(b.is_fused for b in model.modules() if isinstance(b, ReparamLargeKernelConv))


def test_merged_structure_loads_merged_checkpoint(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    fused, ref = _merge_check(tiny(), x)
    path = _save(tmp_path, {'state_dict': fused.state_dict()})
    deploy = tiny(small_kernel_merged=True, init_cfg=dict(type='Pretrained', checkpoint=path))
    assert set(deploy.state_dict()) == set(fused.state_dict())
    deploy.init_weights()
    deploy.eval()
    with torch.no_grad():
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(deploy(x), ref))
    # and the mismatched direction says which structure to build
    unmerged = tiny(init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match=r'it is fused \(a deploy checkpoint\): build with small_kernel_merged=True'):
        unmerged.init_weights()
    official = _save(tmp_path, random_state(official_state_shapes('tiny')), 'official.pth')
    deploy = tiny(small_kernel_merged=True, init_cfg=dict(type='Pretrained', checkpoint=official))
    with pytest.raises(ValueError, match=r'it is unfused \(a training checkpoint\): build with small_kernel_merged=False'):
        deploy.init_weights()


def test_merge_after_mmcv_conv_bn_folding():
    from mmcv.cnn import fuse_conv_bn
    x = torch.randn(1, 3, 64, 64)
    model = randomize(tiny()).eval()
    with torch.no_grad():
        ref = model(x)
        folded = fuse_conv_bn(copy.deepcopy(model))  # BNs become Identity, convs get biases
        assert isinstance(folded.stages[0].blocks[0].large_kernel.lkb_origin.bn, nn.Identity)
        out = fuse(folded)(x)
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(out, ref))


def test_merge_needs_batchnorm():
    model = tiny(norm_cfg=dict(type='GN', num_groups=4)).eval()
    with pytest.raises(TypeError, match='needs BatchNorm running statistics'):
        model.stages[0].blocks[0].large_kernel.to_fused()


# -- DO-Conv stages ------------------------------------------------------------------------------------
def test_doconv_placement():
    model = tiny(stage_with_doconv=(True, False, True, False))
    do = {n for n, m in model.named_modules() if isinstance(m, DOConv2d)}
    assert do == {'stem.0.conv', 'stem.1.conv', 'stem.3.conv',
                  'stages.0.blocks.0.large_kernel.small_conv.conv',
                  'transitions.1.1.conv',
                  'stages.2.blocks.0.large_kernel.small_conv.conv',
                  'stages.2.blocks.2.large_kernel.small_conv.conv'}
    assert model.stem[0].conv.kernel_size == (3, 3) and model.stem[1].conv.groups == 16
    assert model.stages[0].blocks[0].large_kernel.small_conv.conv.groups == 16
    assert isinstance(model.stages[0].blocks[0].large_kernel.lkb_origin.conv, LargeKernelDWConv2d)
    deploy = tiny(stage_with_doconv=(True, ) * 4, small_kernel_merged=True)
    assert not any(isinstance(m, DOConv2d) for m in deploy.modules())


def test_doconv_merge_uses_the_composed_kernel():
    x = torch.randn(2, 3, 64, 64)
    model = randomize(tiny(stage_with_doconv=(True, ) * 4), seed=1).eval()
    with torch.no_grad():
        ref = model(x)
        fused = fuse(copy.deepcopy(model))  # post-order: DO-Conv fused before the block
        assert not any(isinstance(m, DOConv2d) for m in fused.modules())
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(fused(x), ref))
        # a block fused on its own (no walker) fuses its DO-Conv child first, too
        direct = copy.deepcopy(model)
        for m in direct.modules():
            if isinstance(m, ReparamLargeKernelConv):
                m.to_fused()
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(direct(x), ref))


def test_official_checkpoint_loads_into_doconv_stages(tmp_path):
    state = random_state(official_state_shapes('tiny'))
    path = _save(tmp_path, state)
    plain = tiny(init_cfg=dict(type='Pretrained', checkpoint=path))
    do = tiny(stage_with_doconv=(True, ) * 4, init_cfg=dict(type='Pretrained', checkpoint=path))
    plain.init_weights()
    do.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(do.eval()(x), plain.eval()(x)):
            assert rel_err(a, b) < 1e-5


# -- OpenMMLab training behaviour ---------------------------------------------------------------------
def test_frozen_stages():
    model = tiny(frozen_stages=2)
    model.train()
    frozen = ['stem', 'stages.0', 'stages.1', 'transitions.0']
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(tuple(f + '.' for f in frozen))), name
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            assert m.training == (not name.startswith(tuple(f + '.' for f in frozen))), name
    assert all(p.requires_grad for p in tiny(frozen_stages=-1).parameters())
    stem_only = tiny(frozen_stages=0)
    assert not any(p.requires_grad for p in stem_only.stem.parameters())
    assert all(p.requires_grad for p in stem_only.stages.parameters())


def test_norm_eval_keeps_statistics_but_trains_weights():
    model = randomize(tiny(norm_eval=True)).train()
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    stats = model.stem[0].bn.running_mean.clone()
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(model.stem[0].bn.running_mean, stats)
    assert model.stem[0].bn.weight.grad is not None


def test_with_cp_matches_plain_forward_and_backward():
    plain = randomize(tiny(drop_path_rate=0.2)).train()
    cp = tiny(drop_path_rate=0.2, with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, cp):
        torch.manual_seed(0)  # same drop-path masks
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_syncbn_config_builds_everywhere():
    model = tiny(norm_cfg=dict(type='SyncBN'), norm_intermediate_features=True)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert len(norms) == sum(isinstance(m, _BatchNorm)
                             for m in tiny(norm_intermediate_features=True).modules())
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert len(outs) == 4


def test_registered_in_root_models():
    from mmengine.registry import MODELS
    model = MODELS.build(dict(type='RepLKNet', arch='tiny', out_indices=(3, )))
    assert isinstance(model, RepLKNet) and model.out_indices == (3, )


@pytest.mark.slow
def test_official_31b_checkpoint_loads_into_the_backbone(tmp_path):
    """The must-show: official 31B ImageNet keys load with only norm.* / head.* left over (~5 s)."""
    shapes = official_state_shapes('31B')
    state = {k: torch.full(s, 7) if k.endswith('tracked') else torch.empty(s).uniform_(0.5, 1)
             for k, s in shapes.items()}
    path = _save(tmp_path, {'model': state})
    with torch.device('meta'):  # skip the random init of 79M values: everything is loaded
        model = RepLKNet(arch='31B', out_indices=(0, 1, 2, 3),
                         init_cfg=dict(type='Pretrained', checkpoint=path))
    model.to_empty(device='cpu')
    assert sum(p.numel() for p in model.parameters()) == 78_837_120
    model.init_weights()
    own = model.state_dict()
    assert set(state) - set(own) == {'norm.weight', 'norm.bias', 'norm.running_mean',
                                     'norm.running_var', 'norm.num_batches_tracked',
                                     'head.weight', 'head.bias'}
    assert set(own) <= set(state)
    assert all(torch.equal(v, state[k]) for k, v in own.items())


# -- downstream: mmseg UperNet, mmdet Faster / Cascade R-CNN with the tiny arch --------------------
def _lk_weight(model):
    return model.backbone.stages[0].blocks[0].large_kernel.lkb_origin.conv.weight


def test_upernet_mmseg_loss_and_predict():
    downstream.upernet_train_predict_fuse(
        dict(type='RepLKNet', arch='tiny', drop_path_rate=0.1, with_cp=True), moves=_lk_weight)


@pytest.mark.parametrize('base', ['faster-rcnn_r50_fpn.py', 'cascade-rcnn_r50_fpn.py'])
def test_rcnn_mmdet_loss_and_predict(base):
    log_vars = downstream.rcnn_train_predict(
        base, dict(type='RepLKNet', arch='tiny', drop_path_rate=0.1, frozen_stages=0,
                   norm_eval=True), moves=_lk_weight)
    assert any(k.endswith('loss_cls') and k != 'loss_rpn_cls' for k in log_vars)
