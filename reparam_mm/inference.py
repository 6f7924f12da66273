"""Predictions on images from the fused model: mmseg's ``MMSegInferencer`` and mmdet's
``DetInferencer``, with reparam_mm's loading and fusing, behind ``tools/infer.py``.

What changes against the upstream inferencers:

* the checkpoint must match the config's model key for key and shape for shape
  (:func:`~reparam_mm.checkpoint.check_state_dict`); upstream loads with ``strict=False`` and
  predicts after logging the keys it skipped (a deploy checkpoint under its training config
  predicted from random large-kernel branches). A missing checkpoint is an error, not a
  randomly initialised model.
* the model is fused (:func:`~reparam_mm.fuse.fuse_with_report`) after loading, as
  ``tools/test.py`` tests it, and on the first batch the fused outputs are compared with the
  unfused model's (``mode='tensor'``, the whole image, as :class:`~reparam_mm.hooks.FusedEvalHook`
  does); the unfused copy is freed after that batch.
* class names and palette: the checkpoint's, else the config's test dataset's (upstream falls
  back to Cityscapes' or COCO's); mmseg 1.2.2's inferencer paints with Cityscapes' whatever the
  model, so the segmentation visualizer is given the model's.

Everything else (pipelines, batching, the config's visualizer) is the upstream inferencer's; a
config without a ``visualizer`` is painted by its package's default one. :func:`predict_images`
is what the tool runs: the inputs checked before the model is built, label maps named after
their images, and a failed fused check raised after the predictions are written.
"""
import copy
import logging
import os
import os.path as osp

import numpy as np
import torch
from mmengine.logging import print_log
from mmengine.model import revert_sync_batchnorm

from .apis import apply_dispatch_setting
from .checkpoint import STRICT_FIX, check_checkpoint_file, check_state_dict, state_dict_of
from .fuse import fuse_with_report
from .head_layout import tune_head_layouts
from .outputs import check_summary, compare_models, within_tolerance
from .scope import ConfigError, dataset_metainfo, init_scope, load_config, merge_cfg_options
from .train import NotAvailableHereError

__all__ = ['fused_inferencer', 'predict_images', 'image_files', 'check_device', 'FusedCheckError',
           'TOLERANCE']

TOLERANCE = 1e-4
# what paints the predictions when a config names no visualizer (mmseg / mmdet default_runtime's)
DEFAULT_VISUALIZERS = dict(mmseg='SegLocalVisualizer', mmdet='DetLocalVisualizer')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class FusedCheckError(RuntimeError):
    """The fused model's outputs differ from the unfused model's beyond the tolerance."""


class _FusedInference:
    """Mixed in before an upstream inferencer class (see :func:`fused_inferencer`)."""

    segmentation = False  # an MMSegInferencer (whose visualizer ignores the model's classes)

    def __init__(self, model, weights, *, fuse=True, check=True, tolerance=TOLERANCE, **kwargs):
        self.fuse, self.check, self.tolerance = fuse, check, tolerance
        self.fuse_report = None  # FuseReport, when fused
        self.last_check = None   # compare_outputs() of fused vs unfused on the first batch
        self.paint = True        # False: predict without painting pictures (predict_images)
        self._weights, self._unfused = weights, None
        self.checkpoint_meta = {}  # the loaded checkpoint's meta (a deploy pair's says so)
        super().__init__(model, weights, **kwargs)
        given = any(kwargs.get(k) for k in ('classes', 'palette', 'dataset_name'))
        meta = getattr(self.model, 'dataset_meta', None) or {}
        if self.segmentation and not given and meta.get('classes'):
            self.visualizer.set_dataset_meta(list(meta['classes']), _palette(meta))

    def _load_weights_to_model(self, model, checkpoint, cfg):
        source = f'checkpoint {self._weights}'
        check_state_dict(model, state_dict_of(checkpoint, source), source, checkpoint.get('meta'))
        meta = self.checkpoint_meta = checkpoint.get('meta') or {}
        if not (meta.get('dataset_meta') or meta.get('CLASSES')):
            from_config = dataset_metainfo(cfg)
            if from_config:  # upstream would take Cityscapes' or COCO's classes
                print_log(f'{source} records no class names (meta.dataset_meta); using those of '
                          f"the config's test dataset ({len(from_config['classes'])} classes).",
                          logger='current')
                checkpoint = dict(checkpoint, meta=dict(meta, dataset_meta=from_config))
        super()._load_weights_to_model(model, checkpoint, cfg)

    def _init_model(self, cfg, weights, device='cpu'):
        model = revert_sync_batchnorm(super()._init_model(cfg, weights, device)).eval()
        if self.fuse:
            unfused = copy.deepcopy(model) if self.check else None
            model, self.fuse_report = fuse_with_report(model)
            if self.fuse_report.total:  # a deploy pair has nothing left to fuse, nor to compare
                self._unfused = unfused
        tune_head_layouts(model)  # neck and heads in the layout timed fastest here
        return model

    def forward(self, inputs, **kwargs):
        if self._unfused is not None:
            from .layers.large_kernel import dispatch_mode
            unfused, self._unfused = self._unfused, None
            with dispatch_mode('fixed'):  # no timing of kernels for a model used once
                self.last_check = compare_models(unfused, self.model, inputs)
            del unfused
            _log_check(self.last_check, self.tolerance)
        return super().forward(inputs, **kwargs)

    def visualize(self, *args, **kwargs):
        return super().visualize(*args, **kwargs) if self.paint else None

    @property
    def check_failed(self):
        return self.last_check is not None and not within_tolerance(self.last_check, self.tolerance)

    @property
    def pred_folder(self):
        """The folder under ``out_dir`` with the raw predictions (upstream's names)."""
        return 'pred' if self.segmentation else 'preds'


def _log_check(result, tolerance):
    msg = check_summary(result)
    if within_tolerance(result, tolerance):
        print_log(f'{msg} (tolerance {tolerance:.0e}).', logger='current')
    else:
        print_log(f'{msg}: ABOVE the tolerance {tolerance:.0e}. These predictions are not those of '
                  'the trained model; predict unfused (--no-fuse) and check the fuse method of '
                  'the fused layers (see the fuse report).', logger='current', level=logging.WARNING)


def _palette(meta):
    """The meta's palette, or one colour per class (seeded) where it has none or too few."""
    classes, palette = meta['classes'], meta.get('palette')
    if isinstance(palette, (list, tuple)) and len(palette) == len(classes):
        return [list(c) for c in palette]
    rng = np.random.default_rng(42)
    return rng.integers(0, 255, (len(classes), 3)).tolist()


def check_device(device, work='predict'):
    """``device`` (None: the inferencer's choice) if torch can place a model there, else one
    sentence: a malformed name, another device type than CPU / CUDA, CUDA asked of a machine
    without it, a GPU index it lacks. ``work`` is what the calling tool does there ('predict',
    'measure'), as its sentences say."""
    if device is None:
        return None
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device name; use 'cpu', 'cuda' or "
                          "'cuda:N'.") from None
    if where.type not in ('cpu', 'cuda'):
        raise ConfigError(f"--device {device}: reparam_mm {work}s on 'cpu' or 'cuda' ('cuda:N').")
    if where.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NotAvailableHereError(f'--device {device} needs a CUDA GPU and this machine has '
                                        f'none (torch {torch.__version__}); leave --device out to '
                                        f'{work} on the CPU.')
        if where.index is not None and where.index >= count:
            raise NotAvailableHereError(f'--device {device} names GPU {where.index}, but this '
                                        f'machine has {count} (cuda:0 to cuda:{count - 1}).')
    return device


class _NamedDetections:
    """``preds/<image stem>.json`` (and the returned predictions) also name each box's class
    (``label_names``, from the model's ``dataset_meta``): upstream writes class indices only,
    which mean nothing without the config that trained the model."""

    def pred2dict(self, data_sample, pred_out_dir=''):
        result = super().pred2dict(data_sample, pred_out_dir)
        classes = (getattr(self.model, 'dataset_meta', None) or {}).get('classes')
        if 'labels' in result and classes:
            result['label_names'] = [classes[i] for i in result['labels']]
            if pred_out_dir and 'img_path' in data_sample:  # the file upstream just wrote
                import mmengine
                stem = osp.splitext(osp.basename(data_sample.img_path))[0]
                mmengine.dump(result, osp.join(pred_out_dir, 'preds', stem + '.json'))
        return result


def _inferencer_class(scope):
    if scope == 'mmseg':
        from mmseg.apis import MMSegInferencer as base
        mixins = (_FusedInference, base)
    else:
        from mmdet.apis import DetInferencer as base
        mixins = (_FusedInference, _NamedDetections, base)
    return type(f'Fused{base.__name__}', mixins, dict(segmentation=scope == 'mmseg'))


def fused_inferencer(config, checkpoint, device=None, fuse=True, check=True, tolerance=TOLERANCE,
                     cfg_options=None, **kwargs):
    """An upstream inferencer (``MMSegInferencer`` for an mmseg config, ``DetInferencer`` for
    mmdet) predicting with the fused model.

    Args:
        config (str | Config): training or deploy config.
        checkpoint (str): weights for that config (a deploy checkpoint needs its deploy config).
        device (str, optional): 'cpu', 'cuda', 'cuda:1', ...; by default CUDA where available.
        fuse (bool): fuse after loading. Defaults to True.
        check (bool): compare fused with unfused outputs on the first batch (holds a second
            copy of the model until then). Defaults to True.
        tolerance (float): max relative difference of that check before it warns.
        cfg_options (dict, optional): ``--cfg-options`` to merge into the config.
        **kwargs: passed on to the inferencer (both: ``palette``; mmseg: ``classes``,
            ``dataset_name``; mmdet: ``show_progress``).

    Call it as the upstream one: ``inferencer(images, out_dir=...)``. ``fuse_report`` and
    ``last_check`` hold what was fused and the check's result, ``check_failed`` whether it
    was above the tolerance.
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
    return _inferencer_class(scope)(cfg, checkpoint, device=check_device(device), fuse=fuse,
                                    check=check, tolerance=tolerance, scope=scope, **kwargs)


def _image_size(path):
    """(width, height) of an image file, or one sentence saying it is not one."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f'{path} is not an image that can be read ({type(e).__name__}); name '
                          'image files, or folders of them.') from None


def image_files(inputs):
    """The image files named by ``inputs`` (files, or folders read for images, sorted), in order.

    Each is opened (its header only) so that a file that is not an image fails here, before a
    model is built; a path that does not exist, a folder without images, and two inputs of one
    file name, extension aside (their outputs are named after it), are errors naming them.
    """
    files = []
    for path in inputs:
        path = os.fspath(path)
        if osp.isdir(path):
            found = sorted((osp.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith(IMAGE_EXTENSIONS) and osp.isfile(osp.join(path, f))),
                           key=lambda p: osp.basename(p).lower())
            if not found:
                raise ConfigError(f'{path} holds no image ({", ".join(IMAGE_EXTENSIONS)}); name the '
                                  'folder with the images, or the image files.')
            files.extend(found)
        elif osp.isfile(path):
            files.append(path)
        else:
            raise ConfigError(f'input {path} does not exist; name image files or folders of images.')
    seen = {}
    for path in files:
        _image_size(path)
        name = osp.splitext(osp.basename(path))[0]
        if name in seen:
            raise ConfigError(f'{seen[name]} and {path} share the file name {name}, after which '
                              'their predictions are written, so one would overwrite the other; '
                              'predict them in separate runs (another --out-dir each).')
        seen[name] = path
    return files


def predict_images(inferencer, images, out_dir, batch_size=1, paint=True, labels=True,
                   score_thr=0.3, opacity=0.5):
    """Run ``inferencer`` (from :func:`fused_inferencer`) on ``images`` (:func:`image_files`),
    writing under ``out_dir``: ``vis/<image name>`` (painted, unless ``paint`` is False) and
    ``pred/<image stem>.png`` label maps (segmentation) or ``preds/<image stem>.json``
    (detection). Returns the upstream result dict.

    Segmentation batches need images of one size after the test pipeline (mmseg stacks them
    unpadded), which is checked first. A failed fused check raises :class:`FusedCheckError` after the predictions are written.
    """
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise ConfigError(f'--out-dir {out_dir} is a file; name a folder (it is created).')
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    other = next((p for p in images if not isinstance(p, (str, os.PathLike))), None)
    if other is not None:  # the outputs are named after the files
        raise TypeError(f'predict_images takes image paths (it names its outputs after them), got a '
                        f'{type(other).__name__}; save the image first, or call the inferencer '
                        'itself, inferencer(images), which takes arrays.')
    images = [os.fspath(p) for p in images]
    segmentation = inferencer.segmentation
    if segmentation and batch_size > 1:  # as the test pipeline sizes them (a Resize may match
        sizes = {}                          # them; an EXIF rotation may not), before the first batch
        for path in images:
            sizes.setdefault(tuple(inferencer.pipeline(path)['inputs'].shape[-2:]), path)
        if len(sizes) > 1:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            raise ConfigError(f'--batch-size {batch_size}: a segmentation batch needs images of one '
                              f'size after the test pipeline (mmseg stacks them unpadded), and {pa} '
                              f'comes out {a[1]}x{a[0]} (width x height) where {pb} comes out '
                              f'{b[1]}x{b[0]}; use --batch-size 1, or one run per image size.')
    inferencer.paint = paint
    if segmentation:
        first = inferencer.num_pred_imgs
        result = inferencer(images, batch_size=batch_size, out_dir=out_dir, opacity=opacity,
                            with_labels=labels)
        for i, path in enumerate(images):  # upstream names them by a running index
            folder = osp.join(out_dir, inferencer.pred_folder)
            os.replace(osp.join(folder, f'{first + i:08d}_pred.png'),
                       osp.join(folder, osp.splitext(osp.basename(path))[0] + '.png'))
    else:
        result = inferencer(images, batch_size=batch_size, out_dir=out_dir, pred_score_thr=score_thr,
                            no_save_pred=False, no_save_vis=not paint)
    if inferencer.check_failed:
        raise FusedCheckError(
            f'{check_summary(inferencer.last_check)}, above the tolerance '
            f'{inferencer.tolerance:.0e}: the predictions written to {out_dir} are not those of the '
            'trained model; predict with --no-fuse, and check the fuse method of the fused layers.')
    return result
