"""Raw model outputs and how far two sets of them differ: what FusedEvalHook, tools/fuse.py
and the benchmark compare when they check that a fused model computes the unfused one."""
import contextlib

import torch
from mmengine.model import is_model_wrapper

__all__ = ['flatten_tensors', 'compare_models', 'compare_outputs', 'reference_outputs', 'rpn_proposals',
           'tensor_outputs', 'within_tolerance', 'check_summary']


def flatten_tensors(obj) -> list:
    """All tensors in a nested tuple / list / dict / data element, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flatten_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flatten_tensors(v)]
    if hasattr(obj, 'all_items'):  # mmengine BaseDataElement / InstanceData
        return [t for _, v in obj.all_items() for t in flatten_tensors(v)]
    return []


def compare_outputs(reference, output) -> dict:
    """Max abs and max relative (per tensor, to its max magnitude) difference, and the mean
    relative difference (per tensor, mean magnitude of the difference over the reference's;
    the worst tensor's), which a few outliers of half-precision rounding do not dominate.

    Returns ``dict(max_abs, max_rel, mean_rel, num_tensors, same_structure)``; a differing
    number or shape of tensors gives ``same_structure=False`` and infinite differences.
    """
    ref, out = flatten_tensors(reference), flatten_tensors(output)
    result = dict(max_abs=0.0, max_rel=0.0, mean_rel=0.0, num_tensors=len(ref),
                  same_structure=True)
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        result.update(max_abs=float('inf'), max_rel=float('inf'), mean_rel=float('inf'),
                      same_structure=False)
        return result
    for a, b in zip(ref, out):
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double().to(a.device)
        delta = (a64 - b64).abs()
        diff, scale = delta.max().item(), a64.abs().max().item()
        mean_diff, mean_scale = delta.mean().item(), a64.abs().mean().item()
        result['max_abs'] = max(result['max_abs'], diff)
        result['max_rel'] = max(result['max_rel'], diff / scale if scale > 0 else diff)
        result['mean_rel'] = max(result['mean_rel'],
                                 mean_diff / mean_scale if mean_scale > 0 else mean_diff)
    return result


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` unwrapped, in eval mode; every submodule's training flag restored after, so a
    model being trained can be queried in the middle of training."""
    model = model.module if is_model_wrapper(model) else model
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _exact_fp32():
    """fp32 convolutions and matrix products in full fp32 while two models are compared:
    cuDNN's default for fp32 convolutions is TF32 (10-bit mantissa, about 1e-3 relative), which
    would put rounding of that size between a fused and an unfused model on a GPU and hide the
    fusion's own error under it (the Triton large-kernel conv follows the same flag). No effect
    on a CPU, nor on half-precision (autocast) convolutions."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _is_two_stage(model):
    return (getattr(model, 'with_rpn', False) and hasattr(model, 'roi_head')
            and hasattr(model, 'extract_feat'))


@torch.no_grad()
def _outputs(model, data_batch, proposals):
    with _eval_mode(model) as net, _exact_fp32():
        data = net.data_preprocessor(data_batch, False)
        if not _is_two_stage(net):
            return net(**data, mode='tensor'), None
        feats = net.extract_feat(data['inputs'])
        if proposals is None:
            proposals = net.rpn_head.predict(feats, data['data_samples'], rescale=False)
        roi = net.roi_head.forward(feats, proposals, data['data_samples'])
        return (feats, net.rpn_head(feats), roi), proposals


def reference_outputs(model, data_batch):
    """``(tensor_outputs(model, data_batch), proposals)``: a reference's outputs and the RPN
    proposals they were computed on (None but for a two-stage detector), on which another
    model's RoI heads are then compared (:func:`tensor_outputs`' ``proposals``)."""
    return _outputs(model, data_batch, None)


@torch.no_grad()
def rpn_proposals(model, data_batch):
    """A two-stage detector's RPN proposals on a dataloader batch; None for any other model.

    Two models' RoI heads are compared on the same proposals (the reference's): a proposal
    that lands on the other side of nms or of the top-k cut after a rounding-sized change
    would otherwise put different boxes side by side.
    """
    with _eval_mode(model) as net, _exact_fp32():
        if not _is_two_stage(net):
            return None
        data = net.data_preprocessor(data_batch, False)
        return net.rpn_head.predict(net.extract_feat(data['inputs']), data['data_samples'],
                                    rescale=False)


def tensor_outputs(model, data_batch, proposals=None):
    """Raw outputs of ``model`` (``mode='tensor'``) on a dataloader batch, in eval mode.

    A two-stage detector answers its neck's features, its RPN head's raw outputs and its RoI
    head's outputs on ``proposals`` (:func:`rpn_proposals`; by default its own), where
    ``mode='tensor'`` answers only the last, on its own proposals.
    """
    return _outputs(model, data_batch, proposals)[0]


def compare_models(reference, other, data_batch) -> dict:
    """:func:`compare_outputs` of two models' :func:`tensor_outputs` on one batch (a two-stage
    detector's RoI heads on the reference's proposals)."""
    reference_out, proposals = reference_outputs(reference, data_batch)
    return compare_outputs(reference_out, tensor_outputs(other, data_batch, proposals))


def within_tolerance(result, tolerance) -> bool:
    """Whether a :func:`compare_outputs` result says the two models agree: the same outputs, no
    relative difference above ``tolerance``."""
    return result['same_structure'] and result['max_rel'] <= tolerance


def check_summary(result, compared='fused vs unfused') -> str:
    """The log's words for a :func:`compare_outputs` result on a first batch (``compared``: the two
    models compared, fused vs unfused unless said)."""
    return (f"{compared} outputs on the first batch: max abs diff {result['max_abs']:.3e}, "
            f"max rel diff {result['max_rel']:.3e} over {result['num_tensors']} tensor(s)")
