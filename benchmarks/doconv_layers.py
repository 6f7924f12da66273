"""DO-Conv layers timed at ResNet-50's 3x3 conv shapes: a plain conv, this project's
``DOConv2d``, the earlier candidate composition (``DOConv2d`` over a contiguous W) and the
authors' formulation (:class:`AuthorsDOConv2d`, kernel recomposed by an einsum every
forward), all holding the same kernel.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from reparam_mm.layers.doconv import DOConv2d

from .measure import cpu_timing, new_result, record_cpu_load, summarize, time_calls


class AuthorsDOConv2d(nn.Module):
    """DO-Conv as formulated in the authors' reference code, for the benchmark baseline.

    Every forward adds the frozen identity to D and recomposes the kernel with one einsum
    ``'ims,ois->oim'`` over D (Cin, MN, D_mul) and W viewed as (Cout/g, Cin, D_mul), then
    convolves. Written from the paper's formula and their layout, not copied.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, D_mul=None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        mn = kh * kw
        self.D_mul = D_mul or mn
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = (kh, kw), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.W = nn.Parameter(torch.randn(out_channels, in_channels // groups, self.D_mul) * 0.1)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if mn > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, mn, self.D_mul))
            eye = torch.eye(mn).unsqueeze(0).repeat(in_channels, 1, self.D_mul // mn)
            pad = torch.zeros(in_channels, mn, self.D_mul % mn)
            self.D_diag = nn.Parameter(torch.cat([eye, pad], dim=2), requires_grad=False)
        else:
            self.D = self.D_diag = None

    def composed_weight(self):
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.D is None:
            return self.W.reshape(shape)
        W = self.W.reshape(self.out_channels // self.groups, self.in_channels, self.D_mul)
        return torch.einsum('ims,ois->oim', self.D + self.D_diag, W).reshape(shape)

    def forward(self, x):
        return F.conv2d(x, self.composed_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def resnet50_3x3_shapes(height=512, width=512):
    """(name, channels, H, W) of the stride-1 3x3 conv of each ResNet-50 stage (stride 4..32)."""
    if min(height, width) < 32:
        raise ValueError(f'input {height}x{width} is smaller than ResNet-50\'s stride 32; use a '
                         'shape of at least 32x32.')
    return [(f'stage{i + 1}', 64 * 2**i, height // 2**(i + 2), width // 2**(i + 2))
            for i in range(4)]


class DOConv2dT2D(DOConv2d):
    """``DOConv2d`` with W stored contiguous (Cout, Cin, D_mul): the earlier candidate,
    same 2-D transposes, but the bmm reads W through a transposed view."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.W = nn.Parameter(self.W.detach().contiguous())


LAYER_KEYS = ('plain', 'doconv', 'doconv_t2d', 'authors')


def doconv_layers(channels, seed=0):
    """``{key: module}`` for :data:`LAYER_KEYS` at one 3x3 C->C shape: a plain ``nn.Conv2d``,
    ``DOConv2d``, ``DOConv2d`` with the candidate composition and ``AuthorsDOConv2d``, all
    holding the same W and (random) D, so all four compute the same kernel."""
    torch.manual_seed(seed)
    ours = DOConv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        ours.D.normal_(0, 0.05)
    t2d = DOConv2dT2D(channels, channels, 3, padding=1, bias=False)
    ref = AuthorsDOConv2d(channels, channels, 3, padding=1)
    plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        for m in (t2d, ref):
            m.W.copy_(ours.W)
            m.D.copy_(ours.D)
        plain.weight.copy_(ours.composed_weight())
    return dict(zip(LAYER_KEYS, (plain, ours, t2d, ref)))


def _fwd_bwd(module, x, grad):
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


def benchmark_doconv_layers(shape=(512, 512), batch=2, device='cpu', repeat=10, warmup=2,
                            min_time=0.5):
    """Forward, forward+backward and kernel-composition time of the three layers per stage."""
    settings = dict(shape=list(shape), batch=batch, device=str(device), repeat=repeat,
                    warmup=warmup, min_time=min_time)
    result = new_result('doconv_layers', device, settings)
    timing = dict(repeat=repeat, warmup=warmup, min_time=min_time)
    load = cpu_timing(device)
    with load or contextlib.nullcontext():
        for name, c, h, w in resnet50_3x3_shapes(*shape):
            layers = {k: m.to(device) for k, m in doconv_layers(c).items()}
            x = torch.randn(batch, c, h, w, device=device, requires_grad=True)
            grad = torch.randn(batch, c, h, w, device=device)
            rec = dict(name=name, channels=c, height=h, width=w, batch=batch)
            for key, m in layers.items():
                t = dict(
                    forward=time_calls(lambda: m(x.detach()), device, **timing),
                    forward_backward=time_calls(lambda: _fwd_bwd(m, x, grad), device, **timing))
                if key != 'plain':
                    t['compose'] = time_calls(m.composed_weight, device, **timing)
                rec[key] = {k: summarize(v, batch) for k, v in t.items()}
            rec['ratios'] = layer_ratios(rec)
            result['results'].append(rec)
    return record_cpu_load(result, load)


def layer_ratios(rec):
    """Median-time ratios of each DO-Conv formulation over the plain conv and over the authors'."""
    out = {}
    for p in ('forward', 'forward_backward'):
        med = {k: rec[k][p]['median_ms'] for k in LAYER_KEYS}
        for k in LAYER_KEYS[1:]:
            out[f'{k}_over_plain_{p}'] = med[k] / med['plain']
        for k in LAYER_KEYS[1:3]:
            out[f'{k}_over_authors_{p}'] = med[k] / med['authors']
    return out
