"""Make mmengine 0.10.7 checkpoints load under torch >= 2.6 with ``weights_only=True``.

mmengine calls ``torch.load`` without ``weights_only``; since torch 2.6 that
means the safe unpickler, which refuses mmengine's own checkpoints
("Unsupported global: mmengine.logging.history_buffer.HistoryBuffer"), so
``--resume`` and ``load_from`` break. We keep the safe unpickler and widen it
by exactly what an mmengine checkpoint holds:

* ``HistoryBuffer`` pickles its statistics table as bound methods, i.e.
  ``builtins.getattr(HistoryBuffer, 'min')``. Allow-listing ``getattr`` would
  let a checkpoint call any attribute of any allow-listed object, so instead
  the buffer pickles plain data (its arrays and max length) and rebuilds the
  table on unpickle, as mmengine's own ``__setstate__`` already does.
* numpy arrays, scalars and dtypes (the buffers' histories, numpy values in
  the runtime info): numpy's reconstruction functions and dtype classes.
* OneCycleLR's annealing function, pickled the same way: the schedulers' state
  leaves out functions (the config rebuilds them).

``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is never set; a checkpoint holding any
other object is still refused. Imported first by ``reparam_mm/__init__.py``.

It also makes :func:`reparam_mm.checkpoint.load_from_local` mmengine's loader of
local files, so a truncated or damaged checkpoint is one sentence naming the
file and the fix wherever it is loaded (resume, load_from, pretrained, test).

And it lets mmseg 1.2.2's ``CrossEntropyLoss(class_weight=...)`` train on labels with
ignored pixels (Cityscapes, CamVid: 255), which it cannot (open-mmlab/mmsegmentation#3734):
the mean's denominator indexes ``class_weight`` with every label, 255 included, and fails
with "index 255 is out of bounds". :func:`patch_mmseg_class_weight` computes that denominator
over the pixels that count, as ``F.cross_entropy(weight=...)`` does; with no ignored pixel
the value is mmseg's own.

And it lets models holding mmcv's ``SyncBatchNorm`` (``norm_cfg=dict(type='MMSyncBN')``) be
deep-copied, as the fused validation copy, the test's reference and the distributed layout
timing do: that layer keeps its process group, which ``copy.deepcopy`` cannot copy ("cannot
pickle 'ProcessGroup'"). :func:`share_process_groups_in_deepcopy` makes a copy share the group,
a handle to the ranks' communicator, as a copy of torch's own ``SyncBatchNorm`` does (it holds
no group object by default: None stands for the world).
"""
import numpy as np
import torch

_PATCHED = False


def _plain_history_buffer_state(self):
    """Pickle a HistoryBuffer as plain data, without its method table."""
    return {k: v for k, v in self.__dict__.items() if k != 'statistics_methods'}


def _plain_scheduler_state(self):
    """mmengine's ``_ParamScheduler.state_dict`` without functions: OneCycleLR keeps its
    annealing function (its static ``_annealing_cos``), which pickles as ``builtins.getattr``
    and made its checkpoints unloadable; the one built from the config stays on load, as its
    ``anneal_strategy`` says."""
    return {k: v for k, v in self.__dict__.items() if k != 'optimizer' and not callable(v)}


def numpy_safe_globals():
    """numpy callables and classes needed to unpickle arrays, scalars and dtypes."""
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        multiarray = np.core.multiarray
    names = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return names


def patch_checkpoint_loading():
    """Allow-list what mmengine checkpoints hold; idempotent."""
    global _PATCHED
    if _PATCHED:
        return
    from mmengine.logging.history_buffer import HistoryBuffer

    from .checkpoint import patch_mmengine_loads, register_local_loader

    HistoryBuffer.__getstate__ = _plain_history_buffer_state
    from mmengine.optim.scheduler.param_scheduler import _ParamScheduler
    _ParamScheduler.state_dict = _plain_scheduler_state
    if hasattr(torch.serialization, 'add_safe_globals'):  # torch >= 2.4
        torch.serialization.add_safe_globals([HistoryBuffer, *numpy_safe_globals()])
    register_local_loader()
    patch_mmengine_loads()
    _PATCHED = True


def _class_weighted_mean_denominator(label, class_weight, ignore_index):
    """Sum of the class weights of the labelled pixels: the denominator of the weighted mean."""
    valid = label != ignore_index
    return class_weight[label[valid].long()].sum()


def patch_mmseg_class_weight():
    """Give mmseg's ``cross_entropy`` the class-weighted denominator when it would compute it
    from ignored pixels too (and fail); idempotent, a no-op without mmseg."""
    try:
        from mmseg.models.losses import cross_entropy_loss as ce
    except ImportError:  # pragma: no cover - mmseg is a dependency
        return
    original = ce.cross_entropy
    if getattr(original, '_reparam_mm_fixed', False):
        return

    def cross_entropy(pred, label, weight=None, class_weight=None, reduction='mean',
                      avg_factor=None, ignore_index=-100, avg_non_ignore=False):
        if class_weight is not None and avg_factor is None and reduction == 'mean':
            avg_factor = _class_weighted_mean_denominator(label, class_weight, ignore_index)
        return original(pred, label, weight=weight, class_weight=class_weight,
                        reduction=reduction, avg_factor=avg_factor, ignore_index=ignore_index,
                        avg_non_ignore=avg_non_ignore)

    cross_entropy._reparam_mm_fixed = True
    cross_entropy.__doc__ = original.__doc__
    ce.cross_entropy = cross_entropy
    # CrossEntropyLoss picks its criterion by name when built; built ones keep the old one.
    import mmseg.models.losses as losses
    if getattr(losses, 'cross_entropy', None) is original:
        losses.cross_entropy = cross_entropy


def share_process_groups_in_deepcopy():
    """``copy.deepcopy`` of a ``torch.distributed.ProcessGroup`` returns the group itself;
    idempotent."""
    import torch.distributed as dist
    group = getattr(dist, 'ProcessGroup', None) if dist.is_available() else None
    if group is not None and not hasattr(group, '__deepcopy__'):
        group.__deepcopy__ = lambda self, memo: self


patch_checkpoint_loading()
patch_mmseg_class_weight()
share_process_groups_in_deepcopy()
