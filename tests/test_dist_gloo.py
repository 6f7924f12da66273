"""tools/dist_train.sh: two CPU processes under torchrun with the gloo backend.

A probe hook (imported by the workers through ``custom_imports``) records, per
rank, the iterations run, the images each rank saw, checkpoint saves and a
checksum of the final parameters; the test then checks that both ranks
trained on disjoint shards in lock-step (DDP kept the weights equal), that
only rank 0 saved, and that the one checkpoint holds the trained weights.
About 15 s on 2 idle cores (two interpreters importing torch and mmseg), so not
slow-marked; once in fp32 and once with --amp (bf16 autocast on CPU, DDP over gloo).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train_tools import tiny_demo_config

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import json
import os
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

if os.environ.get('RANK_PREFERS'):
    # each rank's timings of a layout pair say its own layout is faster (RANK_PREFERS: rank 0's,
    # rank 1's), from a tuning cache of its own, so the ranks' proposals differ
    from reparam_mm.layers import large_kernel
    _rank = os.environ['RANK']
    _prefers = os.environ['RANK_PREFERS'].split(',')[int(_rank)]
    os.environ['REPARAM_MM_CACHE'] = os.path.join(os.environ['REPARAM_MM_CACHE'], 'rank' + _rank)
    _time_candidates = large_kernel.TUNER.time_candidates

    def _prefer(runs, **kwargs):
        if set(runs) != {'nchw', 'channels_last'}:
            return _time_candidates(runs, **kwargs)
        for run in runs.values():
            run()
        return {name: 1.0 if name == _prefers else 2.0 for name in runs}, {}
    large_kernel.TUNER.time_candidates = _prefer


def _evaluated_layouts():
    from reparam_mm.layers import large_kernel
    return {sig.split('|')[1].split(':')[0]: choice
            for (_, sig), choice in large_kernel.TUNER.choices.items()
            if sig.startswith('layout|') and ':eval|' in sig}


@HOOKS.register_module()
class RankProbeHook(Hook):
    def __init__(self, out_dir):
        self.out_dir, self.record = out_dir, dict(iters=[], images=[], saves=0)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.record['iters'].append(runner.iter + 1)
        self.record['images'].append(sorted(s.img_path for s in data_batch['data_samples']))

    def before_save_checkpoint(self, runner, checkpoint):
        self.record['saves'] += 1

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.record['checksum'] = sum(float(p.double().sum()) for p in model.parameters())
        self.record['buffers'] = sum(float(b.double().sum()) for b in model.buffers())
        self.record['norms'] = sorted({type(m).__name__ for m in model.modules()
                                       if 'Norm' in type(m).__name__})
        self.record['world_size'] = runner.world_size
        self.record['wrapper'] = type(runner.model).__name__
        self.record['optim_wrapper'] = type(runner.optim_wrapper).__name__
        from reparam_mm.layers import large_kernel
        self.record['trained_layouts'] = sorted({sig.split('|')[1].split(':')[0]
                                                 for _, sig in large_kernel.TUNER.choices
                                                 if sig.startswith('layout|') and ':train|' in sig})
        self.record['evaluated_layouts'] = _evaluated_layouts()
        from reparam_mm.head_layout import head_modules, module_layout
        self.record['head_layouts'] = {name: module_layout(m) for name, m, _ in head_modules(model)}
        with open(f'{self.out_dir}/rank{get_rank()}.json', 'w') as f:
            json.dump(self.record, f)

    def after_test(self, runner):
        with open(f'{self.out_dir}/rank{get_rank()}_test.json', 'w') as f:
            json.dump(dict(evaluated_layouts=_evaluated_layouts()), f)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('amp', [False, pytest.param(True, marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason='--amp picks the GPU wrapper there'))], ids=['fp32', 'bf16-amp'])
def test_two_process_gloo_training(tmp_path, amp):
    (tmp_path / 'rank_probe.py').write_text(PROBE)
    # the shipped full-size configs' SyncBN (GPUs only in PyTorch) runs as BN on CPU, said once
    sync_bn = '' if amp else """
sync = dict(type='SyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=sync), decode_head=dict(norm_cfg=sync),
             auxiliary_head=dict(norm_cfg=sync))
"""
    cfg = tiny_demo_config(tmp_path, max_iters=3, extra=f"""
custom_imports = dict(imports=['reparam_mm', 'rank_probe'], allow_failed_imports=False)
custom_hooks = [dict(type='FusedEvalHook'), dict(type='RankProbeHook', out_dir={str(tmp_path)!r})]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
""" + sync_bn)
    wd = tmp_path / 'wd'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]))
    argv = [cfg, '2', '--work-dir', str(wd)] + (['--amp'] if amp else [])
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for r in ranks:
        assert r['iters'] == [1, 2, 3] and r['world_size'] == 2
        assert r['wrapper'] == 'MMDistributedDataParallel'
        assert r['optim_wrapper'] == ('CPUAmpOptimWrapper' if amp else 'OptimWrapper')
    # each iteration, the two ranks read different images (the sampler shards by rank)
    for a, b in zip(ranks[0]['images'], ranks[1]['images']):
        assert len(a) == 2 and not set(a) & set(b)
    # gradients were all-reduced: the ranks end with the same weights
    assert ranks[0]['checksum'] == ranks[1]['checksum']
    # and the last validation gave every rank rank 0's BN statistics (each kept its own before):
    # all validate the model the checkpoint holds
    assert ranks[0]['buffers'] == ranks[1]['buffers']
    assert 'SyncBatchNorm' not in ranks[0]['norms'] and 'BatchNorm2d' in ranks[0]['norms']
    said = [line for line in (proc.stdout + proc.stderr).splitlines()
            if 'CPU distributed run: SyncBN runs on GPUs only' in line]
    assert len(said) == (0 if amp else 2), said  # once per process
    if not amp:
        assert 'model.backbone.norm_cfg.type, model.decode_head.norm_cfg.type, ' \
            'model.auxiliary_head.norm_cfg.type run as BN here' in said[0]
    # the checkpoint was written once, by rank 0, and holds those weights
    assert (ranks[0]['saves'], ranks[1]['saves']) == (1, 0)
    assert sorted(p.name for p in wd.glob('*.pth')) == ['iter_3.pth']
    state = torch.load(wd / 'iter_3.pth', map_location='cpu', weights_only=True)
    assert state['meta']['iter'] == 3
    params = [v for k, v in state['state_dict'].items()
              if 'running_' not in k and 'num_batches_tracked' not in k]
    assert abs(sum(float(p.double().sum()) for p in params) - ranks[0]['checksum']) < 1e-6
    # the final validation (fused copy on each rank, results gathered over gloo) ran
    assert 'mIoU' in proc.stdout + proc.stderr


def test_distributed_training_times_layouts_on_copies_and_trains_heads_in_rank_0s(tmp_path):
    """Each rank times the RepLKNet backbone's and the heads' training layouts on copies (with
    BN for SyncBN), so its SyncBN layers run the step's forward only. The backbone's layout is
    the activations', so each rank keeps its own; the heads' weights are DDP's, so after the
    first step every rank takes rank 0's proposals, here channels_last where rank 1 timed NCHW
    faster: both train the DO-Conv heads channels_last and end with the same weights. The fused
    copy validated at the end is DDP's no longer: each rank evaluates it in its own timed layouts."""
    from test_train_tools import DOCONV_REPLKNET_DEMO
    (tmp_path / 'rank_probe.py').write_text(PROBE)
    cfg = tiny_demo_config(tmp_path, max_iters=2, base=DOCONV_REPLKNET_DEMO, extra=f"""
custom_imports = dict(imports=['reparam_mm', 'rank_probe'], allow_failed_imports=False)
custom_hooks = [dict(type='FusedEvalHook'), dict(type='RankProbeHook', out_dir={str(tmp_path)!r})]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
sync = dict(type='SyncBN', requires_grad=True)
model = dict(decode_head=dict(norm_cfg=sync), auxiliary_head=dict(norm_cfg=sync))
""")
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]),
               RANK_PREFERS='channels_last,nchw', REPARAM_MM_CACHE=str(tmp_path / 'cache'))
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), cfg, '2', '--work-dir',
                           str(tmp_path / 'wd')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for r in ranks:
        assert r['iters'] == [1, 2] and r['trained_layouts'] == ['FCNHead', 'RepLKNet', 'UPerHead'], r
        assert r['head_layouts'] == {'decode_head': 'channels_last',
                                     'auxiliary_head': 'channels_last'}, r
    assert ranks[0]['checksum'] == ranks[1]['checksum']
    assert ranks[0]['evaluated_layouts'] == {'RepLKNet': 'channels_last', 'UPerHead': 'channels_last'}
    assert ranks[1]['evaluated_layouts'] == {'RepLKNet': 'nchw', 'UPerHead': 'nchw'}
    said = [line for line in out.splitlines() if "train in rank 0's timed layouts" in line]
    assert len(said) == 1, out[-3000:]
    assert said[0].endswith('decode_head channels_last, auxiliary_head channels_last'), said


def test_a_bad_label_on_one_rank_ends_both_with_one_line(tmp_path):
    """One training label map holds a value past the classes: the rank that reads it stops with
    the label check's one line, and torchrun ends the other, which would otherwise wait in the
    gradient all-reduce (up to the process group's 30-minute timeout on a real cluster)."""
    from PIL import Image
    cfg = tiny_demo_config(tmp_path, max_iters=3, extra="""
env_cfg = dict(dist_cfg=dict(backend='gloo'))
""")
    bad = sorted((tmp_path / 'data/annotations/training').glob('*.png'))[-1]
    label = np.array(Image.open(bad))
    label[:4, :4] = 9  # reduce_zero_label reads it as 8, past the demo's 5 classes
    Image.fromarray(label).save(bad)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, PORT=str(_free_port()))
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), cfg, '2', '--work-dir',
                           str(tmp_path / 'wd')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith('error: ')]
    assert errors and all(f'the label map {bad} holds the value 8' in e for e in errors), out[-3000:]
    assert 'out of bounds' not in out and not list((tmp_path / 'wd').glob('*.pth'))
    # and said once more at the end, each sentence once, under torchrun's ChildFailedError report
    lines = proc.stderr.rstrip().splitlines()
    stop = max(i for i, line in enumerate(lines) if line.startswith('the run stopped (exit status '))
    assert lines[stop + 1:] == list(dict.fromkeys(errors)), out[-3000:]
    assert 'ChildFailedError' in '\n'.join(lines[:stop])


def test_evaluation_label_counts_are_summed_over_ranks(tmp_path):
    """Validation label maps the IoUMetric cannot score (read without reduce_zero_label): each of
    the two ranks reads one of the 2 validation images, and the warning counts both."""
    cfg = tiny_demo_config(tmp_path, max_iters=1, extra="""
env_cfg = dict(dist_cfg=dict(backend='gloo'))
""")
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, PORT=str(_free_port()))
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), cfg, '2', '--work-dir',
                           str(tmp_path / 'wd'), '--cfg-options',
                           'val_dataloader.dataset.reduce_zero_label=False'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    said = [line for line in out.splitlines() if 'label maps read hold values' in line]
    assert len(said) == 1 and 'val_dataloader: 2 of the 2 label maps read' in said[0], out[-3000:]
    # --show-dir under 2 processes paints every test image, each rank its own (the visualizers'
    # add_datasample is master_only: rank 1's half was counted but never written); the model
    # tools/test.py fuses in place is evaluated in each rank's own timed layouts (here each
    # rank's timings prefer another)
    (tmp_path / 'rank_probe.py').write_text(PROBE)
    probed = tmp_path / 'probed_cfg.py'
    probed.write_text(f"""_base_ = [{cfg!r}]
custom_imports = dict(imports=['reparam_mm', 'rank_probe'], allow_failed_imports=False)
custom_hooks = [dict(type='FusedEvalHook'), dict(type='RankProbeHook', out_dir={str(tmp_path)!r})]
""")
    env.update(RANK_PREFERS='channels_last,nchw', REPARAM_MM_CACHE=str(tmp_path / 'cache'),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_test.sh'), str(probed),
                           str(tmp_path / 'wd/iter_1.pth'), '2', '--work-dir', str(tmp_path / 'wt'),
                           '--show-dir', 'shows'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    pictures = sorted(p.name for p in (tmp_path / 'wt').glob('*/shows/*.png'))
    assert pictures == ['demo_00000.png', 'demo_00001.png'], out[-3000:]
    assert '--show-dir: painted 2 test image(s) to ' in out
    for rank, layout in ((0, 'channels_last'), (1, 'nchw')):
        record = json.loads((tmp_path / f'rank{rank}_test.json').read_text())
        assert record['evaluated_layouts'] == {'UPerHead': layout}, record  # an R18 backbone


@pytest.mark.timeout(60)
def test_a_tool_ends_the_process_group_it_ran_in(tmp_path):
    """A gloo group left to interpreter teardown can abort a run that succeeded (SIGABRT,
    'terminate called without an active exception'), so run_tool destroys it after main, and
    after an input error too."""
    import torch.distributed as dist

    from reparam_mm.cli import run_tool

    def launched(error=None):
        def main(argv):
            dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store_{argv[0]}',
                                    rank=0, world_size=1)
            assert dist.is_initialized()
            if error is not None:
                raise error
        return main

    assert run_tool(launched(), ['ok']) == 0
    assert not dist.is_initialized()
    assert run_tool(launched(FileNotFoundError('x.pth does not exist; pass a file.')), ['bad']) == 1
    assert not dist.is_initialized()


@pytest.mark.timeout(60)
def test_after_an_error_a_nccl_group_is_aborted_not_destroyed(tmp_path, monkeypatch):
    """NCCL's graceful destroy may wait for ranks that wait in a collective the failed rank never
    joins; the process must end for torchrun to end the others (no NCCL here: the backend's
    name and the abort are stood in for)."""
    import torch.distributed as dist

    from reparam_mm import cli
    calls = []
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, 'get_backend', lambda *a: 'nccl')
        monkeypatch.setattr(dist.distributed_c10d, '_abort_process_group',
                            lambda *a: calls.append('abort'), raising=False)
        monkeypatch.setattr(dist, 'destroy_process_group', lambda *a: calls.append('destroy'))

        def main(argv):
            raise FileNotFoundError('x.pth does not exist; pass a file.')
        assert cli.run_tool(main, []) == 1
        assert calls == ['abort']
        assert cli.run_tool(lambda argv: None, []) == 0  # a normal end destroys it
        assert calls == ['abort', 'destroy']
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


END_SCRIPT = '''
import json, os, sys, time
import torch.distributed as dist
from reparam_mm import cli

store, rank, rank1_works_s, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cli.END_BARRIER_S = float(sys.argv[5])


def main(argv):
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    if rank == 1:  # the rank still writing its results when rank 0 is done
        time.sleep(rank1_works_s)
        open(out + '.rank1_done', 'w').close()


status = cli.run_tool(main)
with open(f'{out}.rank{rank}.json', 'w') as f:
    json.dump(dict(status=status, rank1_was_done=os.path.exists(out + '.rank1_done'),
                   initialized=dist.is_initialized()), f)
'''


def _end_two_ranks(tmp_path, rank1_works_s, barrier_s):
    script = tmp_path / 'end.py'
    script.write_text(END_SCRIPT)
    out = str(tmp_path / 'run')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / 'store'), str(rank),
                               str(rank1_works_s), out, str(barrier_s)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    said = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], said
    return [json.loads((tmp_path / f'run.rank{rank}.json').read_text()) for rank in (0, 1)], said


@pytest.mark.timeout(120)
def test_ranks_that_ended_normally_meet_before_they_end_the_process_group(tmp_path):
    """Rank 0 is done at once, rank 1 works 1.5 s more: rank 0 ends its gloo group only after
    rank 1 is done too, so no rank closes its connections under another's feet."""
    (rank0, rank1), said = _end_two_ranks(tmp_path, rank1_works_s=1.5, barrier_s=60)
    assert rank0 == dict(status=0, rank1_was_done=True, initialized=False), said
    assert rank1 == dict(status=0, rank1_was_done=True, initialized=False), said
    assert 'warning' not in ''.join(said)


@pytest.mark.timeout(120)
def test_a_rank_that_does_not_come_to_the_end_is_named_and_the_group_ends(tmp_path):
    """The wait at the end is bounded: past it, rank 0 names the missing rank in one warning and
    ends its group anyway, with the run's own status."""
    (rank0, rank1), said = _end_two_ranks(tmp_path, rank1_works_s=4, barrier_s=1)
    assert rank0 == dict(status=0, rank1_was_done=False, initialized=False), said
    assert rank1['status'] == 0 and not rank1['initialized'], said
    warning = [line for line in said[0].splitlines() if line.startswith('warning: rank 0 ')]
    assert len(warning) == 1 and 'without meeting the other ranks at the end' in warning[0], said
    assert 'Rank 1 failed to pass monitoredBarrier' in warning[0], said
