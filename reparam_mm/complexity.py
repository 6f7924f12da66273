"""Parameters and multiply-adds of a config's model, trained and fused (``tools/get_flops.py``).

Re-parameterisation is a trade of training-time structure for inference cost, so both forms are
counted: the model as trained (DO-Conv's composed kernels, RepLKNet's parallel small kernels)
and as :func:`reparam_mm.fuse` leaves it.

* Multiply-adds are counted by ``torch.utils.flop_counter`` at the dispatcher: convolutions and
  matrix products, one per multiply-add, the unit the papers' "FLOPs" columns use (fvcore's and
  mmcv's counters). Normalisation, activations, pooling and resizing are left out; large
  depthwise convolutions count as direct ones whichever algorithm the dispatch would pick.
* The model is built on the meta device by default: no weight is allocated and no convolution
  runs, so the largest configs count in seconds at their test size. ``device='cpu'`` counts a
  real forward instead (the same figures; tests check that).
* Segmentors and single-stage detectors count their ``mode='tensor'`` forward: the network
  without prediction-time work (the per-instance mask convolutions of SOLOv2 or RTMDet-Ins are
  left out). Two-stage
  detectors count what test time runs: backbone, neck and RPN head, the box head(s) on the
  RPN's ``max_per_img`` proposals, and the mask head(s) on the R-CNN's ``max_per_img``
  detections (mmdet's own ``_forward`` runs NMS, which does not run on the meta device); a RoI
  head with more test-time work than that is refused rather than undercounted.
"""
import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch

from .apis import innermost_dataset
from .batches import synthetic_batch
from .fuse import count_params, fuse
from .layers.large_kernel import fft_min_kernel
from .scope import ConfigError, init_scope

__all__ = ['ModelComplexity', 'count_macs', 'format_gmacs', 'model_complexity', 'default_input_size',
           'input_size_from_pipeline', 'slide_crops', 'tested_image_sizes']


@dataclass
class ModelComplexity:
    """What :func:`model_complexity` counted. ``params_run``: the fused model's parameters that
    the counted forward uses (an auxiliary head, trained but never run at test time, is left out).
    A segmentor tested by sliding window runs ``test_crops`` forwards of ``crop_shape`` on an
    input of ``input_shape``: ``macs_test_fused`` in all, where the papers count one whole-image
    forward. Counted over ``images`` test images, the multiply-adds are their mean and
    ``input_shape`` is None. ``input_from``: where the input size came from when none was given
    (:func:`default_input_size`), else None."""
    input_shape: Optional[Tuple[int, int]]
    params: int
    params_fused: int
    params_run: int
    macs: int
    macs_fused: int
    proposals: Optional[int] = None
    detections: Optional[int] = None
    test_crops: Optional[int] = None
    crop_shape: Optional[Tuple[int, int]] = None
    macs_test_fused: Optional[int] = None
    images: Optional[int] = None
    input_from: Optional[str] = None  # where the default input size came from (INPUT_FROM_*)

    def as_dict(self):
        return asdict(self)


def input_size_from_pipeline(cfg):
    """(H, W) of the test pipeline's ``Resize`` scale (mmcv's scale is (W, H)), or None: e.g.
    2048x512 for ADE20K, 1333x800 for COCO, the sizes the papers count at. Under ``keep_ratio``
    it bounds the resized image: a 4:3 ADE20K image is tested at 512x683."""
    loader = cfg.get('test_dataloader') or {}
    dataset = innermost_dataset(loader.get('dataset') or {})
    for step in dataset.get('pipeline') or []:
        if step.get('type') == 'Resize' and step.get('scale') is not None:
            scale = step['scale']
            scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
            return int(scale[1]), int(scale[0])
    return None


INPUT_FROM_RESIZE = "the test pipeline's Resize scale"
INPUT_FROM_PREPROCESSOR = 'model.data_preprocessor.size'


def default_input_size(cfg):
    """``((H, W), source)`` to count ``cfg``'s model at when no size is given: the test
    pipeline's Resize scale (:func:`input_size_from_pipeline`), else the size the data
    preprocessor pads every batch to (``model.data_preprocessor.size``, (H, W): the 64 x 64 demo
    configs, which test their images as they are); None without either."""
    shape = input_size_from_pipeline(cfg)
    if shape is not None:
        return shape, INPUT_FROM_RESIZE
    size = ((cfg.get('model') or {}).get('data_preprocessor') or {}).get('size')
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(size[0]), int(size[1])), INPUT_FROM_PREPROCESSOR
    return None


def slide_crops(cfg, height, width):
    """(count, (h, w)) of the crops a ``slide`` test runs on an H x W input, as mmseg's
    ``slide_inference`` tiles it, or None where the test is one whole-image forward."""
    test_cfg = cfg.model.get('test_cfg') or {}
    if test_cfg.get('mode') != 'slide':
        return None
    (h_crop, w_crop), (h_stride, w_stride) = test_cfg['crop_size'], test_cfg['stride']
    rows = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    cols = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    return rows * cols, (min(h_crop, height), min(w_crop, width))


@contextlib.contextmanager
def _shape_only_roi_extractors():
    """mmdet's ``SingleRoIExtractor`` picks each RoI's level from box sizes (data-dependent
    branches that the meta device cannot take); on meta features it returns features of the right
    shape. Its RoIAlign is no convolution or matrix product: nothing countable is skipped."""
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
    forward = SingleRoIExtractor.forward

    def shape_only(self, feats, rois, *args, **kwargs):
        if feats[0].is_meta:
            return feats[0].new_zeros(rois.size(0), self.out_channels, *self.roi_layers[0].output_size)
        return forward(self, feats, rois, *args, **kwargs)
    SingleRoIExtractor.forward = shape_only
    try:
        yield
    finally:
        SingleRoIExtractor.forward = forward


def _rois(images, count, height, width, device):
    """``count`` RoIs per image, spread over an H x W image (fixed: the counts depend only on how
    many), as mmdet's ``bbox2roi`` lays them out: image index, x1, y1, x2, y2."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) * 0.75
    wh = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) * 0.25 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    return torch.cat([torch.cat([torch.full((count, 1), float(i)), boxes], 1)
                      for i in range(images)]).to(device)


def _roi_counts(model):
    return model.rpn_head.test_cfg.max_per_img, model.roi_head.test_cfg.max_per_img


def _check_countable(model, on_meta):
    """Counting runs the RPN head, the box and the mask heads as test time does; a head with more
    test-time work than that (a subclass: Grid R-CNN, MS R-CNN, HTC, PointRend, ...) would be
    undercounted, so it is refused instead."""
    from mmdet.models.dense_heads import RPNHead
    from mmdet.models.roi_heads import CascadeRoIHead, StandardRoIHead
    from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor, SingleRoIExtractor
    head, rpn = model.roi_head, getattr(model, 'rpn_head', None)
    if rpn is None:
        raise ConfigError(f'{type(model).__name__} takes its proposals from files, which counting '
                          'cannot: it counts two-stage detectors with an RPNHead.')
    if not isinstance(rpn, RPNHead):
        raise ConfigError(f'counting a two-stage detector runs an RPNHead for its proposals; '
                          f"{type(model).__name__}'s {type(rpn).__name__} is not counted.")
    if type(head) not in (StandardRoIHead, CascadeRoIHead):
        raise ConfigError(f'counting a two-stage detector runs its box and mask heads as '
                          f'StandardRoIHead and CascadeRoIHead do at test time; '
                          f'{type(head).__name__} does more there, which would be left out.')
    others = [type(m).__name__ for m in head.modules()
              if isinstance(m, BaseRoIExtractor) and type(m) is not SingleRoIExtractor]
    if on_meta and others:
        raise ConfigError(f'{others[0]} cannot run on the meta device (only SingleRoIExtractor is '
                          'stood in for there); count with --device cpu.')


def _two_stage_forward(model, inputs):
    from mmdet.models.roi_heads import CascadeRoIHead
    _check_countable(model, inputs.is_meta)
    head = model.roi_head
    proposals, detections = _roi_counts(model)
    feats = model.extract_feat(inputs)
    model.rpn_head(feats)
    images = inputs.shape[0]
    rois = _rois(images, proposals, inputs.shape[-2], inputs.shape[-1], inputs.device)
    # the final detections of each image (at most max_per_img), as predict_mask takes them
    kept = torch.cat([rois[i * proposals:i * proposals + min(detections, proposals)]
                      for i in range(images)])
    stages = [(s, ) for s in range(head.num_stages)] if isinstance(head, CascadeRoIHead) else [()]
    with _shape_only_roi_extractors():
        for stage in stages:  # each cascade stage refines the same number of boxes
            if head.with_bbox:
                head._bbox_forward(*stage, feats, rois)
        for stage in stages:  # masks of the final detections, from every stage's mask head
            if head.with_mask:
                head._mask_forward(*stage, feats, kept)


def _is_two_stage(model):
    from mmdet.models.detectors import TwoStageDetector
    return isinstance(model, TwoStageDetector)


def format_gmacs(*macs):
    """Multiply-adds in G (``tools/get_flops.py``'s GMACs, which ``tools/benchmark.py`` prints
    too), all with one number of decimals: one (the papers' and docs/configs.md's figures), or as
    many as give the smallest three significant digits (the 64 x 64 demo's 0.0268, which one
    decimal printed as 0.0)."""
    values = [m / 1e9 for m in macs]
    smallest = min((v for v in values if v > 0), default=0)
    decimals = max(1, 2 - math.floor(math.log10(smallest))) if smallest else 1
    return [f'{v:.{decimals}f}' for v in values]


def count_macs(model, inputs, data_samples):
    """Multiply-adds of one test-time forward of ``model`` (eval mode) on preprocessed
    ``inputs`` (N, 3, H, W): convolutions and matrix products (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode
    if model.training:
        raise ValueError('count_macs counts the test-time forward: call model.eval() first.')
    with fft_min_kernel(10**9), torch.no_grad(), FlopCounterMode(display=False) as counter:
        if _is_two_stage(model):
            _two_stage_forward(model, inputs)
        else:
            model(inputs, data_samples, mode='tensor')
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def _called_modules(model):
    """The set of ``model``'s modules called inside the block."""
    called = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: called.add(m)) for m in model.modules()]
    try:
        yield called
    finally:
        for h in hooks:
            h.remove()


def _params_of(modules):
    """Parameters the ``modules`` own (shared ones once)."""
    return sum({id(p): p.numel() for m in modules for p in m.parameters(recurse=False)}.values())


def _preprocessed(cfg, height, width, device, images=1):
    from mmengine.registry import MODELS
    preprocessor = MODELS.build(copy.deepcopy(cfg.model.data_preprocessor))
    with torch.no_grad():
        batch = preprocessor(synthetic_batch(cfg, height, width, batch=images), False)
    return batch['inputs'].to(device), batch['data_samples']


def tested_image_sizes(cfg, count):
    """(H, W) of the first ``count`` test images after the test pipeline (resized as tested):
    mmdet's ``get_flops.py --num-images``. The dataset's files must be there."""
    from mmengine.registry import DATASETS

    from .data_checks import check_data_roots
    check_data_roots(cfg, loaders=('test_dataloader', ))
    dataset = DATASETS.build(copy.deepcopy(cfg.test_dataloader.dataset))
    return [tuple(dataset[i]['inputs'].shape[-2:]) for i in range(min(count, len(dataset)))]


def model_complexity(cfg, shape=None, device='meta', images=None):
    """Count ``cfg``'s model, trained and fused, on one ``shape`` = (H, W) image (default:
    :func:`default_input_size`: the test pipeline's resize scale, else the preprocessor's size),
    or averaged over the first ``images`` test images as the test pipeline sizes them; each
    preprocessed (padded) as the config's preprocessor does, the model built with its random
    initialisation, no weights loaded."""
    from mmengine.registry import MODELS

    from .train import check_model_fits
    init_scope(cfg)
    check_model_fits(cfg)  # a neck or head that does not take the backbone's outputs: its keys
    if images is not None:
        if shape is not None:
            raise ConfigError('count at one input size or over test images, not both: give '
                              '--shape or --images.')
        sizes, input_from = tested_image_sizes(cfg, images), None
    else:
        if shape is None:
            found = default_input_size(cfg)
            if found is None:
                raise ConfigError('the config has no Resize step with a scale in its test '
                                  'pipeline and no model.data_preprocessor.size to count at; give '
                                  'the input size (tools/get_flops.py --shape H W).')
            shape, input_from = found
        else:
            shape, input_from = tuple(shape), None
        sizes = [shape]
    batches = {size: _preprocessed(cfg, *size, device) for size in dict.fromkeys(sizes)}

    def mean(count):  # over the images: each size counted once, weighted by its images
        return round(sum(count(*batches[size]) for size in sizes) / len(sizes))
    with torch.device(device):
        model = MODELS.build(copy.deepcopy(cfg.model))
    model.eval()
    params, macs = count_params(model), mean(lambda x, s: count_macs(model, x, s))
    fused = fuse(model)
    counts = _roi_counts(fused) if _is_two_stage(fused) else (None, None)
    with _called_modules(fused) as called:  # the fused test forward: what it runs and costs
        macs_fused = mean(lambda x, s: count_macs(fused, x, s))
    first = batches[sizes[0]][0].shape[-2:]
    result = ModelComplexity(
        input_shape=None if images is not None else tuple(first), params=params,
        params_fused=count_params(fused), params_run=_params_of(called), macs=macs,
        macs_fused=macs_fused, proposals=counts[0], detections=counts[1],
        images=len(sizes) if images is not None else None,
        input_from=input_from)
    crops = slide_crops(cfg, *first) if hasattr(fused, 'slide_inference') else None
    if crops is not None:
        def slide(x, samples):  # every crop of one input has the same size: count one
            count, (h, w) = slide_crops(cfg, *x.shape[-2:])
            return count * count_macs(fused, x[..., :h, :w], samples)
        result.macs_test_fused = mean(slide)
        if images is None:
            result.test_crops, result.crop_shape = crops
    return result
