"""reparam_mm.fuse on toy re-parameterisable modules: order, idempotence, refusals, report."""
import copy
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam_mm  # noqa: F401
from reparam_mm.fuse import CONV_BN, count_params, fuse, fuse_with_report


class ToyDOConv(nn.Module):
    """Over-parameterised conv: the effective kernel is ``weight + delta``.

    Like DO-Conv, ``.weight`` alone is NOT the kernel the layer applies, so a
    parent that reads it before this layer is folded merges a wrong kernel.
    """

    def __init__(self, cin, cout, k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.delta = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def kernel(self):
        return self.weight + self.delta

    def forward(self, x):
        return F.conv2d(x, self.kernel(), self.bias, padding=self.weight.shape[-1] // 2)

    def reparameterize(self):
        k = self.weight.shape[-1]
        conv = nn.Conv2d(self.weight.shape[1], self.weight.shape[0], k, padding=k // 2)
        conv.to(self.weight)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            conv.bias.copy_(self.bias)
        return conv


class ToyRepBlock(nn.Module):
    """Large conv+BN branch plus a small-kernel child, merged in place (like RepLKNet)."""

    def __init__(self, ch, small):
        super().__init__()
        self.lk = nn.Sequential(nn.Conv2d(ch, ch, 5, padding=2, bias=False), nn.BatchNorm2d(ch))
        self.small = small
        self.merged = None

    def forward(self, x):
        if self.merged is not None:
            return self.merged(x)
        return self.lk(x) + self.small(x)

    def reparameterize(self):
        if self.merged is not None:
            return self
        if self.training:
            raise RuntimeError('ToyRepBlock must be fused in eval mode')
        conv, bn = self.lk
        std = (bn.running_var + bn.eps).sqrt()
        k = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * bn.weight / std
        pad = (5 - self.small.weight.shape[-1]) // 2
        k = k + F.pad(self.small.weight, [pad] * 4)  # reads the child's .weight
        b = b + self.small.bias
        merged = nn.Conv2d(conv.in_channels, conv.out_channels, 5, padding=2).to(conv.weight)
        with torch.no_grad():
            merged.weight.copy_(k)
            merged.bias.copy_(b)
        del self.lk, self.small
        self.merged = merged
        return self


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _nested(ch=4):
    torch.manual_seed(0)
    model = nn.Sequential(ToyDOConv(3, ch, 3), nn.ReLU(), ToyRepBlock(ch, ToyDOConv(ch, ch, 3)),
                          nn.Conv2d(ch, ch, 1))
    return _randomize_bn(model).eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _parent_first(module):
    """timm-style walk: a module is re-parameterised before its children."""
    for name, child in list(module.named_children()):
        if callable(getattr(child, 'reparameterize', None)):
            child = child.reparameterize()
            setattr(module, name, child)
        _parent_first(child)
    return module


def test_post_order_folds_child_before_parent_reads_it():
    model = _nested()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    fused, report = fuse_with_report(copy.deepcopy(model))
    assert _rel(fused(x), ref) < 1e-5
    assert not any(isinstance(m, ToyDOConv) for m in fused.modules())
    assert fused[2].merged is not None and not hasattr(fused[2], 'small')
    assert report.fused == {'ToyDOConv': 2, 'ToyRepBlock': 1}
    # the same merge walked parent-first reads the unfolded child's .weight: a wrong kernel
    wrong = _parent_first(copy.deepcopy(model))
    assert _rel(wrong(x), ref) > 1e-2


def test_report_counts_parameters_and_is_kept():
    model = _nested()
    before = sum(p.numel() for p in model.parameters())
    out = fuse(model)
    assert out is model
    report = fuse.last_report
    assert report.params_before == before
    assert report.params_after == count_params(model) < before
    # 2 ToyDOConv of 3*4*9 / 4*4*9 weights become plain convs; the block's 5x5 conv+BN+small conv
    # become one 5x5 conv with bias
    expected = before - (3 * 4 * 9 + 4 * 4 * 9) - (4 * 4 * 9 + 4 + 4 + 4) + 4
    assert report.params_after == expected
    assert 'ToyDOConv: 2' in str(report) and f'{before:,}' in str(report)


def test_fusing_twice_is_a_no_op():
    model = fuse(_nested())
    x = torch.randn(1, 3, 12, 12)
    y = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again, report = fuse_with_report(model)
    assert again is model and report.fused == {} and report.params_before == report.params_after
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), y)


def test_bare_fusable_root_is_replaced():
    layer = ToyDOConv(3, 5, 3).eval()
    x = torch.randn(1, 3, 8, 8)
    conv = fuse(layer)
    assert type(conv) is nn.Conv2d
    assert torch.allclose(conv(x), layer(x), atol=1e-6)


def test_training_mode_is_refused_before_anything_changes():
    model = _nested().train()
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match=r'training mode .*model\.eval\(\)'):
        fuse(model)
    assert list(model.state_dict()) == keys  # nothing was half-fused
    assert any(isinstance(m, ToyDOConv) for m in model.modules())


def test_fuse_bn_folds_conv_bn_pairs_and_keeps_dtype():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)))
    model = _randomize_bn(model).double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    ref = model(x)
    fused, report = fuse_with_report(model, fuse_bn=True)
    assert report.fused == {CONV_BN: 2}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    assert _rel(fused(x), ref) < 1e-12
    assert report.params_after == report.params_before - 2 * 12 + 6  # BN affine gone, one new bias


def test_fuse_bn_in_training_mode_is_refused_and_default_leaves_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match='training mode'):
        fuse(model, fuse_bn=True)
    fused = fuse(model)  # nothing fusable without fuse_bn: training mode is harmless
    assert isinstance(fused[1], nn.BatchNorm2d) and fuse.last_report.fused == {}


class _NormFirst(nn.Module):
    """mmcv ConvModule with order=('norm', 'conv', 'act'): conv registered first, runs second."""

    def __init__(self):
        super().__init__()
        self.order = ('norm', 'conv', 'act')
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_fuse_bn_skips_norm_before_conv():
    model = _randomize_bn(_NormFirst()).eval()
    x = torch.randn(1, 4, 6, 6)
    ref = model(x)
    fuse(model, fuse_bn=True)
    assert fuse.last_report.fused == {} and isinstance(model.bn, nn.BatchNorm2d)
    assert torch.equal(model(x), ref)


def test_bad_reparameterize_return_is_a_clear_error():
    class Bad(nn.Module):
        def reparameterize(self):
            return None

    with pytest.raises(TypeError, match='returned NoneType'):
        fuse(nn.Sequential(Bad()).eval())


def test_non_module_is_refused():
    with pytest.raises(TypeError, match='expects an nn.Module'):
        fuse({'state_dict': {}})


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group():
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize('wrapper', ['torch', 'mmengine'])
def test_fuses_inside_ddp_wrappers(process_group, wrapper):
    from mmengine.model import MMDistributedDataParallel
    cls = nn.parallel.DistributedDataParallel if wrapper == 'torch' else MMDistributedDataParallel
    model = _nested()
    x = torch.randn(1, 3, 12, 12)
    ref = model(x)
    wrapped = cls(model)
    out = fuse(wrapped.eval())
    assert out is wrapped
    assert not any(isinstance(m, ToyDOConv) for m in wrapped.module.modules())
    assert fuse.last_report.fused == {'ToyDOConv': 2, 'ToyRepBlock': 1}
    with torch.no_grad():
        assert _rel(wrapped.module(x), ref) < 1e-5
