"""Predictions on images from the fused model: mmseg's ``MMSegInferencer`` and mmdet's
``DetInferencer``, with reparam_mm's loading and fusing, behind ``tools/infer.py``.

What changes against the upstream inferencers:

* the checkpoint must match the config's model key for key and shape for shape
  (:func:`~reparam_mm.checkpoint.check_state_dict`); upstream loads with ``strict=False``, so a
  deploy checkpoint under its training config used to predict from random large-kernel
  branches without a word. A missing checkpoint is an error, not a randomly initialised model.
* the model is fused (:func:`~reparam_mm.fuse.fuse_with_report`) after loading, as
  ``tools/test.py`` tests it, and on the first batch the fused outputs are compared with the
  unfused model's (``mode='tensor'``, as :class:`~reparam_mm.hooks.FusedEvalHook` does); the
  unfused copy is freed after that batch.

Everything else (pipelines, batching, the config's visualizer, what is written under
``out_dir``) is the upstream inferencer's; a config without a ``visualizer`` is painted by
its package's default one.
"""
import copy
import logging
import os
import os.path as osp

import torch
from mmengine.logging import print_log
from mmengine.model import revert_sync_batchnorm

from .apis import apply_dispatch_setting
from .checkpoint import STRICT_FIX, check_checkpoint_file, check_state_dict, state_dict_of
from .fuse import fuse_with_report
from .outputs import compare_models
from .scope import ConfigError, init_scope, load_config, merge_cfg_options
from .train import NotAvailableHereError

__all__ = ['fused_inferencer', 'image_files', 'TOLERANCE']

TOLERANCE = 1e-4
# what paints the predictions when a config names no visualizer (mmseg / mmdet default_runtime's)
DEFAULT_VISUALIZERS = dict(mmseg='SegLocalVisualizer', mmdet='DetLocalVisualizer')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class _FusedInference:
    """Mixed in before an upstream inferencer class (see :func:`fused_inferencer`)."""

    def __init__(self, model, weights, *, fuse=True, check=True, tolerance=TOLERANCE, **kwargs):
        self.fuse, self.check, self.tolerance = fuse, check, tolerance
        self.fuse_report = None  # FuseReport, when fused
        self.last_check = None   # compare_outputs() of fused vs unfused on the first batch
        self._weights, self._unfused = weights, None
        super().__init__(model, weights, **kwargs)

    def _load_weights_to_model(self, model, checkpoint, cfg):
        source = f'checkpoint {self._weights}'
        check_state_dict(model, state_dict_of(checkpoint, source), source, checkpoint.get('meta'))
        super()._load_weights_to_model(model, checkpoint, cfg)

    def _init_model(self, cfg, weights, device='cpu'):
        model = revert_sync_batchnorm(super()._init_model(cfg, weights, device)).eval()
        if not self.fuse:
            return model
        unfused = copy.deepcopy(model) if self.check else None
        model, self.fuse_report = fuse_with_report(model)
        if self.fuse_report.total:  # a deploy pair has nothing left to fuse, nor to compare
            self._unfused = unfused
        return model

    def forward(self, inputs, **kwargs):
        if self._unfused is not None:
            unfused, self._unfused = self._unfused, None
            self.last_check = compare_models(unfused, self.model, inputs)
            del unfused
            _log_check(self.last_check, self.tolerance)
        return super().forward(inputs, **kwargs)


def _log_check(result, tolerance):
    msg = (f"fused vs unfused outputs on the first batch: max abs diff {result['max_abs']:.3e}, "
           f"max rel diff {result['max_rel']:.3e} over {result['num_tensors']} tensor(s)")
    if result['same_structure'] and result['max_rel'] <= tolerance:
        print_log(f'{msg} (tolerance {tolerance:.0e}).', logger='current')
    else:
        print_log(f'{msg}: ABOVE the tolerance {tolerance:.0e}. These predictions are not those of '
                  'the trained model; predict unfused (--no-fuse) and check the fuse method of '
                  'the fused layers (see the fuse report).', logger='current', level=logging.WARNING)


def check_device(device):
    """``device`` (None: the inferencer's choice) if torch can place a model there, else one
    sentence: a malformed name, CUDA asked of a machine without it, a GPU index it lacks."""
    if device is None:
        return None
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device name; use 'cpu', 'cuda' or "
                          "'cuda:N'.") from None
    if where.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NotAvailableHereError(f'--device {device} needs a CUDA GPU and this machine has '
                                        f'none (torch {torch.__version__}); leave --device out to '
                                        'predict on the CPU.')
        if where.index is not None and where.index >= count:
            raise NotAvailableHereError(f'--device {device} names GPU {where.index}, but this '
                                        f'machine has {count} (cuda:0 to cuda:{count - 1}).')
    return device


def _inferencer_class(scope):
    if scope == 'mmseg':
        from mmseg.apis import MMSegInferencer as base
    else:
        from mmdet.apis import DetInferencer as base
    return type(f'Fused{base.__name__}', (_FusedInference, base), {})


def fused_inferencer(config, checkpoint, device=None, fuse=True, check=True, tolerance=TOLERANCE,
                     cfg_options=None, **kwargs):
    """An upstream inferencer (``MMSegInferencer`` for an mmseg config, ``DetInferencer`` for
    mmdet) predicting with the fused model.

    Args:
        config (str | Config): training or deploy config.
        checkpoint (str): weights for that config (a deploy checkpoint needs its deploy config).
        device (str, optional): 'cpu', 'cuda', 'cuda:1', ...; by default CUDA where available.
        fuse (bool): fuse after loading. Defaults to True.
        check (bool): compare fused with unfused outputs on the first batch (needs the unfused
            model's memory once more until then). Defaults to True.
        tolerance (float): max relative difference of that check before it warns.
        cfg_options (dict, optional): ``--cfg-options`` to merge into the config.
        **kwargs: passed on to the inferencer (``palette``, ``classes``, ``show_progress``).

    Call it as the upstream one: ``inferencer(images, out_dir=...)``. ``fuse_report`` and
    ``last_check`` hold what was fused and the check's result.
    """
    cfg = copy.deepcopy(load_config(config))
    merge_cfg_options(cfg, cfg_options)
    apply_dispatch_setting(cfg)
    scope = init_scope(cfg)
    if not cfg.get('visualizer'):
        cfg.visualizer = dict(type=DEFAULT_VISUALIZERS[scope], name='visualizer',
                              vis_backends=[dict(type='LocalVisBackend')])
    if checkpoint is None:
        raise ConfigError('inference needs the trained weights: pass the checkpoint the config '
                          'was trained to (a config alone predicts from random weights).')
    check_checkpoint_file(checkpoint, fix=STRICT_FIX)
    return _inferencer_class(scope)(cfg, checkpoint, device=check_device(device), fuse=fuse, check=check,
                                    tolerance=tolerance, scope=scope, **kwargs)


def image_files(inputs):
    """The image files named by ``inputs`` (files, or folders read for images, sorted), in order;
    a path that does not exist or a folder without images is an error naming it."""
    files = []
    for path in inputs:
        path = os.fspath(path)
        if osp.isdir(path):
            found = sorted(osp.join(path, f) for f in os.listdir(path)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and osp.isfile(osp.join(path, f)))
            if not found:
                raise ConfigError(f'{path} holds no image ({", ".join(IMAGE_EXTENSIONS)}); name the '
                                  'folder with the images, or the image files.')
            files.extend(found)
        elif osp.isfile(path):
            files.append(path)
        else:
            raise ConfigError(f'input {path} does not exist; name image files or folders of images.')
    return files

