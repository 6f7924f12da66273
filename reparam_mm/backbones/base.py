"""The OpenMMLab plumbing RepLKNet and UniRepLKNet share: init_cfg / pretrained handling,
argument checks, freezing, ``norm_eval`` and the pretrained-loading sequence.

What differs between the two (arch tables, key layouts, which keys may stay missing) stays in
each backbone as the hooks ``_arch_values``, ``_backbone_state``, ``_check_keys`` and
``_freeze_stages``; ``_read_checkpoint`` is shared and overridden only where a backbone names
its checkpoints its own way (EfficientNetLite's ``pypi:``).
"""
import warnings
from collections import OrderedDict

import torch
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import read_checkpoint, state_dict_of
from ..scope import ConfigError

__all__ = ['LargeKernelBackbone']


def _checkpointed(module, x):
    """Activation checkpointing (recompute ``module`` in backward) when autograd records."""
    if not torch.is_grad_enabled():
        return module(x)
    return cp.checkpoint(module, x, use_reentrant=False)


class LargeKernelBackbone(BaseModule):
    """Base of the large-kernel backbones; subclasses set ``backbone_name`` (used in messages),
    ``arch_settings`` and the static ``_arch_values(arch)`` validator."""

    #: the backbone's name in error and log messages
    backbone_name = None
    arch_settings = {}

    # -- construction checks -------------------------------------------------------------------
    @classmethod
    def _resolve_init_cfg(cls, pretrained, init_cfg):
        name = cls.backbone_name
        if pretrained is not None:
            if init_cfg is not None:
                raise ConfigError(f'{name}: set either init_cfg or the deprecated pretrained, '
                                  "not both; use init_cfg=dict(type='Pretrained', checkpoint=...).")
            if not isinstance(pretrained, str):
                raise TypeError(f'{name}: pretrained must be a checkpoint path or URL, got '
                                f'{type(pretrained).__name__}.')
            warnings.warn(f"{name}: pretrained is deprecated, use "
                          "init_cfg=dict(type='Pretrained', checkpoint=...) instead.", stacklevel=3)
            return dict(type='Pretrained', checkpoint=pretrained)
        cfgs = [init_cfg] if isinstance(init_cfg, dict) else (init_cfg or [])
        for cfg in cfgs:
            if not isinstance(cfg, dict) or 'type' not in cfg:
                raise TypeError(f'{name}: init_cfg must be a dict (or list of dicts) with a '
                                f"'type', got {cfg!r}.")
            if cfg['type'] == 'Pretrained' and not cfg.get('checkpoint'):
                raise ConfigError(f"{name}: init_cfg of type 'Pretrained' needs a 'checkpoint' "
                                  f'(path or URL), got {cfg!r}.')
        return init_cfg

    def _resolve_arch(self, arch, dict_keys):
        """The validated arch dict of a name in ``arch_settings`` or a dict."""
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ConfigError(f"{self.backbone_name} arch '{arch}' is unknown; use one of "
                                  f"{', '.join(self.arch_settings)} or a dict with keys "
                                  f'{dict_keys}.')
            arch = self.arch_settings[arch]
        elif not isinstance(arch, dict):
            raise TypeError(f'{self.backbone_name} arch must be a str or a dict, got '
                            f'{type(arch).__name__}.')
        return self._arch_values(arch)

    def _check_out_indices(self, out_indices):
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        n = self.num_stages
        if not isinstance(out_indices, (tuple, list)) or not out_indices or not all(
                isinstance(i, int) and -n <= i < n for i in out_indices):
            raise ConfigError(f'out_indices={out_indices!r} must be a non-empty sequence of stage '
                              f'indices in [-{n}, {n - 1}].')
        return tuple(sorted({i % n for i in out_indices}))

    def _check_stage_args(self, frozen_stages, stage_with_doconv, doconv_cfg=None):
        """Check ``frozen_stages`` and, where a stage uses it, ``doconv_cfg`` (mmcv's own error
        for a misspelt type reads 'Cannot find None in registry'); return ``stage_with_doconv``
        as one bool per stage."""
        n = self.num_stages
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) \
                or not -1 <= frozen_stages <= n:
            raise ConfigError(f'frozen_stages={frozen_stages!r} must be an integer in [-1, {n}] '
                              '(-1: none frozen).')
        if stage_with_doconv is None:
            return (False, ) * n
        flags = tuple(stage_with_doconv) if isinstance(stage_with_doconv, (list, tuple)) else None
        if flags is None or len(flags) != n or not all(isinstance(s, bool) for s in flags):
            raise ConfigError(f'stage_with_doconv={stage_with_doconv!r} must hold one bool per stage '
                              f'({n}), e.g. {(True, ) * n} for DO-Conv in all of them.')
        if any(flags) and doconv_cfg is not None:
            from ..layers.convert import _check_doconv_cfg
            _check_doconv_cfg(doconv_cfg)
        return flags

    def _arch_name(self):
        for name, setting in self.arch_settings.items():
            if self._arch_values(setting) == self.arch:
                return repr(name)
        return 'custom'

    # -- training-mode behaviour ----------------------------------------------------------------
    @staticmethod
    def _freeze(modules):
        """Eval mode and no gradients for ``modules`` (what ``_freeze_stages`` selects)."""
        for module in modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # -- pretrained weights ---------------------------------------------------------------------
    def init_weights(self):
        cfgs = [self.init_cfg] if isinstance(self.init_cfg, dict) else list(self.init_cfg or [])
        pretrained = [c for c in cfgs if c['type'] == 'Pretrained']
        if not pretrained:
            return super().init_weights()
        others = [c for c in cfgs if c['type'] != 'Pretrained']
        if others:  # e.g. an init for layers the checkpoint does not cover
            self.init_cfg = others
            try:
                super().init_weights()
            finally:
                self.init_cfg = cfgs
        self.load_pretrained(**{k: v for k, v in pretrained[-1].items() if k != 'type'})
        self._is_init = True

    def load_pretrained(self, checkpoint, prefix=None, map_location='cpu'):
        """Load a checkpoint in the authors' layout, checking every key (see class docstring)."""
        state = self._backbone_state(self._read_checkpoint(checkpoint, map_location), prefix,
                                     checkpoint)
        allowed_missing = self._check_keys(state, checkpoint)
        result = self.load_state_dict(state, strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= allowed_missing, result
        if allowed_missing:
            print_log(f'{self.backbone_name}: {len(allowed_missing)} keys not in {checkpoint} '
                      f'keep their initial values (e.g. {sorted(allowed_missing)[0]}).',
                      logger='current')

    @staticmethod
    def _read_checkpoint(checkpoint, map_location,
                         fix='point init_cfg.checkpoint to a .pth file or URL'):
        """The state dict of a checkpoint path or URL (one sentence when it is missing)."""
        return state_dict_of(read_checkpoint(checkpoint, map_location, fix=fix), checkpoint)

    def _strip_prefix(self, state, prefix, name):
        """The keys of ``state`` under ``prefix``, with it stripped (all keys without one)."""
        if prefix:
            prefix = prefix if prefix.endswith('.') else prefix + '.'
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise ConfigError(f'{self.backbone_name}: no key of {name} starts with prefix '
                                  f"'{prefix}'; fix init_cfg.prefix (e.g. \"backbone.\") or drop "
                                  'it.')
        return state

    def _backbone_state(self, state, prefix, name):
        """The keys under ``prefix`` (stripped), without the classifier's."""
        state = self._strip_prefix(state, prefix, name)
        return OrderedDict((k, v) for k, v in state.items()
                           if not k.startswith(self.classifier_prefixes))

    def _expected_keys(self, state):
        """``(expected, allowed)``: key -> shape (None: any) a checkpoint should hold, and the
        keys allowed to stay missing. A DO-Conv loads a plain conv's ``weight`` into W (D
        starts at zero), so its ``weight`` is expected instead of W and D."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        allowed = set()
        for mod_name, m in self.named_modules():
            if hasattr(m, 'composed_weight') and f'{mod_name}.weight' in state:
                expected.pop(f'{mod_name}.W', None)
                expected.pop(f'{mod_name}.D', None)
                expected[f'{mod_name}.weight'] = None  # W's shape differs; any shape is read
                allowed.add(f'{mod_name}.D')
        return expected, allowed
