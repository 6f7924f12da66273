"""``type='WithDOConv'``: DO-Conv in any registered backbone, neck or head, from the config.

::

    backbone=dict(type='WithDOConv',
                  module=dict(type='mmseg.MobileNetV2', widen_factor=1., ...,
                              init_cfg=dict(type='Pretrained', checkpoint='mmcls://mobilenet_v2')),
                  include=None,            # fnmatch patterns over module names; None: all
                  exclude=['conv1'],       # kept plain
                  doconv_cfg=dict(type='DOConv'))

It builds ``module`` as usual, runs its own initialisation (:func:`init_as_plain`), converts its
selected k>1 convs with :func:`~reparam_mm.layers.convert.convert_to_doconv` (each DO layer
starts as the conv it replaces, D = 0) and returns **that module itself**: same class, same
attributes, same state-dict keys (a conv's ``weight`` becomes ``W`` + ``D``, which load a plain
``weight``), no wrapper prefix. So the converted module starts as the plain one would (RetinaNet's
std-0.01 convs and focal-loss bias prior included), a ``Pretrained`` init_cfg still loads when
the model is initialised (the plain checkpoint, with only the D keys missing), the optimizer
sees W and D, and everything that reads the built module (``frozen_stages``, ``out_indices``,
``norm_eval``) keeps working. The same type works in place
of a backbone, neck or head; keys a parent model sets on the sub-config (mmseg's
``pretrained``, mmdet's ``train_cfg`` / ``test_cfg``) are handed to the wrapped module.
``reparam_mm.fuse`` turns the DO-Conv layers back into plain convs with the plain module's keys,
so the deploy config (``tools/fuse.py``) is ``module`` itself.
"""
import importlib
import logging
from collections import defaultdict

from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS, DefaultScope

from ..layers.convert import convert_to_doconv, doconv_kinds
from ..layers.doconv import DOConv2d
from ..scope import ConfigError

__all__ = ['build_with_doconv', 'init_as_plain']


def _is_pretrained(cfg):
    kind = cfg.get('type') if isinstance(cfg, dict) else None
    return kind == 'Pretrained' or getattr(kind, '__name__', None) == 'PretrainedInit'


def init_as_plain(module):
    """Run ``module``'s own initialisation now, while its convs are plain; return whether it ran.

    Done later, it would not reach DO layers as it reaches plain convs: initialisers keyed on
    ``layer='Conv2d'`` (RetinaHead's std 0.01, its focal-loss bias prior) or on
    ``isinstance(m, nn.Conv2d)`` skip them, and mmengine then re-runs their own Kaiming init.
    ``Pretrained`` entries of ``init_cfg`` are left for the model's initialisation, where they
    load as before (a test run never reads the pretrained file). mmengine's bookkeeping of which
    initialiser set each parameter is kept for this call and not printed (the model's own
    ``init_weights`` prints it).
    """
    if not callable(getattr(module, 'init_weights', None)) or any(
            p.is_meta for p in module.parameters()):  # built on 'meta' for its keys only
        return False
    init_cfg = getattr(module, 'init_cfg', None)
    entries = [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg or ())
    pretrained = [c for c in entries if _is_pretrained(c)]
    info = defaultdict(dict)
    for param in module.parameters():
        info[param] = dict(init_info='not changed by init_as_plain',
                           tmp_mean_value=param.data.mean().cpu())
    subs = list(module.modules())
    for sub in subs:  # as a submodule of a model being initialised: nothing is printed
        sub._params_init_info = info
    if isinstance(module, BaseModule):
        module.init_cfg = [c for c in entries if not _is_pretrained(c)] or None
    try:
        module.init_weights()
    finally:
        for sub in subs:
            sub.__dict__.pop('_params_init_info', None)
        if isinstance(module, BaseModule):
            # what is left to do when the model initialises its weights: load the checkpoint
            module.init_cfg = (pretrained[0] if len(pretrained) == 1 else pretrained) \
                if pretrained else init_cfg
            module._is_init = not pretrained
    print_log(f'WithDOConv: {type(module).__name__}: initialised as the plain module before '
              'the conversion' + (' (its Pretrained init_cfg loads when the model is initialised)'
                                  if pretrained else ''), logger='current', level=logging.DEBUG)
    return True


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
    initialised = init_as_plain(built)
    try:
        names = convert_to_doconv(built, include, exclude, doconv_cfg)
    except ValueError as e:  # the config's include / exclude / doconv_cfg: one line in the tools
        raise ConfigError(f'WithDOConv on {type(built).__name__}: {e}') from e
    if initialised:  # their values are the plain init's: mmengine must not re-run their own
        for m in built.modules():
            if isinstance(m, DOConv2d):
                m.is_init = True
    if not names:
        print_log(f'WithDOConv: {type(built).__name__} has no k>1 conv, so nothing was converted '
                  '(DO-Conv leaves 1x1 convs plain: they have nothing to over-parameterise); '
                  'the wrapper can go.', logger='current', level=logging.WARNING)
        return built
    kinds = ', '.join(f'{k}: {v}' for k, v in doconv_kinds(built).items())
    print_log(f'WithDOConv: {type(built).__name__}: {len(names)} k>1 conv(s) -> DO-Conv '
              f'({kinds})', logger='current')
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
