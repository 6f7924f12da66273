"""FusedEvalHook in a real mmengine Runner with a toy re-parameterisable model (no mmcv needed)."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import reparam_mm  # noqa: F401
from reparam_mm.hooks import FusedEvalHook
from reparam_mm.outputs import compare_outputs, flatten_tensors
from test_fuse import ToyDOConv, ToyRepBlock

_COUNT = [0]


class ToyNet(BaseModel):
    def __init__(self, broken=False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(ToyDOConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  (BrokenDOConv if broken else ToyRepBlock)(4, ToyDOConv(4, 4, 3)))
        self.head = nn.Linear(4, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.body(inputs).mean((2, 3)))
        if mode == 'loss':
            return {'loss': F.cross_entropy(logits, labels)}
        if mode == 'predict':
            return [dict(logits=lg, label=lb) for lg, lb in zip(logits, labels)]
        return logits


class BrokenDOConv(ToyRepBlock):
    """A fuse with a bug: its fused kernel is off by 10%."""

    def to_fused(self):
        out = super().to_fused()
        with torch.no_grad():
            out.fused_conv.weight.mul_(1.1)
        return out


class ToyData(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


class ToyMetric(BaseMetric):
    """acc plus the mean of the logits: a metric that sees tiny weight differences."""

    def process(self, data_batch, data_samples):
        for s in data_samples:
            self.results.append((float(s['logits'].argmax() == s['label']), float(s['logits'].mean())))

    def compute_metrics(self, results):
        return dict(acc=sum(r[0] for r in results) / len(results),
                    logit_mean=sum(r[1] for r in results) / len(results))


class Spy(Hook):
    """Snapshots the trained model around validation and sees what val runs on."""
    priority = 'LOWEST'

    def __init__(self):
        self.val_models, self.identical, self.same_objects = [], [], []

    def before_val(self, runner):
        self.model = runner.model
        self.params = {k: id(v) for k, v in runner.model.named_parameters()}
        self.state = {k: v.clone() for k, v in runner.model.state_dict().items()}
        self.flags = [m.training for m in runner.model.modules()]

    def before_val_iter(self, runner, batch_idx, data_batch=None):
        self.val_models.append(runner.model)

    def after_val(self, runner):
        after = runner.model.state_dict()
        self.identical.append(runner.model is self.model and after.keys() == self.state.keys()
                              and all(torch.equal(after[k], v) for k, v in self.state.items())
                              and [m.training for m in runner.model.modules()] == self.flags)
        self.same_objects.append({k: id(v) for k, v in runner.model.named_parameters()} == self.params)


def _loader(n, seed, shuffle=False):
    return dict(dataset=ToyData(n, seed), sampler=dict(type='DefaultSampler', shuffle=shuffle),
                batch_size=4, collate_fn=dict(type='default_collate'))


def _runner(work_dir, hooks, max_iters=4, resume=False, load_from=None, ema=False, broken=False,
            amp=False):
    _COUNT[0] += 1
    custom = list(hooks) + ([dict(type='EMAHook', momentum=0.5)] if ema else [])
    return Runner(
        model=ToyNet(broken), work_dir=str(work_dir),
        train_dataloader=_loader(16, 0, shuffle=True), val_dataloader=_loader(8, 1),
        test_dataloader=_loader(8, 1),
        val_evaluator=Evaluator(ToyMetric()), test_evaluator=Evaluator(ToyMetric()),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=2),
        val_cfg=dict(), test_cfg=dict(fp16=True) if amp else dict(),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=4, by_epoch=False,
                                           save_best='logit_mean', rule='greater'),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=custom, resume=resume, load_from=load_from, randomness=dict(seed=0),
        experiment_name=f'fused_eval_{_COUNT[0]}')


def _has_unfused(model):
    return any(isinstance(m, ToyDOConv) for m in model.modules())


def test_validation_runs_fused_and_leaves_trained_weights_untouched(tmp_path):
    hook, spy = FusedEvalHook(), Spy()
    runner = _runner(tmp_path, [hook, spy])
    runner.train()
    assert len(spy.val_models) == 4  # 2 validations x 2 batches
    assert all(m is not spy.model and not _has_unfused(m) for m in spy.val_models)
    assert spy.identical == [True, True] and spy.same_objects == [True, True]
    assert runner.model is spy.model and _has_unfused(runner.model)
    assert hook.last_report.fused == {'ToyDOConv': 2, 'ToyRepBlock': 1}
    assert hook.last_check['same_structure'] and hook.last_check['max_rel'] < 1e-5
    assert hook._saved_model is None and hook._reference is None  # the copy is freed
    # checkpoints written after a validation (periodic and best) hold the unfused weights
    keys = set(runner.model.state_dict())
    for name in ('iter_4.pth', *[p.name for p in tmp_path.glob('best_*.pth')]):
        state = torch.load(tmp_path / name, map_location='cpu', weights_only=True)['state_dict']
        assert set(state) == keys and any(k.endswith('delta') for k in state)
    assert len(list(tmp_path.glob('best_*.pth'))) == 1

    resumed = _runner(tmp_path, [FusedEvalHook()], max_iters=6, resume=True)
    resumed.train()
    assert resumed.iter == 6 and _has_unfused(resumed.model)


def test_validation_with_ema_fuses_the_ema_weights(tmp_path):
    hook, spy = FusedEvalHook(), Spy()
    runner = _runner(tmp_path, [hook, spy], ema=True)
    runner.train()
    assert spy.identical == [True, True]
    # the reference compared against is the model as validated (EMA weights swapped in)
    assert hook.last_check['max_rel'] < 1e-5


def test_test_fuses_in_place_after_loading(tmp_path):
    _runner(tmp_path / 'train', []).train()
    ckpt = str(tmp_path / 'train' / 'iter_4.pth')
    plain = _runner(tmp_path / 'plain', [], load_from=ckpt).test()
    hook = FusedEvalHook()

    class HoldsReference(Hook):  # the unfused copy is freed once the first batch was checked
        priority, held = 'LOWEST', []

        def before_test_iter(self, runner, batch_idx, data_batch=None):
            self.held.append(hook._reference is not None)

    runner = _runner(tmp_path / 'fused', [hook, HoldsReference()], load_from=ckpt)
    fused = runner.test()
    assert HoldsReference.held == [False, False]
    assert not _has_unfused(runner.model)
    assert hook.last_check['max_rel'] < 1e-5 and hook._reference is None
    assert fused['acc'] == plain['acc']
    assert abs(fused['logit_mean'] - plain['logit_mean']) < 1e-5
    random_init = _runner(tmp_path / 'random', []).test()
    assert abs(random_init['logit_mean'] - plain['logit_mean']) > 1e-3  # loading mattered


@pytest.mark.timeout(60)
def test_a_model_with_nothing_to_fuse_is_said_to_be_in_deploy_form_and_checked_as_loaded(tmp_path):
    """A deploy pair (tools/fuse.py) has nothing left to fuse: the log said 'fused 0 module(s)',
    then 'fused vs unfused ... max rel diff 8.3e-07', as if a fusion had been checked. It says
    what it compares: the evaluated model (its heads in their timed layouts) with the model as
    loaded. A model that fuses is checked fused vs unfused."""
    from conftest import mmengine_log
    from reparam_mm.fuse import fuse
    hook = FusedEvalHook()
    runner = _runner(tmp_path / 'deploy', [hook], max_iters=2)
    runner.model = fuse(runner.model.eval())  # the deploy form, as a deploy config builds it
    with mmengine_log() as records:
        runner.train()  # one validation
        runner.test()
    said = [r.getMessage() for r in records if r.getMessage().startswith('FusedEvalHook')]
    params = sum(p.numel() for p in runner.model.parameters())
    for stage in ('validating', 'testing'):
        announced = (f'FusedEvalHook: {stage} the model as it is: nothing to fuse (already in its '
                     'deploy form, as a deploy pair from tools/fuse.py, or no re-parameterisable '
                     'layer); the first batch compares it, its neck and heads in the layouts timed '
                     f'for evaluation, with the model as loaded; parameters {params:,}.')
        checked = said[said.index(announced) + 1]
        assert checked.startswith('FusedEvalHook: evaluated vs loaded outputs on the first batch: '
                                  'max abs diff '), said
    assert not any('fused vs unfused' in s or 'fused 0 module' in s for s in said), said
    assert hook.last_report.total == 0 and hook.last_check['max_rel'] < 1e-5
    trained = FusedEvalHook()
    _runner(tmp_path / 'trained', [trained], max_iters=2).test()
    assert trained.last_report.total == 3 and trained.last_check['max_rel'] < 1e-5


def test_test_with_ema_fuses_a_copy_since_ema_swaps_the_weights_back(tmp_path):
    _runner(tmp_path / 'train', [], ema=True).train()
    ckpt = str(tmp_path / 'train' / 'iter_4.pth')
    plain = _runner(tmp_path / 'plain', [], load_from=ckpt, ema=True).test()
    hook = FusedEvalHook()
    runner = _runner(tmp_path / 'fused', [hook], load_from=ckpt, ema=True)
    fused = runner.test()
    assert _has_unfused(runner.model)  # fused in place, EMA would swap into the wrong modules
    assert hook.last_check['max_rel'] < 1e-5 and hook._saved_model is None
    assert abs(fused['logit_mean'] - plain['logit_mean']) < 1e-5  # the EMA weights, fused


def test_under_autocast_the_check_runs_again_at_the_half_precision_tolerance(tmp_path, capsys):
    hook = FusedEvalHook()
    _runner(tmp_path / 'ok', [hook], load_from=None, amp=True).test()  # bf16 on CPU
    assert hook.last_check['max_rel'] < 1e-5  # fusing itself is checked in fp32
    assert 0 < hook.last_amp_check['mean_rel'] < hook.amp_tolerance
    assert 'under bf16 autocast' in capsys.readouterr().out
    # the limit is twice what bf16 alone moves the unfused outputs, where that is above the
    # tolerance: a correct fusion passes however small the tolerance
    strict = FusedEvalHook(amp_tolerance=1e-9)
    _runner(tmp_path / 'strict', [strict], load_from=None, amp=True).test()
    check = strict.last_amp_check
    assert 0 < check['autocast_error'] and check['limit'] == 2 * check['autocast_error']
    assert check['mean_rel'] <= check['limit']
    assert re.search(r'under bf16 autocast: mean rel diff [0-9.e+-]+ \(max [0-9.e+-]+\), within the limit '
                     r'[0-9.e+-]+ \(the bf16 tolerance 1e-09, or twice what bf16 alone moves',
                     capsys.readouterr().out)
    broken = FusedEvalHook(amp_tolerance=1e-3)
    _runner(tmp_path / 'broken', [broken], broken=True, amp=True).test()
    assert broken.last_amp_check['mean_rel'] > broken.last_amp_check['limit'] >= 1e-3
    out = capsys.readouterr()
    assert 'ABOVE the limit' in out.out + out.err
    plain = FusedEvalHook()
    _runner(tmp_path / 'fp32', [plain]).test()
    assert plain.last_amp_check is None  # no autocast, no second check


def test_a_wrong_fusion_is_a_loud_warning(tmp_path, capsys):
    hook = FusedEvalHook(tolerance=1e-4)
    _runner(tmp_path, [hook], max_iters=2, broken=True).train()
    assert hook.last_check['max_rel'] > 1e-2
    out = capsys.readouterr()
    assert 'FUSED MODEL DOES NOT REPRODUCE THE UNFUSED ONE' in out.out + out.err


def test_compare_outputs_reports_structure_and_relative_difference():
    a = (torch.tensor([1.0, -4.0]), [torch.tensor([[2.0]])])
    same = compare_outputs(a, (a[0].clone(), [a[1][0].clone()]))
    assert same == dict(max_abs=0.0, max_rel=0.0, mean_rel=0.0, num_tensors=2, same_structure=True)
    off = compare_outputs(a, (torch.tensor([1.0, -4.4]), [torch.tensor([[2.0]])]))
    assert abs(off['max_abs'] - 0.4) < 1e-6 and abs(off['max_rel'] - 0.1) < 1e-6
    assert abs(off['mean_rel'] - 0.2 / 2.5) < 1e-6  # mean |diff| 0.2 over mean |ref| 2.5
    # one outlier in many elements: the max sees it whole, the mean a thousandth of it
    ref = torch.ones(1000)
    spike = compare_outputs(ref, torch.cat([torch.full((1,), 2.0), torch.ones(999)]))
    assert spike['max_rel'] == 1.0 and abs(spike['mean_rel'] - 1e-3) < 1e-9
    assert compare_outputs(a, (a[0],))['same_structure'] is False
    assert len(flatten_tensors({'x': a, 'y': 'text'})) == 2


class IterCounter(Hook):
    def __init__(self):
        self.iters = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.iters += 1


def _seg_runner(tmp_path, data_root, hooks, max_iters, resume=False):
    from mmengine.config import ConfigDict
    from test_tools_test_fuse import seg_config
    cfg = ConfigDict(seg_config(data_root))
    train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
                      dict(type='Resize', scale=(64, 64), keep_ratio=True), dict(type='PackSegInputs')]
    train_loader = dict(cfg['test_dataloader'], batch_size=2,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(cfg['test_dataloader']['dataset'], pipeline=train_pipeline))
    _COUNT[0] += 1
    return Runner(
        model=cfg['model'], work_dir=str(tmp_path), default_scope='mmseg',
        train_dataloader=train_loader, val_dataloader=cfg['test_dataloader'],
        val_evaluator=cfg['test_evaluator'],
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=2), val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks, resume=resume, randomness=dict(seed=0), experiment_name=f'seg_fused_{_COUNT[0]}')


def test_segmentor_training_validates_fused_and_resumes_unfused(tmp_path):
    """UperNet with DO-Conv on tiny generated ADE20K data: train 3 iters, validate at 2 and 3."""
    from reparam_mm.layers.doconv import DOConv2d
    from test_tools_test_fuse import make_ade
    data = make_ade(tmp_path / 'ade')
    hook, spy = FusedEvalHook(), Spy()
    runner = _seg_runner(tmp_path / 'work', data, [hook, spy], max_iters=3)
    runner.train()
    assert spy.identical == [True, True] and spy.same_objects == [True, True]
    assert all(not any(isinstance(m, DOConv2d) for m in v.modules()) for v in spy.val_models)
    from reparam_mm.head_layout import tune_head_layouts
    assert all(tune_head_layouts(v) == [] for v in spy.val_models)  # the head's layout is timed
    assert hook.last_report.fused == {'DOConv2d': 29}
    assert hook.last_check['same_structure'] and hook.last_check['max_rel'] < 1e-5
    # iter_3.pth was written after the validation at iter 2: unfused, DO-Conv keys and all
    state = torch.load(tmp_path / 'work' / 'iter_3.pth', map_location='cpu', weights_only=True)['state_dict']
    assert set(state) == set(runner.model.state_dict()) and any(k.endswith('.D') for k in state)

    counter = IterCounter()
    resumed = _seg_runner(tmp_path / 'work', data, [FusedEvalHook(), counter], max_iters=4, resume=True)
    resumed.train()
    assert resumed.iter == 4 and counter.iters == 1  # continued from iter 3, not from scratch
