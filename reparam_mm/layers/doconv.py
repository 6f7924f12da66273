"""DO-Conv: a convolution trained as a depthwise kernel D composed with a conventional kernel W.

Cao, Li et al., "DO-Conv: Depthwise Over-parameterized Convolutional Layer" (2020). For an M x N
kernel, W holds Cout x Cin/g x D_mul values and D holds Cin x (M*N) x D_mul values. Every forward
composes them into one conventional kernel

    K[o, i, m] = sum_s (D + I)[c(o, i), m, s] * W[o, i, s]

where c(o, i) is the input channel that kernel slice (o, i) convolves (o's group times Cin/g,
plus i) and I stacks floor(D_mul / MN) M*N identities along s (zero columns after, as in the
authors' code), then runs a single ``F.conv2d``. D starts at zero, so a fresh layer is exactly
the plain convolution with kernel ``W @ I^T``; :meth:`DOConv2d.to_fused` fuses the pair
into a plain ``nn.Conv2d``.
"""
import math
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple

from ..scope import ConfigError
from .large_kernel import _exporting

_PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')


def doconv_identity(kernel_numel, D_mul, dtype=None, device=None):
    """The frozen I of ``D + I`` as an (M*N, D_mul) matrix, shared by every input channel."""
    eye = torch.zeros(kernel_numel, D_mul, dtype=dtype, device=device)
    tiles = D_mul // kernel_numel
    eye[:, :tiles * kernel_numel] = torch.eye(
        kernel_numel, dtype=dtype, device=device).repeat(1, tiles)
    return eye


def compose_kernel(W, D, identity, groups, kernel_size):
    """Composed (Cout, Cin/g, M, N) kernel; one batched matmul over the Cin input channels.

    Batch c multiplies (D + I)[c] (M*N x D_mul) by the W columns of the Cout/g output channels
    of c's group (D_mul x Cout/g), i.e. ``K[o, i, :] = (D + I)[c(o, i)] @ W[o, i, :]`` for all
    slices at once, without any Cout x Cin x M*N x D_mul intermediate. The result is
    (Cin, MN, Cout/g) per group; one transpose (a 2-D one for groups=1, none when Cout/g = 1)
    gives the conv layout. Any memory layout of W gives the same values; for groups=1,
    :class:`DOConv2d` stores W as (Cin, D_mul, Cout) in memory, so the bmm reads it, and its
    gradient lands in it, without a copy.
    """
    cout, cin_g, d_mul = W.shape
    if D is None:  # 1x1: nothing to compose
        return W.reshape(cout, cin_g, *kernel_size)
    cout_g = cout // groups
    cin, mn = cin_g * groups, identity.shape[0]
    if groups == 1:
        w = W.reshape(cout, cin * d_mul).t().reshape(cin, d_mul, cout)  # a view, any W layout
        k = torch.bmm(D + identity, w)  # (Cin, MN, Cout)
        return _Transpose.apply(k.view(cin * mn, cout)).view(cout, cin, *kernel_size)
    w = W.reshape(groups, cout_g, cin_g * d_mul).transpose(1, 2).reshape(cin, d_mul, cout_g)
    k = torch.bmm(D + identity, w)  # (Cin, MN, Cout/g)
    if cout_g > 1:
        k = _Transpose.apply(k.view(groups, cin_g * mn, cout_g))
    return k.view(cout, cin_g, *kernel_size)


class _Transpose(torch.autograd.Function):
    """``x.transpose(-2, -1).contiguous()``, and the same for its gradient.

    Autograd would hand ``bmm`` the gradient as a transposed view, a layout for which CPU
    ``bmm`` falls back to a per-matrix loop many times slower. A 2-D ``x`` (groups=1) goes
    through :func:`transpose_2d`, which copies it the way found fastest on this machine.
    """

    @staticmethod
    def forward(ctx, x):
        return _swap_last_two(x)

    @staticmethod
    def backward(ctx, grad):
        return _swap_last_two(grad)


def _swap_last_two(x):
    return transpose_2d(x) if x.dim() == 2 else x.transpose(-2, -1).contiguous()


def _transpose_whole(x):
    """PyTorch's blocked 2-D transpose copy of the whole matrix in one call."""
    return x.t().contiguous()


# A block of source rows of about this many bytes, and at least this many rows (so that every
# destination row gets a segment of a few cache lines), stays in a core's L2 while it is copied.
ROW_BLOCK_BYTES = 512 * 1024
ROW_BLOCK_MIN_ROWS = 64


def _transpose_in_row_blocks(x):
    """The same copy, one block of source rows at a time (TensorIterator's strided copy)."""
    rows, cols = x.shape
    out = x.new_empty(cols, rows)
    step = max(ROW_BLOCK_MIN_ROWS, ROW_BLOCK_BYTES // max(1, cols * x.element_size()))
    for start in range(0, rows, step):
        out[:, start:start + step].copy_(x[start:start + step].t())
    return out


TRANSPOSES = {'whole': _transpose_whole, 'row_blocks': _transpose_in_row_blocks}
# Matrices smaller than this are copied whole: microseconds either way, below timing noise.
TIMED_MIN_NUMEL = 1 << 18
_transpose_choice = {}  # (shape, dtype) -> name in TRANSPOSES, per process


def _time_transposes(x, rounds=3):
    """The name of the faster copy of ``x``: the best of ``rounds`` alternating runs each."""
    best = dict.fromkeys(TRANSPOSES, math.inf)
    for _ in range(rounds):
        for name, fn in TRANSPOSES.items():
            t0 = time.perf_counter()
            fn(x)
            best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.get)


def transpose_2d(x):
    """``x.t().contiguous()`` of a contiguous CPU matrix, by the copy fastest on this CPU.

    Which copy wins depends on the CPU: on the Intel Xeon (AMX) VM the one-call copy of
    DO-Conv's largest composed kernels ran 3-4x slower than copying blocks of rows, on the AMD
    EPYC VM the one-call copy was fast (docs/benchmarks.md section 3). Both give the same bits,
    so each (shape, dtype) times both once per process and keeps the faster one.
    """
    if (x.device.type != 'cpu' or x.dim() != 2 or not x.is_contiguous()
            or x.numel() < TIMED_MIN_NUMEL or _exporting()):
        return _transpose_whole(x)
    key = (tuple(x.shape), x.dtype)
    name = _transpose_choice.get(key)
    if name is None:
        name = _transpose_choice[key] = _time_transposes(x)
    return TRANSPOSES[name](x)


def _doconv_W(out_channels, cin_g, d_mul, groups, has_D, **factory):
    """Uninitialised W of shape (Cout, Cin/g, D_mul); for groups=1 with a D stored as
    (Cin, D_mul, Cout) in memory, the layout :func:`compose_kernel`'s bmm reads and writes."""
    if groups == 1 and has_D:
        return torch.empty(cin_g, d_mul, out_channels, **factory).permute(2, 0, 1)
    return torch.empty(out_channels, cin_g, d_mul, **factory)


@MODELS.register_module(name=['DOConv', 'DOConv2d'])
class DOConv2d(nn.Module):
    """Depthwise over-parameterised 2-D convolution, a drop-in for ``nn.Conv2d``.

    ``groups=1`` is DO-Conv, ``groups=in_channels`` DO-DConv, anything between DO-GConv.
    Build it from configs with ``conv_cfg=dict(type='DOConv', D_mul=...)``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode: as for ``nn.Conv2d`` (``padding`` may be 'same' / 'valid').
        D_mul (int, optional): depth multiplier of D; defaults to M*N and must be >= M*N (below
            that, D + I cannot start at the identity and the layer is not an over-parameterisation
            of a plain conv). Ignored for 1x1 kernels, which have no D and act as a plain conv.

    Initialisation: W takes OpenMMLab's default conv init (Kaiming normal, fan_out, ReLU) as if it
    were the composed kernel, D and the bias start at zero. The layer has ``init_weights`` so
    mmcv's ``ConvModule`` leaves it alone, and mmengine's ``BaseModule.init_weights`` re-runs it.
    Initialisers keyed on ``layer='Conv2d'`` do not match it (it is deliberately not an
    ``nn.Conv2d`` subclass: code that rewrites ``conv.weight``, such as ``fuse_conv_bn``, must
    see it only after :meth:`to_fused`).

    Loading (via ``_load_from_state_dict``, so plain ``load_state_dict`` and mmengine's
    ``Pretrained`` init work): a plain conv's ``weight`` fills W's first M*N columns and zeroes D
    (D is reported missing), so the layer equals that conv; the authors' layout ``W``, ``D``,
    ``d_diag`` / ``D_diag`` loads as is. Their code pairs slice (o, i) with D row
    ``(o * Cin/g + i) mod Cin``, which is the convolved channel only for groups=1 and for
    depthwise layers with Cout == Cin; for other grouped layers the reference kernel is composed
    their way and stored in W with D = 0 (same outputs, a warning says so).
    """

    transposed = False  # read by mmcv's ConvModule
    output_padding = (0, 0)
    #: the memory layout the composed kernel is convolved in ('nchw' or 'channels_last'): a
    #: plain conv's is its weight's, this layer composes its kernel at every call
    #: (``head_layout.set_module_layout`` sets it where channels_last was timed faster)
    kernel_layout = 'nchw'

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode='zeros', D_mul=None, device=None, dtype=None):
        super().__init__()
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ConfigError(f'DOConv2d: in_channels={in_channels} and out_channels={out_channels} '
                             f'must both be divisible by groups={groups} (a positive integer).')
        if padding_mode not in _PADDING_MODES:
            raise ConfigError(f'DOConv2d: padding_mode={padding_mode!r} is not one of '
                             f'{_PADDING_MODES}.')
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = (
            _pair(kernel_size), _pair(stride), _pair(dilation))
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = self._pad_for_f_pad()

        mn = self.kernel_size[0] * self.kernel_size[1]
        self.D_mul = self._check_D_mul(D_mul, mn)
        factory = dict(device=device, dtype=dtype)
        self.W = nn.Parameter(_doconv_W(out_channels, in_channels // groups, self.D_mul, groups,
                                        mn > 1, **factory))
        if mn > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, mn, self.D_mul, **factory))
            self.register_buffer('identity', doconv_identity(mn, self.D_mul, **factory),
                                 persistent=False)
        else:
            self.register_parameter('D', None)
            self.register_buffer('identity', None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter('bias', None)
        self.init_weights()

    # -- construction helpers ------------------------------------------------------------------
    def _check_D_mul(self, D_mul, mn):
        if mn == 1:  # nothing to over-parameterise; accept any D_mul so one conv_cfg fits all
            return 1
        if D_mul is None:
            return mn
        if isinstance(D_mul, bool) or not isinstance(D_mul, int) or D_mul < mn:
            raise ConfigError(
                f'DOConv2d: D_mul={D_mul!r} is invalid for a {self.kernel_size[0]}x'
                f'{self.kernel_size[1]} kernel; use an integer D_mul >= M*N = {mn} '
                f'(or None for {mn}), since smaller D_mul cannot form the identity.')
        return D_mul

    def _pad_for_f_pad(self):
        """Padding for ``F.pad`` in non-zero padding modes, computed as ``nn.Conv2d`` does."""
        if not isinstance(self.padding, str):
            return _reverse_repeat_tuple(self.padding, 2)
        if self.padding not in ('same', 'valid'):
            raise ConfigError(f"DOConv2d: padding={self.padding!r} must be 'same', 'valid' or ints.")
        if self.padding == 'same' and any(s != 1 for s in self.stride):
            raise ConfigError("DOConv2d: padding='same' is not supported for strided convolutions.")
        pad = [0, 0, 0, 0]
        if self.padding == 'same':
            for d, k, i in zip(self.dilation, self.kernel_size, (1, 0)):
                total = d * (k - 1)
                pad[2 * i], pad[2 * i + 1] = total // 2, total - total // 2
        return pad

    @torch.no_grad()
    def init_weights(self):
        """OpenMMLab's default conv init on the composed kernel: Kaiming normal (fan_out, ReLU)."""
        mn = self.kernel_size[0] * self.kernel_size[1]
        std = math.sqrt(2.0 / (self.out_channels // self.groups * mn))
        # D = 0 composes floor(D_mul / MN) tiles of W: scale so their sum has the target std.
        # Drawn in W's logical order (not its memory order), so a seed gives the same W always.
        self.W.copy_(torch.empty(self.W.shape, dtype=self.W.dtype, device=self.W.device).normal_(
            0, std / math.sqrt(self.D_mul // mn)))
        if self.D is not None:
            self.D.zero_()
        if self.bias is not None:
            self.bias.zero_()

    # -- forward ---------------------------------------------------------------------------------
    def composed_weight(self):
        """The (Cout, Cin/g, M, N) kernel this layer convolves with (differentiable)."""
        return compose_kernel(self.W, self.D, self.identity, self.groups, self.kernel_size)

    def forward(self, x):
        weight = self.composed_weight()
        if self.kernel_layout == 'channels_last':
            weight = weight.contiguous(memory_format=torch.channels_last)
        if self.padding_mode != 'zeros':
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    # -- re-parameterisation ----------------------------------------------------------------------
    @torch.no_grad()
    def to_fused(self):
        """Plain ``nn.Conv2d`` (same geometry, device, dtype, mode) with the composed kernel."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device=self.W.device, dtype=self.W.dtype)
        conv.weight.copy_(self.composed_weight())
        conv.weight.requires_grad_(self.W.requires_grad)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
            conv.bias.requires_grad_(self.bias.requires_grad)
        return conv.train(self.training)

    # -- loading plain-conv and reference checkpoints ---------------------------------------------
    def _kernel_to_W(self, kernel):
        """W (and D = 0) that compose exactly ``kernel``: it fills the first M*N columns of W."""
        mn = kernel.shape[-2] * kernel.shape[-1]
        W = kernel.new_zeros(self.W.shape)
        W[..., :mn] = kernel.reshape(kernel.shape[0], kernel.shape[1], mn)
        return W

    def _pairs_like_reference(self):
        """True where the authors' reshape pairs every kernel slice with its convolved channel."""
        cout, cin_g = self.out_channels, self.in_channels // self.groups
        o = torch.arange(cout)[:, None]
        i = torch.arange(cin_g)[None, :]
        true_channel = o // (cout // self.groups) * cin_g + i
        return torch.equal(true_channel, (o * cin_g + i) % self.in_channels)

    def _check_shape(self, key, tensor, expected, what):
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f'Cannot load {what} {key!r} of shape {tuple(tensor.shape)} into '
                f'DOConv2d({self.extra_repr()}), which needs {tuple(expected)}: the checkpoint '
                'was saved for a different layer geometry or D_mul; build the model to match it.')

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        cout, cin_g = self.out_channels, self.in_channels // self.groups
        w_key, d_key, plain_key = prefix + 'W', prefix + 'D', prefix + 'weight'
        if plain_key in state_dict:
            if w_key in state_dict:
                raise ValueError(f'State dict holds both {plain_key!r} (plain conv) and {w_key!r} '
                                 '(DO-Conv) for one layer; keep only one of them.')
            kernel = state_dict.pop(plain_key)
            self._check_shape(plain_key, kernel, (cout, cin_g, *self.kernel_size),
                              'plain conv weight')
            state_dict[w_key] = self._kernel_to_W(kernel)
            if self.D is not None and d_key not in state_dict:
                with torch.no_grad():
                    self.D.zero_()  # D stays 'missing' but the layer now equals the plain conv
        if w_key in state_dict:
            self._check_shape(w_key, state_dict[w_key], self.W.shape, 'DO-Conv W')
        if self.D is not None:
            if d_key in state_dict:
                self._check_shape(d_key, state_dict[d_key], self.D.shape, 'DO-Conv D')
            self._load_reference_diag(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _load_reference_diag(self, state_dict, prefix):
        """Check and drop the authors' frozen identity; remap their pairing where it differs."""
        diag_keys = [prefix + n for n in ('d_diag', 'D_diag') if prefix + n in state_dict]
        if not diag_keys:
            return
        for key in diag_keys:
            diag = state_dict.pop(key)
            self._check_shape(key, diag, self.D.shape, 'reference identity')
            if not torch.equal(diag.to(self.identity).expand_as(self.D),
                               self.identity.expand_as(self.D)):
                raise ValueError(f'{key!r} is not the DO-Conv identity for D_mul={self.D_mul}; '
                                 'this checkpoint was not made by the DO-Conv reference code.')
        w_key, d_key = prefix + 'W', prefix + 'D'
        if self._pairs_like_reference() or w_key not in state_dict or d_key not in state_dict:
            return
        W, D = state_dict[w_key], state_dict[d_key]
        d_rows = torch.arange(self.out_channels)[:, None] * W.shape[1] \
            + torch.arange(W.shape[1])[None, :]
        d_rows = d_rows % self.in_channels
        kernel = torch.einsum('oims,ois->oim', (D + self.identity.to(D))[d_rows], W)
        state_dict[w_key] = self._kernel_to_W(kernel.reshape(*W.shape[:2], *self.kernel_size))
        state_dict[d_key] = torch.zeros_like(D)
        warnings.warn(
            f'{prefix or "DOConv2d"}: the DO-Conv reference code pairs this grouped layer '
            f'(groups={self.groups}, in={self.in_channels}, out={self.out_channels}) with D rows '
            'of other channels; its composed kernel was loaded into W with D = 0 (same outputs, '
            'D restarts from zero).', stacklevel=2)

    def extra_repr(self):
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}, D_mul={self.D_mul}')
        if self.padding != (0, 0):
            s += f', padding={self.padding}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode!r}'
        return s
