"""The one place where RepLKNet's large depthwise convolution is computed.

Every large-kernel depthwise conv of the backbone (``lkb_origin.conv`` while
training, ``lkb_reparam`` after merging) is a :class:`LargeKernelDWConv2d`,
whose forward calls :func:`large_depthwise_conv2d`. A faster implementation
(the authors' CUDA implicit-GEMM kernel, a Triton kernel, ...) is slotted in
here and nowhere else.

Memory layout rule (CPU): oneDNN's depthwise kernels for NCHW fall back to a
slow path once the kernel is larger than 5x5, while its NHWC (channels_last)
kernels stay fast. Measured on this project's CPU machine (torch 2.13, fp32,
batch 1, 1 thread, NCHW time / channels_last time including both layout
copies): 31x31 C=128 at 128x128 3183 / 244 ms; 13x13 C=1024 at 16x16
104 / 7 ms; 13x13 C=64 at 64x64 67 / 6 ms; but 5x5 C=512 at 32x32
0.97 / 4.4 ms and 5x5 C=1024 at 16x16 0.56 / 2.3 ms. So on CPU, for kernels
of at least :data:`CHANNELS_LAST_MIN_KERNEL`, the input is made channels_last
for the call and the output handed back in the input's layout (the copies are
cheap next to the conv; returning channels_last instead makes the following
NCHW ops slower). Other devices run ``F.conv2d`` unchanged: no GPU was lent
to measure cuDNN here. Results equal ``F.conv2d`` in either layout.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CHANNELS_LAST_MIN_KERNEL', 'use_channels_last', 'large_depthwise_conv2d',
           'LargeKernelDWConv2d']

#: smallest kernel side for which CPU calls are run in channels_last (see module docstring)
CHANNELS_LAST_MIN_KERNEL = 7


def use_channels_last(x: torch.Tensor, kernel_size) -> bool:
    """Whether :func:`large_depthwise_conv2d` runs this call in channels_last."""
    return x.device.type == 'cpu' and x.dim() == 4 and max(kernel_size) >= CHANNELS_LAST_MIN_KERNEL


def large_depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``.

    ``weight`` is (C, 1, kh, kw) with C the channels of ``x``; the memory layout
    of the computation is chosen per call (module docstring), that of the
    output always follows ``x``.
    """
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(f'large_depthwise_conv2d expects a depthwise (C, 1, kh, kw) weight with '
                         f'C={channels} (the input channels), got {tuple(weight.shape)}.')
    if not use_channels_last(x, weight.shape[-2:]):
        return F.conv2d(x, weight, bias, stride, padding, dilation, channels)
    nchw = not x.is_contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride, padding,
                   dilation, channels)
    return out.contiguous() if nchw else out


class LargeKernelDWConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) computed by :func:`large_depthwise_conv2d`.

    Args:
        channels (int): input = output channels = groups.
        kernel_size (int): kernel side (odd).
        stride (int): stride. Defaults to 1.
        padding (int, optional): defaults to ``kernel_size // 2`` (same size at stride 1).
        bias (bool): whether the conv has a bias (True after re-parameterisation).
    """

    def __init__(self, channels, kernel_size, stride=1, padding=None, bias=False, **factory):
        if padding is None:
            padding = kernel_size // 2
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding,
                         groups=channels, bias=bias, **factory)

    def forward(self, x):
        if self.padding_mode != 'zeros':  # pragma: no cover - never built so, kept for safety
            return super().forward(x)
        return large_depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                      self.dilation)
