"""ResNets with DO-Conv switched on per stage: ``DOResNet`` (mmdet) and ``DOResNetV1c`` (mmseg).

The switch works like ``stage_with_dcn``: every k>1 conv of a chosen stage's residual blocks
(Bottleneck ``conv2``, BasicBlock ``conv1`` and ``conv2``) becomes a layer built from
``doconv_cfg``, converted as each stage is built by the same code as ``type='WithDOConv'``
(any backbone); 1x1 convs and shortcuts stay plain, so nothing is added
where DO-Conv has nothing to over-parameterise. Parameter names other than the DO-Conv ``W`` /
``D`` are unchanged and a DO layer loads a plain ``weight``, so ImageNet ResNet checkpoints load
through ``init_cfg=dict(type='Pretrained', ...)`` with only the ``D`` keys missing (D starts at
zero: the loaded network computes exactly what the plain one does).
"""
from mmdet.models.backbones.resnet import ResNet as MMDetResNet
from mmengine.registry import MODELS
from mmseg.models.backbones.resnet import ResNetV1c as MMSegResNetV1c

from ..layers.convert import _check_doconv_cfg, convert_to_doconv
from ..scope import ConfigError

__all__ = ['DOResNet', 'DOResNetV1c']


class _DOConvStages:
    """Mixin over an OpenMMLab ResNet: converts each flagged stage as it is built.

    The conversion is :func:`~reparam_mm.layers.convert.convert_to_doconv` (what
    ``type='WithDOConv'`` does for any module) on the stage's residual layer: every k>1 conv
    of its blocks, i.e. the 3x3 convs (downsample shortcuts are 1x1). It runs in
    ``make_res_layer``, before the parent's ``_freeze_stages``, so ``frozen_stages`` freezes
    the DO-Conv parameters too, and the random init draws in the order it always did.
    """

    def __init__(self, stage_with_doconv=(False, True, True, True),
                 doconv_cfg=dict(type='DOConv'), **kwargs):
        num_stages = kwargs.get('num_stages', 4)
        flags = tuple(stage_with_doconv) if isinstance(stage_with_doconv, (list, tuple)) else ()
        if len(flags) != num_stages or not all(isinstance(f, bool) for f in flags):
            raise ConfigError(f'stage_with_doconv={stage_with_doconv!r} must hold one bool per '
                              f'stage ({num_stages}), e.g. (False, True, True, True).')
        if any(flags):
            _check_doconv_cfg(doconv_cfg)
        dcn_stages = kwargs.get('stage_with_dcn', (False, ) * num_stages)
        if kwargs.get('dcn') is not None and any(a and b for a, b in zip(flags, dcn_stages)):
            raise ConfigError('A stage cannot use both DCN and DO-Conv for its 3x3 conv; set '
                              'stage_with_dcn and stage_with_doconv on different stages.')
        # set before the parent __init__, whose stage loop calls make_res_layer
        self.stage_with_doconv = flags
        self.doconv_cfg = dict(doconv_cfg)
        self._stages_made = 0
        super().__init__(**kwargs)

    def make_res_layer(self, **kwargs):
        res_layer = super().make_res_layer(**kwargs)
        stage, self._stages_made = self._stages_made, self._stages_made + 1
        if self.stage_with_doconv[stage]:
            convert_to_doconv(res_layer, doconv_cfg=self.doconv_cfg, prefix=f'layer{stage + 1}.')
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
