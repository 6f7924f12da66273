"""Mixed precision on CPU: bf16 autocast training, and the mmcv ops that must stay fp32 under it.

mmengine's ``AmpOptimWrapper`` trains on CUDA, NPU, MLU or MUSA only. On a CPU with native bf16
(AVX512-BF16, AMX) oneDNN's bf16 convolutions and GEMMs run much faster than fp32, and bf16 keeps
fp32's exponent range, so autocast alone is enough: no loss scaling. :class:`CPUAmpOptimWrapper`
is that wrapper; ``tools/train.py --amp`` picks it on a machine without a GPU.

mmcv's compiled CPU ops (nms, RoIAlign, deformable convs, ...) take fp32 tensors only, so under
CPU autocast a detector stops at its first nms with ``expected scalar type Float but found
BFloat16``. :func:`cast_mmcv_ops_to_fp32` makes each of them compute in fp32 while CPU autocast
is on, and leaves them untouched otherwise. :class:`AmpTestLoop` tests under autocast and hands
the evaluator fp32 predictions (numpy, and so mmdet's CocoMetric, has no bf16).
"""
import contextlib
import functools
import logging

import torch
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import LOOPS, OPTIM_WRAPPERS
from mmengine.runner import TestLoop
from mmengine.structures import BaseDataElement

from .layers.large_kernel import cpu_native_half

__all__ = ['AmpTestLoop', 'CPUAmpOptimWrapper', 'cast_mmcv_ops_to_fp32', 'cpu_has_native_bf16',
           'predictions_to_fp32', 'warn_if_bf16_is_emulated']

_CAST_MARK = '_reparam_mm_fp32_under_cpu_autocast'
_HALF = (torch.bfloat16, torch.float16)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    return cpu_native_half(torch.bfloat16)


def warn_if_bf16_is_emulated(what):
    """One warning that ``what`` (bf16 autocast on this CPU) will run slower than fp32 here."""
    if not cpu_has_native_bf16():
        print_log(f'{what}: this CPU has no native bf16 (no AVX512-BF16 or AMX), so oneDNN '
                  'computes bf16 in software, far slower than fp32 (on an AVX2 AMD EPYC a '
                  "31x31 depthwise conv took 9 s in bf16 and 39 ms in fp32: docs/benchmarks.md "
                  'section 6); drop --amp on this machine.', logger='current',
                  level=logging.WARNING)


def _mmcv_op_functions():
    import sys

    import mmcv.ops  # noqa: F401  (imports every op module)
    seen = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith('mmcv.ops.') or module is None:
            continue
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, torch.autograd.Function)
                    and value.__module__.startswith('mmcv.ops.')):
                seen[f'{value.__module__}.{value.__qualname__}'] = value
    return [seen[k] for k in sorted(seen)]


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _half_to_fp32(t):
    return t.float() if t.device.type == 'cpu' and t.dtype in _HALF else t


def _half_dtype(args, kwargs):
    """The dtype of the first bf16 / fp16 CPU tensor among the arguments (lists included)."""
    found = []
    _map_tensors((args, kwargs), lambda t: found.append(t.dtype)
                 if t.device.type == 'cpu' and t.dtype in _HALF else None)
    return found[0] if found else None


def _fp32_forward(forward):
    @functools.wraps(forward)
    def run(ctx, *args, **kwargs):
        dtype = _half_dtype(args, kwargs) if torch.is_autocast_enabled('cpu') else None
        ctx._reparam_mm_half = dtype
        if dtype is None:
            return forward(ctx, *args, **kwargs)
        with torch.autocast('cpu', enabled=False):
            out = forward(ctx, *_map_tensors(args, _half_to_fp32),
                          **_map_tensors(kwargs, _half_to_fp32))
        # as the op would answer in half precision: float results in the inputs' dtype
        return _map_tensors(out, lambda t: t.to(dtype) if t.dtype == torch.float32 else t)
    return run


def _fp32_backward(backward):
    @functools.wraps(backward)
    def run(ctx, *grads):
        if getattr(ctx, '_reparam_mm_half', None) is None:
            return backward(ctx, *grads)
        with torch.autocast('cpu', enabled=False):  # input gradients go back in the inputs' dtype
            return backward(ctx, *_map_tensors(grads, _half_to_fp32))
    return run


def cast_mmcv_ops_to_fp32():
    """Run every mmcv op in fp32 under CPU autocast; a no-op for the ops already made so.

    While CPU autocast is on, each op's ``forward`` gets its bf16 / fp16 CPU tensors as fp32 and
    answers in their dtype, as a GPU op does in fp16, so mmdet's code around it (RoI feature
    buffers made with ``new_zeros``) sees the dtype it expects; its ``backward`` computes in fp32
    and autograd hands the gradients back in the inputs' dtype. Outside CPU autocast the ops run
    as mmcv wrote them. Ops that mmcv calls without an autograd Function (``nms_match``,
    ``nms_rotated``, ``nms_quadri``, ``box_iou_rotated``: PISA and rotated-box detectors, none of
    this project's configs) are not reached.
    Returns the names of the ops changed by this call.
    """
    changed = []
    for fn in _mmcv_op_functions():
        if fn.__dict__.get(_CAST_MARK):
            continue
        forward, backward = fn.__dict__.get('forward'), fn.__dict__.get('backward')
        if not isinstance(forward, staticmethod):
            continue  # inherits autograd.Function's: nothing of mmcv's to wrap
        fn.forward = staticmethod(_fp32_forward(forward.__func__))
        if isinstance(backward, staticmethod):
            fn.backward = staticmethod(_fp32_backward(backward.__func__))
        setattr(fn, _CAST_MARK, True)
        changed.append(f'{fn.__module__}.{fn.__qualname__}')
    return changed


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed-precision training on CPU: forward and loss under bf16 autocast, weights in fp32.

    What ``AmpOptimWrapper`` is on a GPU, for CPUs: the model's parameters, gradients and
    optimizer state stay fp32, convolutions and matrix products run in bf16. bf16 has fp32's
    exponent range, so gradients need no loss scaling. A checkpoint written by
    ``AmpOptimWrapper`` (its ``loss_scaler`` entry) resumes here, and the reverse.

    Args:
        dtype (str | torch.dtype): the autocast dtype; only ``'bfloat16'`` (fp16 would need a
            loss scaler, and CPUs gain nothing from it over bf16).
        loss_scale: accepted and unused, so an ``AmpOptimWrapper`` config switches by its type.
        **kwargs: as :class:`mmengine.optim.OptimWrapper` (``optimizer``, ``clip_grad``,
            ``accumulative_counts``).
    """

    def __init__(self, dtype='bfloat16', loss_scale=None, **kwargs):
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if dtype is not torch.bfloat16:
            raise ValueError(f'CPUAmpOptimWrapper trains under bf16 autocast only, not {dtype}; '
                             "drop dtype or set dtype='bfloat16'.")
        super().__init__(**kwargs)
        self.cast_dtype = dtype
        self._device_checked = False
        cast_mmcv_ops_to_fp32()
        warn_if_bf16_is_emulated('CPUAmpOptimWrapper (bf16 autocast training)')

    def _check_device(self, model):
        if self._device_checked:
            return
        devices = {p.device.type for p in model.parameters()}
        if devices - {'cpu'}:
            raise RuntimeError(
                f"CPUAmpOptimWrapper autocasts CPU ops, but the model is on {sorted(devices)}; "
                "on a GPU use optim_wrapper.type='AmpOptimWrapper' (tools/train.py --amp).")
        self._device_checked = True

    @contextlib.contextmanager
    def optim_context(self, model):
        self._check_device(model)
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        if state_dict.pop('loss_scaler', None) is not None:
            print_log('CPUAmpOptimWrapper: the checkpoint was trained with a loss scaler '
                      '(AmpOptimWrapper); bf16 needs none, so it is not used.', logger='current')
        super().load_state_dict(state_dict)


def _element_to_fp32(element):
    for key, value in list(element.items()):
        if isinstance(value, BaseDataElement):
            _element_to_fp32(value)
        elif isinstance(value, torch.Tensor) and value.dtype in _HALF:
            element.set_field(value.float(), key)


def predictions_to_fp32(samples):
    """Turn the half-precision tensors of data samples (nested ones too) into fp32, in place."""
    for sample in samples:
        if isinstance(sample, BaseDataElement):
            _element_to_fp32(sample)
    return samples


@LOOPS.register_module()
class AmpTestLoop(TestLoop):
    """mmengine's ``TestLoop`` under autocast (bf16 on CPU, fp16 on CUDA), predictions in fp32.

    A detector under autocast answers in half precision; mmdet's CocoMetric reads its boxes
    through numpy, which has no bf16. This loop turns each batch's predictions into fp32 before
    the evaluator sees them, and makes mmcv's ops run under CPU autocast
    (:func:`cast_mmcv_ops_to_fp32`). ``tools/test.py --amp`` uses it.
    """

    def __init__(self, runner, dataloader, evaluator, fp16=True):
        super().__init__(runner, dataloader, evaluator, fp16=fp16)
        cast_mmcv_ops_to_fp32()
        if not torch.cuda.is_available():
            warn_if_bf16_is_emulated('AmpTestLoop (bf16 autocast test)')
        process = self.evaluator.process

        def process_in_fp32(data_samples, data_batch=None):
            return process(predictions_to_fp32(data_samples), data_batch)

        self.evaluator.process = process_in_fp32
