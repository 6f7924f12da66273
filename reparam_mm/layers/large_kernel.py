"""The one place where RepLKNet's large depthwise convolution is computed.

Every large-kernel depthwise conv of the backbone (``lkb_origin.conv`` while
training, ``lkb_reparam`` after merging) is a :class:`LargeKernelDWConv2d`,
whose forward calls :func:`large_depthwise_conv2d`. A faster implementation
(the authors' CUDA implicit-GEMM kernel, a Triton kernel, ...) is slotted in
here and nowhere else.

Memory layout rule (CPU). oneDNN, which runs PyTorch's CPU depthwise convs,
has a fast NCHW depthwise kernel only up to 9x9; from 11x11 on, NCHW falls
back to a path 6-15x slower, while its channels_last (NHWC) kernel stays fast.
Measured on this project's machine (2-core AMD EPYC VM, torch 2.13, fp32,
batch 1, 1 thread, CPU time, min of 5; "via channels_last" includes copying
the input to channels_last and the output back):

    kernel  C x HxW          NCHW      via channels_last
    7x7     128 x 128x128    6.2 ms    22.6 ms
    9x9     128 x 128x128    26.8 ms   47.7 ms
    9x9     1024 x 16x16     0.7 ms    3.4 ms
    11x11   128 x 128x128    306 ms    45.5 ms
    13x13   1024 x 16x16     33.6 ms   5.3 ms
    27x27   512 x 32x32      378 ms    34.9 ms
    31x31   128 x 128x128    2308 ms   241 ms

Two rules follow, both here so the policy has one home:

* :func:`large_depthwise_conv2d`: on CPU, a call with a kernel side of at
  least :data:`CHANNELS_LAST_MIN_KERNEL` (11) runs channels_last and hands its
  output back in the input's layout, so any caller gets the fast path.
* :func:`backbone_channels_last`: a large-kernel backbone (RepLKNet) runs its
  whole forward channels_last on CPU in half precision and returns features in
  the caller's layout; oneDNN's convs are native in NHWC, so the 1x1 and small
  convs skip a reorder each. In fp32 the FFT rule below takes the largest
  kernels, and NCHW is then faster as a whole (see the function).

RepLKNet-31B at 512x512, eval, batch 1, 2 threads, quiet machine, best of 3,
before the FFT rule: whole backbone channels_last 2.28-2.37 s; per-call rule
only 2.38 s; all NCHW direct (the authors' code as written) 9.4 s. With the
FFT rule: 2.05 s (NCHW, the default now) vs 2.13 s (channels_last).

FFT rule (CPU). Direct convolution costs O(k^2) per output pixel; a
correlation through real FFTs costs O(log HW), whatever the kernel. oneDNN's
*backward* of a large depthwise conv is also ~10x slower than its forward
(forward + backward at ~40x the arithmetic bound, docs/benchmarks.md). So a
stride-1, undilated fp32/fp64 call with a kernel side of at least
:data:`FFT_MIN_KERNEL` (27: RepLKNet's 31/29/27 stages, not its 13x13 one)
runs :func:`fft_depthwise_conv2d`; autograd differentiates through the FFTs.
Measured at RepLKNet-31B's stage shapes for a 512x512 input (batch 1, 2
threads, ms, forward / forward + backward):

    kernel  C x HxW          channels_last direct   FFT
    31x31   128 x 128x128    116 / 3379             46 / 91
    29x29   256 x 64x64      48 / 1452              21 / 58
    27x27   512 x 32x32      18 / 509               18 / 46

FFT results match ``F.conv2d`` to float rounding (relative error ~1e-6 in
fp32). Other devices run ``F.conv2d`` unchanged: no GPU was lent to measure
cuDNN.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CHANNELS_LAST_MIN_KERNEL', 'FFT_MIN_KERNEL', 'use_channels_last', 'use_fft',
           'backbone_channels_last', 'fft_min_kernel', 'fft_depthwise_conv2d',
           'large_depthwise_conv2d', 'LargeKernelDWConv2d']

#: smallest kernel side for which CPU calls are run in channels_last (see module docstring)
CHANNELS_LAST_MIN_KERNEL = 11
#: smallest kernel side for which CPU calls are computed through FFTs (see module docstring)
FFT_MIN_KERNEL = 27
_FFT_DTYPES = (torch.float32, torch.float64)


def use_channels_last(x: torch.Tensor, kernel_size) -> bool:
    """Whether :func:`large_depthwise_conv2d` runs this call in channels_last."""
    return x.device.type == 'cpu' and x.dim() == 4 and max(kernel_size) >= CHANNELS_LAST_MIN_KERNEL


@contextlib.contextmanager
def fft_min_kernel(kernel):
    """Within the block, CPU calls use FFTs from kernel side ``kernel`` on (a huge value: never).

    For measurements: benchmarking the direct path, and FLOP counters, which trace
    ``aten::convolution`` and would not see a convolution computed through FFTs.
    """
    global FFT_MIN_KERNEL
    saved, FFT_MIN_KERNEL = FFT_MIN_KERNEL, kernel
    try:
        yield
    finally:
        FFT_MIN_KERNEL = saved


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def use_fft(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> bool:
    """Whether :func:`large_depthwise_conv2d` computes this call through FFTs."""
    return (x.device.type == 'cpu' and x.dim() == 4 and x.dtype in _FFT_DTYPES
            and min(kernel_size) >= FFT_MIN_KERNEL and not isinstance(padding, str)
            and _pair(stride) == (1, 1) and _pair(dilation) == (1, 1))


def _fast_fft_size(n):
    """Smallest 2-3-5-smooth integer >= n (sizes FFT libraries handle fastest)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_depthwise_conv2d(x, weight, bias=None, padding=0):
    """Depthwise cross-correlation (``F.conv2d(..., groups=C)``, stride 1) through real FFTs.

    The padded input is transformed at a 2-3-5-smooth size of at least its own:
    the circular correlation then has no wrap-around in the ``H - kh + 1`` rows
    (and columns) kept. Output is NCHW-contiguous.
    """
    c, kh, kw = weight.shape[0], weight.shape[-2], weight.shape[-1]
    if weight.dim() != 4 or weight.shape[1] != 1 or x.shape[1] != c:
        raise ValueError(f'fft_depthwise_conv2d expects a (C, 1, kh, kw) weight with C = input '
                         f'channels {x.shape[1]}, got {tuple(weight.shape)}.')
    ph, pw = _pair(padding)
    h, w = x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw
    oh, ow = h - kh + 1, w - kw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f'kernel {kh}x{kw} is larger than the padded input {h}x{w}.')
    fh, fw = _fast_fft_size(h), _fast_fft_size(w)
    xf = torch.fft.rfft2(F.pad(x, (pw, pw, ph, ph)), s=(fh, fw))
    wf = torch.fft.rfft2(weight[:, 0], s=(fh, fw))
    out = torch.fft.irfft2(xf * wf.conj(), s=(fh, fw))[..., :oh, :ow]
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out.contiguous()


def backbone_channels_last(x: torch.Tensor) -> bool:
    """Whether a large-kernel backbone should run its whole forward channels_last for ``x``.

    On CPU, only for dtypes the FFT rule does not cover (fp16 / bf16): there every large
    kernel runs direct, fastest in NHWC, and oneDNN's other convs are native in NHWC too. In
    fp32 the 31/29/27 kernels go through FFTs, which want NCHW, and RepLKNet-31B at 512x512
    measured faster all-NCHW: forward + backward (batch 2) 11.6 s vs 13.6 s channels_last,
    inference 2.05 s vs 2.13 s. The backbone returns features in the input's layout either way.
    """
    return x.device.type == 'cpu' and x.dim() == 4 and x.dtype not in _FFT_DTYPES


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
    nchw = not x.is_contiguous(memory_format=torch.channels_last)
    if use_fft(x, weight.shape[-2:], stride, padding, dilation):
        out = fft_depthwise_conv2d(x, weight, bias, padding)
        return out if nchw else out.contiguous(memory_format=torch.channels_last)
    if not use_channels_last(x, weight.shape[-2:]):
        return F.conv2d(x, weight, bias, stride, padding, dilation, channels)
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
