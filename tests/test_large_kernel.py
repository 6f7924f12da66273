"""The large depthwise conv dispatch point: same results as F.conv2d, layout and algorithm
(direct or FFT) chosen per call."""
import pytest
import torch
import torch.nn.functional as F

from reparam_mm.layers import large_kernel
from reparam_mm.layers.large_kernel import (CHANNELS_LAST_MIN_KERNEL, FFT_MIN_KERNEL,
                                            LargeKernelDWConv2d, _fast_fft_size,
                                            backbone_channels_last, fft_depthwise_conv2d,
                                            large_depthwise_conv2d, use_channels_last, use_fft)


@pytest.mark.parametrize('k,stride,bias', [(31, 1, False), (13, 1, True), (11, 2, True),
                                           (9, 1, True), (5, 2, True), (3, 2, False)])
@pytest.mark.parametrize('channels_last_input', [False, True])
def test_equals_f_conv2d(k, stride, bias, channels_last_input):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 6, 19, 23, generator=g)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, k, k, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    out = large_depthwise_conv2d(x, w, b, stride, k // 2)
    ref = F.conv2d(x.contiguous(), w, b, stride, k // 2, 1, 6)
    # float rounding grows with the k*k-term sums (and differs between direct and FFT)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # the output keeps the caller's layout whatever layout the conv ran in
    layout = torch.channels_last if channels_last_input else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)


def test_layout_rule():
    x = torch.randn(1, 4, 8, 8)
    assert use_channels_last(x, (CHANNELS_LAST_MIN_KERNEL, CHANNELS_LAST_MIN_KERNEL))
    assert not use_channels_last(x, (CHANNELS_LAST_MIN_KERNEL - 2,) * 2)
    assert not use_channels_last(torch.randn(4, 8, 8), (31, 31))
    assert not use_channels_last(torch.randn(1, 4, 8, 8, device='meta'), (31, 31))
    assert not backbone_channels_last(x)  # fp32: FFTs take the largest kernels, NCHW is faster
    assert backbone_channels_last(x.bfloat16()) and backbone_channels_last(x.half())
    assert not backbone_channels_last(torch.randn(4, 8, 8).bfloat16())
    assert not backbone_channels_last(torch.randn(1, 4, 8, 8, device='meta', dtype=torch.half))


def test_gradients_match_f_conv2d():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 17, 17, generator=g, requires_grad=True)
    w = torch.randn(4, 1, 13, 13, generator=g, requires_grad=True)
    large_depthwise_conv2d(x, w, None, 1, 6).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.conv2d(x, w, None, 1, 6, 1, 4).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-4)


def test_rejects_non_depthwise_weight():
    with pytest.raises(ValueError, match='depthwise'):
        large_depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 7, 7))


def test_module_is_a_conv2d_with_the_same_keys_and_output():
    conv = LargeKernelDWConv2d(8, 29, bias=True)
    assert isinstance(conv, torch.nn.Conv2d)
    assert set(conv.state_dict()) == {'weight', 'bias'}
    assert conv.padding == (14, 14) and conv.groups == 8
    x = torch.randn(1, 8, 21, 21)
    plain = torch.nn.Conv2d(8, 8, 29, padding=14, groups=8)
    plain.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)


def test_cpu_runs_large_kernels_in_channels_last(monkeypatch):
    seen = []
    real = F.conv2d

    def spy(x, *args):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(x, *args)

    monkeypatch.setattr(F, 'conv2d', spy)
    x = torch.randn(1, 8, 16, 16)  # NCHW, where oneDNN's large depthwise path is slow
    large_depthwise_conv2d(x, torch.randn(8, 1, 13, 13), None, 1, 6)
    large_depthwise_conv2d(x, torch.randn(8, 1, 5, 5), None, 1, 2)
    assert seen == [True, False]


# -- FFT path ---------------------------------------------------------------------------------
@pytest.mark.parametrize('c,h,w,k,padding,bias', [(3, 11, 9, 7, 3, True), (2, 16, 16, 13, 6, False),
                                                   (4, 8, 10, 5, (1, 4), True),
                                                   (2, 40, 33, 31, 15, True), (3, 20, 12, 27, 0, False)])
def test_fft_depthwise_conv_matches_conv2d_in_float64(c, h, w, k, padding, bias):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, c, h, w, dtype=torch.float64, generator=g)
    wt = torch.randn(c, 1, k, k, dtype=torch.float64, generator=g)
    b = torch.randn(c, dtype=torch.float64, generator=g) if bias else None
    if k > h + 2 * (padding if isinstance(padding, int) else padding[0]):
        with pytest.raises(ValueError, match='larger than the padded input'):
            fft_depthwise_conv2d(x, wt, b, padding)
        return
    out = fft_depthwise_conv2d(x, wt, b, padding)
    torch.testing.assert_close(out, F.conv2d(x, wt, b, 1, padding, 1, c), rtol=1e-9, atol=1e-9)
    # differentiable: gradients match direct convolution too
    xs, ws = x.clone().requires_grad_(), wt.clone().requires_grad_()
    go = torch.randn(out.shape, dtype=torch.float64, generator=g)
    ga = torch.autograd.grad(fft_depthwise_conv2d(xs, ws, None, padding), (xs, ws), go)
    gb = torch.autograd.grad(F.conv2d(xs, ws, None, 1, padding, 1, c), (xs, ws), go)
    for a, b_ in zip(ga, gb):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-8)


def test_fft_rejects_non_depthwise_weight():
    with pytest.raises(ValueError, match=r'\(C, 1, kh, kw\) weight'):
        fft_depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 3, 3, 3), None, 1)


def test_fast_fft_size():
    assert [_fast_fft_size(n) for n in (158, 97, 64, 7)] == [160, 100, 64, 8]


def test_fft_rule():
    x = torch.randn(1, 4, 8, 8)
    k = (FFT_MIN_KERNEL, FFT_MIN_KERNEL)
    assert use_fft(x, k, 1, 13, 1) and use_fft(x.double(), (31, 29), (1, 1), (15, 14), (1, 1))
    assert not use_fft(x, (FFT_MIN_KERNEL - 2,) * 2)  # 13x13: direct channels_last is faster
    assert not use_fft(x, (31, 5))  # both sides must be large
    assert not use_fft(x, k, stride=2) and not use_fft(x, k, dilation=2)
    assert not use_fft(x, k, padding='same')
    assert not use_fft(x.bfloat16(), k) and not use_fft(x.half(), k)
    assert not use_fft(torch.randn(1, 4, 8, 8, device='meta'), k)


@pytest.mark.parametrize('channels_last_input', [False, True])
def test_dispatch_takes_fft_for_large_stride_1_kernels_and_matches(monkeypatch, channels_last_input):
    calls, real_fft = [], large_kernel.fft_depthwise_conv2d
    monkeypatch.setattr(large_kernel, 'fft_depthwise_conv2d',
                        lambda *a: calls.append('fft') or real_fft(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 37, 30, generator=g)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(8, 1, 31, 29, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    out = large_depthwise_conv2d(x, w, b, 1, (15, 14))
    assert calls == ['fft']
    layout = torch.channels_last if channels_last_input else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    go = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (x, w, b), go)
    ref = F.conv2d(x, w, b, 1, (15, 14), 1, 8)
    want = torch.autograd.grad(ref, (x, w, b), go)
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(scale))
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-5 * float(b_.abs().max()))
    # a stride-2 or half-precision call of the same kernel stays on direct convolution
    large_depthwise_conv2d(x.detach(), w.detach(), None, 2, 15)
    large_depthwise_conv2d(x.detach().bfloat16(), w.detach().bfloat16(), None, 1, 15)
    assert calls == ['fft']
