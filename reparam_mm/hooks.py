"""``FusedEvalHook``: validate and test the fused model, never touch the trained one;
``TrainingLoadCheckHook``: train only from a checkpoint that loads whole;
``DatasetClassesCheckHook``: train only on classes the annotations have;
``LabelValuesCheckHook``: train only on label maps whose values the segmentor's heads can read;
``HeadLayoutAgreementHook``: under DDP, the ranks train their neck and heads in one agreed layout.

* Validation (during training or ``runner.val()``): ``before_val_epoch``
  deep-copies the model, fuses the copy and points ``runner.model`` at it;
  ``after_val_epoch`` points it back and frees the copy. The trainable,
  unfused weights are never modified, so checkpoints stay unfused and
  resumable. Each rank fuses its own copy.
* Test (``runner.test()``): fuses ``runner.model`` in place in
  ``before_test_epoch``, i.e. after the checkpoint was loaded (mmengine loads
  with ``strict=False``; fusing before loading would silently ignore weights).
  With an ``EMAHook`` registered the copy scheme is used for tests too, since
  EMA swaps parameters back after the test.
* The fused model's neck and heads run in the memory layout timed fastest on this machine
  (``head_layout.tune_head_layouts``), as a RepLKNet backbone does.
* On the first batch the fused outputs are compared with the unfused ones
  (``mode='tensor'``: segmentation logits, raw detection head outputs); the
  max abs / relative difference is logged, above ``tolerance`` loudly (under
  TTA: the wrapped models on the first augmented view). A model with nothing to fuse (a
  deploy pair from ``tools/fuse.py``) is said to be in its deploy form, and its evaluated copy
  (heads in their timed layouts) is compared with the model as loaded.

Priority ``LOW``: after ``EMAHook`` (NORMAL) has swapped in the EMA weights,
so the EMA model is what gets fused, and before ``CheckpointHook``
(VERY_LOW) saves a best checkpoint after validation, so that checkpoint is
taken from the restored, unfused model.
"""
import copy
import gc
import logging

import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import HOOKS

from .checkpoint import check_training_load
from .fuse import fuse_with_report
from .head_layout import (agree_head_layouts, allow_agreed_layouts, allow_per_rank_layouts,
                          tune_head_layouts)
from .outputs import check_summary, compare_outputs, reference_outputs, tensor_outputs, within_tolerance

__all__ = ['FusedEvalHook', 'TrainingLoadCheckHook', 'DatasetClassesCheckHook', 'LabelValuesCheckHook',
           'HeadLayoutAgreementHook']


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _compare(reference, fused, data_batch, what):
    """compare_outputs() of the two models on ``data_batch``, with the reference's outputs and
    proposals (``outputs.reference_outputs``) for a second comparison, or None (logged) if it
    fails: a failed check must not stop evaluation."""
    try:
        full, proposals = reference_outputs(reference, data_batch)
        return compare_outputs(full, tensor_outputs(fused, data_batch, proposals)), full, proposals
    except Exception as e:  # noqa: BLE001
        print_log(f'FusedEvalHook: could not compare {what} ({type(e).__name__}: {e}).',
                  logger='current', level=logging.WARNING)
        return None


def share_buffers_of_rank0(model):
    """In a distributed run, give every process rank 0's buffers (BN running statistics).

    With BN (not SyncBN) each process keeps the statistics of its own images, since the DDP
    wrapper does not broadcast buffers (``broadcast_buffers=False``, mmengine's default): every
    rank but 0 then validated a model that no checkpoint holds (rank 0 saves), and the metric
    gathered from them differed from a test of the checkpoint (24.59 vs 24.77 mIoU in a 2-process
    run). A no-op in one process; with SyncBN the statistics are the same already."""
    from mmengine.dist import broadcast, is_distributed
    if not is_distributed():
        return
    with torch.no_grad():
        for buf in _unwrap(model).buffers():
            broadcast(buf, src=0)


@HOOKS.register_module()
class FusedEvalHook(Hook):
    """Evaluate the re-parameterised (fused) model; keep the trained one intact.

    Args:
        fuse_bn (bool): also fold Conv->BN pairs into the conv. Defaults to False.
        check (bool): compare fused and unfused outputs on the first batch of
            every validation / test. Defaults to True.
        tolerance (float): relative difference above which the comparison is
            a loud warning. Defaults to 1e-4.
        amp_tolerance (float): the limit of the second comparison, made when the
            loop runs under autocast (``--amp``: bf16 on CPU, fp16 on CUDA), where
            both models round differently: on the mean relative difference, and
            raised to twice what autocast alone moves the unfused model's outputs
            where that is more. Defaults to 5e-2.
    """
    priority = 'LOW'

    def __init__(self, fuse_bn: bool = False, check: bool = True, tolerance: float = 1e-4,
                 amp_tolerance: float = 5e-2):
        self.fuse_bn = fuse_bn
        self.check = check
        self.tolerance = tolerance
        self.amp_tolerance = amp_tolerance
        self.last_amp_check = None  # the same under the loop's autocast (--amp), else None
        self.last_report = None   # FuseReport of the latest fuse
        self.last_check = None    # compare_outputs() result of the latest check
        self._saved_model = None  # runner.model while a fused copy stands in for it
        self._reference = None    # unfused model to compare with on the first batch

    # -- fusing ---------------------------------------------------------------
    def _fused_copy(self, runner):
        src = _unwrap(runner.model)
        fused = copy.deepcopy(src)
        for p in fused.parameters():
            p.grad = None
        fused, self.last_report = fuse_with_report(fused.eval(), fuse_bn=self.fuse_bn)
        tune_head_layouts(fused)
        allow_per_rank_layouts(fused)  # a copy only evaluated: each rank times its own
        self._saved_model, self._reference = runner.model, src
        runner.model = fused

    def _fuse_in_place(self, runner):
        model = _unwrap(runner.model)
        self._reference = copy.deepcopy(model).eval() if self.check else None
        fused, self.last_report = fuse_with_report(model.eval(), fuse_bn=self.fuse_bn)
        tune_head_layouts(fused)
        allow_per_rank_layouts(fused)  # tested, never trained again: each rank times its own
        if fused is not model:  # only when the root itself was replaced
            if is_model_wrapper(runner.model):
                runner.model.module = fused
            else:
                runner.model = fused

    def _after_fuse(self, stage):
        """Log the fuse report. A model with nothing to fuse (a deploy pair) is still checked: its
        evaluated copy's neck and heads may run in other layouts (head_layout), so the check
        compares that copy with the model as loaded, and says so rather than 'fused vs unfused'."""
        if self.last_report.total:
            print_log(f'FusedEvalHook: {stage} on the fused model: {self.last_report}', logger='current')
            return
        print_log(f'FusedEvalHook: {stage} the model as it is: nothing to fuse (already in its '
                  'deploy form, as a deploy pair from tools/fuse.py, or no re-parameterisable layer); '
                  'the first batch compares it, its neck and heads in the layouts timed for '
                  f'evaluation, with the model as loaded; parameters {self.last_report.params_after:,}.',
                  logger='current')

    def _compared(self):
        """What the check compares, in the log's words."""
        return 'fused vs unfused' if self.last_report.total else 'evaluated vs loaded'

    def before_val_epoch(self, runner) -> None:
        share_buffers_of_rank0(runner.model)
        self._fused_copy(runner)
        self._after_fuse('validating')

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._end(runner)

    def after_val(self, runner) -> None:
        self._end(runner)  # no-op unless after_val_epoch was skipped

    def before_test_epoch(self, runner) -> None:
        if any(isinstance(h, EMAHook) for h in runner.hooks):
            self._fused_copy(runner)
        else:
            self._fuse_in_place(runner)
        self._after_fuse('testing')

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._end(runner)

    def _end(self, runner):
        if self._saved_model is not None:
            runner.model = self._saved_model
        self._saved_model = self._reference = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- checking -------------------------------------------------------------
    def before_val_iter(self, runner, batch_idx, data_batch=None) -> None:
        if batch_idx == 0:
            self._check(runner, data_batch, runner.val_loop)

    def before_test_iter(self, runner, batch_idx, data_batch=None) -> None:
        if batch_idx == 0:
            self._check(runner, data_batch, runner.test_loop)
        if self._saved_model is None:
            self._reference = None  # in-place test: the unfused copy is no longer needed

    def _check(self, runner, data_batch, loop=None):
        reference, fused = self._reference, _unwrap(runner.model)
        if not self.check or reference is None or data_batch is None:
            return
        if isinstance(fused, BaseTTAModel):  # compare the wrapped models on the first augmented view
            reference, fused = _unwrap(reference).module, fused.module
            if isinstance(data_batch, dict):
                data_batch = {k: v[0] for k, v in data_batch.items()}
            else:
                data_batch = data_batch[0]
        compared = _compare(reference, fused, data_batch, 'fused and unfused outputs')
        if compared is None:
            return
        result, full, proposals = compared
        self.last_check = result
        msg = check_summary(result, self._compared())
        if within_tolerance(result, self.tolerance):
            print_log(f'FusedEvalHook: {msg} (tolerance {self.tolerance:.0e}).', logger='current')
        else:
            what = ('FUSED MODEL DOES NOT REPRODUCE THE UNFUSED ONE' if self.last_report.total
                    else 'THE EVALUATED MODEL DOES NOT REPRODUCE THE MODEL AS LOADED')
            print_log('!' * 79 + f'\nFusedEvalHook: {what}: {msg}'
                      + ('' if result['same_structure'] else ' (different number or shapes of outputs)')
                      + f', above the tolerance {self.tolerance:.0e}. The metrics below are NOT those '
                      'of the trained model; check the fuse method of the fused layers (to_fused, '
                      'switch_to_deploy, reparameterize or fuse; see the report above).\n' + '!' * 79,
                      logger='current', level=logging.WARNING)
        self.last_amp_check = None
        if getattr(loop, 'fp16', False):
            self._check_under_autocast(reference, fused, data_batch, full, proposals)

    def _check_under_autocast(self, reference, fused, data_batch, full, proposals):
        """The loop runs the fused model under autocast: compare the two there too, against what
        autocast alone does to the unfused model's outputs (its rounding grows with depth, so a
        deep network can pass a fixed tolerance by a hair while nothing is wrong)."""
        device = next(fused.parameters()).device.type
        dtype = torch.float16 if device == 'cuda' else torch.bfloat16
        name = 'fp16' if dtype == torch.float16 else 'bf16'
        try:  # ``full``: the fp32 check's reference outputs, on ``proposals`` as the two here
            with torch.autocast(device, dtype=dtype):
                ref_half = tensor_outputs(reference, data_batch, proposals)
                fused_half = tensor_outputs(fused, data_batch, proposals)
        except Exception as e:  # noqa: BLE001 - a failed check must not stop evaluation
            print_log(f'FusedEvalHook: could not compare under {name} autocast '
                      f'({type(e).__name__}: {e}).', logger='current', level=logging.WARNING)
            return
        result = compare_outputs(ref_half, fused_half)
        # judged on the mean difference: a few RoIs of a detector move by whole logits under
        # bf16 alone (rounding amplified through the head), which a max would take for a fault
        result['autocast_error'] = compare_outputs(full, ref_half)['mean_rel']
        # two models rounded apart: up to twice what one rounding moves, or the tolerance
        limit = max(self.amp_tolerance, 2 * result['autocast_error'])
        result['limit'] = limit
        self.last_amp_check = result
        ok = result['same_structure'] and result['mean_rel'] <= limit
        print_log(f"FusedEvalHook: {self._compared()} outputs under {name} autocast: mean rel diff "
                  f"{result['mean_rel']:.3e} (max {result['max_rel']:.1e}), "
                  f"{'within' if ok else 'ABOVE'} the limit {limit:.1e} (the {name} tolerance "
                  f"{self.amp_tolerance:.0e}, or twice what {name} alone moves the unfused "
                  f"outputs: {result['autocast_error']:.1e}).", logger='current',
                  level=logging.INFO if ok else logging.WARNING)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Keeps the random number generators' states in every checkpoint and, on ``--resume``,
    sets them back at the first iteration trained (after mmengine has replayed the data loader
    to where the run was), so a resumed run trains as the uninterrupted one: mmengine seeds the
    generators afresh, and a resumed run drew other dropout masks than the run it continues.
    Only the main process saves checkpoints, so under several processes the states are set
    back only where every rank shares the seed (not ``randomness.diff_rank_seed``)."""
    priority = 'HIGHEST'

    def __init__(self):
        self.pending = None

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        from .checkpoint import RANDOM_STATES, random_states
        checkpoint.setdefault('meta', {})[RANDOM_STATES] = random_states()

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        from .checkpoint import RANDOM_STATES
        states = (checkpoint.get('meta') or {}).get(RANDOM_STATES)
        shared = runner.world_size == 1 or not (runner.cfg.get('randomness') or {}).get('diff_rank_seed')
        self.pending = states if runner._resume and shared else None

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.pending is None:
            return
        from .checkpoint import restore_random_states
        states, self.pending = self.pending, None
        loader = runner.train_dataloader
        restore_random_states(states, main_process_data=not getattr(loader, 'num_workers', 0))


@HOOKS.register_module()
class TrainingLoadCheckHook(Hook):
    """Refuse a ``load_from`` / ``--resume`` checkpoint that would load only in part
    (:func:`reparam_mm.checkpoint.check_training_load`). mmengine's runner hands every checkpoint
    it loads to ``after_load_checkpoint`` before loading it into the model, non-strictly. A
    ``--resume`` that found no checkpoint in the work_dir (mmengine trains from scratch after an
    info line) is a warning at the start of training, as is one whose config changed the
    schedule that the checkpoint's restores (:func:`reparam_mm.checkpoint.resumed_schedule_changes`).

    Args:
        partial (bool): accept a ``load_from`` that fills only part of the model, logging what
            it left out (the config's ``load_from_partial``). Default: False.
    """

    priority = 'VERY_HIGH'

    def __init__(self, partial=False):
        self.partial = partial
        self.built_schedule, self.resumed_from = None, None

    def before_run(self, runner) -> None:
        # the schedulers as the config builds them, before a resume overwrites them
        from .checkpoint import schedule_settings
        self.built_schedule = schedule_settings(getattr(runner, 'param_schedulers', None),
                                                runner.cfg.get('param_scheduler'))

    def before_train(self, runner) -> None:
        if runner._resume and runner._has_loaded and self.built_schedule:
            from .checkpoint import resumed_schedule_changes, schedule_settings
            said = resumed_schedule_changes(self.built_schedule,
                                            schedule_settings(runner.param_schedulers,
                                                              runner.cfg.get('param_scheduler')),
                                            self.resumed_from)
            if said:
                print_log(said, logger='current', level=logging.WARNING)
        if runner._resume and not runner._has_loaded:  # mmengine found nothing and starts over
            print_log(f'--resume found no checkpoint in {runner.work_dir} (no last_checkpoint file '
                      'there), so training starts from iteration 0; to go on with a run, pass its '
                      'folder as --work-dir, or its checkpoint as --resume PATH.', logger='current',
                      level=logging.WARNING)

    def after_load_checkpoint(self, runner, checkpoint):
        from mmengine.runner import find_latest_checkpoint
        filename = runner._load_from or find_latest_checkpoint(runner.work_dir)
        self.resumed_from = filename
        check_training_load(runner.model, checkpoint, filename, resume=runner._resume,
                            partial=self.partial)
        done = (checkpoint.get('meta') or {}).get('iter')
        if runner._resume and done is not None and done >= runner.max_iters:
            print_log(f'--resume {filename}: the run is at iteration {done}, and train_cfg '
                      f'stops at {runner.max_iters}, so nothing is left to train; raise '
                      'train_cfg.max_iters (or max_epochs) to train on.', logger='current',
                      level=logging.WARNING)


class DatasetClassesCheckHook(Hook):
    """Before the first iteration: the datasets' classes are all in their annotations, in their
    order, and the metrics' jsons hold the loaders' images
    (:func:`reparam_mm.data_checks.check_dataset_classes`); registered by ``train()`` and
    ``tools/test.py``'s runner (the test set, before the test loop)."""
    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        from .data_checks import check_dataset_classes
        check_dataset_classes(runner)

    def before_test(self, runner) -> None:
        from .data_checks import check_dataset_classes
        check_dataset_classes(runner, ['test_dataloader'])


class HeadLayoutAgreementHook(Hook):
    """Distributed training under DDP: the neck and heads (hooked by
    ``head_layout.tune_head_layouts``) propose their layouts during the first step, each rank
    timing copies, and after it every rank takes rank 0's (``head_layout.agree_head_layouts``),
    before DDP lays out its gradient buckets in the weights' strides at the second step.
    Registered by ``train()``; does nothing in a run that is not distributed under DDP."""

    def __init__(self):
        self.pending = False

    def before_train(self, runner) -> None:
        from torch.nn.parallel import DistributedDataParallel
        from .layers.large_kernel import _distributed
        self.pending = (_distributed() and isinstance(runner.model, DistributedDataParallel)
                        and allow_agreed_layouts(_unwrap(runner.model)) > 0)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self.pending:
            return
        self.pending = False
        agreed = agree_head_layouts(_unwrap(runner.model))
        if agreed:
            print_log('the neck and heads train in rank 0\'s timed layouts on every rank: '
                      + ', '.join(f'{name} {layout}' for name, layout in agreed.items()),
                      logger='current')


class LabelValuesCheckHook(Hook):
    """Before every training iteration of a segmentor: the batch's label maps hold only classes
    of its heads or their ignore index (:func:`reparam_mm.data_checks.check_label_values`), checked on
    the CPU tensors before the data preprocessor moves them. In validation and test, label maps
    the ``IoUMetric`` cannot score are counted and said after the loop
    (:class:`reparam_mm.data_checks.EvalLabelValues`): a warning, not an error, so a long run is not
    stopped at its first validation. Registered by ``train()`` and ``tools/test.py``'s runner."""
    priority = 'VERY_HIGH'

    def __init__(self):
        self.heads, self.reduce_key, self.ignore_keys, self.eval_counter = [], None, None, None
        self.coverage, self.pass_end, self.pass_images = None, None, 0

    def before_train(self, runner) -> None:
        from .data_checks import ignore_setting_keys, reduce_zero_label_key, segmentation_heads
        self.heads = segmentation_heads(_unwrap(runner.model))
        self.reduce_key = reduce_zero_label_key(runner.cfg, 'train_dataloader')
        self.ignore_keys = ignore_setting_keys(runner.cfg, self.heads)
        self._start_coverage(runner)

    def _start_coverage(self, runner):
        """Count the classes the training maps hold for one pass of the training set from this
        start (a resume counts again), if the run lasts that long."""
        import math

        from mmengine.dist import get_world_size

        from .data_checks import TrainLabelCoverage
        loader = runner.train_dataloader
        try:
            images, batch = len(loader.dataset), loader.batch_size
            classes = tuple(loader.dataset.metainfo.get('classes') or ())
        except (TypeError, AttributeError):  # an iterable dataset, a batch sampler: no pass to count
            return
        if not self.heads or not images or not batch:
            return
        head = self.heads[0][1]
        n = 2 if getattr(head, 'out_channels', None) == 1 else head.num_classes
        end = runner.iter + math.ceil(images / (batch * get_world_size()))
        if end <= runner.max_iters:
            self.coverage, self.pass_end, self.pass_images = (
                TrainLabelCoverage(classes, n, reduce_key=self.reduce_key), end, images)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.heads and isinstance(data_batch, dict) and data_batch.get('data_samples'):
            from .data_checks import check_label_values
            check_label_values(data_batch['data_samples'], self.heads, reduce_key=self.reduce_key,
                               ignore_keys=self.ignore_keys)
            if self.coverage is not None:
                self.coverage.count(data_batch['data_samples'])
        if self.coverage is not None and runner.iter + 1 >= self.pass_end:  # this batch ends the pass
            coverage, self.coverage = self.coverage, None
            coverage.gather()  # every rank reaches this iteration: each takes part
            said = coverage.warning(self.pass_images)
            if said:
                print_log(said, logger='current', level=logging.WARNING)

    def _start_eval(self, runner, evaluator, loader):
        from .data_checks import EvalLabelValues
        self.eval_counter = EvalLabelValues.of(evaluator, loader, runner.cfg)

    def _count(self, data_batch):
        if self.eval_counter is not None and isinstance(data_batch, dict):
            self.eval_counter.count(data_batch.get('data_samples') or [])

    def _end_eval(self):
        counter, self.eval_counter = self.eval_counter, None
        if counter is None:
            return
        counter.gather()  # every rank takes part, or the others would wait
        said = counter.warning()
        if said:
            print_log(said, logger='current', level=logging.WARNING)

    def before_val_epoch(self, runner) -> None:
        self._start_eval(runner, runner.val_evaluator, 'val_dataloader')

    def before_test_epoch(self, runner) -> None:
        self._start_eval(runner, runner.test_evaluator, 'test_dataloader')

    def before_val_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._count(data_batch)

    def before_test_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._count(data_batch)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._end_eval()

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._end_eval()
