"""Effective receptive field (ERF) of a backbone, measured as RepLKNet's authors measure it
(``tools/analyze_erf.py``; "Scaling Up Your Kernels to 31x31", Fig. 1 and the high-contribution
area ratio table).

The point of large kernels is that one output position draws on a large part of the image, and
the ERF says how large: for each image, the gradient of the central position of the chosen
feature map (its channels summed after a ReLU) with respect to the input, negative gradients
cut to zero and the three input channels summed, is that position's contribution score per input
pixel; the scores are averaged over the images. :func:`area_ratios` then reads how much of the
image the high-contribution area covers, on the authors' scale (``log10(score + 1)`` rescaled to
a maximum of 1): for each threshold t, the smallest centred square whose scores hold more than
t of the total.

The scores are a property of the trained weights: a randomly initialised model has an ERF too,
but it says little about what training makes of the kernels.
"""
import contextlib
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .scope import ConfigError

__all__ = ['ERFResult', 'AreaRatio', 'THRESHOLDS', 'contribution_scores', 'area_ratios', 'load_image',
           'effective_receptive_field', 'feature_centre', 'normalised_scores', 'load_backbone',
           'save_heatmaps']

#: the thresholds of the authors' table
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


@dataclass
class AreaRatio:
    threshold: float
    side: int  # of the centred square, in input pixels
    ratio: float  # the square's share of the input's area (clipped at the borders)


@dataclass
class ERFResult:
    scores: np.ndarray  # H x W, the mean contribution score per input pixel
    images: int  # the images averaged
    skipped: List[str] = field(default_factory=list)  # images whose gradient was not finite
    feature_shape: Tuple[int, int] = (0, 0)  # the feature map whose centre was taken
    centre: Optional[Tuple[int, int]] = None  # the input pixel that position looks at

    def area_ratios(self, thresholds=THRESHOLDS):
        return area_ratios(self.scores, thresholds, self.centre)


def _feature(outputs, out_index):
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    outputs = tuple(outputs)
    if not -len(outputs) <= out_index < len(outputs):
        raise ConfigError(f'--out-index {out_index}: the backbone returns {len(outputs)} feature '
                          f'map(s); use an index from {-len(outputs)} to {len(outputs) - 1}.')
    feature = outputs[out_index]
    if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
        raise ConfigError(f'--out-index {out_index}: that backbone output is not an N x C x H x W '
                          'feature map; choose another index.')
    return feature


def feature_centre(input_shape, feature_shape):
    """The input pixel that the central position ``(h // 2, w // 2)`` of an ``h x w`` feature map
    looks at, for a backbone whose stride-s position i is centred on input pixel ``i * s`` (convs
    padded by half their kernel, as ResNet, RepLKNet and UniRepLKNet are). It is the input's centre
    when h and w are even, as at the authors' 1024 x 1024 with stride 32; an odd map's centre is a
    half-stride off it."""
    (height, width), (h, w) = input_shape, feature_shape
    if h < 2 or w < 2:
        raise ConfigError(f'the feature map is {h} x {w} at an input of {height} x {width}: it has '
                          'no central position; use a larger --size (the authors use 1024).')
    return round((h // 2) * height / h), round((w // 2) * width / w)


def contribution_scores(backbone, images, out_index=-1):
    """Per-image contribution scores (N x H x W) of ``images`` (N x 3 x H x W, normalised) to the
    central position of ``backbone(images)[out_index]``, and that feature map's H x W.

    Each image's gradient is its own (N independent centres summed give N separate gradients),
    which holds for a model in eval mode: batch statistics would mix the images.
    """
    if backbone.training:
        raise ValueError('contribution_scores needs the backbone in eval mode (BN statistics '
                         'fixed); call backbone.eval() first.')
    x = images.detach().clone().requires_grad_(True)
    feature = _feature(backbone(x), out_index)
    h, w = feature.shape[-2:]
    centre = F.relu(feature[:, :, h // 2, w // 2]).sum()
    (grad,) = torch.autograd.grad(centre, x)
    return F.relu(grad.float()).sum(dim=1), (int(h), int(w))


def normalised_scores(scores):
    """The authors' display scale: ``log10(scores + 1)``, rescaled to a maximum of 1."""
    data = np.log10(np.asarray(scores, dtype=np.float64) + 1)
    top = data.max()
    if not top > 0:
        raise ConfigError('every contribution score is zero: the central feature position does not '
                          'depend on the input (all its channels at or below zero after the ReLU).')
    return data / top


def area_ratios(scores, thresholds: Sequence[float] = THRESHOLDS, centre=None) -> List[AreaRatio]:
    """For each threshold t, the smallest square centred on ``centre`` (default: the input's
    centre, ``(H // 2, W // 2)``) whose normalised scores (:func:`normalised_scores`) sum to more
    than t of their total, and its share of the input's area.

    The authors' rule, extended at both ends: their squares start at side 3 and stop one short of
    the input's side (no answer beyond); these start at side 1, and a square reaching past the
    borders counts the pixels it covers, so every threshold below 1 has an answer.
    """
    data = normalised_scores(scores)
    h, w = data.shape
    total = data.sum()
    cy, cx = (h // 2, w // 2) if centre is None else centre
    # the sum of the square of half-side i, for every i, from a 2-D cumulative sum
    cum = np.zeros((h + 1, w + 1))
    cum[1:, 1:] = data.cumsum(0).cumsum(1)
    last = max(cy, h - 1 - cy, cx, w - 1 - cx)
    i = np.arange(last + 1)
    top, bottom = np.clip(cy - i, 0, h), np.clip(cy + i + 1, 0, h)
    left, right = np.clip(cx - i, 0, w), np.clip(cx + i + 1, 0, w)
    inside = cum[bottom, right] - cum[top, right] - cum[bottom, left] + cum[top, left]
    covered = (bottom - top) * (right - left)
    out = []
    for t in thresholds:
        if not 0 < t < 1:
            raise ValueError(f'threshold {t} is not a fraction between 0 and 1 (e.g. 0.2).')
        k = int(np.argmax(inside > t * total))  # the whole input always holds more than t < 1
        out.append(AreaRatio(float(t), int(2 * k + 1), float(covered[k] / (h * w))))
    return out


def load_image(path, size, mean, std, bgr_to_rgb=True):
    """One image file as a 1 x 3 x size x size tensor: resized bicubic (aspect ratio not kept, as
    the authors' ``Resize((1024, 1024))``) and normalised as the config's data preprocessor does."""
    import mmcv
    img = mmcv.imread(path, channel_order='bgr')
    if img is None:
        raise ConfigError(f'{path} is not an image that can be read; pass image files or folders '
                          'of them.')
    img = mmcv.imresize(img, (size, size), interpolation='bicubic').astype(np.float32)
    if bgr_to_rgb:
        img = img[..., ::-1]
    img = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def effective_receptive_field(backbone, files, size=1024, mean=(123.675, 116.28, 103.53),
                              std=(58.395, 57.12, 57.375), bgr_to_rgb=True, out_index=-1,
                              device='cpu') -> ERFResult:
    """The mean contribution scores of ``files`` (image paths, one forward and backward each) to
    the central position of ``backbone``'s ``out_index`` feature map, the backbone in eval mode.

    An image whose gradient is not finite (the authors' script skips those too) is left out of
    the mean and named in ``skipped``; if every image is, that is an error.
    """
    if not files:
        raise ConfigError('no images to measure the ERF on; pass image files or folders of them.')
    backbone.eval()
    total, used, skipped = None, 0, []
    for path in files:
        x = load_image(path, size, mean, std, bgr_to_rgb).to(device)
        scores, feature_shape = contribution_scores(backbone, x, out_index)
        centre = feature_centre(tuple(x.shape[-2:]), feature_shape)  # a 1 x 1 map: at once
        scores = scores[0].double().cpu()
        if not torch.isfinite(scores).all():
            skipped.append(str(path))
            continue
        total = scores if total is None else total + scores
        used += 1
    if used == 0:
        raise ConfigError(f'the gradient was not finite on any of the {len(files)} image(s); the '
                          'weights may hold NaN or overflow: check the checkpoint.')
    return ERFResult((total / used).numpy(), used, skipped, feature_shape, centre)


@contextlib.contextmanager
def _quiet_init_log():
    """mmengine logs every parameter's initialisation at INFO outside a runner; keep warnings."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


#: the config keys whose pretrained weights reach the backbone (mmseg's and mmdet's models hand
#: ``model.pretrained`` to it)
BACKBONE_KEYS = ('model.backbone.', 'model.pretrained')


def load_backbone(cfg, checkpoint=None, fuse=True, device='cpu'):
    """The backbone of ``cfg``'s model in eval mode, its weights from ``checkpoint`` (the whole
    model's, loaded strictly) or else from the backbone's pretrained ``init_cfg`` (an ImageNet
    checkpoint); fused unless ``fuse`` is False. Returns (backbone, what the weights are, the
    preprocessor's (mean, std, bgr_to_rgb)).

    With neither, the weights are a random initialisation, and the description says so.
    """
    from mmengine.model import revert_sync_batchnorm

    from .apis import build_model
    from .checkpoint import load_checkpoint_strict
    from .fuse import fuse_with_report
    from .train import check_pretrained_files, pretrained_paths
    if 'backbone' not in cfg.model:
        raise ConfigError(f'{cfg.filename}: the model has no backbone; the ERF is measured on a '
                          "backbone's feature maps.")
    pre = cfg.model.get('data_preprocessor') or {}
    norm = (pre.get('mean') or (0.0, 0.0, 0.0), pre.get('std') or (1.0, 1.0, 1.0),
            bool(pre.get('bgr_to_rgb', False)))
    if checkpoint is None:
        check_pretrained_files(cfg, BACKBONE_KEYS)  # a missing file: the key to set, or None
    model = build_model(cfg)
    if checkpoint is not None:
        load_checkpoint_strict(model, checkpoint)
        weights = f'checkpoint {checkpoint}'
    else:
        with _quiet_init_log():
            model.backbone.init_weights()
        sources = list(dict.fromkeys(file for _, file in pretrained_paths(cfg, BACKBONE_KEYS)))
        weights = (f'backbone pretrained from {", ".join(sources)}' if sources else
                   'random initialisation (no checkpoint, and the backbone has no pretrained '
                   'init_cfg)')
    backbone = revert_sync_batchnorm(model.backbone)
    backbone.eval()  # not chained: mmseg's ResNet.train() returns None
    if fuse:
        backbone, report = fuse_with_report(backbone)
        weights += f', fused ({report.total} module(s))'
    return backbone.to(device), weights, norm


def save_heatmaps(panels, path):
    """Pictures of ``panels``, (scores, title) pairs, side by side on the authors' scale
    (:func:`normalised_scores`) and colour map, one colour bar for all."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels) + 1, 3.6), dpi=80,
                             squeeze=False)
    for ax, (scores, title) in zip(axes[0], panels):
        image = ax.imshow(normalised_scores(scores), cmap='RdYlGn', vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), orientation='horizontal', fraction=0.05, pad=0.04)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)
