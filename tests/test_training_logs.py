"""reparam_mm.training_logs and tools/analyze_logs.py: the scalars runs logged, read back across
a resume, summarised and drawn."""
import json

import pytest

from conftest import load_tool
from reparam_mm.cli import run_tool
from reparam_mm.scope import ConfigError
from reparam_mm.train import main as train_main
from reparam_mm.training_logs import (RunScalars, lower_is_better, mean_iter_time, read_scalars,
                                      summarise)
from test_train_tools import tiny_demo_config

logs_tool = load_tool('analyze_logs')


def _write(folder, rows):
    (folder / 'vis_data').mkdir(parents=True)
    (folder / 'vis_data' / 'scalars.json').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def _train(step, loss, time=0.5):
    return dict(lr=0.01, loss=loss, time=time, data_time=0.1, iter=step, step=step)


def test_a_resumed_run_is_read_as_one_and_its_later_start_wins_where_both_logged(tmp_path):
    wd = tmp_path / 'wd'
    _write(wd / '20261203_090000', [_train(1, 3.0), _train(2, 2.0), dict(mIoU=10.0, time=0.2, step=2),
                                    _train(3, 1.5, time=0.9)])  # stopped after iter 3, checkpoint at 2
    _write(wd / '20261203_091500', [_train(3, 1.8, time=0.7), _train(4, 1.0), dict(mIoU=30.0, step=4)])
    (wd / 'deploy').mkdir()  # not a start of tools/train.py
    run = read_scalars(wd)
    assert run.name == str(wd) and len(run.files) == 2
    assert run.series('loss') == [(1, 3.0), (2, 2.0), (3, 1.8), (4, 1.0)]
    assert run.series('mIoU') == [(2, 10.0), (4, 30.0)]
    assert run.train['time'] == [(1, 0.5), (2, 0.5), (3, 0.7), (4, 0.5)]
    assert run.val['time'] == [(2, 0.2)]  # validation rows are kept apart from training rows
    assert mean_iter_time(run) == pytest.approx((0.5 + 0.7 + 0.5) / 3)  # the first left out
    loss, miou = summarise(run, ['loss', 'mIoU'])
    assert (loss.last, loss.best, loss.points) == ((4, 1.0), (4, 1.0), 4)
    assert (miou.last, miou.best, miou.points) == ((4, 30.0), (4, 30.0), 2)
    single = read_scalars(wd / '20261203_090000' / 'vis_data' / 'scalars.json', name='first')
    assert single.name == 'first' and single.series('loss')[-1] == (3, 1.5)
    assert summarise(single, ['loss'])[0].best == (3, 1.5)


def test_validation_logged_by_epoch_is_placed_at_the_iteration_it_followed(tmp_path):
    # mmdet's LoggerHook logs validation with step = epoch (log_metric_by_epoch): by epoch, 1 and 2;
    # in an iteration-based run, 0 every time (its epoch never advances)
    def train(step, epoch=None):
        return dict(_train(step, 1.0 / step), **({'epoch': epoch} if epoch else {}))
    _write(tmp_path / 'ep' / '20261203_090000',
           [train(5, 1), train(10, 1), {'coco/bbox_mAP': 0.2, 'time': 0.3, 'step': 1},
            train(15, 2), train(20, 2), {'coco/bbox_mAP': 0.1, 'time': 0.3, 'step': 2}])
    run = read_scalars(tmp_path / 'ep')
    assert run.val_by_epoch and run.series('coco/bbox_mAP') == [(10, 0.2), (20, 0.1)]
    assert summarise(run, ['coco/bbox_mAP'])[0].best == (10, 0.2)
    _write(tmp_path / 'it' / '20261203_090000',
           [train(50), {'coco/bbox_mAP': 0.1, 'step': 0}, train(100), {'coco/bbox_mAP': 0.3, 'step': 0}])
    run = read_scalars(tmp_path / 'it' / '20261203_090000')  # one start's folder
    assert run.val_by_epoch and run.series('coco/bbox_mAP') == [(50, 0.1), (100, 0.3)]
    # mmseg's (log_metric_by_epoch=False): the step is the iteration itself
    _write(tmp_path / 'seg' / '20261203_090000', [train(4), {'mIoU': 9.0, 'step': 4}])
    assert not read_scalars(tmp_path / 'seg').val_by_epoch
    # time is the training iteration's, though validation rows carry a time too
    assert read_scalars(tmp_path / 'ep').series('time') == [(s, 0.5) for s in (5, 10, 15, 20)]


def test_validations_more_often_than_the_logging_are_all_kept(tmp_path, capsys):
    """mmdet logs validation by epoch (step 0 in an iteration-based run): with val_interval 5 and
    the logger at 16 iterations, six validations were read as three, the rest overwritten. With the
    config.py mmengine dumps beside scalars.json each lands on its iteration; without it, each is
    kept where it can be placed, and the sharing is said."""
    def val(map50):
        return {'coco/bbox_mAP_50': map50, 'step': 0}
    rows = [val(0.1), val(0.2), val(0.3), _train(16, 1.0), val(0.4), _train(25, 0.8), val(0.5),
            val(0.6)]  # validations at 5, 10, 15, 20, 25 and 30 (max_iters)
    _write(tmp_path / 'cfg' / '20261203_090000', rows)
    (tmp_path / 'cfg' / '20261203_090000' / 'vis_data' / 'config.py').write_text(
        "train_cfg = dict(type='IterBasedTrainLoop', max_iters=30, val_interval=5)\n")
    run = read_scalars(tmp_path / 'cfg')
    assert run.series('coco/bbox_mAP_50') == [(5, 0.1), (10, 0.2), (15, 0.3), (20, 0.4), (25, 0.5),
                                              (30, 0.6)]
    assert (run.val_by_epoch, run.val_interval, run.val_shared) == (True, 5, 0)
    logs_tool.main([str(tmp_path / 'cfg'), '--keys', 'coco/bbox_mAP_50'])
    printed = capsys.readouterr().out
    assert '| coco/bbox_mAP_50 | 0.6 (30) | 0.6 (30) | 6 |' in printed
    assert 'placed at the iterations of the val_interval (5) in the config.py' in printed

    _write(tmp_path / 'bare' / '20261203_090000', rows)
    run = read_scalars(tmp_path / 'bare')
    assert [value for _, value in run.series('coco/bbox_mAP_50')] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert [step for step, _ in run.series('coco/bbox_mAP_50')] == [0, 0, 0, 16, 25, 25]
    assert (run.val_interval, run.val_shared) == (None, 3)
    logs_tool.main([str(tmp_path / 'bare'), '--keys', 'coco/bbox_mAP_50'])
    assert '; 3 validation(s) fell where an earlier one was placed' in capsys.readouterr().out


def test_runs_of_which_one_did_not_validate_keep_the_others_metric(tmp_path, capsys):
    _write(tmp_path / 'val' / '20261203_090000', [_train(1, 2.0), _train(2, 1.0), dict(mIoU=20.0, step=2)])
    _write(tmp_path / 'noval' / '20261203_090000', [_train(1, 2.0), _train(2, 1.5)])
    out = tmp_path / 'new' / 'folder' / 'curves.png'
    logs_tool.main([str(tmp_path / 'noval'), str(tmp_path / 'val'), '--out', str(out)])
    printed = capsys.readouterr().out
    assert '| mIoU | not logged | | 0 |\n| loss | 1.5 (2) | 1.5 (2) | 2 |' in printed
    assert '| mIoU | 20 (2) | 20 (2) | 1 |\n| loss | 1 (2) | 1 (2) | 2 |' in printed
    assert out.stat().st_size > 1000  # its folder made, as mmengine's tools make theirs


def test_a_resume_drops_what_the_earlier_start_logged_from_its_first_iteration_on(tmp_path):
    _write(tmp_path / '20261203_090000', [_train(i, 1.0) for i in (1, 2, 3, 4, 5, 6)]
           + [dict(mIoU=5.0, step=6)])  # ran to 6, last checkpoint at 2
    _write(tmp_path / '20261203_100000', [_train(3, 2.0), _train(4, 2.0)])  # resumed, stopped at 4
    run = read_scalars(tmp_path)
    assert run.series('loss') == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    assert 'mIoU' not in run.val


def test_values_that_are_not_finite_are_left_out_of_best_and_counted(tmp_path, capsys):
    _write(tmp_path / '20261203_090000', [_train(1, float('nan')), _train(2, 1.0), _train(3, 0.5),
                                          dict(mIoU=float('nan'), step=3)])
    run = read_scalars(tmp_path)
    loss, miou = summarise(run, ['loss', 'mIoU'])
    assert loss.best == (3, 0.5) and loss.not_finite == 1 and loss.points == 3
    assert miou.best is None and miou.not_finite == 1
    logs_tool.main([str(tmp_path), '--keys', 'loss', 'mIoU'])
    printed = capsys.readouterr().out
    assert '| loss | 0.5 (3) | 0.5 (3) | 3 |' in printed and '| mIoU | nan (3) | none finite | 1 |' in printed
    assert 'loss: 1 of 3 values NaN or infinite, left out of best' in printed
    with pytest.raises(SystemExit):
        logs_tool.main([str(tmp_path), '--out', 'curves.xyz'])
    assert 'curves.xyz is not a picture file name' in capsys.readouterr().err


def test_what_goes_up_and_what_goes_down():
    assert all(lower_is_better(k) for k in ('loss', 'decode.loss_ce', 'time', 'data_time', 'lr',
                                            'backbone.lr', 'memory'))
    assert not any(lower_is_better(k) for k in ('mIoU', 'aAcc', 'coco/bbox_mAP', 'decode.acc_seg',
                                                'accuracy/top1'))
    run = RunScalars('r', val={'mIoU': [(1, 5.0), (2, 9.0), (3, 7.0)]},
                     train={'loss': [(1, 2.0), (2, 0.5), (3, 0.7)]})
    miou, loss = summarise(run, ['mIoU', 'loss'])
    assert miou.best == (2, 9.0) and miou.last == (3, 7.0)
    assert loss.best == (2, 0.5) and loss.last == (3, 0.7)


def test_bad_logs_are_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r'does not exist; give a work_dir or a vis_data/scalars.json'):
        read_scalars(tmp_path / 'none')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConfigError, match=r'holds no <timestamp>/vis_data/scalars.json'):
        read_scalars(tmp_path / 'empty')
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(_train(1, 1.0)) + '\n{"loss": 2}\n')
    with pytest.raises(ConfigError, match=r'bad.json, line 2: not a row mmengine writes'):
        read_scalars(bad)
    bad.write_text(json.dumps(_train(1, 1.0)) + '\n')
    with pytest.raises(ConfigError, match=r"logged no 'mIoU'; its keys are: validation none; "
                                          r'training data_time, loss, lr, time\.'):
        summarise(read_scalars(bad), ['mIoU'])


def test_tool_on_a_real_run_resumed_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fixed')
    wd = tmp_path / 'wd'
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    train_main([tiny_demo_config(tmp_path / 'a', max_iters=2), '--work-dir', str(wd)])
    # the same run, resumed from its iteration-2 checkpoint to 4 (in this one process mmengine's
    # visualizer, a global instance, keeps writing to the first start's folder; a second
    # tools/train.py process writes a folder of its own, as the first test reads)
    later = tiny_demo_config(tmp_path / 'b', max_iters=4,
                             extra='train_cfg = dict(max_iters=4, val_interval=2)')
    runner = train_main([later, '--work-dir', str(wd), '--resume'])
    assert runner.iter == 4
    run = read_scalars(wd)
    assert [step for step, _ in run.series('loss')] == [1, 2, 3, 4]
    assert [step for step, _ in run.series('mIoU')] == [2, 4]
    assert run.series('mIoU')[-1][1] == pytest.approx(runner.message_hub.get_scalar('val/mIoU').current())
    out = tmp_path / 'curves.png'
    capsys.readouterr()  # the training's log
    logs_tool.main([str(wd), str(wd), '--legend', 'A', 'B', '--out', str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith(f'A ({len(run.files)} scalars.json file(s))\n') and '\nB (' in printed
    miou = summarise(run, ['mIoU'])[0]
    assert f'| mIoU | {miou.last[1]:.4g} (4) | {miou.best[1]:.4g} ({miou.best[0]}) | 2 |' in printed
    assert f'training: {mean_iter_time(run):.3f} s per iteration' in printed
    assert out.stat().st_size > 1000 and f'written: {out}' in printed
    assert run_tool(logs_tool.main, [str(wd), '--keys', 'mIoU', 'nope']) == 1
    err = capsys.readouterr()
    assert err.err.startswith(f"error: {wd} logged no 'nope'; its keys are: validation ")
    assert err.out == ''  # refused before any table
    with pytest.raises(SystemExit):
        logs_tool.main([str(wd), '--legend', 'A', 'B'])
    assert '--legend: give one name per RUN (1), not 2.' in capsys.readouterr().err


def test_each_run_of_one_process_logs_into_its_own_work_dir(tmp_path, monkeypatch):
    # mmengine's visualizer is a process-wide instance by name: without reparam_mm.train's
    # own_visualizer the second run's scalars went into the first run's folder
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fixed')
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        train_main([tiny_demo_config(tmp_path / name, max_iters=1), '--work-dir', str(tmp_path / name / 'wd')])
    for name in ('a', 'b'):
        run = read_scalars(tmp_path / name / 'wd')
        assert [step for step, _ in run.series('loss')] == [1] and len(run.files) == 1
