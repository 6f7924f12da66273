"""The large depthwise conv dispatch point: same results as F.conv2d, layout chosen per call."""
import pytest
import torch
import torch.nn.functional as F

from reparam_mm.layers.large_kernel import (CHANNELS_LAST_MIN_KERNEL, LargeKernelDWConv2d,
                                            backbone_channels_last, large_depthwise_conv2d,
                                            use_channels_last)


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
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the output keeps the caller's layout whatever layout the conv ran in
    layout = torch.channels_last if channels_last_input else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)


def test_layout_rule():
    x = torch.randn(1, 4, 8, 8)
    assert use_channels_last(x, (CHANNELS_LAST_MIN_KERNEL, CHANNELS_LAST_MIN_KERNEL))
    assert not use_channels_last(x, (CHANNELS_LAST_MIN_KERNEL - 2,) * 2)
    assert not use_channels_last(torch.randn(4, 8, 8), (31, 31))
    assert not use_channels_last(torch.randn(1, 4, 8, 8, device='meta'), (31, 31))
    assert backbone_channels_last(x) and not backbone_channels_last(torch.randn(4, 8, 8))
    assert not backbone_channels_last(torch.randn(1, 4, 8, 8, device='meta'))


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
