"""UniRepLKNet (Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet", CVPR 2024)
for mmseg / mmdet 3.x.

Module names follow the authors' code (AILab-CVC/UniRepLKNet, ``unireplknet.py``), so their
published ImageNet checkpoints load unchanged (``downsample_layers.0.0.weight``,
``stages.2.0.dwconv.dil_conv_k7_2.weight``, ``stages.2.0.pwconv2.2.running_var``, ...) and a fused
model has the keys of their ``deploy=True`` structure. Differences from it: ``norm_cfg`` is honoured
by every BatchNorm (the authors switch SyncBN with a flag), ``out_indices`` selects the returned
stages (the authors always return four), fusing follows the project protocol (``to_fused()``,
children first, idempotent, refused in training mode) and checkpoint keys are checked instead of
loaded with ``strict=False``.
"""
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ..checkpoint import compare_keys, mismatch_error
from ..layers.bn_fold import bn_folded_kernel, is_batch_norm
from ..layers.large_kernel import LargeKernelDWConv2d
from ..scope import ConfigError
from .base import LargeKernelBackbone, _checkpointed

__all__ = ['UniRepLKNet', 'UniRepLKNetBlock', 'DilatedReparamBlock', 'GRN', 'SEBlock',
           'LayerNorm', 'DILATED_BRANCHES']

#: large kernel -> (kernel sizes, dilations) of its parallel dilated depthwise branches; the
#: authors' table ("default settings, not tuned carefully"). Each branch spans (k - 1) * r + 1.
DILATED_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}
#: block kernel sizes: 0 no depthwise conv, 3 / 5 a plain depthwise conv, >= 7 a DilatedReparamBlock
BLOCK_KERNELS = (0, 3, 5) + tuple(sorted(k for k in DILATED_BRANCHES if k >= 7))


# -- small layers ------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """The authors' LayerNorm: over the last dim (``channels_last``) or dim 1
    (``channels_first``, NCHW without permutes)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format='channels_last'):
        super().__init__()
        if data_format not in ('channels_last', 'channels_first'):
            raise ValueError(f"LayerNorm data_format must be 'channels_last' or 'channels_first', "
                             f'got {data_format!r}.')
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps, self.data_format = eps, data_format
        self.normalized_shape = (normalized_shape, )

    def forward(self, x):
        if self.data_format == 'channels_last':
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def extra_repr(self):
        return f'{self.normalized_shape[0]}, eps={self.eps}, data_format={self.data_format}'


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2) of NHWC features; the authors' ``GRNwithNHWC``.

    ``(gamma * N(x) + 1) * x + beta`` with ``N`` the per-channel spatial L2 norm divided by its
    channel mean. ``beta`` is None once folded into the next linear layer (the fused form).
    """

    def __init__(self, dim, use_bias=True):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        else:
            self.register_parameter('beta', None)

    @property
    def use_bias(self):
        return self.beta is not None

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma * nx + 1) * x
        return out + self.beta if self.beta is not None else out


class SEBlock(nn.Module):
    """Squeeze-and-excitation (NCHW): pool -> 1x1 ``down`` -> ReLU -> 1x1 ``up`` -> sigmoid gate."""

    def __init__(self, channels, internal_channels):
        super().__init__()
        self.down = nn.Conv2d(channels, internal_channels, 1, bias=True)
        self.up = nn.Conv2d(internal_channels, channels, 1, bias=True)
        self.nonlinear = nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.up(self.nonlinear(self.down(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(s)


class NCHWtoNHWC(nn.Module):
    """Permute to channels last: the FFN's linear layers (keeps the authors' Sequential indices)."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class NHWCtoNCHW(nn.Module):
    """Permute back to NCHW after the FFN."""

    def forward(self, x):
        return x.permute(0, 3, 1, 2)


# -- fusing helpers ----------------------------------------------------------------------------
def _plain_conv(parent, name):
    """``parent.<name>`` as a conv with its kernel in ``.weight``: a DO-Conv is fused first.

    The walker fuses children first anyway; this keeps a direct ``to_fused()`` call right too
    (reading an unfused DO-Conv's parameters would fuse the wrong kernel).
    """
    conv = parent._modules[name]
    if callable(getattr(conv, 'to_fused', None)):
        conv = conv.to_fused()
        parent._modules[name] = conv
    if not isinstance(getattr(conv, 'weight', None), torch.Tensor):
        raise TypeError(f'cannot fuse {name}, a {type(conv).__name__}: it has no conv weight '
                        'after to_fused(); use a conv layer whose kernel is its .weight.')
    return conv


def _check_bn(norm, where):
    if not is_batch_norm(norm):
        raise TypeError(f'cannot fuse {where}: its norm is a {type(norm).__name__}, but fusing '
                        "needs BatchNorm running statistics; build UniRepLKNet with a BN-type "
                        "norm_cfg (e.g. 'BN' or 'SyncBN').")


def _conv_bn_kernel(conv, norm, where):
    """(kernel, bias) of ``norm(conv(x))`` in float64; ``norm`` may be an ``nn.Identity`` left by
    a Conv+BN folding pass (mmcv's ``fuse_conv_bn``) that ran before."""
    if isinstance(norm, nn.Identity):
        w = conv.weight.double()
        bias = conv.bias.double() if conv.bias is not None else w.new_zeros(w.shape[0])
        return w, bias
    _check_bn(norm, where)
    return bn_folded_kernel(conv, norm)


def _dilated_to_dense(kernel, dilation):
    """The (k - 1) * r + 1 kernel equal to ``kernel`` applied with dilation r (taps r apart)."""
    k = kernel.shape[-1]
    size = (k - 1) * dilation + 1
    dense = kernel.new_zeros(*kernel.shape[:2], size, size)
    dense[..., ::dilation, ::dilation] = kernel
    return dense


def _conv_like(conv, weight, bias):
    """A conv of ``conv``'s kind and geometry holding ``weight`` and ``bias``, in eval mode."""
    factory = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    if isinstance(conv, LargeKernelDWConv2d):
        new = LargeKernelDWConv2d(conv.in_channels, conv.kernel_size, conv.stride,
                                  padding=conv.padding, dilation=conv.dilation, bias=True,
                                  **factory)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, bias=True, **factory)
    new.weight.copy_(weight)
    new.bias.copy_(bias)
    new.requires_grad_(conv.weight.requires_grad)
    return new.train(False)


# -- blocks ------------------------------------------------------------------------------------
class DilatedReparamBlock(BaseModule):
    """A large depthwise kernel (``lk_origin`` + ``origin_bn``) and parallel dilated small
    depthwise kernels (``dil_conv_k{k}_{r}`` + ``dil_bn_k{k}_{r}``), summed.

    :meth:`to_fused` folds each BN into its conv, turns every dilated k x k kernel into the
    equivalent (k - 1) * r + 1 kernel (its taps r apart, zeros between), zero-pads it to the large
    size (all centred), adds, and keeps ``lk_origin`` alone with a bias: the authors' deploy form.

    Args:
        channels (int): input = output channels (depthwise).
        kernel_size (int): the large kernel side, a key of :data:`DILATED_BRANCHES`.
        small_kernel_merged (bool): build the fused form directly (the authors' ``deploy``).
        conv_cfg (dict, optional): conv config of the dilated branches (DO-Conv). The large
            kernel is always a plain :class:`LargeKernelDWConv2d` (the project's dispatch).
        norm_cfg (dict): norm config of every branch.
    """

    def __init__(self, channels, kernel_size, small_kernel_merged=False, conv_cfg=None,
                 norm_cfg=dict(type='BN'), init_cfg=None):
        super().__init__(init_cfg)
        if kernel_size not in DILATED_BRANCHES:
            raise ConfigError(f'DilatedReparamBlock has no dilated branches for kernel_size='
                              f'{kernel_size}; use one of {sorted(DILATED_BRANCHES)}.')
        self.channels, self.kernel_size = channels, kernel_size
        self.kernel_sizes, self.dilates = DILATED_BRANCHES[kernel_size]  # the authors' names
        self.lk_origin = LargeKernelDWConv2d(channels, kernel_size, bias=small_kernel_merged)
        if small_kernel_merged:
            return
        self.origin_bn = build_norm_layer(norm_cfg, channels)[1]
        for k, r in self.branches:
            self.add_module(f'dil_conv_k{k}_{r}', build_conv_layer(
                conv_cfg, channels, channels, k, stride=1, padding=(r * (k - 1) + 1) // 2,
                dilation=r, groups=channels, bias=False))
            self.add_module(f'dil_bn_k{k}_{r}', build_norm_layer(norm_cfg, channels)[1])

    @property
    def branches(self):
        return tuple(zip(self.kernel_sizes, self.dilates))

    @property
    def is_fused(self):
        return 'origin_bn' not in self._modules

    def forward(self, x):
        if self.is_fused:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            out = out + self._modules[f'dil_bn_k{k}_{r}'](self._modules[f'dil_conv_k{k}_{r}'](x))
        return out

    @torch.no_grad()
    def to_fused(self):
        """Fuse the branches into ``lk_origin`` in place; return self (no-op once fused)."""
        if self.is_fused:
            return self
        if self.training:
            raise RuntimeError('DilatedReparamBlock.to_fused() needs eval mode (it folds '
                               'BatchNorm running statistics); call model.eval() first.')
        kernel, bias = _conv_bn_kernel(self.lk_origin, self.origin_bn,
                                       'the large kernel of a DilatedReparamBlock')
        for k, r in self.branches:
            conv = _plain_conv(self, f'dil_conv_k{k}_{r}')
            small, small_bias = _conv_bn_kernel(conv, self._modules[f'dil_bn_k{k}_{r}'],
                                                f'the dilated {k}x{k} (r={r}) branch')
            dense = _dilated_to_dense(small, r)
            pad = (self.kernel_size - dense.shape[-1]) // 2
            kernel = kernel + F.pad(dense, [pad] * 4)
            bias = bias + small_bias
        self.lk_origin = _conv_like(self.lk_origin, kernel, bias)
        del self.origin_bn
        for k, r in self.branches:
            delattr(self, f'dil_conv_k{k}_{r}')
            delattr(self, f'dil_bn_k{k}_{r}')
        return self


class UniRepLKNetBlock(BaseModule):
    """dwconv -> BN -> SE -> Linear (NHWC) -> GELU -> GRN -> Linear -> BN -> layer scale ->
    drop path, plus the input.

    ``dwconv`` is a :class:`DilatedReparamBlock` for kernel sizes >= 7, a plain depthwise conv for
    3 and 5, nothing for 0 (the authors' rule). :meth:`to_fused` then folds, as the authors'
    ``reparameterize()``: the BN after the depthwise conv into it, and the GRN bias, the BN after
    the second linear layer and the layer scale into that linear layer (which gets a bias).

    Args:
        dim (int): channels.
        kernel_size (int): one of :data:`BLOCK_KERNELS`.
        drop_path (float): stochastic depth rate.
        layer_scale_init_value (float): initial layer scale; 0 or None for none.
        ffn_ratio (float): FFN width / dim (the authors' ``ffn_factor``, 4).
        small_kernel_merged (bool): build the fused form directly (the authors' ``deploy``).
        conv_cfg (dict, optional): conv config of the small depthwise kernels (DO-DConv): the
            3 / 5 depthwise conv and the dilated branches.
        norm_cfg (dict): config of the BatchNorms.
    """

    def __init__(self, dim, kernel_size, drop_path=0., layer_scale_init_value=1e-6, ffn_ratio=4,
                 small_kernel_merged=False, conv_cfg=None, norm_cfg=dict(type='BN'),
                 init_cfg=None):
        super().__init__(init_cfg)
        if kernel_size not in BLOCK_KERNELS:
            raise ConfigError(f'UniRepLKNet block kernel_size={kernel_size} is not supported; use '
                              '0 (no depthwise conv), 3 or 5 (a plain depthwise conv) or one of '
                              f'{", ".join(str(k) for k in BLOCK_KERNELS[3:])} '
                              '(a DilatedReparamBlock).')
        if small_kernel_merged:
            conv_cfg = None
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, small_kernel_merged, conv_cfg,
                                              norm_cfg)
        else:
            self.dwconv = build_conv_layer(conv_cfg, dim, dim, kernel_size, stride=1,
                                           padding=kernel_size // 2, groups=dim,
                                           bias=small_kernel_merged)
        self.norm = (nn.Identity() if small_kernel_merged or kernel_size == 0 else
                     build_norm_layer(norm_cfg, dim)[1])
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_ratio * dim)
        self.pwconv1 = nn.Sequential(NCHWtoNHWC(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn_dim, use_bias=not small_kernel_merged))
        if small_kernel_merged:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), NHWCtoNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), NHWCtoNCHW(),
                                         build_norm_layer(norm_cfg, dim)[1])
        if not small_kernel_merged and layer_scale_init_value:
            self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.register_parameter('gamma', None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def is_fused(self):
        if isinstance(self.dwconv, DilatedReparamBlock):
            dwconv_fused = self.dwconv.is_fused
        else:  # nothing, a plain conv, or a DO-DConv still to fuse
            dwconv_fused = not callable(getattr(self.dwconv, 'to_fused', None))
        return (dwconv_fused and isinstance(self.norm, nn.Identity) and len(self.pwconv2) == 2
                and self.gamma is None and not self.act[1].use_bias)

    def forward(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def to_fused(self):
        """Fold as the authors' ``reparameterize()``, in place; return self (no-op once fused)."""
        if self.is_fused:
            return self
        if self.training:
            raise RuntimeError('UniRepLKNetBlock.to_fused() needs eval mode (it folds BatchNorm '
                               'running statistics); call model.eval() first.')
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.to_fused()  # already done by the walker (children first)
        elif callable(getattr(self.dwconv, 'to_fused', None)):  # a DO-DConv 3x3 / 5x5
            _plain_conv(self, 'dwconv')
        if not isinstance(self.norm, nn.Identity):  # the BN after the depthwise conv
            dilated = isinstance(self.dwconv, DilatedReparamBlock)
            owner, name = (self.dwconv, 'lk_origin') if dilated else (self, 'dwconv')
            conv = owner._modules[name]
            kernel, bias = _conv_bn_kernel(conv, self.norm, 'the depthwise conv of a block')
            owner._modules[name] = _conv_like(conv, kernel, bias)
            self.norm = nn.Identity()
        self._fold_into_pwconv2()
        return self

    def _fold_into_pwconv2(self):
        """GRN bias, BN and layer scale into the second linear layer: y = x W'^T + b'."""
        linear, grn = self.pwconv2[0], self.act[1]
        w = linear.weight.double()
        b = linear.bias.double() if linear.bias is not None else w.new_zeros(w.shape[0])
        if grn.beta is not None:  # W (g + beta) = W g + W beta
            b = b + w @ grn.beta.double().reshape(-1)
        if len(self.pwconv2) == 3:
            bn = self.pwconv2[2]
            _check_bn(bn, 'the FFN output of a block')
            std = (bn.running_var.double() + bn.eps).sqrt()
            scale = (bn.weight.double() if bn.weight is not None else torch.ones_like(std)) / std
            shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
            w, b = w * scale[:, None], (b - bn.running_mean.double()) * scale + shift
        if self.gamma is not None:
            ls = self.gamma.double()
            w, b = w * ls[:, None], b * ls
        fused = nn.Linear(linear.in_features, linear.out_features, bias=True,
                          device=linear.weight.device, dtype=linear.weight.dtype)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        fused.requires_grad_(linear.weight.requires_grad)
        self.pwconv2 = nn.Sequential(fused, NHWCtoNCHW())
        grn.beta = None
        self.gamma = None


def _arch_values(arch):
    """Validated copy of an arch dict with tuple values."""
    keys = ('depths', 'dims', 'kernel_sizes')
    missing = [k for k in keys if k not in arch]
    extra = [k for k in arch if k not in keys]
    if missing or extra:
        raise ConfigError(f'a UniRepLKNet arch dict needs exactly the keys {", ".join(keys)}; '
                          f'missing {missing}, unknown {extra}.')
    depths, dims = tuple(arch['depths']), tuple(arch['dims'])
    kernels = tuple(tuple(k) for k in arch['kernel_sizes'])
    if not depths or len(dims) != len(depths) or len(kernels) != len(depths) or any(
            len(k) != d for k, d in zip(kernels, depths)):
        raise ConfigError('a UniRepLKNet arch dict needs depths, dims and kernel_sizes of the same '
                          'non-zero length, with one kernel size per block (len(kernel_sizes[i]) '
                          f'== depths[i]); got {arch}.')
    bad = sorted({k for stage in kernels for k in stage if k not in BLOCK_KERNELS})
    if bad:
        raise ConfigError(f'UniRepLKNet kernel sizes {bad} are not supported; use 0, 3, 5 or one '
                          f'of {", ".join(str(k) for k in BLOCK_KERNELS[3:])}.')
    return dict(depths=depths, dims=dims, kernel_sizes=kernels)


_K_AFP = ((3, 3), (13, 13), (13, ) * 6, (13, 13))
_K_N = ((3, 3), (13, 13), (13, ) * 8, (13, 13))
_K_T = ((3, 3, 3), (13, 13, 13), (13, 3) * 9, (13, 13, 13))
_K_SBLXL = ((3, 3, 3), (13, 13, 13), (13, 3, 3) * 9, (13, 13, 13))


@MODELS.register_module()
class UniRepLKNet(LargeKernelBackbone):
    """UniRepLKNet backbone: dilated re-parameterised large depthwise kernels with SE and GRN FFNs.

    Stem (3x3 s2 conv to C/2, channels-first LayerNorm, GELU, 3x3 s2 conv, LayerNorm), then
    stages of :class:`UniRepLKNetBlock`; before stage i > 0 a 3x3 s2 conv and a LayerNorm. Stage
    i runs at stride 4 * 2**i; each returned stage has its own channels-first LayerNorm
    (``norm{i}``), as in the authors' downstream mode.

    ======  ============  ========================  ============================================
    arch    depths        dims                      kernel sizes (stage 2)
    ======  ============  ========================  ============================================
    'A'     2, 2, 6, 2    40, 80, 160, 320          all 13
    'F'     2, 2, 6, 2    48, 96, 192, 384          all 13
    'P'     2, 2, 6, 2    64, 128, 256, 512         all 13
    'N'     2, 2, 8, 2    80, 160, 320, 640         all 13
    'T'     3, 3, 18, 3   80, 160, 320, 640         13, 3 repeated
    'S'     3, 3, 27, 3   96, 192, 384, 768         13, 3, 3 repeated
    'B'     3, 3, 27, 3   128, 256, 512, 1024       13, 3, 3 repeated
    'L'     3, 3, 27, 3   192, 384, 768, 1536       13, 3, 3 repeated
    'XL'    3, 3, 27, 3   256, 512, 1024, 2048      13, 3, 3 repeated
    'tiny'  1, 1, 2, 1    16, 32, 64, 128           13, 3
    ======  ============  ========================  ============================================

    Stage 0 has 3x3 kernels, stages 1 and 3 13x13 ones (the authors' defaults). 'tiny' keeps both
    block kinds for fast CPU tests and demos.

    Args:
        arch (str | dict): a name above or a dict with keys ``depths, dims, kernel_sizes`` (one
            kernel size per block: 0, 3, 5, 7, 9, 11, 13, 15 or 17).
        in_channels (int): input image channels. Defaults to 3.
        out_indices (Sequence[int]): stages whose normed outputs are returned. Stages after the
            last one are not computed. Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 the stem, k >= 1 the stem, stages 0..k-1,
            the downsampling layers feeding them and their output norms (eval mode, no grad).
        norm_eval (bool): keep every BN in eval mode while training.
        with_cp (bool): activation checkpointing of each block.
        drop_path_rate (float): stochastic depth, linearly spaced over all blocks from 0.
        layer_scale_init_value (float): initial layer scale of every block. Defaults to 1e-6.
        norm_cfg (dict): config of every BatchNorm, e.g. ``dict(type='SyncBN')``. The
            LayerNorms of the stem, the downsampling layers and the outputs are the authors'.
        small_kernel_merged (bool): build the fused (deploy) structure directly, the authors'
            ``deploy=True``: what ``reparam_mm.fuse`` leaves, so deploy configs load fused
            checkpoints. Plain convs where ``stage_with_doconv`` would put DO-Conv.
        stage_with_doconv (Sequence[bool], optional): per stage (default: none), make its k > 1
            convs DO-Conv where that over-parameterises: the stem's two 3x3 convs (stage 0), the
            3x3 downsampling conv into the stage, the 3x3 / 5x5 depthwise convs of its blocks and
            the dilated branches (DO-DConv). The large kernels stay plain, as in RepLKNet.
        doconv_cfg (dict): conv config of those layers. Defaults to ``dict(type='DOConv')``.
        pretrained (str, optional): deprecated, use ``init_cfg``.
        init_cfg (dict | list[dict], optional): e.g. ``dict(type='Pretrained',
            checkpoint='unireplknet_s_in1k_224_acc83.91.pth')``. The state dict is taken from
            ``state_dict`` or ``model``; the classifier's ``norm.*`` / ``head.*`` are ignored, the
            output norms ``norm{i}`` keep their initial values if absent, and any other mismatch
            raises an error naming the keys. ``prefix`` selects a sub-module (``'backbone.'``).
            None: the authors' from-scratch init (truncated normal, std 0.02, for every conv and
            linear layer; zero biases).
    """

    arch_settings = {
        'A': dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), kernel_sizes=_K_AFP),
        'F': dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), kernel_sizes=_K_AFP),
        'P': dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), kernel_sizes=_K_AFP),
        'N': dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), kernel_sizes=_K_N),
        'T': dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640), kernel_sizes=_K_T),
        'S': dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_sizes=_K_SBLXL),
        'B': dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), kernel_sizes=_K_SBLXL),
        'L': dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), kernel_sizes=_K_SBLXL),
        'XL': dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048), kernel_sizes=_K_SBLXL),
        'tiny': dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                     kernel_sizes=((3, ), (13, ), (13, 3), (13, ))),
    }
    #: top-level keys of the authors' ImageNet classifier that a backbone ignores
    classifier_prefixes = ('norm.', 'head.')
    #: the authors' from-scratch init, used when no init_cfg is given
    default_init_cfg = [dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.)]
    backbone_name = 'UniRepLKNet'
    _arch_values = staticmethod(_arch_values)

    def __init__(self, arch='S', in_channels=3, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                 norm_eval=False, with_cp=False, drop_path_rate=0., layer_scale_init_value=1e-6,
                 norm_cfg=dict(type='BN'), small_kernel_merged=False, stage_with_doconv=None,
                 doconv_cfg=dict(type='DOConv'), pretrained=None, init_cfg=None):
        init_cfg = self._resolve_init_cfg(pretrained, init_cfg)
        super().__init__(init_cfg=init_cfg if init_cfg is not None else self.default_init_cfg)
        self.arch = arch = self._resolve_arch(arch, 'depths, dims, kernel_sizes')
        dims, depths = arch['dims'], arch['depths']
        self.num_stages = len(depths)
        self.out_indices = self._check_out_indices(out_indices)
        self.stage_with_doconv = self._check_stage_args(frozen_stages, stage_with_doconv,
                                                         doconv_cfg)
        self.frozen_stages, self.norm_eval, self.with_cp = frozen_stages, norm_eval, with_cp
        self.small_kernel_merged = small_kernel_merged
        conv_cfgs = [doconv_cfg if s and not small_kernel_merged else None
                     for s in self.stage_with_doconv]

        def downsample_conv(i, cin, cout):
            return build_conv_layer(conv_cfgs[i], cin, cout, 3, stride=2, padding=1, bias=True)

        c0 = dims[0]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            downsample_conv(0, in_channels, c0 // 2),
            LayerNorm(c0 // 2, eps=1e-6, data_format='channels_first'),
            nn.GELU(),
            downsample_conv(0, c0 // 2, c0),
            LayerNorm(c0, eps=1e-6, data_format='channels_first'))])
        for i in range(1, self.num_stages):
            self.downsample_layers.append(nn.Sequential(
                downsample_conv(i, dims[i - 1], dims[i]),
                LayerNorm(dims[i], eps=1e-6, data_format='channels_first')))

        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        self.stages = nn.ModuleList()
        for i, (dim, kernels) in enumerate(zip(dims, arch['kernel_sizes'])):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dim, k, dpr[first + j], layer_scale_init_value,
                                 small_kernel_merged=small_kernel_merged, conv_cfg=conv_cfgs[i],
                                 norm_cfg=norm_cfg) for j, k in enumerate(kernels)]))
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm(dims[i], eps=1e-6, data_format='channels_first'))
        self._freeze_stages()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x):
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self.downsample_layers[i](x)
            for block in self.stages[i]:
                x = _checkpointed(block, x) if self.with_cp and self.training else block(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x))
        return tuple(outs)

    # -- training-mode behaviour ----------------------------------------------------------------
    def _freeze_stages(self):
        frozen = [self.downsample_layers[0]] if self.frozen_stages >= 0 else []
        for i in range(max(self.frozen_stages, 0)):
            frozen += [self.downsample_layers[i], self.stages[i]]
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        self._freeze(frozen)

    # -- pretrained weights (the loading sequence is LargeKernelBackbone.load_pretrained) -----
    def _backbone_state(self, state, prefix, name):
        state = super()._backbone_state(state, prefix, name)
        # the output norms of stages this model does not return (a downstream checkpoint's)
        unused = tuple(f'norm{i}.' for i in range(self.num_stages) if i not in self.out_indices)
        skipped = [k for k in state if unused and k.startswith(unused)]
        if skipped:
            print_log(f'UniRepLKNet: {len(skipped)} keys of {name} belong to the output norms of '
                      f'stages not in out_indices={self.out_indices} and are not loaded (e.g. '
                      f'{skipped[0]}).', logger='current')
        return OrderedDict((k, v) for k, v in state.items() if k not in skipped)

    def _check_keys(self, state, name):
        """Raise one error naming mismatched keys; return the keys allowed to stay missing."""
        expected, allowed = self._expected_keys(state)
        for key in set(expected) - set(state):
            # BN counters, and the output norms, which ImageNet checkpoints do not have
            if key.endswith('num_batches_tracked') or re.match(r'norm\d+\.', key):
                allowed.add(key)
        missing, unexpected, shapes = compare_keys(expected, state, allowed)
        hint = 'check that arch and the checkpoint match'
        fused_ckpt = any(k.endswith('.pwconv2.0.bias') for k in state)
        if fused_ckpt and not self.small_kernel_merged:
            hint = 'it is fused (a deploy checkpoint): build with small_kernel_merged=True'
        elif not fused_ckpt and self.small_kernel_merged and any('.pwconv2.2.' in k for k in state):
            hint = 'it is unfused (a training checkpoint): build with small_kernel_merged=False'
        error = mismatch_error(f'UniRepLKNet(arch={self._arch_name()}) cannot load {name}',
                               missing, unexpected, shapes, hint)
        if error is not None:
            raise error
        return allowed & set(self.state_dict())
