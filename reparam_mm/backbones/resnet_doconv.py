"""ResNets with DO-Conv switched on per stage: ``DOResNet`` (mmdet) and ``DOResNetV1c`` (mmseg).

The switch works like ``stage_with_dcn``: every k>1 conv of a chosen stage's residual blocks
(Bottleneck ``conv2``, BasicBlock ``conv1`` and ``conv2``) is built from ``doconv_cfg`` instead of
``nn.Conv2d``; 1x1 convs and shortcuts stay plain, so nothing is added where DO-Conv has nothing
to over-parameterise. Parameter names other than the DO-Conv ``W`` / ``D`` are unchanged and a DO
layer loads a plain ``weight``, so ImageNet ResNet checkpoints load through
``init_cfg=dict(type='Pretrained', ...)`` with only the ``D`` keys missing (D starts at zero:
the loaded network computes exactly what the plain one does).
"""
import math

import torch.nn as nn
from mmcv.cnn import build_conv_layer
from mmdet.models.backbones.resnet import ResNet as MMDetResNet
from mmengine.registry import MODELS
from mmseg.models.backbones.resnet import ResNetV1c as MMSegResNetV1c

__all__ = ['DOResNet', 'DOResNetV1c', 'convert_res_layer_to_doconv']

_BLOCK_CONVS = ('conv1', 'conv2', 'conv3')


def convert_res_layer_to_doconv(res_layer, doconv_cfg, stage):
    """Rebuild every k>1 ``nn.Conv2d`` of the blocks of ``res_layer`` from ``doconv_cfg``."""
    for idx, block in enumerate(res_layer):
        for name in _BLOCK_CONVS:
            conv = getattr(block, name, None)
            if conv is None or math.prod(conv.kernel_size) == 1:
                continue
            if type(conv) is not nn.Conv2d:
                raise ValueError(
                    f'Stage {stage + 1} block {idx} {name} is a {type(conv).__name__}, but '
                    'DO-Conv replaces plain nn.Conv2d only; set conv_cfg=None for DO-Conv stages.')
            setattr(block, name, build_conv_layer(
                doconv_cfg, conv.in_channels, conv.out_channels, conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, bias=conv.bias is not None))
    return res_layer


class _DOConvStages:
    """Mixin over an OpenMMLab ResNet: converts the chosen stages while they are built.

    Conversion happens in ``make_res_layer``, i.e. before the parent's ``_freeze_stages``,
    so ``frozen_stages`` freezes the DO-Conv parameters too.
    """

    def _set_doconv(self, stage_with_doconv, doconv_cfg, num_stages, kwargs):
        flags = tuple(stage_with_doconv)
        if len(flags) != num_stages or not all(isinstance(f, bool) for f in flags):
            raise ValueError(f'stage_with_doconv={stage_with_doconv!r} must hold one bool per '
                             f'stage ({num_stages}), e.g. (False, True, True, True).')
        if not isinstance(doconv_cfg, dict) or 'type' not in doconv_cfg:
            raise ValueError(f"doconv_cfg={doconv_cfg!r} must be a dict with a 'type', e.g. "
                             "dict(type='DOConv', D_mul=None).")
        dcn_stages = kwargs.get('stage_with_dcn', (False, ) * num_stages)
        if kwargs.get('dcn') is not None and any(a and b for a, b in zip(flags, dcn_stages)):
            raise ValueError('A stage cannot use both DCN and DO-Conv for its 3x3 conv; set '
                             'stage_with_dcn and stage_with_doconv on different stages.')
        # set before the parent __init__, whose stage loop calls make_res_layer
        self.stage_with_doconv = flags
        self.doconv_cfg = dict(doconv_cfg)

    def make_res_layer(self, **kwargs):
        res_layer = super().make_res_layer(**kwargs)
        stage = int(math.log2(kwargs['planes'] // self.base_channels))  # planes = base * 2**i
        if self.stage_with_doconv[stage]:
            convert_res_layer_to_doconv(res_layer, self.doconv_cfg, stage)
        return res_layer


@MODELS.register_module()
class DOResNet(_DOConvStages, MMDetResNet):
    """mmdet's ``ResNet`` with DO-Conv in the stages chosen by ``stage_with_doconv``.

    Args:
        stage_with_doconv (tuple[bool]): one flag per stage (``num_stages``); the k>1 convs of
            the residual blocks of flagged stages become DO-Conv. Default: stages 2-4 (c3-c5).
        doconv_cfg (dict): conv config of those layers, e.g. ``dict(type='DOConv', D_mul=18)``.
        **kwargs: everything mmdet's ``ResNet`` takes (depth, frozen_stages, init_cfg, ...).

    The stem (7x7 conv, or the three 3x3 convs of ``deep_stem``) is not a stage and stays a
    plain conv, so it loads and computes exactly as in the plain ResNet.
    """

    def __init__(self, stage_with_doconv=(False, True, True, True),
                 doconv_cfg=dict(type='DOConv'), **kwargs):
        self._set_doconv(stage_with_doconv, doconv_cfg, kwargs.get('num_stages', 4), kwargs)
        super().__init__(**kwargs)


@MODELS.register_module()
class DOResNetV1c(_DOConvStages, MMSegResNetV1c):
    """mmseg's ``ResNetV1c`` (deep stem, usually dilated) with DO-Conv per stage.

    Args:
        stage_with_doconv (tuple[bool]): one flag per stage; see :class:`DOResNet`.
        doconv_cfg (dict): conv config of the DO-Conv layers, e.g. ``dict(type='DOConv')``.
        **kwargs: everything mmseg's ``ResNetV1c`` takes (depth, dilations, strides, ...).

    The deep stem (three 3x3 convs) stays plain: it is not a stage, and keeping it plain keeps
    its pretrained weights and its cost untouched.
    """

    def __init__(self, stage_with_doconv=(False, True, True, True),
                 doconv_cfg=dict(type='DOConv'), **kwargs):
        self._set_doconv(stage_with_doconv, doconv_cfg, kwargs.get('num_stages', 4), kwargs)
        super().__init__(**kwargs)
