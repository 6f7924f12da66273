"""DOConv2d against independent references: loop-built kernels, torch's convs, the authors' code."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam_mm  # noqa: F401  (registers DOConv)
from reparam_mm import DOConv2d


def loop_identity(mn, d_mul):
    """I[m, s] = 1 where s < MN * floor(D_mul / MN) and s % MN == m (the authors' d_diag row)."""
    eye = torch.zeros(mn, d_mul, dtype=torch.float64)
    for s in range(mn * (d_mul // mn)):
        eye[s % mn, s] = 1.0
    return eye


def loop_kernel(layer):
    """The issue's formula with explicit loops: K[o,i,m] = sum_s (D+I)[c(o,i),m,s] * W[o,i,s]."""
    W, D = layer.W.detach().double(), layer.D.detach().double()
    cout, cin_g, d_mul = W.shape
    M, N = layer.kernel_size
    eye = loop_identity(M * N, d_mul)
    K = torch.zeros(cout, cin_g, M * N, dtype=torch.float64)
    for o in range(cout):
        group = o // (cout // layer.groups)
        for i in range(cin_g):
            c = group * cin_g + i  # the input channel slice (o, i) convolves
            for m in range(M * N):
                K[o, i, m] = sum((D[c, m, s] + eye[m, s]) * W[o, i, s] for s in range(d_mul))
    return K.reshape(cout, cin_g, M, N)


def authors_kernel(W, D, d_diag, out_channels, in_channels, groups, kernel_size):
    """The authors' composition, verbatim in meaning: einsum over a flat reshape of W."""
    d_mul = W.shape[-1]
    DoW = torch.einsum('ims,ois->oim', D + d_diag, W.reshape(out_channels // groups, in_channels,
                                                             d_mul))
    return DoW.reshape(out_channels, in_channels // groups, *kernel_size)


def authors_d_diag(in_channels, mn, d_mul):
    """The authors' frozen identity, built as their __init__ builds it."""
    eye = torch.eye(mn).reshape(1, mn, mn)
    d_diag = eye.repeat((in_channels, 1, d_mul // mn))
    if d_mul % mn:
        d_diag = torch.cat([d_diag, torch.zeros(in_channels, mn, d_mul % mn)], dim=2)
    return d_diag


def randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


GEOMETRIES = [  # (cin, cout, groups, kernel, D_mul)
    (4, 6, 1, (3, 3), None),
    (4, 6, 1, (3, 2), 7),  # non-square, D_mul not a multiple of M*N
    (4, 6, 2, (3, 3), 18),  # DO-GConv, two identity tiles
    (6, 6, 6, (3, 3), None),  # DO-DConv
    (4, 8, 4, (2, 3), 13),  # depthwise with channel multiplier 2
    (6, 9, 3, (1, 3), 4),  # DO-GConv, 1xN kernel
]


@pytest.mark.parametrize('cin,cout,groups,k,d_mul', GEOMETRIES)
def test_composed_kernel_equals_loop_formula(cin, cout, groups, k, d_mul):
    layer = randomise(DOConv2d(cin, cout, k, groups=groups, D_mul=d_mul).double())
    assert layer.D_mul == (d_mul or k[0] * k[1])
    kernel = layer.composed_weight()
    assert kernel.shape == (cout, cin // groups, *k)
    torch.testing.assert_close(kernel, loop_kernel(layer), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('cin,cout,groups,k,d_mul,stride,padding,dilation', [
    (4, 6, 1, (3, 3), None, 1, 1, 1),
    (4, 6, 2, (3, 2), 9, 2, (1, 2), 1),
    (6, 6, 6, (3, 3), 10, 1, 2, 2),
    (4, 8, 4, (2, 3), None, 1, 'same', 1),
])
def test_forward_equals_torch_conv_with_loop_kernel(cin, cout, groups, k, d_mul, stride, padding,
                                                    dilation, padding_mode):
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
              padding_mode=padding_mode)
    layer = randomise(DOConv2d(cin, cout, k, D_mul=d_mul, **kw).double())
    ref = nn.Conv2d(cin, cout, k, **kw).double()
    with torch.no_grad():
        ref.weight.copy_(loop_kernel(layer))
        ref.bias.copy_(layer.bias)
    x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)


def test_gradcheck_reaches_W_D_bias_and_input():
    layer = randomise(DOConv2d(4, 4, (2, 3), padding=1, groups=2, D_mul=7).double())
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    assert set(params) == {'W', 'D', 'bias'}

    def f(W, D, bias, x):
        return torch.func.functional_call(layer, {'W': W, 'D': D, 'bias': bias}, (x,))

    assert torch.autograd.gradcheck(f, (params['W'], params['D'], params['bias'], x))
    layer(x).square().sum().backward()
    assert layer.W.grad.abs().sum() > 0 and layer.D.grad.abs().sum() > 0


@pytest.mark.parametrize('cin,cout,groups,k,d_mul', [
    (3, 5, 1, (3, 2), 8),  # groups=1: W stored (Cin, D_mul, Cout), one 2-D transpose
    (4, 6, 2, (2, 2), 5),  # grouped, Cout/g > 1: batched transpose
    (3, 3, 3, (3, 3), 10),  # depthwise: no transpose at all
    (2, 4, 2, (2, 3), None),  # depthwise with channel multiplier 2
])
def test_gradcheck_every_composition_path(cin, cout, groups, k, d_mul):
    layer = randomise(DOConv2d(cin, cout, k, padding=1, groups=groups, D_mul=d_mul).double())
    x = torch.randn(1, cin, 4, 3, dtype=torch.float64, requires_grad=True)
    # clone() keeps the parameters' memory layout; the contiguous copies take the generic route.
    for layout in ('layer', 'contiguous'):
        params = {n: p.detach().clone() for n, p in layer.named_parameters()}
        if layout == 'contiguous':
            params = {n: p.contiguous() for n, p in params.items()}
        params = {n: p.requires_grad_() for n, p in params.items()}

        def f(W, D, bias, x):
            return torch.func.functional_call(layer, {'W': W, 'D': D, 'bias': bias}, (x,))

        assert torch.autograd.gradcheck(f, (params['W'], params['D'], params['bias'], x))
        torch.testing.assert_close(torch.func.functional_call(layer, params, (x,)), layer(x),
                                   rtol=1e-12, atol=1e-12)


def test_groups1_W_memory_is_the_bmm_layout_and_takes_its_grad_in_place():
    """W (Cout, Cin, D_mul) lives as (Cin, D_mul, Cout) in memory, so composing reads it and its
    gradient is stored without a transposing copy; values, init and loading ignore the layout."""
    torch.manual_seed(0)
    layer = DOConv2d(4, 6, 3, D_mul=10)
    torch.manual_seed(0)
    drawn = torch.empty(6, 4, 10).normal_(0, (2.0 / (6 * 9)) ** 0.5)  # seed -> same W as ever
    torch.testing.assert_close(layer.W, drawn, rtol=0, atol=0)
    assert layer.W.permute(1, 2, 0).is_contiguous()
    randomise(layer)
    torch.testing.assert_close(layer.composed_weight().double(), loop_kernel(layer),
                               rtol=1e-5, atol=1e-6)
    layer(torch.randn(2, 4, 5, 5)).square().sum().backward()
    assert layer.W.grad.stride() == layer.W.stride()
    copy_ = DOConv2d(4, 6, 3, D_mul=10)
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_.W, layer.W) and copy_.W.stride() == layer.W.stride()
    assert DOConv2d(4, 6, 3, groups=2).W.is_contiguous()  # grouped layers keep the plain layout


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('shape', [(1000, 300), (300, 1000), (4608, 64), (64, 4608), (5, 7)])
def test_every_transpose_copy_equals_the_plain_transpose(shape, dtype, monkeypatch):
    """Blocks that do not divide the rows (1000 rows by 436, 300 by 64) included."""
    from reparam_mm.layers import doconv
    x = torch.randn(shape).to(dtype)
    expected = x.t().contiguous()
    for name, copy_fn in doconv.TRANSPOSES.items():
        assert torch.equal(copy_fn(x), expected), name
    timed = []
    monkeypatch.setattr(doconv, '_transpose_choice', {})
    monkeypatch.setattr(doconv, '_time_transposes',
                        lambda m: timed.append(m.shape) or 'row_blocks')
    for _ in range(2):
        assert torch.equal(doconv.transpose_2d(x), expected)
    big = x.numel() >= doconv.TIMED_MIN_NUMEL
    assert timed == ([shape] if big else [])  # timed once per (shape, dtype), small ones never
    assert doconv._transpose_choice == ({(shape, dtype): 'row_blocks'} if big else {})


@pytest.mark.parametrize('choice', ['whole', 'row_blocks'])
def test_large_layer_composes_through_either_copy_with_the_same_gradients(choice, monkeypatch):
    """A layer big enough for the timed copy (64 x 9 x 512 values): forced to each copy, the
    kernel and the gradients of W and D equal the authors' einsum composition's."""
    from reparam_mm.layers import doconv
    layer = randomise(DOConv2d(64, 512, 3))
    assert 64 * 9 * 512 >= doconv.TIMED_MIN_NUMEL
    monkeypatch.setattr(doconv, '_transpose_choice', {})
    monkeypatch.setattr(doconv, '_time_transposes', lambda m: choice)
    kernel = layer.composed_weight()
    assert list(doconv._transpose_choice.values()) == [choice]
    grad_out = torch.randn_like(kernel)
    grads = torch.autograd.grad(kernel, (layer.W, layer.D), grad_out)
    assert len(doconv._transpose_choice) == 2  # the backward's (512, 576) copy was timed too
    W, D = (p.detach().clone().requires_grad_() for p in (layer.W, layer.D))
    ref = authors_kernel(W, D, authors_d_diag(64, 9, 9), 512, 64, 1, (3, 3))
    ref_grads = torch.autograd.grad(ref, (W, D), grad_out)
    torch.testing.assert_close(kernel, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('d_mul', [None, 9, 19])
def test_fresh_layer_is_plain_conv_of_its_W(d_mul):
    layer = DOConv2d(3, 5, 3, padding=1, D_mul=d_mul)
    assert torch.count_nonzero(layer.D) == 0
    with torch.no_grad():
        layer.bias.normal_()
    W = layer.W.detach()
    kernel = sum(W[..., t * 9:(t + 1) * 9] for t in range(layer.D_mul // 9))  # I's full tiles
    x = torch.randn(2, 3, 6, 7)
    expected = F.conv2d(x, kernel.reshape(5, 3, 3, 3), layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_init_is_openmmlab_kaiming_on_the_composed_kernel():
    layer = DOConv2d(64, 64, 3, D_mul=27)
    std = layer.composed_weight().std().item()
    assert abs(std / (2.0 / (64 * 9)) ** 0.5 - 1) < 0.05
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize('d_mul', [None, 12])
def test_plain_conv_state_dict_loads_and_matches(d_mul):
    plain = randomise(nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode='reflect'))
    layer = randomise(DOConv2d(4, 6, 3, padding=1, groups=2, padding_mode='reflect', D_mul=d_mul))
    result = layer.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ['D'] and result.unexpected_keys == []
    assert torch.count_nonzero(layer.D) == 0  # reset: the loaded layer *is* the plain conv
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "D"'):
        layer.load_state_dict(plain.state_dict())


def test_plain_1x1_conv_loads_strictly():
    plain = randomise(nn.Conv2d(4, 6, 1, bias=False))
    layer = DOConv2d(4, 6, 1, bias=False, D_mul=16)  # D_mul is meaningless for 1x1
    assert layer.D is None and layer.D_mul == 1
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(layer(x), plain(x))
    assert type(layer.to_fused()) is nn.Conv2d


@pytest.mark.parametrize('diag_key', ['d_diag', 'D_diag'])
@pytest.mark.parametrize('cin,cout,groups,k,d_mul', [
    (4, 6, 1, (3, 3), None), (4, 6, 1, (3, 2), 8), (6, 6, 6, (3, 3), 11)])
def test_reference_layout_loads_and_matches_authors_output(diag_key, cin, cout, groups, k, d_mul):
    mn = k[0] * k[1]
    d_mul = d_mul or mn
    g = torch.Generator().manual_seed(1)
    ref_sd = {'W': torch.randn(cout, cin // groups, d_mul, generator=g),
              'D': torch.randn(cin, mn, d_mul, generator=g) * 0.3,
              diag_key: authors_d_diag(cin, mn, d_mul),
              'bias': torch.randn(cout, generator=g)}
    layer = DOConv2d(cin, cout, k, padding=1, groups=groups, D_mul=d_mul)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # groups=1 and depthwise need no remapping
        layer.load_state_dict(ref_sd)  # strict: nothing missing, nothing unexpected
    torch.testing.assert_close(layer.D.detach(), ref_sd['D'])
    x = torch.randn(2, cin, 6, 6)
    kernel = authors_kernel(ref_sd['W'], ref_sd['D'], ref_sd[diag_key], cout, cin, groups, k)
    expected = F.conv2d(x, kernel, ref_sd['bias'], padding=1, groups=groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cin,cout,groups', [(4, 6, 2), (4, 8, 4)])
def test_reference_layout_grouped_is_remapped_to_authors_output(cin, cout, groups):
    d_mul, g = 9, torch.Generator().manual_seed(2)
    ref_sd = {'W': torch.randn(cout, cin // groups, d_mul, generator=g),
              'D': torch.randn(cin, 9, d_mul, generator=g) * 0.3,
              'd_diag': authors_d_diag(cin, 9, d_mul)}
    layer = DOConv2d(cin, cout, 3, groups=groups, bias=False)
    with pytest.warns(UserWarning, match='D rows of other channels'):
        layer.load_state_dict(ref_sd)
    assert torch.count_nonzero(layer.D) == 0
    x = torch.randn(1, cin, 5, 5)
    kernel = authors_kernel(ref_sd['W'], ref_sd['D'], ref_sd['d_diag'], cout, cin, groups, (3, 3))
    torch.testing.assert_close(layer(x), F.conv2d(x, kernel, groups=groups), rtol=1e-5, atol=1e-5)


def test_own_state_dict_round_trips():
    a = randomise(DOConv2d(4, 6, 3, groups=2, D_mul=10))
    assert set(a.state_dict()) == {'W', 'D', 'bias'}  # the identity is a non-persistent buffer
    b = DOConv2d(4, 6, 3, groups=2, D_mul=10)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(kernel_size=3, D_mul=4), r'D_mul=4 is invalid for a 3x3 kernel; use an integer D_mul >= '
                                   r'M\*N = 9'),
    (dict(kernel_size=(1, 3), D_mul=2.5), r'D_mul=2.5 is invalid'),
    (dict(kernel_size=3, groups=3), 'must both be divisible by groups=3'),
    (dict(kernel_size=3, groups=4), 'out_channels=6 must both be divisible by groups=4'),
    (dict(kernel_size=3, D_mul=12.0), r'D_mul=12\.0 is invalid .* use an integer'),
    (dict(kernel_size=3, D_mul=True), r'D_mul=True is invalid'),
    (dict(kernel_size=3, padding='same', stride=2), "padding='same' is not supported for strided"),
    (dict(kernel_size=3, padding_mode='mirror'), "padding_mode='mirror' is not one of"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DOConv2d(4, 6, **kwargs)


def test_mismatched_checkpoints_raise_one_clear_sentence():
    layer = DOConv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"Cannot load plain conv weight 'weight' of shape "
                                         r"\(6, 4, 5, 5\) into DOConv2d.*needs \(6, 4, 3, 3\)"):
        layer.load_state_dict(nn.Conv2d(4, 6, 5).state_dict(), strict=False)
    other = DOConv2d(4, 6, 3, D_mul=12)
    with pytest.raises(ValueError, match=r"Cannot load DO-Conv W 'W' of shape \(6, 4, 12\)"):
        layer.load_state_dict(other.state_dict())
    both = {**other.state_dict(), 'weight': torch.zeros(6, 4, 3, 3)}
    with pytest.raises(ValueError, match="holds both 'weight'"):
        other.load_state_dict(both)
    wrong_d = {**layer.state_dict(), 'D': torch.zeros(4, 9, 8)}
    with pytest.raises(ValueError, match=r"Cannot load DO-Conv D 'D' of shape \(4, 9, 8\)"):
        layer.load_state_dict(wrong_d)
    wrong_diag = {**layer.state_dict(), 'd_diag': torch.ones(4, 9, 9)}
    with pytest.raises(ValueError, match="'d_diag' is not the DO-Conv identity for D_mul=9"):
        layer.load_state_dict(wrong_diag)


@pytest.mark.parametrize('kwargs', [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2, D_mul=12),
    dict(in_channels=6, out_channels=6, kernel_size=(3, 2), padding='same', groups=6,
         padding_mode='circular'),
    dict(in_channels=4, out_channels=6, kernel_size=1, bias=False),
])
def test_to_fused_returns_plain_conv_with_same_output(kwargs):
    layer = randomise(DOConv2d(**kwargs)).eval()
    fused = layer.to_fused()
    assert type(fused) is nn.Conv2d and not fused.training
    for name in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                 'groups', 'padding_mode'):
        assert getattr(fused, name) == getattr(layer, name), name
    assert (fused.bias is None) == (layer.bias is None)
    x = torch.randn(2, kwargs['in_channels'], 8, 8)
    assert rel_err(fused(x), layer(x)) < 1e-5
    # float64 and training mode survive too
    layer64 = copy.deepcopy(layer).double().train()
    fused64 = layer64.to_fused()
    assert fused64.weight.dtype == torch.float64 and fused64.training
    # a frozen layer fuses into a frozen conv
    frozen = copy.deepcopy(layer).requires_grad_(False).to_fused()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in fused.parameters())
    assert rel_err(fused64(x.double()), layer64(x.double())) < 1e-12


def test_to_fused_then_mmcv_fuse_conv_bn_matches_in_eval():
    from mmcv.cnn import ConvModule, fuse_conv_bn

    model = nn.Sequential(DOConv2d(4, 8, 3, padding=1, bias=False, D_mul=12), nn.BatchNorm2d(8),
                          nn.ReLU(),
                          ConvModule(8, 8, 3, padding=1, conv_cfg=dict(type='DOConv'),
                                     norm_cfg=dict(type='BN')))
    randomise(model)
    with torch.no_grad():
        for bn in (model[1], model[3].bn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    expected = model(x)
    model[0] = model[0].to_fused()
    model[3].conv = model[3].conv.to_fused()
    fused = fuse_conv_bn(model)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3].bn, nn.Identity)
    assert rel_err(fused(x), expected) < 1e-5


def test_fuse_conv_bn_leaves_unfused_doconv_alone():
    """Not an nn.Conv2d subclass: mmcv must not rewrite a .weight the layer never reads."""
    from mmcv.cnn import fuse_conv_bn

    model = nn.Sequential(randomise(DOConv2d(4, 8, 3, padding=1)), nn.BatchNorm2d(8)).eval()
    x = torch.randn(1, 4, 6, 6)
    expected = model(x)
    fuse_conv_bn(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    torch.testing.assert_close(model(x), expected)


def test_reparam_mm_fuse_replaces_doconv():
    from reparam_mm.fuse import fuse

    model = nn.Sequential(DOConv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          DOConv2d(8, 8, 1))
    randomise(model).eval()
    x = torch.randn(1, 4, 6, 6)
    expected = model(x)
    fused = fuse(model, fuse_bn=True)
    assert not any(isinstance(m, DOConv2d) for m in fused.modules())
    assert rel_err(fused(x), expected) < 1e-5


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_conv_cfg_builds_under_default_scope(scope):
    from mmcv.cnn import ConvModule, build_conv_layer
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope(scope):
        conv = build_conv_layer(dict(type='DOConv', D_mul=12), 4, 8, 3, padding=1)
        assert isinstance(conv, DOConv2d) and conv.D_mul == 12
        module = ConvModule(4, 8, 3, padding=1, conv_cfg=dict(type='DOConv'),
                            norm_cfg=dict(type='BN'))
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    assert registry.build(dict(type='DOConv', in_channels=4, out_channels=8,
                               kernel_size=3)).__class__ is DOConv2d
    assert isinstance(module.conv, DOConv2d) and not hasattr(module.conv, 'weight')
    assert torch.count_nonzero(module.conv.D) == 0  # ConvModule did not re-init it
    assert module(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)
