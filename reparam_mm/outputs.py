"""Raw model outputs and how far two sets of them differ: what FusedEvalHook, tools/fuse.py
and the benchmark compare when they check that a fused model computes the unfused one."""
import torch
from mmengine.model import is_model_wrapper

__all__ = ['flatten_tensors', 'compare_outputs', 'tensor_outputs']


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
    """Max abs and max relative (per tensor, to its max magnitude) difference.

    Returns ``dict(max_abs, max_rel, num_tensors, same_structure)``; a
    differing number or shape of tensors gives ``same_structure=False`` and
    infinite differences.
    """
    ref, out = flatten_tensors(reference), flatten_tensors(output)
    result = dict(max_abs=0.0, max_rel=0.0, num_tensors=len(ref), same_structure=True)
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        result.update(max_abs=float('inf'), max_rel=float('inf'), same_structure=False)
        return result
    for a, b in zip(ref, out):
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double().to(a.device)
        diff = (a64 - b64).abs().max().item()
        scale = a64.abs().max().item()
        result['max_abs'] = max(result['max_abs'], diff)
        result['max_rel'] = max(result['max_rel'], diff / scale if scale > 0 else diff)
    return result


@torch.no_grad()
def tensor_outputs(model, data_batch):
    """Raw outputs of ``model`` (``mode='tensor'``) on a dataloader batch, in eval mode.

    The training flags of every submodule are restored afterwards, so a model
    being trained can be queried in the middle of training.
    """
    model = model.module if is_model_wrapper(model) else model
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        data = model.data_preprocessor(data_batch, False)
        return model(**data, mode='tensor')
    finally:
        for m, flag in flags:
            m.training = flag
