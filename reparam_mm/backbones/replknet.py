"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022) for mmseg / mmdet 3.x.

Module names follow the authors' code, so their published ImageNet checkpoints
load unchanged (``stem.0.conv.weight``, ``stages.0.blocks.0.large_kernel.lkb_origin.bn.running_var``,
...). Differences from it: ``norm_cfg`` is honoured by every norm (the authors
switch SyncBN through a process-wide global), re-parameterising twice is a
no-op, and checkpoint keys are checked instead of loaded with ``strict=False``.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ..checkpoint import compare_keys, mismatch_error
from ..layers import large_kernel
from ..layers.bn_fold import bn_folded_kernel, is_batch_norm
from ..layers.large_kernel import LargeKernelDWConv2d
from ..scope import ConfigError
from .base import LargeKernelBackbone, _checkpointed

__all__ = ['RepLKNet', 'RepLKBlock', 'ConvFFN', 'RepLKNetStage', 'ReparamLargeKernelConv',
           'conv_bn']


def conv_bn(in_channels, out_channels, kernel_size, stride=1, groups=1, conv_cfg=None,
            norm_cfg=dict(type='BN'), act=False):
    """``nn.Sequential(conv, bn[, nonlinear=ReLU])`` with the authors' child names."""
    seq = nn.Sequential()
    seq.add_module('conv', build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size,
                                            stride=stride, padding=kernel_size // 2,
                                            groups=groups, bias=False))
    seq.add_module('bn', build_norm_layer(norm_cfg, out_channels)[1])
    if act:
        seq.add_module('nonlinear', nn.ReLU())
    return seq


def _fused_conv(seq):
    """``seq.conv`` as a plain conv: a re-parameterisable conv (DO-Conv) is fused first.

    Reading an unfused DO-Conv's parameters instead of its composed kernel
    would fuse the wrong kernel.
    """
    conv = seq.conv
    if callable(getattr(conv, 'to_fused', None)):
        conv = conv.to_fused()
        seq.conv = conv
    if not isinstance(getattr(conv, 'weight', None), torch.Tensor):
        raise TypeError(f'cannot fuse a {type(conv).__name__}: it has no conv weight after '
                        'to_fused(); use a conv layer whose kernel is its .weight.')
    return conv


def _branch_kernel(conv, bn):
    """(kernel, bias) of one branch, ``bn(conv(x))`` with eval statistics, in float64.

    ``bn`` may be an ``nn.Identity`` left by a Conv+BN folding pass (mmcv's
    ``fuse_conv_bn``) that ran before this fuse.
    """
    if isinstance(bn, nn.Identity):
        bias = conv.bias.double() if conv.bias is not None else conv.weight.new_zeros(
            conv.weight.shape[0], dtype=torch.float64)
        return conv.weight.double(), bias
    if not is_batch_norm(bn):
        raise TypeError(f'cannot fuse the large-kernel branches: their norm is a '
                        f'{type(bn).__name__}, but fusing needs BatchNorm running statistics; '
                        "build RepLKNet with a BN-type norm_cfg (e.g. 'BN' or 'SyncBN').")
    return bn_folded_kernel(conv, bn)


class ReparamLargeKernelConv(BaseModule):
    """Large-kernel depthwise conv-BN plus a parallel small-kernel depthwise conv-BN.

    After training, :meth:`to_fused` fuses both into one depthwise conv
    with bias, ``lkb_reparam``: each BN is folded into its conv, the small
    kernel is zero-padded to the large size (both are centred: padding k // 2)
    and added.

    Args:
        channels (int): input = output channels (depthwise).
        kernel_size (int): the large kernel side (odd).
        small_kernel (int, optional): the small kernel side (odd, at most
            ``kernel_size``); None for no small branch (RepLKNet-XL).
        stride (int): stride of both branches. Defaults to 1.
        small_kernel_merged (bool): build ``lkb_reparam`` directly (deploy; the authors' name for fused).
        conv_cfg (dict, optional): conv config of the small kernel (DO-Conv).
            The large kernel is always a plain :class:`LargeKernelDWConv2d`.
        norm_cfg (dict): norm config of both branches.
    """

    def __init__(self, channels, kernel_size, small_kernel=None, stride=1,
                 small_kernel_merged=False, conv_cfg=None, norm_cfg=dict(type='BN'),
                 init_cfg=None):
        super().__init__(init_cfg)
        if kernel_size % 2 == 0 or (small_kernel is not None and (
                small_kernel % 2 == 0 or small_kernel > kernel_size)):
            raise ConfigError(f'kernel sizes must be odd with small_kernel <= kernel_size so the '
                              f'small kernel pads centrally into the large one; got '
                              f'kernel_size={kernel_size}, small_kernel={small_kernel}.')
        self.channels, self.kernel_size = channels, kernel_size
        self.small_kernel, self.stride = small_kernel, stride
        if small_kernel_merged:
            self.lkb_reparam = LargeKernelDWConv2d(channels, kernel_size, stride, bias=True)
            return
        self.lkb_origin = nn.Sequential(OrderedDict(
            conv=LargeKernelDWConv2d(channels, kernel_size, stride),
            bn=build_norm_layer(norm_cfg, channels)[1]))
        if small_kernel is not None:
            self.small_conv = conv_bn(channels, channels, small_kernel, stride=stride,
                                      groups=channels, conv_cfg=conv_cfg, norm_cfg=norm_cfg)

    @property
    def is_fused(self):
        return 'lkb_reparam' in self._modules

    def forward(self, x):
        if self.is_fused:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if 'small_conv' in self._modules:
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def to_fused(self):
        """Fuse the branches into ``lkb_reparam`` in place; return self (no-op once fused)."""
        if self.is_fused:
            return self
        if self.training:
            raise RuntimeError('ReparamLargeKernelConv.to_fused() needs eval mode (it folds '
                               'BatchNorm running statistics); call model.eval() first.')
        conv = self.lkb_origin.conv
        kernel, bias = _branch_kernel(conv, self.lkb_origin.bn)
        if 'small_conv' in self._modules:
            small, small_bias = _branch_kernel(_fused_conv(self.small_conv), self.small_conv.bn)
            pad = (self.kernel_size - self.small_kernel) // 2
            kernel = kernel + nn.functional.pad(small, [pad] * 4)
            bias = bias + small_bias
        fused = LargeKernelDWConv2d(self.channels, self.kernel_size, self.stride,
                                    padding=conv.padding, bias=True,
                                    device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        fused.requires_grad_(conv.weight.requires_grad)
        self.lkb_reparam = fused.train(False)
        del self.lkb_origin
        if 'small_conv' in self._modules:
            del self.small_conv
        return self


class RepLKBlock(BaseModule):
    """prelkb_bn -> pw1 (1x1 conv-BN-ReLU) -> large kernel -> ReLU -> pw2 (1x1 conv-BN) + x."""

    def __init__(self, in_channels, dw_channels, kernel_size, small_kernel, drop_path=0.,
                 small_kernel_merged=False, conv_cfg=None, norm_cfg=dict(type='BN'),
                 init_cfg=None):
        super().__init__(init_cfg)
        self.pw1 = conv_bn(in_channels, dw_channels, 1, norm_cfg=norm_cfg, act=True)
        self.pw2 = conv_bn(dw_channels, in_channels, 1, norm_cfg=norm_cfg)
        self.large_kernel = ReparamLargeKernelConv(
            dw_channels, kernel_size, small_kernel, small_kernel_merged=small_kernel_merged,
            conv_cfg=conv_cfg, norm_cfg=norm_cfg)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = build_norm_layer(norm_cfg, in_channels)[1]
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        out = self.pw1(self.prelkb_bn(x))
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))
        return x + self.drop_path(out)


class ConvFFN(BaseModule):
    """preffn_bn -> pw1 (1x1 conv-BN) -> GELU -> pw2 (1x1 conv-BN) + x."""

    def __init__(self, in_channels, internal_channels, drop_path=0., norm_cfg=dict(type='BN'),
                 init_cfg=None):
        super().__init__(init_cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.preffn_bn = build_norm_layer(norm_cfg, in_channels)[1]
        self.pw1 = conv_bn(in_channels, internal_channels, 1, norm_cfg=norm_cfg)
        self.pw2 = conv_bn(internal_channels, in_channels, 1, norm_cfg=norm_cfg)
        self.nonlinear = nn.GELU()

    def forward(self, x):
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(BaseModule):
    """``num_blocks`` pairs of (RepLKBlock, ConvFFN); ``norm`` is applied to the stage output."""

    def __init__(self, channels, num_blocks, kernel_size, drop_path, small_kernel, dw_ratio=1,
                 ffn_ratio=4, with_cp=False, small_kernel_merged=False,
                 norm_intermediate_features=False, conv_cfg=None, norm_cfg=dict(type='BN'),
                 init_cfg=None):
        super().__init__(init_cfg)
        self.with_cp = with_cp
        blocks = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(
                channels, int(channels * dw_ratio), kernel_size, small_kernel,
                drop_path=drop_path[i], small_kernel_merged=small_kernel_merged,
                conv_cfg=conv_cfg, norm_cfg=norm_cfg))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path=drop_path[i],
                                  norm_cfg=norm_cfg))
        self.blocks = nn.ModuleList(blocks)
        self.norm = (build_norm_layer(norm_cfg, channels)[1] if norm_intermediate_features
                     else nn.Identity())

    def forward(self, x):
        for block in self.blocks:
            x = _checkpointed(block, x) if self.with_cp and self.training else block(x)
        return x


def _arch_values(arch):
    """Validated copy of an arch dict (ffn_ratio defaults to 4)."""
    keys = ('large_kernel_sizes', 'layers', 'channels', 'small_kernel', 'dw_ratio')
    missing = [k for k in keys if k not in arch]
    extra = [k for k in arch if k not in keys + ('ffn_ratio',)]
    if missing or extra:
        raise ConfigError(f'a RepLKNet arch dict needs exactly the keys {", ".join(keys)} '
                          f'(ffn_ratio optional); missing {missing}, unknown {extra}.')
    arch = dict(arch, ffn_ratio=arch.get('ffn_ratio', 4))
    n = len(arch['layers'])
    if n == 0 or len(arch['channels']) != n or len(arch['large_kernel_sizes']) != n:
        raise ConfigError('a RepLKNet arch dict needs large_kernel_sizes, layers and channels of '
                          f'the same non-zero length, got {arch}.')
    return arch


@MODELS.register_module()
class RepLKNet(LargeKernelBackbone):
    """RepLKNet backbone: large depthwise kernels with structural re-parameterisation.

    Stem (3x3 s2 conv, DW 3x3, 1x1, DW 3x3 s2; each conv-BN-ReLU), then stages
    of alternating :class:`RepLKBlock` / :class:`ConvFFN`; between stages a 1x1
    conv-BN-ReLU and a DW 3x3 s2 conv-BN-ReLU. Stage i runs at stride 4 * 2**i.

    ======  ===============  ==========  =====================  =====  ========
    arch    large kernels    layers      channels               small  dw_ratio
    ======  ===============  ==========  =====================  =====  ========
    '31B'   31, 29, 27, 13   2, 2, 18, 2 128, 256, 512, 1024    5      1
    '31L'   31, 29, 27, 13   2, 2, 18, 2 192, 384, 768, 1536    5      1
    'XL'    27, 27, 27, 13   2, 2, 18, 2 256, 512, 1024, 2048   none   1.5
    'tiny'  31, 29, 27, 13   1, 1, 2, 1  16, 32, 64, 128        5      1
    ======  ===============  ==========  =====================  =====  ========

    'tiny' keeps the topology and kernel sizes for fast CPU tests and demos.

    Args:
        arch (str | dict): a name above or a dict with keys ``large_kernel_sizes,
            layers, channels, small_kernel, dw_ratio`` (and optional
            ``ffn_ratio``, default 4).
        in_channels (int): input image channels. Defaults to 3.
        out_indices (Sequence[int]): stages whose outputs (after the stage's
            blocks, before the transition) are returned. Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 the stem, k >= 1 the stem,
            stages 0..k-1 and the transitions feeding them (eval mode, no grad).
        norm_eval (bool): keep every BN in eval mode while training.
        with_cp (bool): activation checkpointing of each block and of the stem
            layers after the first (saves memory, costs a second forward).
        drop_path_rate (float): stochastic depth, linearly spaced over the
            block pairs from 0 to this value.
        norm_cfg (dict): config of every norm layer, e.g. ``dict(type='SyncBN')``.
        small_kernel_merged (bool): build the deploy structure directly: one
            ``lkb_reparam`` conv per block, and plain convs where
            ``stage_with_doconv`` would put DO-Conv (what ``reparam_mm.fuse``
            leaves; the name is the authors'). Such a model loads fused checkpoints.
        norm_intermediate_features (bool): add a norm (``stages.i.norm``) to
            every returned feature, as the authors do for RepLKNet-XL downstream.
        stage_with_doconv (Sequence[bool], optional): per stage (default: none),
            make its k > 1 convs DO-Conv where that over-parameterises: the stem's 3x3
            convs (stage 0), the DW 3x3 conv of the transition into the stage,
            and the 5x5 small kernels. The large kernels stay plain: DO-Conv
            needs D_mul >= k*k, i.e. a C x 961 x 961 D for one 31x31 layer
            (about 118M values at C=128), which is not a sensible training cost.
        doconv_cfg (dict): conv config of those layers. Defaults to
            ``dict(type='DOConv')`` (D_mul = k*k).
        pretrained (str, optional): deprecated, use ``init_cfg``.
        init_cfg (dict | list[dict], optional): e.g. ``dict(type='Pretrained',
            checkpoint='RepLKNet-31B_ImageNet-1K_224.pth')``. The state dict is
            taken from ``state_dict`` or ``model``; the classifier's ``norm.*`` /
            ``head.*`` are ignored and any other mismatch raises an error naming
            the keys. ``prefix`` selects a sub-module (e.g. ``'backbone.'``).
    """

    arch_settings = {
        '31B': dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                    channels=(128, 256, 512, 1024), small_kernel=5, dw_ratio=1),
        '31L': dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                    channels=(192, 384, 768, 1536), small_kernel=5, dw_ratio=1),
        'XL': dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2),
                   channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5),
        'tiny': dict(large_kernel_sizes=(31, 29, 27, 13), layers=(1, 1, 2, 1),
                     channels=(16, 32, 64, 128), small_kernel=5, dw_ratio=1),
    }
    #: top-level keys of the authors' ImageNet classifier that a backbone ignores
    classifier_prefixes = ('norm.', 'head.')
    backbone_name = 'RepLKNet'
    _arch_values = staticmethod(_arch_values)

    def __init__(self, arch='31B', in_channels=3, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                 norm_eval=False, with_cp=False, drop_path_rate=0., norm_cfg=dict(type='BN'),
                 small_kernel_merged=False, norm_intermediate_features=False,
                 stage_with_doconv=None, doconv_cfg=dict(type='DOConv'),
                 pretrained=None, init_cfg=None):
        super().__init__(init_cfg=self._resolve_init_cfg(pretrained, init_cfg))
        self.arch = arch = self._resolve_arch(
            arch, 'large_kernel_sizes, layers, channels, small_kernel, dw_ratio')
        channels, layers = arch['channels'], arch['layers']
        self.num_stages = len(layers)
        self.out_indices = self._check_out_indices(out_indices)
        self.stage_with_doconv = self._check_stage_args(frozen_stages, stage_with_doconv,
                                                         doconv_cfg)
        self.frozen_stages, self.norm_eval, self.with_cp = frozen_stages, norm_eval, with_cp
        self.norm_intermediate_features = norm_intermediate_features
        conv_cfgs = [doconv_cfg if s and not small_kernel_merged else None
                     for s in self.stage_with_doconv]

        c0 = channels[0]
        self.stem = nn.ModuleList([
            conv_bn(in_channels, c0, 3, stride=2, conv_cfg=conv_cfgs[0], norm_cfg=norm_cfg,
                    act=True),
            conv_bn(c0, c0, 3, groups=c0, conv_cfg=conv_cfgs[0], norm_cfg=norm_cfg, act=True),
            conv_bn(c0, c0, 1, norm_cfg=norm_cfg, act=True),
            conv_bn(c0, c0, 3, stride=2, groups=c0, conv_cfg=conv_cfgs[0], norm_cfg=norm_cfg,
                    act=True)])
        total = sum(layers)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages, self.transitions = nn.ModuleList(), nn.ModuleList()
        for i, (c, n, k) in enumerate(zip(channels, layers, arch['large_kernel_sizes'])):
            self.stages.append(RepLKNetStage(
                c, num_blocks=n, kernel_size=k, drop_path=dpr[sum(layers[:i]):sum(layers[:i + 1])],
                small_kernel=arch['small_kernel'], dw_ratio=arch['dw_ratio'],
                ffn_ratio=arch['ffn_ratio'], with_cp=with_cp,
                small_kernel_merged=small_kernel_merged,
                norm_intermediate_features=norm_intermediate_features, conv_cfg=conv_cfgs[i],
                norm_cfg=norm_cfg))
            if i + 1 < self.num_stages:
                nxt = channels[i + 1]
                self.transitions.append(nn.Sequential(
                    conv_bn(c, nxt, 1, norm_cfg=norm_cfg, act=True),
                    conv_bn(nxt, nxt, 3, stride=2, groups=nxt, conv_cfg=conv_cfgs[i + 1],
                            norm_cfg=norm_cfg, act=True)))
        self._freeze_stages()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x):
        # the layout policy lives in layers/large_kernel.py: on CPU and CUDA the faster one, timed
        return large_kernel.forward_in_best_layout(self, x, self._forward_in_layout)

    def _forward_in_layout(self, x, channels_last):
        """The features for ``x``, computed channels_last or not, returned in ``x``'s layout."""
        if not channels_last:
            return tuple(self._forward(x))
        outs = self._forward(x.contiguous(memory_format=torch.channels_last))
        return tuple(out.contiguous() for out in outs)

    def _forward(self, x):
        x = self.stem[0](x)
        for layer in self.stem[1:]:
            x = _checkpointed(layer, x) if self.with_cp and self.training else layer(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(stage.norm(x))
            if i == self.out_indices[-1]:
                break
            x = self.transitions[i](x)
        return outs

    # -- training-mode behaviour ----------------------------------------------------------------
    def _freeze_stages(self):
        frozen = [self.stem] if self.frozen_stages >= 0 else []
        for i in range(max(self.frozen_stages, 0)):
            frozen.append(self.stages[i])
            if i > 0:
                frozen.append(self.transitions[i - 1])
        self._freeze(frozen)

    # -- pretrained weights (the loading sequence is LargeKernelBackbone.load_pretrained) -----
    def _check_keys(self, state, name):
        """Raise one error naming mismatched keys; return the keys allowed to stay missing."""
        expected, allowed = self._expected_keys(state)
        for key in set(expected) - set(state):
            if key.endswith('num_batches_tracked') or (
                    self.norm_intermediate_features and key.split('.')[2:3] == ['norm']):
                allowed.add(key)
        missing, unexpected, shapes = compare_keys(expected, state, allowed)
        hint = 'check that arch and the checkpoint match'
        if any('lkb_origin' in k for k in unexpected) and any('lkb_reparam' in k for k in missing):
            hint = 'it is unfused (a training checkpoint): build with small_kernel_merged=False'
        elif any('lkb_reparam' in k for k in unexpected):
            hint = 'it is fused (a deploy checkpoint): build with small_kernel_merged=True'
        error = mismatch_error(f'RepLKNet(arch={self._arch_name()}) cannot load {name}',
                               missing, unexpected, shapes, hint)
        if error is not None:
            raise error
        return allowed & set(self.state_dict())
