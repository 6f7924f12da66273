"""ONNX export of a fused segmentor or detector, checked in onnxruntime on export.

What ``tools/export_onnx.py`` does, importable for tests and the demo:

* :func:`load_fused`: the model of a config with a checkpoint loaded **strictly**
  (:func:`reparam_mm.apis.load_checkpoint_strict`), then fused. A deploy config +
  checkpoint written by ``tools/fuse.py`` loads as it is (nothing left to fuse).
* :class:`SegmentorGraph`: normalised image -> per-pixel logits at the input size
  (mmseg's ``whole`` inference; optionally the argmax labels too).
* :class:`DetectorGraph`: normalised image (+ proposals) -> the dense head's raw
  outputs per level and, for two-stage detectors, the RoI head's outputs for the
  given proposals. Anchor decoding and NMS stay outside the graph, in mmdet's
  ``predict_by_feat`` (the whole graph with NMS is not exported).
* :func:`export_onnx`: export with torch's TorchScript-based exporter, run the
  file in onnxruntime (CPU provider) on the same input, compare with PyTorch.
  Above the tolerance it raises :class:`OnnxCheckError` and removes the file.

Why the TorchScript exporter (``dynamo=False``): torch 2.13's default exporter goes
through ``torch.export``, which cannot trace into mmcv's compiled ops (RoIAlign is a
pybind call, not a torch op) and needs the extra ``onnxscript`` package; the
TorchScript exporter records autograd Functions with a ``symbolic`` (used here for
RoIAlign) and is what mmdeploy uses for these models. torch flags it deprecated.

Standard ONNX ops only: large depthwise kernels export as one ``Conv`` each (the
CPU dispatch in ``layers/large_kernel.py`` runs plain ``F.conv2d`` while exporting,
never its FFT path), and RoIAlign as ONNX ``RoiAlign`` (opset >= 16, whose
``half_pixel`` mode is mmcv's ``aligned=True``).
"""
import contextlib
import copy
import math
import os
import os.path as osp
import time
import types
import warnings
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from .apis import apply_dispatch_setting, build_model, load_checkpoint_strict
from .fuse import fuse_with_report
from .outputs import compare_outputs
from .scope import ConfigError, load_config, merge_cfg_options

__all__ = ['OPSET', 'OPSETS', 'TOLERANCE', 'NotExportableError', 'OnnxCheckError', 'load_fused',
           'SegmentorGraph', 'DetectorGraph', 'build_graph', 'default_shape', 'example_inputs',
           'normalise_image', 'export_onnx', 'onnx_graph_summary', 'ort_session', 'run_ort']

#: default ONNX opset: RoiAlign's half_pixel mode needs 16, LayerNorm 17
OPSET = 17


def _torchscript_max_opset():
    try:
        from torch.onnx import _constants
        return int(getattr(_constants, 'ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET', 17))
    except (ImportError, ValueError, TypeError):  # pragma: no cover - another torch layout
        return 17


#: the opsets the exporter is offered: from 11 (bilinear Resize as the heads use it) to the
#: TorchScript exporter's newest
OPSETS = tuple(range(11, _torchscript_max_opset() + 1))
#: relative difference (per output, to its largest magnitude) accepted between ORT and PyTorch
TOLERANCE = 1e-4


class NotExportableError(NotImplementedError):
    """A model this exporter cannot write as a graph that computes what it computes; the
    message names the part and what can be exported (the tools print it as one line)."""


class OnnxCheckError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


def load_fused(config, checkpoint, cfg_options=None, keep_unfused=False):
    """``(cfg, fused_model, FuseReport)``: build, load ``checkpoint`` strictly, eval, fuse; with
    ``keep_unfused``, the unfused model follows as a fourth item (a copy fused)."""
    cfg = load_config(config)
    cfg = copy.deepcopy(cfg)
    merge_cfg_options(cfg, cfg_options)
    apply_dispatch_setting(cfg)
    model = build_model(cfg)
    load_checkpoint_strict(model, checkpoint)
    unfused = model.eval()
    model, report = fuse_with_report(copy.deepcopy(unfused) if keep_unfused else unfused)
    return (cfg, model, report, unfused) if keep_unfused else (cfg, model, report)


def slide_note(cfg):
    """The sentence for a segmentor its config tests by sliding a window (``test_cfg.mode``
    'slide'), or None: the graph runs the whole input at once, so onnxruntime reproduces the
    fused model but not the config's test, and its mIoU may differ (26.4 against 25.9 in a
    walk-through)."""
    test_cfg = (cfg.get('model') or {}).get('test_cfg') or {}
    if test_cfg.get('mode') != 'slide':
        return None
    crop, stride = test_cfg.get('crop_size'), test_cfg.get('stride')
    return (f"note: the config tests by sliding a window (model.test_cfg.mode='slide', crops "
            f"{crop} every {stride}); the exported graph runs the whole input at once, as "
            "mode='whole' does: slide the crops in your application (export at the crop size, "
            "--shape H W) to reproduce the config's test.")


# -- the exported networks -------------------------------------------------------------------------
class SegmentorGraph(nn.Module):
    """mmseg segmentor as a plain network: ``(N, 3, H, W)`` normalised image -> logits.

    The logits are the decode head's, bilinearly resized to the input size: mmseg's
    ``whole`` inference before cropping the padding and resizing to the original image
    (a config's ``slide`` test mode is not reproduced). With ``argmax=True`` the labels
    ``(N, H, W)`` (int64) follow as a second output (a one-channel head: the sigmoid
    above the head's ``threshold``).
    """

    def __init__(self, segmentor, argmax=False):
        super().__init__()
        self.segmentor = segmentor
        self.argmax = argmax
        heads = segmentor.decode_head
        self.last_head = heads[-1] if isinstance(heads, nn.ModuleList) else heads

    @property
    def input_names(self):
        return ['input']

    @property
    def output_names(self):
        return ['logits', 'labels'] if self.argmax else ['logits']

    def forward(self, inputs):
        feats = self.segmentor.extract_feat(inputs)
        heads = self.segmentor.decode_head
        if isinstance(heads, nn.ModuleList):  # CascadeEncoderDecoder (OCRNet ...)
            out = heads[0].forward(feats)
            for head in heads[1:]:
                out = head.forward(feats, out)
            logits = out
        else:
            logits = heads.forward(feats)
        logits = F.interpolate(logits, size=inputs.shape[2:], mode='bilinear',
                               align_corners=self.last_head.align_corners)
        if not self.argmax:
            return logits
        if logits.shape[1] == 1:
            labels = (logits.sigmoid() > self.last_head.threshold).squeeze(1).long()
        else:
            labels = logits.argmax(dim=1)
        return logits, labels


def _flat(obj):
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat(v)]
    return [obj]


class DetectorGraph(nn.Module):
    """mmdet detector as a plain network, batch 1.

    Inputs: ``input`` (1, 3, H, W) normalised image and, for two-stage detectors,
    ``proposals`` (N, 4) boxes ``x1, y1, x2, y2`` in input pixels. Outputs: the dense
    head's raw maps per FPN level (``rpn_cls_score_l0`` ... / ``cls_score_l0`` ...) and
    the RoI head's outputs for the proposals (``roi_cls_score``, ``roi_bbox_pred``,
    ``roi_mask_pred`` with a mask head), i.e. what mmdet's ``mode='tensor'`` computes
    before post-processing, with the proposals given instead of taken from the RPN.
    """

    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        self.two_stage = getattr(detector, 'with_rpn', False) and \
            getattr(detector, 'roi_head', None) is not None
        head = detector.rpn_head if self.two_stage else getattr(detector, 'bbox_head', None)
        if head is None:
            raise NotExportableError(f'{type(detector).__name__} has neither an RPN + RoI head nor a '
                            'dense bbox_head; only those detectors can be exported.')
        if self.two_stage and getattr(detector.roi_head, 'num_stages', 1) > 1:
            raise NotExportableError(
                f'{type(detector.roi_head).__name__} has {detector.roi_head.num_stages} stages; '
                'its box refinement between stages does not export correctly yet (onnxruntime '
                'disagreed with PyTorch in our check), so only single-stage RoI heads '
                '(StandardRoIHead, as in Faster R-CNN) are exported.')
        self.dense_head = head
        self._names = None

    @property
    def input_names(self):
        return ['input', 'proposals'] if self.two_stage else ['input']

    @property
    def output_names(self):
        if self._names is None:
            raise RuntimeError('run the graph once (export_onnx does) before asking its '
                               'output names.')
        return self._names

    def forward(self, inputs, proposals=None):
        from mmengine.structures import InstanceData
        feats = self.detector.extract_feat(inputs)
        dense = self.dense_head.forward(feats)
        prefix = 'rpn_' if self.two_stage else ''
        kinds = (['cls_score', 'bbox_pred'] if len(dense) == 2 else
                 [f'out{j}' for j in range(len(dense))])
        names, outs = [], []
        for kind, per_level in zip(kinds, dense):
            for level, t in enumerate(_flat(per_level)):
                names.append(f'{prefix}{kind}_l{level}')
                outs.append(t)
        if self.two_stage:
            if proposals is None:
                raise ValueError('a two-stage detector graph needs proposals (N, 4) as its '
                                 'second input.')
            from mmdet.structures import DetDataSample
            shape = tuple(inputs.shape[2:])  # cascade heads clip refined boxes to the image
            sample = DetDataSample(metainfo=dict(img_shape=shape, pad_shape=shape,
                                                 batch_input_shape=shape))
            roi_outs = self.detector.roi_head.forward(feats, [InstanceData(bboxes=proposals)],
                                                      [sample])
            roi_names = ['roi_cls_score', 'roi_bbox_pred', 'roi_mask_pred']
            for j, t in enumerate(_flat(roi_outs)):
                names.append(roi_names[j] if j < len(roi_names) else f'roi_out{j}')
                outs.append(t)
        self._names = names
        return tuple(outs)


def build_graph(cfg, model, argmax=False):
    """The exportable network of a fused ``model`` built from ``cfg`` (mmseg or mmdet)."""
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        return SegmentorGraph(model, argmax=argmax).eval()
    if argmax:
        raise ConfigError('--argmax applies to segmentors; a detector graph ends at the heads.')
    return DetectorGraph(model).eval()


# -- inputs ----------------------------------------------------------------------------------------
def _divisor(cfg):
    pre = cfg.model.get('data_preprocessor') or {}
    return int(pre.get('pad_size_divisor') or pre.get('size_divisor') or 1)


def _test_resize_scale(cfg):
    try:
        pipeline = cfg.test_dataloader.dataset.pipeline
    except AttributeError:
        return None
    for step in pipeline or []:
        if step.get('type') == 'Resize' and step.get('scale'):
            return step['scale']
    return None


def default_shape(cfg):
    """``(H, W)`` to export at: the config's ``crop_size`` or preprocessor ``size``, else its test
    Resize scale (short, long side), else 512 x 512; rounded up to the pad divisor."""
    pre = cfg.model.get('data_preprocessor') or {}
    shape = cfg.get('crop_size') or pre.get('size')
    if not shape:
        scale = _test_resize_scale(cfg)
        shape = (min(scale), max(scale)) if scale else (512, 512)
    d = _divisor(cfg)
    return tuple(int(math.ceil(s / d) * d) for s in shape)


def _random_proposals(num, height, width, generator):
    """``num`` boxes inside the image, sides log-uniform from 8 px to the image size, so the
    RoI extractor's FPN levels all get some."""
    side = torch.exp(torch.empty(num, 2).uniform_(math.log(8), math.log(max(height, width)),
                                                  generator=generator))
    side = torch.minimum(side, torch.tensor([float(width), float(height)]))
    x1 = torch.rand(num, generator=generator) * (width - side[:, 0])
    y1 = torch.rand(num, generator=generator) * (height - side[:, 1])
    return torch.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)


def example_inputs(graph, shape, batch=1, num_proposals=100, seed=0):
    """A seeded normalised image (standard normal, like a normalised photo) and proposals."""
    g = torch.Generator().manual_seed(seed)
    height, width = shape
    image = torch.randn(batch, 3, height, width, generator=g)
    if isinstance(graph, DetectorGraph) and graph.two_stage:
        return image, _random_proposals(num_proposals, height, width, g)
    return (image,)


def normalise_image(image, cfg):
    """``(H, W, 3)`` uint8 RGB image -> ``(1, 3, H, W)`` float32 input of the exported graph, as
    the config's data preprocessor feeds the model (channel order, mean, std; no padding)."""
    import numpy as np
    pre = cfg.model.get('data_preprocessor') or {}
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    if not pre.get('bgr_to_rgb') and not pre.get('rgb_to_bgr'):
        x = x.flip(-1)  # files load as BGR, and the model was trained on that order
    if pre.get('mean') is not None:
        x = (x - torch.tensor(pre['mean']).float()) / torch.tensor(pre['std']).float()
    return x.permute(2, 0, 1)[None].contiguous()


# -- export-time rewrites (PyTorch numerics unchanged) ---------------------------------------------
class _RoIAlignONNX(torch.autograd.Function):
    """mmcv's RoIAlign forward, exported as ONNX ``RoiAlign`` (opset >= 16).

    mmcv's own ``symbolic`` targets opset 10-12 (``Squeeze`` with an ``axes`` attribute,
    the 0.5 pixel shift subtracted from the boxes, which opset 16's default
    ``half_pixel`` mode would apply a second time).
    """

    @staticmethod
    def forward(ctx, feats, rois, output_size, spatial_scale, sampling_ratio, pool_mode, aligned):
        from mmcv.ops import roi_align
        return roi_align(feats, rois, output_size, spatial_scale, sampling_ratio, pool_mode,
                         aligned)

    @staticmethod
    def symbolic(g, feats, rois, output_size, spatial_scale, sampling_ratio, pool_mode, aligned):
        index = g.op('Constant', value_t=torch.tensor(0, dtype=torch.long))
        batch = g.op('Cast', g.op('Gather', rois, index, axis_i=1), to_i=7)  # INT64
        boxes = g.op('Gather', rois, g.op('Constant', value_t=torch.tensor([1, 2, 3, 4])), axis_i=1)
        return g.op('RoiAlign', feats, boxes, batch, output_height_i=output_size[0],
                    output_width_i=output_size[1], spatial_scale_f=spatial_scale,
                    sampling_ratio_i=max(0, sampling_ratio), mode_s=pool_mode,
                    coordinate_transformation_mode_s=('half_pixel' if aligned
                                                      else 'output_half_pixel'))


def _roi_align_forward(self, feats, rois):
    return _RoIAlignONNX.apply(feats, rois, tuple(self.output_size), float(self.spatial_scale),
                               int(self.sampling_ratio), self.pool_mode, bool(self.aligned))


def _all_levels_roi_forward(self, feats, rois, roi_scale_factor=None):
    """SingleRoIExtractor without data-dependent branches: every level pools every RoI and a
    0/1 mask keeps each RoI's own level (mmdet's loop traces the levels that happened to
    hold RoIs at export time as the only ones)."""
    rois = rois.type_as(feats[0])
    if len(feats) == 1:
        return self.roi_layers[0](feats[0], rois)
    levels = self.map_roi_levels(rois, len(feats))
    if roi_scale_factor is not None:
        rois = self.roi_rescale(rois, roi_scale_factor)
    out = 0
    for i, feat in enumerate(feats[:len(self.roi_layers)]):
        keep = (levels == i).to(feat.dtype).reshape(-1, 1, 1, 1)
        out = out + self.roi_layers[i](feat, rois) * keep
    return out


def _adaptive_avg_pool_forward(self, x):
    """``nn.AdaptiveAvgPool2d`` as one mean per bin over slices computed from the input size.

    The exporter turns adaptive pooling into ``AveragePool`` only when the output size
    divides the (static) input size: UperNet's PPM bins 2, 3, 6 over a 16x16 map do not.
    Bin ``i`` spans rows ``floor(i H / o)`` to ``ceil((i + 1) H / o)`` as in PyTorch; with a
    ``--dynamic`` export ``H`` is read from the input at run time.
    """
    out_h, out_w = (self.output_size, self.output_size) if isinstance(self.output_size, int) \
        else self.output_size
    if out_h is None or out_w is None:
        return F.adaptive_avg_pool2d(x, self.output_size)
    if out_h == 1 and out_w == 1:
        return x.mean((-2, -1), keepdim=True)
    h, w = x.shape[-2], x.shape[-1]
    rows = []
    for i in range(out_h):  # ceil(a / b) as (a + b - 1) // b: exported integer division truncates
        r0, r1 = (i * h) // out_h, ((i + 1) * h + out_h - 1) // out_h
        rows.append(torch.cat([x[..., r0:r1, (j * w) // out_w:((j + 1) * w + out_w - 1) // out_w]
                               .mean((-2, -1), keepdim=True) for j in range(out_w)], dim=-1))
    return torch.cat(rows, dim=-2)


@contextlib.contextmanager
def export_rewrites(model):
    """While exporting: adaptive average pooling as slices, mmcv RoIAlign -> ONNX RoiAlign,
    RoI extractors without branches. The model computes the same numbers either way."""
    patched = []
    try:
        from mmcv.ops import RoIAlign
        from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
    except ImportError:  # no mmdet / mmcv ops: a segmentor needs no rewrite
        RoIAlign = SingleRoIExtractor = ()
    for m in model.modules():
        if isinstance(m, nn.AdaptiveAvgPool2d):
            m.forward = types.MethodType(_adaptive_avg_pool_forward, m)
            patched.append(m)
        elif RoIAlign and isinstance(m, RoIAlign):
            m.forward = types.MethodType(_roi_align_forward, m)
            patched.append(m)
        elif SingleRoIExtractor and type(m) is SingleRoIExtractor:
            m.forward = types.MethodType(_all_levels_roi_forward, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# -- export and check ------------------------------------------------------------------------------
def onnx_graph_summary(path):
    """Op counts, Conv kernel sizes and non-standard op domains of an ONNX file."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    ops, kernels = Counter(), Counter()
    domains = set()
    for node in model.graph.node:
        ops[node.op_type] += 1
        if node.domain not in ('', 'ai.onnx'):
            domains.add(node.domain)
        if node.op_type == 'Conv':
            for attr in node.attribute:
                if attr.name == 'kernel_shape':
                    kernels['x'.join(map(str, attr.ints))] += 1
    largest = max(kernels, key=lambda k: math.prod(map(int, k.split('x'))), default=None)
    opset = max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')),
                default=None)
    return dict(ops=dict(ops), conv_kernels=dict(kernels), largest_kernel=largest,
                custom_domains=sorted(domains), opset=opset)


def ort_session(path, threads=None):
    """An onnxruntime CPU session; ``threads`` sets its intra-op threads (default: ORT's)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def run_ort(session, names, inputs):
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _check(graph, session, inputs, output_names, tolerance, argmax_label='labels'):
    """Per-output comparison of ORT with PyTorch; returns a dict (worst first in ``outputs``)."""
    with torch.no_grad():
        expected = _as_tuple(graph(*inputs))
    got = run_ort(session, graph.input_names, inputs)
    per_output = []
    for name, ref, out in zip(output_names, expected, got):
        if not ref.is_floating_point():  # argmax labels: agreement, ties may flip
            equal = (ref == out.to(ref.dtype)) if ref.shape == out.shape else \
                torch.zeros(1, dtype=torch.bool)
            per_output.append(dict(name=name, agreement=float(equal.double().mean()),
                                   exact=bool(equal.all())))
            continue
        c = compare_outputs(ref, out)
        per_output.append(dict(name=name, max_abs=c['max_abs'], max_rel=c['max_rel'],
                               shape=tuple(ref.shape)))
    floats = [o for o in per_output if 'max_rel' in o]
    worst = max(floats, key=lambda o: o['max_rel']) if floats else None
    ok = len(got) == len(expected) and (worst is None or worst['max_rel'] <= tolerance)
    return dict(ok=ok, outputs=per_output, worst=worst, num_outputs=len(expected),
                input_shapes=[tuple(t.shape) for t in inputs], tolerance=tolerance)


def _check_fused(graph, unfused_graph, inputs, tolerance):
    """The fused graph's float outputs against the unfused model's on ``inputs``; raises
    :class:`~reparam_mm.apis.DeployCheckError` beyond ``tolerance``, before anything is written:
    onnxruntime's check compares with the fused model only, so a layer that fused wrongly
    exported with a PASS."""
    from .apis import DeployCheckError
    with torch.no_grad():
        fused, reference = _as_tuple(graph(*inputs)), _as_tuple(unfused_graph(*inputs))
    worst = max((compare_outputs(ref, out)['max_rel'] for ref, out in zip(reference, fused)
                 if ref.is_floating_point()), default=0.0)
    if worst > tolerance:
        raise DeployCheckError(
            f'the fused model differs from the unfused one (max rel diff {worst:.3e} > '
            f'{tolerance:.0e} on input {_shapes([tuple(t.shape) for t in inputs])}); nothing was '
            'exported: check the to_fused / fuse method of the fused layers (docs/fusion.md).')
    return dict(max_rel=worst, input_shapes=[tuple(t.shape) for t in inputs])


def _second_inputs(graph, inputs, divisor, seed):
    """Inputs of another size (and batch, for segmentors) to check a ``--dynamic`` export."""
    h, w = inputs[0].shape[2:]
    step = max(divisor, 8)
    shape = (h + step, max(step, w - step))
    if isinstance(graph, DetectorGraph):
        fewer = inputs[1].shape[0] // 2 + 1 if graph.two_stage else 0
        return example_inputs(graph, shape, batch=1, num_proposals=fewer, seed=seed + 1)
    return example_inputs(graph, shape, batch=2, seed=seed + 1)


def export_onnx(config, checkpoint, out, shape=None, dynamic=False, opset=OPSET, argmax=False,
                num_proposals=100, tolerance=TOLERANCE, cfg_options=None, seed=0, log=print):
    """Fuse, export to ``out`` and check it in onnxruntime; return a summary dict.

    Raises :class:`OnnxCheckError` (and removes ``out``) when onnxruntime's outputs differ
    from PyTorch's by more than ``tolerance`` (relative, per output).
    """
    if osp.isdir(out):
        raise IsADirectoryError(f'{out} is a folder; give the .onnx file to write, e.g. '
                                f'{osp.join(out, "model.onnx")}.')
    cfg, model, report, unfused = load_fused(config, checkpoint, cfg_options, keep_unfused=True)
    log(f'fused: {report}')
    graph = build_graph(cfg, model, argmax=argmax)
    note = slide_note(cfg) if isinstance(graph, SegmentorGraph) else None
    if note:
        log(note)
    divisor = _divisor(cfg)
    shape = tuple(shape) if shape else default_shape(cfg)
    if any(s % divisor for s in shape):
        raise ConfigError(f'--shape {shape[0]} {shape[1]}: the model pads its inputs to multiples '
                          f'of {divisor} (data_preprocessor); pass a multiple of {divisor}.')
    if isinstance(graph, DetectorGraph) and graph.two_stage and opset < 16:
        raise ConfigError(f'--opset {opset}: RoIAlign exports as ONNX RoiAlign with half_pixel '
                          'coordinates, which needs opset 16 or later.')
    inputs = example_inputs(graph, shape, num_proposals=num_proposals, seed=seed)
    with torch.no_grad():
        graph(*inputs)  # output names of a detector depend on its heads
    if report.total:  # onnxruntime is checked against the fused model: that one against the trained
        fused_check = _check_fused(graph, build_graph(cfg, unfused, argmax=argmax), inputs, tolerance)
        log(f"fused vs unfused (PyTorch, input {_shapes(fused_check['input_shapes'])}): max rel diff "
            f"{fused_check['max_rel']:.1e} (tolerance {tolerance:.0e})")
    del unfused
    names_in, names_out = graph.input_names, graph.output_names
    axes = None
    if dynamic:
        axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        if isinstance(graph, DetectorGraph):
            axes['input'] = {2: 'height', 3: 'width'}
            if graph.two_stage:
                axes['proposals'] = {0: 'num_proposals'}
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    try:  # a file that fails its check, or is half written, is never left to deploy
        t0 = time.perf_counter()
        with warnings.catch_warnings(), export_rewrites(model), torch.no_grad():
            warnings.filterwarnings('ignore', message='You are using the legacy TorchScript-based ONNX')
            # shape-dependent Python values traced as constants: the --dynamic check below catches any
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            torch.onnx.export(graph, inputs, out, dynamo=False, opset_version=opset,
                              input_names=names_in, output_names=names_out, dynamic_axes=axes,
                              do_constant_folding=True)
        export_s = time.perf_counter() - t0
        summary = onnx_graph_summary(out)
        size_mb = osp.getsize(out) / 2**20
        custom = summary['custom_domains']
        log(f'exported {out} ({size_mb:.1f} MB, opset {opset}, TorchScript exporter, '
            f"{export_s:.1f} s): {sum(summary['ops'].values())} nodes, {summary['ops'].get('Conv', 0)} "
            f"Conv (largest kernel {summary['largest_kernel']}), DFT nodes: "
            f"{summary['ops'].get('DFT', 0)}" + (f', custom op domains: {custom}' if custom else ''))

        session = ort_session(out)
        checks = [_check(graph, session, inputs, names_out, tolerance)]
        if dynamic:
            other = _second_inputs(graph, inputs, divisor, seed)
            checks.append(_check(graph, session, other, names_out, tolerance))
        for c in checks:
            log(_check_line(c))
        failed = [c for c in checks if not c['ok']]
        if failed:  # (removed below)
            c = failed[0]
            w = c['worst'] or {}
            raise OnnxCheckError(
                f"onnxruntime's output {w.get('name', '?')} differs from PyTorch's on input "
                f"{_shapes(c['input_shapes'])} (max abs diff {w.get('max_abs', float('nan')):.3e}, "
                f"max rel diff {w.get('max_rel', float('nan')):.3e} > {tolerance:.0e}); {out} was "
                'removed -- look for an op the exporter translated differently (a --dynamic export '
                'may have traced a size as a constant; try without --dynamic).')
        return dict(out=out, shape=shape, opset=opset, dynamic=dynamic, report=report, graph=summary,
                    size_mb=size_mb, export_s=export_s, checks=checks, input_names=names_in,
                    output_names=names_out, config=cfg, model=graph, inputs=inputs)
    except BaseException:
        if osp.exists(out):
            os.remove(out)
        raise


def _shapes(shapes):
    return ', '.join('x'.join(map(str, s)) for s in shapes)


def _check_line(check):
    w = check['worst']
    head = f"onnxruntime (CPU) vs PyTorch on {_shapes(check['input_shapes'])}: "
    parts = []
    if w is not None:
        parts.append(f"max abs diff {w['max_abs']:.3e}, max rel diff {w['max_rel']:.3e} "
                     f"(worst of {check['num_outputs']} output(s): {w['name']}; tolerance "
                     f"{check['tolerance']:.0e})")
    for o in check['outputs']:
        if 'agreement' in o:
            parts.append(f"{o['name']} agree on {100 * o['agreement']:.3f}% of pixels")
    return head + '; '.join(parts) + (' -- PASS' if check['ok'] else ' -- FAIL')
