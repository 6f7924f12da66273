"""One re-parameterisation pass over any model: ``fuse(model)``.

Protocol: a fusable module defines ``to_fused() -> nn.Module`` and
returns the module that replaces it at inference (a new module, or ``self``
after fusing in place; on an already fused module it is a no-op). The walker
knows no layer types; it finds every module with a callable
``to_fused`` and calls it, **children first** (post-order), so a parent
that reads a child's ``.weight`` (a RepLKNet block reading its DO-Conv small
kernel) sees the child already fused. A parent-first walk (timm's
``reparameterize_model``) would fuse the unfused kernel and be wrong.

The ecosystem's own conventions go through the same walk (:data:`CONVENTIONS`,
first match wins): mmpretrain's / mmyolo's ``switch_to_deploy()`` and timm's
``reparameterize()`` fuse in place and return None; timm's ``fuse()`` returns
the module that replaces it. mmpretrain's blocks also have a ``reparameterize()``
that only *computes* the fused kernel (it returns a tuple), which is why
``switch_to_deploy`` is tried before ``reparameterize``. timm's ``fuse()`` is the
one exception to children first: a timm parent's ``fuse()`` calls its children's
``fuse()`` itself (RepViT's ``RepVggDw`` reads ``self.conv.fuse()``), so among
nested ``fuse()`` modules only the outermost is called, as timm's
``reparameterize_model`` does; everything else below it (DO-Conv, other
conventions) is still fused first. In-place conventions are
not idempotent everywhere (timm's FastViT large-kernel block deletes its
branches and would fail on a second call), so a module already in its deploy
form (a true :data:`DEPLOY_FLAGS` attribute, or marked by an earlier pass) is
skipped: a second pass is a no-op.

Optionally (``fuse_bn=True``) each Conv followed by its BatchNorm is folded
into the conv afterwards. The pairing follows mmcv's ``fuse_conv_bn``: a BN
child directly after a conv child of the same parent, in registration order,
with matching channels, and (for mmcv's ``ConvModule``) ``order`` saying the
conv runs first. Registration order is not data flow in every custom module,
so check outputs after ``fuse_bn`` (``tools/fuse.py`` does).
"""
import inspect
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .layers.bn_fold import bn_folded_kernel

__all__ = ['FuseReport', 'fuse', 'fuse_with_report', 'count_params', 'fusable_modules',
           'fuse_convention', 'CONVENTIONS', 'DEPLOY_FLAGS']

CONV_BN = 'Conv+BN'
# method names, in the order they are tried: the project's protocol, then
# mmpretrain / mmyolo (in place), timm in place, timm returning a new module
CONVENTIONS = ('to_fused', 'switch_to_deploy', 'reparameterize', 'fuse')
# attributes that, when True, say a module following a foreign convention is
# already in its deploy form (mmpretrain / mmyolo: deploy; timm: inference_mode,
# reparameterized; mmpretrain's RepLKNet: small_kernel_merged)
DEPLOY_FLAGS = ('deploy', 'inference_mode', 'reparameterized', 'small_kernel_merged')
_FUSED_MARK = '_reparam_mm_fused'  # set on a module fused in place by a foreign convention


@dataclass
class FuseReport:
    """What one ``fuse`` pass did: modules fused per kind, parameter counts.

    ``fused`` maps a kind (the fused module's class name, or ``'Conv+BN'``)
    to how many such modules changed; a second pass over a fused model
    reports ``{}`` and equal parameter counts.
    """
    fused: Dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    # convention (a CONVENTIONS name, or 'Conv+BN') -> modules fused through it
    conventions: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.fused.values())

    def to_dict(self) -> dict:
        return dict(fused=dict(self.fused), params_before=self.params_before,
                    params_after=self.params_after, conventions=dict(self.conventions))

    def __str__(self) -> str:
        kinds = ', '.join(f'{k}: {v}' for k, v in sorted(self.fused.items())) or 'nothing to fuse'
        via = ', '.join(f'{k}() {v}' for k, v in sorted(self.conventions.items()) if k != CONV_BN)
        foreign = set(self.conventions) - {'to_fused', CONV_BN}  # said only when others took part
        return (f'fused {self.total} module(s) ({kinds}' + (f'; via {via}' if foreign else '')
                + f'); parameters {self.params_before:,} -> {self.params_after:,}')


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def _no_arg_method(module: nn.Module, name: str) -> bool:
    """True if ``module.name`` is a method callable without arguments.

    A child module or a method taking inputs (a ``fuse(x, y)`` feature fusion,
    a VAE's ``reparameterize(mu, logvar)``) is not a fuse convention.
    """
    method = getattr(type(module), name, None)
    if method is None or isinstance(getattr(module, name, None), nn.Module) or not callable(method):
        return False
    try:
        params = list(inspect.signature(getattr(module, name)).parameters.values())
    except (TypeError, ValueError):
        return True
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def fuse_convention(module: nn.Module) -> Optional[str]:
    """The :data:`CONVENTIONS` method that fuses ``module``, or None.

    None as well for a module following a foreign convention that is already
    in its deploy form (see :data:`DEPLOY_FLAGS`), so it is not fused twice.
    """
    for name in CONVENTIONS:
        if _no_arg_method(module, name):
            if name != 'to_fused' and (getattr(module, _FUSED_MARK, False) or any(
                    getattr(module, flag, None) is True for flag in DEPLOY_FLAGS)):
                return None
            return name
    return None


def _is_fusable(module: nn.Module) -> bool:
    return fuse_convention(module) is not None


def fusable_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every module a :func:`fuse` pass would call, the root included."""
    return [(n, m) for n, m in model.named_modules() if _is_fusable(m)]


def _bn_pairs(parent: nn.Module) -> List[Tuple[str, str]]:
    """Names ``(conv, bn)`` of children of ``parent`` that form a Conv->BN pair."""
    order = getattr(parent, 'order', None)
    if isinstance(order, (tuple, list)) and 'conv' in order and 'norm' in order \
            and order.index('norm') < order.index('conv'):
        return []  # mmcv ConvModule with the norm applied before the conv
    names = list(parent._modules.keys())
    pairs = []
    for prev, cur in zip(names, names[1:]):
        conv, bn = parent._modules[prev], parent._modules[cur]
        if isinstance(conv, _ConvNd) and isinstance(bn, _BatchNorm) and not _is_fusable(conv) \
                and bn.num_features == conv.out_channels and bn.track_running_stats \
                and bn.running_mean is not None and conv.transposed is False:
            pairs.append((prev, cur))
    return pairs


def _refuse_training_mode(model: nn.Module, fuse_bn: bool) -> None:
    """Raise before touching anything if a part to fuse is in training mode."""
    bad = [n or '<root>' for n, m in fusable_modules(model) if m.training]
    if fuse_bn:
        for pname, parent in model.named_modules():
            for _, bn in _bn_pairs(parent):
                if parent._modules[bn].training:
                    bad.append(f'{pname}.{bn}' if pname else bn)
    if bad:
        shown = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
        raise RuntimeError(
            f'fuse() refuses to fuse modules in training mode ({shown}): it would freeze '
            'BatchNorm running statistics and detach the optimizer from the trained weights; '
            'call model.eval() first (or fuse a copy: copy.deepcopy(model).eval()).')


def _state_ids(module: nn.Module) -> Tuple:
    """Identity, storage and version of everything a module holds, to notice in-place fusing."""
    return tuple((n, id(t), t.data_ptr(), t._version)
                 for n, t in module.state_dict(keep_vars=True).items())


def _call_convention(module: nn.Module, name: str, path: str) -> Tuple[nn.Module, bool]:
    """Fuse ``module`` through its method ``name``: (its replacement, whether anything changed)."""
    kind = type(module).__name__
    before = _state_ids(module)
    try:
        new = getattr(module, name)()
    except Exception as e:  # noqa: BLE001 - re-raised with the module's place in the model
        if hasattr(e, 'add_note'):  # Python >= 3.11
            e.add_note(f'reparam_mm.fuse: raised by {kind}.{name}() of '
                       f'{path or "the root module"}.')
        raise
    if isinstance(new, nn.Module):
        if new is module and name != 'to_fused':
            setattr(module, _FUSED_MARK, True)  # fused in place: no later pass calls it again
        return new, new is not module or _state_ids(new) != before
    if name == 'to_fused':
        raise TypeError(f'{kind}.to_fused() of {path or "the root module"} returned '
                        f'{type(new).__name__}; the protocol requires the nn.Module that replaces '
                        'it (or self after fusing in place).')
    changed = _state_ids(module) != before
    if new is not None and not changed:
        raise TypeError(
            f'{kind}.{name}() of {path or "the root module"} returned {type(new).__name__} and '
            'left the module unchanged: reparam_mm.fuse knows in-place methods returning None '
            '(switch_to_deploy, reparameterize) and ones returning the replacing module '
            '(to_fused, fuse); give the class a to_fused() that returns its fused form.')
    setattr(module, _FUSED_MARK, True)  # in place: a later pass must not call it again
    return module, changed


def _reparam_children(module: nn.Module, counts: Counter, by_convention: Counter, path: str,
                      under_fuse: bool) -> None:
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _reparam_tree(child, counts, by_convention, f'{path}.{name}' if path else name,
                            under_fuse)
        if new is not child:
            setattr(module, name, new)


def _reparam_tree(module: nn.Module, counts: Counter, by_convention: Counter,
                  path: str = '', under_fuse: bool = False) -> nn.Module:
    """Post-order: fuse the children of ``module``, then ``module`` itself.

    ``under_fuse``: an ancestor will call its timm-style ``fuse()``, which fuses
    the ``fuse()`` modules below it itself.
    """
    convention = fuse_convention(module)
    _reparam_children(module, counts, by_convention, path, under_fuse or convention == 'fuse')
    if convention is None or (convention == 'fuse' and under_fuse):
        return module
    new, changed = _call_convention(module, convention, path)
    if changed:
        counts[type(module).__name__] += 1
        by_convention[convention] += 1
    if convention == 'fuse':  # whatever the returned module still holds that its fuse() left
        _reparam_children(new, counts, by_convention, path, under_fuse)
    return new


@torch.no_grad()
def _fold_bn(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place, keeping dtype and device."""
    w = conv.weight
    new_w, new_b = bn_folded_kernel(conv, bn)
    conv.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)


def _fold_bn_pairs(model: nn.Module, counts: Counter, by_convention: Counter) -> None:
    for parent in list(model.modules()):
        for conv_name, bn_name in _bn_pairs(parent):
            _fold_bn(parent._modules[conv_name], parent._modules[bn_name])
            parent._modules[bn_name] = nn.Identity()
            counts[CONV_BN] += 1
            by_convention[CONV_BN] += 1


def fuse_with_report(model: nn.Module, fuse_bn: bool = False) -> Tuple[nn.Module, FuseReport]:
    """Re-parameterise ``model`` in place; return ``(model, FuseReport)``.

    Args:
        model (nn.Module): any module (segmentor, detector, backbone, a single
            layer, or one wrapped in (MM)DistributedDataParallel). It must be
            in eval mode wherever something will be fused.
        fuse_bn (bool): also fold Conv->BatchNorm pairs into the conv.

    Returns:
        The fused model (the same object unless the root itself was replaced,
        e.g. a bare ``DOConv2d``) and the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'fuse() expects an nn.Module, got {type(model).__name__}.')
    _refuse_training_mode(model, fuse_bn)
    report = FuseReport(params_before=count_params(model))
    counts, by_convention = Counter(), Counter()
    model = _reparam_tree(model, counts, by_convention)
    if fuse_bn:
        _fold_bn_pairs(model, counts, by_convention)
    report.fused = OrderedDict(sorted(counts.items()))
    report.conventions = OrderedDict(sorted(by_convention.items()))
    report.params_after = count_params(model)
    return model, report


def fuse(model: nn.Module, fuse_bn: bool = False, verbose: bool = False) -> nn.Module:
    """Re-parameterise ``model`` in place and return it (see :func:`fuse_with_report`).

    The report of the call is kept in ``fuse.last_report``; with
    ``verbose=True`` it is also logged.
    """
    model, report = fuse_with_report(model, fuse_bn=fuse_bn)
    fuse.last_report = report
    if verbose:
        from mmengine.logging import print_log
        print_log(f'reparam_mm.fuse: {report}', logger='current')
    return model


fuse.last_report = None
