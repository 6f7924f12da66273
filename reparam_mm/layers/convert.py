"""Turn the convolutions of any built module into DO-Conv: :func:`convert_to_doconv`.

Every k>1 ``nn.Conv2d`` (mmcv's ``Conv2d`` wrapper included) whose name is selected by
``include`` / ``exclude`` becomes a layer built from ``doconv_cfg`` with the same geometry:
groups=1 gives DO-Conv, depthwise DO-DConv, anything between DO-GConv. It replaces the conv
in its parent module under the same name, so the state-dict keys stay those of the plain
module except ``weight`` -> ``W`` plus ``D``, and a DOConv2d loads a plain ``weight`` itself:
a plain checkpoint loads with only the ``D`` keys missing. Each new layer starts with the
values of the conv it replaces and D = 0, so the converted module computes exactly what the
plain one did, and, once plain weights are loaded, what the plain one does.
"""
import math
from collections import Counter
from fnmatch import fnmatchcase
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

from ..scope import ConfigError

__all__ = ['convert_to_doconv', 'doconv_kind', 'doconv_kinds', 'convertible_convs']


def _plain_conv_types():
    types = [nn.Conv2d]
    try:  # mmcv's Conv2d only adds empty-tensor support to nn.Conv2d
        from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
        types.append(MMCVConv2d)
    except ImportError:  # pragma: no cover - mmcv is a dependency; keep the layer usable alone
        pass
    return tuple(types)


def doconv_kind(layer: nn.Module) -> str:
    """'DO-Conv' (groups=1), 'DO-DConv' (depthwise) or 'DO-GConv' (grouped) for a DO layer."""
    if layer.groups == 1:
        return 'DO-Conv'
    if layer.groups == layer.in_channels:
        return 'DO-DConv'
    return 'DO-GConv'


def doconv_kinds(module: nn.Module) -> Dict[str, int]:
    """Count of the DO-Conv layers (anything with ``W`` and ``D``) in ``module``, per kind."""
    from .doconv import DOConv2d
    return dict(sorted(Counter(doconv_kind(m) for m in module.modules()
                               if isinstance(m, DOConv2d)).items()))


def _selected(name: str, patterns: Sequence[str]) -> bool:
    """``name`` or an ancestor's matches a glob pattern ('layer4' covers 'layer4.0.conv2')."""
    parts = name.split('.')
    prefixes = ['.'.join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _check_patterns(patterns, what):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f'{what}={patterns!r} must be a list of module-name patterns such as '
                         "['layer3', 'layer4.*.conv2'] (fnmatch globs over dotted names).")
    return patterns


def convertible_convs(module: nn.Module, include: Optional[Sequence[str]] = None,
                      exclude: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the k>1 convs of ``module`` that :func:`convert_to_doconv` would convert."""
    include = _check_patterns(include, 'include')
    exclude = _check_patterns(exclude, 'exclude') or []
    names = []
    for name, m in module.named_modules():
        if not name or not isinstance(m, nn.Conv2d) or math.prod(m.kernel_size) == 1:
            continue
        if (include is None or _selected(name, include)) and not _selected(name, exclude):
            names.append(name)
    return names


def _check_doconv_cfg(doconv_cfg):
    """``doconv_cfg`` as mmcv's ``build_conv_layer`` will read it, or a ConfigError (a ValueError) naming the
    fix (mmcv's own error for an unknown type reads 'Cannot find None in registry')."""
    if not isinstance(doconv_cfg, dict) or 'type' not in doconv_cfg:
        raise ConfigError(f"doconv_cfg={doconv_cfg!r} must be a dict with a 'type', e.g. "
                         "dict(type='DOConv', D_mul=None).")
    kind = doconv_cfg['type']
    if isinstance(kind, str):
        from mmengine.registry import MODELS
        with MODELS.switch_scope_and_registry(None) as registry:  # where mmcv looks
            if registry.get(kind) is None:
                raise ConfigError(f"doconv_cfg type {kind!r} is not a registered conv layer: "
                                 "use type='DOConv' (optionally with D_mul).")
    return doconv_cfg


def _build_like(conv: nn.Conv2d, doconv_cfg: dict, name: str) -> nn.Module:
    """A layer from ``doconv_cfg`` with ``conv``'s geometry, device, dtype, mode, requires_grad
    and values (a plain kernel loads as W with D = 0: :meth:`DOConv2d._load_from_state_dict`)."""
    from mmcv.cnn import build_conv_layer
    if type(conv) not in _plain_conv_types():
        raise ConfigError(
            f"'{name}' is a {type(conv).__name__}, but DO-Conv replaces plain nn.Conv2d (and "
            f"mmcv's Conv2d) only: a {type(conv).__name__} computes something else from its "
            'weight; exclude it, or build it as a plain conv (conv_cfg=None).')
    w = conv.weight
    extra = {} if conv.padding_mode == 'zeros' else dict(padding_mode=conv.padding_mode)
    try:
        layer = build_conv_layer(doconv_cfg, conv.in_channels, conv.out_channels,
                                 conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                 dilation=conv.dilation, groups=conv.groups,
                                 bias=conv.bias is not None, **extra)
    except ValueError as e:  # e.g. a D_mul below this layer's kernel size
        raise ConfigError(f"'{name}' ({'x'.join(map(str, conv.kernel_size))} conv): {e}") from e
    layer.to(device=w.device, dtype=w.dtype).train(conv.training)
    layer.load_state_dict(conv.state_dict(), strict=False)  # its values; D stays 0
    # keep what the module did to the conv before (frozen stages: requires_grad=False)
    for p in layer.parameters():
        p.requires_grad_(w.requires_grad)
    return layer


def convert_to_doconv(module: nn.Module, include: Optional[Sequence[str]] = None,
                      exclude: Optional[Sequence[str]] = None,
                      doconv_cfg: Optional[dict] = None, prefix: str = '') -> List[str]:
    """Replace the selected k>1 convs below ``module`` in place; return their names.

    Args:
        module (nn.Module): a built module (backbone, neck, head, whole model).
        include (list[str], optional): fnmatch patterns over dotted module names (relative to
            ``module``); a conv is selected if its name or one of its ancestors' matches.
            None selects every k>1 conv.
        exclude (list[str], optional): patterns of convs (or ancestors) to keep plain.
        doconv_cfg (dict, optional): conv config of the new layers. Defaults to
            ``dict(type='DOConv')`` (D_mul = M*N).
        prefix (str): ``module``'s name in its model (e.g. ``'layer2.'``), put before the
            names in error messages and in the returned list; patterns match without it.

    Each new layer starts with the values of the conv it replaces (its kernel as W, D = 0,
    its bias), so the converted module computes what it did before; it keeps the plain conv's
    requires_grad and train/eval mode. A conv registered under several names (``self.conv``
    also placed in ``self.body``) is replaced under all of them by one layer; the returned
    list names it once. Initialisation that runs later does not reach the new layers as it
    reached the plain convs (initialisers keyed on ``layer='Conv2d'`` or ``isinstance(m,
    nn.Conv2d)`` do not match them, and mmengine re-runs their own ``init_weights``):
    ``WithDOConv`` therefore runs the module's own initialisation before converting.

    Raises ConfigError (a ValueError), before anything is replaced, if a pattern selects no k>1 conv or
    include and exclude together select none (a typo would otherwise convert nothing
    silently), a selected conv is an ``nn.Conv2d`` subclass with its own arithmetic (weight
    standardisation, adaptive padding, ...), ``doconv_cfg`` names no registered conv type, or
    its ``D_mul`` does not fit a selected conv's kernel (the error names the conv).
    """
    doconv_cfg = _check_doconv_cfg(dict(type='DOConv') if doconv_cfg is None else doconv_cfg)
    include = _check_patterns(include, 'include')
    exclude = _check_patterns(exclude, 'exclude') or []
    every = convertible_convs(module)
    for what, patterns in (('include', include or []), ('exclude', exclude)):
        unused = [p for p in patterns if not any(_selected(n, [p]) for n in every)]
        if unused:
            ones = [n for n, m in module.named_modules() if n and isinstance(m, nn.Conv2d)
                    and math.prod(m.kernel_size) == 1 and any(_selected(n, [p]) for p in unused)]
            raise ConfigError(
                f'{what} pattern(s) {unused} match no k>1 conv of {type(module).__name__}'
                + (f' (only 1x1 convs such as {ones[0]!r}, which DO-Conv leaves plain: a 1x1 '
                   'kernel has nothing to over-parameterise)' if ones else '')
                + f'; its k>1 convs are named like {every[:3]}'
                + (f' and {len(every) - 3} more.' if len(every) > 3 else '.'))
    names = convertible_convs(module, include, exclude)
    if (include or exclude) and every and not names:
        raise ConfigError(f'include={include} and exclude={exclude} together select none of the '
                         f'{len(every)} k>1 convs of {type(module).__name__}: every conv include '
                         'selects, exclude keeps plain; narrow exclude.')
    modules = dict(module.named_modules())
    new = {name: _build_like(modules[name], doconv_cfg, prefix + name) for name in names}
    replaced = {id(modules[name]): layer for name, layer in new.items()}
    # only once every layer was built: nothing half-converted; every name a conv is
    # registered under (a module may hold one conv twice) gets the same new layer
    for parent_name, parent in list(module.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
    return [prefix + name for name in names]
