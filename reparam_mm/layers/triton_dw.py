"""Depthwise conv2d in Triton for large kernels: forward, input, weight and bias gradients.

:func:`triton_depthwise_conv2d` equals ``F.conv2d(x, weight, bias, 1, padding,
groups=C)`` for a (C, 1, kh, kw) weight: stride 1, any padding (ph, pw),
square or non-square kernels of any size (kernel loops run at run time, so
one compiled kernel serves 7x7 to 31x31 and beyond), bias optional,
float32 / bfloat16 / float16 inputs with fp32 accumulation. NCHW and
channels_last inputs are read in place through their strides; the output
(and the input gradient) comes back in the input's memory format.

Tensor cores, not CUDA cores. A depthwise conv has no channel reduction, so
there is no matrix product in it as written. Along one image row, though, the
outputs of a kernel row are a product of the input row with a banded
(Toeplitz) matrix built from the weights, shared by every output row of a
tile. The kernels (``_triton_dw_kernels.py``) run that product through
``tl.dot``: 2-5x more multiply-adds than the conv needs (the zeros of the band),
on units with ~12x the throughput of the CUDA-core FMAs. fp32 inputs use TF32
when ``torch.backends.cudnn.allow_tf32`` allows it (as ``F.conv2d`` on cuDNN
does), otherwise 3-pass TF32 ("tf32x3", about fp32 accuracy).

Weight gradient: per-(channel, row split) partial sums, not atomics. Each
program owns a block of channels, a block of up to 32 x 32 kernel taps and
one contiguous split of the N * OH output rows; it accumulates
``x (taps x pixels) @ band of the output gradient (pixels x taps)`` in an
fp32 register tile and writes it once to a (splits, C, kh, kw) fp32 buffer,
which one ``sum`` reduces. The split count gives the H200's 132 SMs about
eight programs each whatever C is (C = 128 at RepLKNet's first stage would
otherwise leave most SMs idle). Against fp32 atomics: the result is
deterministic (equal across runs, under activation checkpointing
too), the autotuner may re-run a configuration without zeroing the output
first, and the extra buffer is small (splits * C * kh * kw floats).

The bias gradient is a per-channel sum of the output gradient, split the same
way. Triton is imported on the first call (``import reparam_mm`` works
without it); under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with
one small block configuration, which is how the tests run them. CUDA speed:
not yet measured (no GPU lent so far); see docs/large_kernel.md.
"""
import contextlib
import functools
import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable

from .large_kernel import size_bucket

__all__ = ['triton_available', 'triton_depthwise_conv2d', 'bound_seconds']

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_LIMIT = 2 ** 31
_kernels = None


def _interpret() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def _triton_installed() -> bool:
    return importlib.util.find_spec('triton') is not None


def triton_available(x: torch.Tensor) -> bool:
    """Whether :func:`triton_depthwise_conv2d` can run on ``x``: triton installed and
    ``x`` on CUDA, or Triton's interpreter switched on (``TRITON_INTERPRET=1``)."""
    return (x.is_cuda or _interpret()) and _triton_installed()


def _load_kernels():
    global _kernels
    if _kernels is None:
        from . import _triton_dw_kernels
        _kernels = _triton_dw_kernels
    return _kernels


def _pair(v, name):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or not all(isinstance(e, int) and e >= 0 for e in v):
        raise ValueError(f'triton_depthwise_conv2d: {name} must be a non-negative int or a pair '
                         f'of them, got {v!r}.')
    return v


def _is_channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _family(t):
    """Block-configuration family for a tensor read by a kernel: channels contiguous or not."""
    return 'cl' if t.shape[1] > 1 and t.stride(1) < t.stride(3) else 'cf'


def _precision(dtype):
    if dtype != torch.float32:
        return 'tf32'  # ignored by tl.dot for 16-bit inputs
    return 'tf32' if torch.backends.cudnn.allow_tf32 else 'tf32x3'


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(t):
    if t.is_cuda:
        return _cuda_sm_count(t.device.index)
    return 1  # interpreter: a few splits, so that the reduction path is exercised


def _on_device_of(t):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _size_key(n, h, w):
    """The kernels' autotuning key for a batch of n planes of h x w: the same for the sizes of
    one size bucket (an int32 kernel argument)."""
    return hash((n, size_bucket(h)[0], size_bucket(w)[0])) & 0x3FFFFFFF


def _conv(x, w, bias, ph, pw, oh, ow, channels_last):
    """Launch the direct kernel: y = conv(x, w (C, kh, kw)) + bias, with output size (oh, ow)."""
    k = _load_kernels()
    n, c, h, wd = x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    kernel = k.conv[_family(x)]

    def grid(meta):
        return (n * _cdiv(c, meta['BC']) * _cdiv(oh, meta['BH'])
                * _cdiv(ow, meta['BW']),)

    kernel[grid](x, w, bias if bias is not None else w, y,
                 n, c, h, wd, oh, ow, w.shape[1], w.shape[2], ph, pw, _size_key(n, h, wd),
                 *x.stride(), *w.stride(), *y.stride(),
                 HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype))
    return y


def _wgrad(x, g, kh, kw, ph, pw):
    """(C, kh, kw) fp32 weight gradient from the input x and the output gradient g."""
    k = _load_kernels()
    n, c, h, wd = x.shape
    oh, ow = g.shape[-2:]
    fam = _family(x)
    bkh, bkw = _tap_block(kh), _tap_block(kw)
    tap_blocks = _cdiv(kh, bkh) * _cdiv(kw, bkw)
    rows = n * oh
    if rows == 0:
        return torch.zeros((c, kh, kw), dtype=torch.float32, device=x.device)
    programs = _cdiv(c, k.WGRAD_MIN_BC[fam]) * tap_blocks
    splits = max(1, min(_cdiv(8 * _sm_count(x), programs), _cdiv(rows, 8)))
    rows_per_split = _cdiv(rows, splits)
    splits = _cdiv(rows, rows_per_split)
    part = torch.empty((splits, c, kh, kw), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (_cdiv(c, meta['BC']) * tap_blocks * splits,)

    k.wgrad[fam][grid](x, g, part, n, c, h, wd, oh, ow, kh, kw, ph, pw, rows_per_split,
                       _size_key(n, h, wd), *x.stride(), *g.stride(),
                       PRECISION=_precision(x.dtype), BKH=bkh, BKW=bkw)
    return part.sum(0)


def _channel_sum(g):
    """(C,) fp32 sum of g over batch and space (the bias gradient)."""
    k = _load_kernels()
    n, c, oh, ow = g.shape
    total = n * oh * ow
    if total == 0:
        return torch.zeros(c, dtype=torch.float32, device=g.device)
    splits = max(1, min(_cdiv(8 * _sm_count(g), c), _cdiv(total, 4096)))
    per_split = _cdiv(total, splits)
    splits = _cdiv(total, per_split)
    part = torch.empty((splits, c), dtype=torch.float32, device=g.device)

    def grid(meta):
        return (_cdiv(c, meta['BC']) * splits,)

    k.channel_sum[_family(g)][grid](g, part, c, oh, ow, per_split, total, _size_key(n, oh, ow),
                                    *g.stride())
    return part.sum(0)


def _cdiv(a, b):
    return -(-a // b)


def _tap_block(k):
    """Kernel taps per wgrad program along one axis: 16 (tl.dot's minimum) or 32."""
    return 16 if k <= 16 else 32


class _TritonDWConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, ph, pw):
        kh, kw = weight.shape[-2:]
        oh, ow = x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1
        w = weight.detach().to(x.dtype)[:, 0]
        channels_last = _is_channels_last(x)
        with _on_device_of(x):
            y = _conv(x, w, bias, ph, pw, oh, ow, channels_last)
        ctx.save_for_backward(x, w)
        ctx.conf = (ph, pw, channels_last, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        ph, pw, channels_last, weight_dtype, bias_dtype = ctx.conf
        kh, kw = w.shape[-2:]
        gy = gy.to(x.dtype)
        gx = gw = gb = None
        with _on_device_of(x):
            if ctx.needs_input_grad[0]:
                # correlation of gy with the flipped kernel, padded to come back at x's size
                gx = _conv(gy, w.flip((-2, -1)), None, kh - 1 - ph, kw - 1 - pw, x.shape[2],
                           x.shape[3], channels_last)
            if ctx.needs_input_grad[1]:
                gw = _wgrad(x, gy, kh, kw, ph, pw).to(weight_dtype).unsqueeze(1)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                gb = _channel_sum(gy).to(bias_dtype)
        return gx, gw, gb, None, None


def triton_depthwise_conv2d(x, weight, bias=None, padding=None):
    """``F.conv2d(x, weight, bias, stride=1, padding=padding, groups=C)`` with Triton kernels.

    Args:
        x (Tensor): (N, C, H, W) float32 / bfloat16 / float16, NCHW or channels_last.
        weight (Tensor): (C, 1, kh, kw) depthwise kernel; cast to the compute dtype.
        bias (Tensor, optional): (C,).
        padding (int | tuple[int, int], optional): zero padding (ph, pw) per side;
            defaults to (kh // 2, kw // 2). The output is (H + 2ph - kh + 1, W + 2pw - kw + 1).

    Under autocast the compute dtype is autocast's (as for ``F.conv2d``), else x's.
    Gradients flow to x, weight and bias in their own dtypes.
    """
    if not triton_available(x):
        why = ('triton is not installed' if not _triton_installed()
               else f'the input is on {x.device.type}, not CUDA, and TRITON_INTERPRET is not 1')
        raise RuntimeError(f'triton_depthwise_conv2d cannot run here: {why}; use F.conv2d '
                           f'(large_depthwise_conv2d) instead.')
    if x.dim() != 4:
        raise ValueError(f'triton_depthwise_conv2d expects an (N, C, H, W) input, got shape '
                         f'{tuple(x.shape)}.')
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f'triton_depthwise_conv2d expects a depthwise (C, 1, kh, kw) weight with '
                         f'C={c} (the input channels), got {tuple(weight.shape)}.')
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f'triton_depthwise_conv2d expects a bias of shape ({c},), got '
                         f'{tuple(bias.shape)}.')
    kh, kw = weight.shape[-2:]
    ph, pw = _pair((kh // 2, kw // 2) if padding is None else padding, 'padding')
    oh, ow = x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f'triton_depthwise_conv2d: kernel {kh}x{kw} is larger than the padded '
                         f'input {x.shape[2] + 2 * ph}x{x.shape[3] + 2 * pw}.')
    if any(t is not None and t.device != x.device for t in (weight, bias)):
        raise ValueError(f'triton_depthwise_conv2d: weight and bias must be on the input\'s device '
                         f'{x.device}, got {weight.device}'
                         f'{"" if bias is None else f" and {bias.device}"}.')
    if x.dtype in _DTYPES and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.dtype not in _DTYPES:
        raise TypeError(f'triton_depthwise_conv2d supports float32, bfloat16 and float16 inputs, '
                        f'got {x.dtype}; use F.conv2d for it.')
    if max(x.numel(), x.shape[0] * c * oh * ow) >= _INT32_LIMIT:
        raise ValueError(f'triton_depthwise_conv2d indexes with int32: input {tuple(x.shape)} or '
                         f'its output has 2**31 elements or more; split the batch.')
    return _TritonDWConv2d.apply(x, weight, bias, ph, pw)


def bound_seconds(n, c, h, w, kh, kw, dtype, bandwidth, fma_peak, backward, padding=None):
    """Roofline lower bound (seconds) of a stride-1 depthwise conv on a device.

    ``max(minimum bytes / bandwidth, multiply-adds / fma_peak)`` with bandwidth in
    bytes/s and fma_peak in FMAs/s (the CUDA-core peak: one FMA = 2 FLOPs). Minimum
    bytes: each tensor read or written once in ``dtype`` (no bias). Forward: read x and
    the weight, write y; N*C*OH*OW*kh*kw FMAs. ``backward=True`` is forward plus
    backward: also read the output gradient, x and the weight, write the input and
    weight gradients; three times the forward's FMAs. Padding defaults to k // 2.
    """
    ph, pw = (kh // 2, kw // 2) if padding is None else _pair(padding, 'padding')
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    size = torch.empty((), dtype=dtype).element_size()
    x_el, y_el, w_el = n * c * h * w, n * c * oh * ow, c * kh * kw
    elements = x_el + w_el + y_el
    fmas = n * c * oh * ow * kh * kw
    if backward:
        elements += y_el + x_el + w_el + x_el + w_el
        fmas *= 3
    return max(elements * size / bandwidth, fmas / fma_peak)
