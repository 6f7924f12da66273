"""``type='WithDOConv'``: DO-Conv in any registered backbone, neck or head, from the config.

::

    backbone=dict(type='WithDOConv',
                  module=dict(type='mmseg.MobileNetV2', widen_factor=1., ...,
                              init_cfg=dict(type='Pretrained', checkpoint='mmcls://mobilenet_v2')),
                  include=None,            # fnmatch patterns over module names; None: all
                  exclude=['conv1'],       # kept plain
                  doconv_cfg=dict(type='DOConv'))

It builds ``module`` as usual, converts its selected k>1 convs with
:func:`~reparam_mm.layers.convert.convert_to_doconv` and returns **that module itself**: same
class, same attributes, same state-dict keys (a conv's ``weight`` becomes ``W`` + ``D``, which
load a plain ``weight``), no wrapper prefix. So the conversion happens while the model is built,
before ``init_weights`` (a ``Pretrained`` init_cfg loads the plain checkpoint with only the D
keys missing) and before the optimizer exists, and everything that reads the built module
(``frozen_stages``, ``out_indices``, ``norm_eval``) keeps working. The same type works in place
of a backbone, neck or head; keys a parent model sets on the sub-config (mmseg's
``pretrained``, mmdet's ``train_cfg`` / ``test_cfg``) are handed to the wrapped module.
``reparam_mm.fuse`` turns the DO-Conv layers back into plain convs with the plain module's keys,
so the deploy config (``tools/fuse.py``) is ``module`` itself.
"""
import importlib

from mmengine.logging import print_log
from mmengine.registry import MODELS, DefaultScope

from ..layers.convert import convert_to_doconv, doconv_kinds
from ..scope import ConfigError

__all__ = ['build_with_doconv']


def build_with_doconv(module, include=None, exclude=None, doconv_cfg=None, registry=None,
                      **module_args):
    """Build ``module`` with ``registry`` (default: the current scope's) and convert it."""
    if not isinstance(module, dict) or 'type' not in module:
        raise ConfigError(f"WithDOConv needs module=dict(type=..., ...), the config of the "
                          f"backbone / neck / head to convert; got module={module!r}.")
    cfg = dict(module, **module_args)
    if registry is None:
        scope = DefaultScope.get_current_instance()
        registry = MODELS if scope is None else importlib.import_module(
            f'{scope.scope_name}.registry').MODELS
    built = registry.build(cfg)
    names = convert_to_doconv(built, include, exclude, doconv_cfg)
    kinds = ', '.join(f'{k}: {v}' for k, v in doconv_kinds(built).items())
    print_log(f'WithDOConv: {type(built).__name__}: {len(names)} k>1 conv(s) -> DO-Conv '
              f'({kinds or "none"})', logger='current')
    return built


def _register(registry, bound):
    """Register ``WithDOConv`` in ``registry``; ``bound``: build the wrapped type with it."""
    def WithDOConv(module, include=None, exclude=None, doconv_cfg=None,  # noqa: N802
                   **module_args):
        return build_with_doconv(module, include, exclude, doconv_cfg,
                                 registry=registry if bound else None, **module_args)

    WithDOConv.__doc__ = __doc__
    registry.register_module(name='WithDOConv', module=WithDOConv, force=True)


# mmengine's root registry (the wrapped type resolves in the default scope) and mmseg's and
# mmdet's own, so e.g. mmseg.registry.MODELS.build resolves it in mmseg without a default scope
_register(MODELS, bound=False)
for _scope in ('mmseg', 'mmdet'):
    _register(importlib.import_module(f'{_scope}.registry').MODELS, bound=True)
