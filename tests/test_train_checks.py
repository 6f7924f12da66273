"""What tools/train.py checks and says before and around training: validation on the fused model
whatever the config's custom_hooks, heads' num_classes against the dataset, schedules that end
past the run, and a resume with nothing left to train."""
import logging

import pytest

import reparam_mm  # noqa: F401
from conftest import ROOT, mmengine_log
from reparam_mm.scope import ConfigError, init_scope, load_config
from reparam_mm.train import check_num_classes, main, warn_schedules_past_the_end
from test_train_tools import PLAIN_DEMO, tiny_demo_config

COCO_DEMO = ROOT / 'configs/demo/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-400i_coco128-person-320.py'


def _fused_eval_hooks(runner):
    return [h for h in runner.hooks if type(h).__name__ == 'FusedEvalHook']


def test_validation_stays_fused_when_the_config_replaces_custom_hooks(tmp_path):
    """mmengine replaces lists: a config of one's own with custom_hooks=[...] dropped the base's
    FusedEvalHook, and validation ran unfused without a word."""
    cfg = tiny_demo_config(tmp_path, max_iters=1, extra='custom_hooks = []')
    with mmengine_log() as records:
        runner = main([cfg, '--work-dir', str(tmp_path / 'a')])
    hooks = _fused_eval_hooks(runner)
    assert len(hooks) == 1 and hooks[0].last_check is not None  # it validated a fused copy
    assert any(r.getMessage().startswith('validation runs on a fused copy: FusedEvalHook added')
               for r in records)
    runner = main([cfg, '--work-dir', str(tmp_path / 'b'), '--no-fuse'])
    assert _fused_eval_hooks(runner) == [] and runner.message_hub.get_scalar('val/mIoU') is not None


def test_heads_with_another_number_of_classes_than_the_dataset_are_refused(tmp_path, monkeypatch):
    import reparam_mm.train
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built before num_classes was checked'))
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    with pytest.raises(ConfigError) as err:
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'model.decode_head.num_classes=6'])
    assert str(err.value) == (
        'model.decode_head.num_classes is 6, but the training dataset has 5 classes (backdrop, disc, '
        'box, triangle, ...); set every head to 5: --cfg-options model.decode_head.num_classes=5.')
    det = load_config(str(COCO_DEMO))  # one class, person; mmdet reads label 1 as background
    init_scope(det)
    det.model.roi_head.bbox_head.num_classes = 2
    with pytest.raises(ConfigError, match=r'^model\.roi_head\.bbox_head\.num_classes is 2, but the '
                                          r'training dataset has 1 classes \(person\)'):
        check_num_classes(det)
    seg = load_config(str(PLAIN_DEMO))  # mmseg's binary form: one sigmoid output for 2 classes
    init_scope(seg)
    seg.train_dataloader.dataset.metainfo = dict(classes=('background', 'object'))
    seg.model.decode_head.num_classes = seg.model.auxiliary_head.num_classes = 1
    check_num_classes(seg)


def test_a_schedule_ending_past_a_shortened_run_is_said():
    cfg = load_config(str(PLAIN_DEMO))
    with mmengine_log() as records:
        warn_schedules_past_the_end(cfg)  # as shipped: every schedule ends with the run
        cfg.train_cfg.max_iters = 60
        warn_schedules_past_the_end(cfg)
    said = [(r.levelno, r.getMessage()) for r in records]
    ends = [s['end'] for s in cfg.param_scheduler if s['end'] > 60]
    assert len(said) == len(ends) >= 1 and all(level == logging.WARNING for level, _ in said)
    assert said[-1][1].endswith(f'past the end of training (iteration 60, train_cfg.max_iters): it will '
                                f'stop part way; --cfg-options param_scheduler.{len(cfg.param_scheduler) - 1}'
                                '.end=60 fits it to this run.')


def test_a_resume_with_nothing_left_to_train_is_said(tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    main([cfg, '--work-dir', str(tmp_path / 'w')])
    with mmengine_log() as records:
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--resume', '--cfg-options', 'train_cfg.max_iters=1'])
    assert any('the run is at iteration 2, and train_cfg stops at 1, so nothing is left to train'
               in r.getMessage() and r.levelno == logging.WARNING for r in records)


def test_a_class_the_coco_json_does_not_name_is_refused_before_the_first_iteration(tmp_path):
    """mmdet keeps the classes it finds among the json's categories: 'human' for 'person' trained
    without that label, and the evaluator failed with an IndexError at the first validation."""
    from test_tools_test_fuse import make_coco
    root = make_coco(tmp_path / 'coco', n=2)  # categories person, car
    data = [f'{loader}.dataset.{key}' for loader in ('train_dataloader', 'val_dataloader')
            for key in (f'data_root={root}', 'ann_file=annotations.json', 'data_prefix.img=val/')]
    common = [str(COCO_DEMO), '--work-dir', str(tmp_path / 'w'), '--cfg-options', *data,
              f'val_evaluator.ann_file={root}/annotations.json', 'train_cfg.max_iters=1',
              'train_cfg.val_interval=1', 'train_dataloader.batch_size=2']
    common.append('model.roi_head.bbox_head.num_classes=2')
    with pytest.raises(ConfigError) as err:  # images with cars remain, so mmdet would train on
        main(common + ["train_dataloader.dataset.metainfo.classes=('human','car')",
                       "val_dataloader.dataset.metainfo.classes=('human','car')"])
    assert str(err.value) == (
        f"train_dataloader: the dataset names 2 classes (human, car), and only 1 of them are "
        f"categories of {root}/annotations.json; name the classes as the json's categories do (its "
        "'categories' list), e.g. 'person', not 'human'.")
    runner = main(common + ["train_dataloader.dataset.metainfo.classes=('person','car')",
                            "val_dataloader.dataset.metainfo.classes=('person','car')"])
    assert runner.iter == 1 and runner.message_hub.get_scalar('val/coco/bbox_mAP') is not None
