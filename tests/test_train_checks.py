"""What tools/train.py checks and says before and around training: validation on the fused model
whatever the config's custom_hooks, heads' num_classes against the dataset, schedules that end
past the run, a resume with nothing left to train or nothing to resume from, and label values the
heads cannot read."""
import logging
import re

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


@pytest.mark.timeout(120)
def test_a_validation_or_test_set_with_other_classes_than_the_heads_is_refused(tmp_path, monkeypatch):
    """A 1-class detector tested on a set whose metainfo was left out scored its boxes under the
    80 COCO names (a 'car' written as category 2, bicycle), and a segmentor's mIoU was averaged
    over a class it never predicts, without a word: tools/train.py checks the validation set and
    tools/test.py the test set, before anything is built."""
    import reparam_mm.train
    from reparam_mm.apis import build_test_runner
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built before the classes were checked'))
    det = load_config(str(COCO_DEMO))  # one class, person
    init_scope(det)
    check_num_classes(det, ['train_dataloader', 'val_dataloader', 'test_dataloader'])
    det.test_dataloader.dataset.pop('metainfo')  # CocoDataset's own: the 80 COCO classes
    with pytest.raises(ConfigError) as err:
        check_num_classes(det, ['train_dataloader', 'test_dataloader'])
    assert str(err.value) == (
        'model.roi_head.bbox_head.num_classes is 1, but test_dataloader.dataset has 80 classes '
        '(person, bicycle, car, motorcycle, ...), so the metric would score the predictions under '
        'other names; give test_dataloader.dataset the classes the model was trained on '
        '(metainfo=dict(classes=...), as the training dataset has them).')
    check_num_classes(det)  # training alone reads the training set
    seg_file = tiny_demo_config(tmp_path, max_iters=1, extra="""
val_dataloader['dataset']['metainfo'] = dict(classes=('backdrop', 'disc', 'box', 'triangle', 'star', 'x'))
""")
    with pytest.raises(ConfigError, match=r'^model\.decode_head\.num_classes is 5, .*but '
                                          r'val_dataloader\.dataset has 6 classes'):
        main([seg_file, '--work-dir', str(tmp_path / 'w')])
    with pytest.raises(ConfigError, match=r'but test_dataloader\.dataset has 6 classes'):
        build_test_runner(seg_file, str(tmp_path / 'no.pth'), work_dir=str(tmp_path / 't'))


@pytest.mark.timeout(60)
def test_heads_that_ignore_another_value_than_the_label_padding_are_refused(tmp_path, monkeypatch):
    """Heads set to ignore CamVid's 11 with the preprocessor padding label maps with 255 trained
    until the first image smaller than the crop, then stopped in torch with 'Target 255 is out
    of bounds'; refused before anything is built, naming the value to pad with."""
    import reparam_mm.train
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built before the padding was checked'))
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    heads = ['model.decode_head.ignore_index=4', 'model.auxiliary_head.ignore_index=4']
    with pytest.raises(ConfigError) as err:
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', *heads])
    assert str(err.value) == (
        'model.decode_head.ignore_index is 4, model.auxiliary_head.ignore_index is 4, but '
        'model.data_preprocessor.seg_pad_val is 255: the label maps are padded with 255 wherever an '
        "image is padded (to the preprocessor's size, or to the largest in the batch), and the loss "
        'would read it as a label; pad with the ignore index: --cfg-options '
        'model.data_preprocessor.seg_pad_val=4.')
    from reparam_mm.train import check_pad_label, config_from_args, parse_args
    fixed = config_from_args(parse_args([cfg, '--cfg-options', *heads,
                                         'model.data_preprocessor.seg_pad_val=4']))
    init_scope(fixed)
    check_pad_label(fixed)
    det = load_config(str(COCO_DEMO))  # detectors pad no label maps
    init_scope(det)
    check_pad_label(det)


@pytest.mark.timeout(60)
def test_a_metric_that_ignores_another_label_than_the_heads_is_refused(tmp_path, monkeypatch):
    """Heads and padding at CamVid's 11 (4 here) with IoUMetric at its default 255 scored the
    ignored pixels as a class no head predicts: the mIoU read low, and the label-value warning
    blamed reduce_zero_label."""
    import reparam_mm.train

    class Built(Exception):
        pass

    def build_runner(cfg):
        raise Built

    monkeypatch.setattr(reparam_mm.train, 'build_runner', build_runner)
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    ignore = ['model.decode_head.ignore_index=4', 'model.auxiliary_head.ignore_index=4',
              'model.data_preprocessor.seg_pad_val=4']
    with pytest.raises(ConfigError) as err:
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', *ignore])
    assert str(err.value) == (
        "val_evaluator.ignore_index is 255, but the heads' ignore_index is 4: the metric would score "
        'the pixels labelled 4 as a class no head predicts, and its mIoU would read low; ignore the '
        'same label: --cfg-options val_evaluator.ignore_index=4.')
    with pytest.raises(Built):  # as advised
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', *ignore,
              'val_evaluator.ignore_index=4'])
    with pytest.raises(Built):  # no validation, no metric to check
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', *ignore,
              'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'])


def test_heads_that_do_not_take_the_backbones_channels_are_refused(tmp_path, monkeypatch):
    """A backbone changed alone (model.backbone.arch=tiny on a config made for 31B) built, loaded
    the data and stopped at the first forward with torch's channel error, naming no key; the
    model now runs on the meta device before anything is built, and every head to change is
    named with the value that fits."""
    import reparam_mm.train
    from reparam_mm.train import check_model_fits
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built before the channels were checked'))
    config = ROOT / 'configs/replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py'
    seg = load_config(str(config))
    init_scope(seg)
    check_model_fits(seg)  # as shipped
    seg.model.backbone.arch = 'tiny'
    with pytest.raises(ConfigError) as err:
        check_model_fits(seg)
    assert str(err.value) == (
        'model.decode_head.in_channels is [128, 256, 512, 1024] and model.auxiliary_head.in_channels '
        'is 512, but model.backbone gives [16, 32, 64, 128] channels; set '
        'model.decode_head.in_channels=[16,32,64,128] model.auxiliary_head.in_channels=64 (a '
        'backbone changed alone, e.g. its arch, keeps the neck and heads of the one the config was '
        'made for), or use a config made for this backbone.')
    seg.merge_from_dict({'model.decode_head.in_channels': [16, 32, 64, 128],
                         'model.auxiliary_head.in_channels': 64})
    check_model_fits(seg)  # the advice fits
    det = load_config(str(COCO_DEMO))
    init_scope(det)
    det.model.neck.in_channels = [64, 128, 256, 512]
    with pytest.raises(ConfigError, match=r'^model\.neck\.in_channels is \[64, 128, 256, 512\], but '
                                          r'model\.backbone gives \[(\d+, ){3}\d+\] channels; set '
                                          r'model\.neck\.in_channels=\[(\d+,){3}\d+\] \('):
        check_model_fits(det)
    cfg = tiny_demo_config(tmp_path, max_iters=1)  # and train() checks it first
    with pytest.raises(ConfigError, match=r'^model\.decode_head\.in_channels is \[8, 16, 32, 64\], '):
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
              'model.decode_head.in_channels=[8,16,32,64]'])


def test_a_backbone_giving_fewer_feature_maps_than_the_heads_pick_is_refused():
    """model.backbone.out_indices=(1, 2, 3) on UperNet stopped in mmseg with 'IndexError: tuple
    index out of range', on a Faster R-CNN in FPN's bare AssertionError (tools/get_flops.py too)."""
    from reparam_mm.complexity import model_complexity
    from reparam_mm.train import check_model_fits
    seg = load_config(str(ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-1k_camvid-128x128.py'))
    init_scope(seg)
    seg.model.backbone.out_indices = (1, 2, 3)
    with pytest.raises(ConfigError) as err:
        check_model_fits(seg)
    assert str(err.value) == (
        'model.decode_head.in_index is [0, 1, 2, 3], but model.backbone gives 3 feature maps ([32, 64, '
        '128] channels, by its out_indices); give the backbone the out_indices the heads were made '
        'for, or set the heads to its outputs (in_index among 0..2, in_channels to their channels).')
    with pytest.raises(ConfigError, match=r'^model\.decode_head\.in_index is \[0, 1, 2, 3\]'):
        model_complexity(seg, shape=(64, 64))
    seg.merge_from_dict({'model.decode_head.in_index': [0, 1, 2], 'model.decode_head.in_channels': [32, 64, 128],
                         'model.auxiliary_head.in_index': 1, 'model.auxiliary_head.in_channels': 64})
    check_model_fits(seg)  # the advice fits
    det = load_config(str(COCO_DEMO))
    init_scope(det)
    det.model.backbone.out_indices = (1, 2, 3)
    with pytest.raises(ConfigError, match=r'^model\.neck\.in_channels lists 4 feature maps, but '
                                          r'model\.backbone gives 3 feature maps \(\[(\d+, ){2}\d+\] '
                                          r'channels, by its out_indices\); give the backbone the '
                                          r'out_indices the neck was made for, or set '
                                          r'model\.neck\.in_channels=\[(\d+,){2}\d+\]\.$'):
        check_model_fits(det)
    # a neck whose in_channels are the widths of the levels it builds from one map (mmdet's
    # ViTDet SimpleFPN) was refused for listing 4 where the backbone gives 1
    import torch.nn as nn
    from mmdet.registry import MODELS

    class OneMapPyramid(nn.Module):
        def __init__(self, backbone_channel, in_channels, out_channels, num_outs):
            super().__init__()
            self.ups = nn.ModuleList(nn.Conv2d(backbone_channel, c, 1) for c in in_channels)
            self.outs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
            self.pooled = num_outs - len(in_channels)

        def forward(self, x):
            outs = [o(u(x[-1])) for u, o in zip(self.ups, self.outs)]
            return tuple(outs + [nn.functional.max_pool2d(outs[-1], 1, 2)] * self.pooled)
    MODELS.register_module(module=OneMapPyramid, force=True)
    one = load_config(str(COCO_DEMO))
    init_scope(one)
    one.model.backbone.out_indices = (3, )
    one.model.neck = dict(type=OneMapPyramid, backbone_channel=one.model.neck.in_channels[-1],
                          in_channels=[8, 16, 32, 64], out_channels=one.model.neck.out_channels, num_outs=5)
    check_model_fits(one)


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
    # the override it names works: a list of one schedule is indexed (param_scheduler.end on a
    # list raised a TypeError), a single dict is not
    from reparam_mm.scope import merge_cfg_options
    for schedules, key in (([dict(cfg.param_scheduler[-1])], 'param_scheduler.0.end'),
                           (dict(cfg.param_scheduler[-1]), 'param_scheduler.end')):
        cfg.param_scheduler = schedules
        with mmengine_log() as records:
            warn_schedules_past_the_end(cfg)
            merge_cfg_options(cfg, {key: 60})
            warn_schedules_past_the_end(cfg)
        assert [r.getMessage().rsplit('--cfg-options ', 1)[1] for r in records] == [
            f'{key}=60 fits it to this run.']


def test_a_resume_with_nothing_left_to_train_is_said(tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    main([cfg, '--work-dir', str(tmp_path / 'w')])
    with mmengine_log() as records:
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--resume', '--cfg-options', 'train_cfg.max_iters=1'])
    assert any('the run is at iteration 2, and train_cfg stops at 1, so nothing is left to train'
               in r.getMessage() and r.levelno == logging.WARNING for r in records)


def test_a_resume_that_finds_no_checkpoint_is_said(tmp_path):
    """mmengine logs 'Auto resumed from the latest checkpoint None.' and trains from scratch."""
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    work_dir = tmp_path / 'w'
    said = f'--resume found no checkpoint in {work_dir} (no last_checkpoint file there), so training starts'
    with mmengine_log() as records:
        runner = main([cfg, '--work-dir', str(work_dir), '--resume'])
    assert runner.iter == 1
    assert [r.levelno for r in records if r.getMessage().startswith(said)] == [logging.WARNING]
    with mmengine_log() as records:  # the checkpoint of that run is found: nothing to say
        runner = main([cfg, '--work-dir', str(work_dir), '--resume',
                       '--cfg-options', 'train_cfg.max_iters=2'])
    assert runner.iter == 2 and not any(r.getMessage().startswith(said) for r in records)


def _coco_run(tmp_path):
    """A tiny COCO json (categories person, car) and the demo detector's tools/train.py
    arguments for one iteration on it, both loaders on the json; the classes are to add."""
    from test_tools_test_fuse import make_coco
    root = make_coco(tmp_path / 'coco', n=2)
    data = [f'{loader}.dataset.{key}' for loader in ('train_dataloader', 'val_dataloader')
            for key in (f'data_root={root}', 'ann_file=annotations.json', 'data_prefix.img=val/')]
    return root, [str(COCO_DEMO), '--work-dir', str(tmp_path / 'w'), '--cfg-options', *data,
                  f'val_evaluator.ann_file={root}/annotations.json', 'train_cfg.max_iters=1',
                  'train_cfg.val_interval=1', 'train_dataloader.batch_size=2',
                  'model.roi_head.bbox_head.num_classes=2']


def _classes(*names):
    value = '(' + ','.join(repr(n) for n in names) + ')'
    return [f'{loader}.dataset.metainfo.classes={value}' for loader in ('train_dataloader', 'val_dataloader')]


def test_a_class_the_coco_json_does_not_name_is_refused_before_the_first_iteration(tmp_path):
    """mmdet keeps the classes it finds among the json's categories: 'human' for 'person' trained
    without that label, and the evaluator failed with an IndexError at the first validation."""
    root, common = _coco_run(tmp_path)
    with pytest.raises(ConfigError) as err:  # images with cars remain, so mmdet would train on
        main(common + _classes('persons', 'car'))
    assert str(err.value) == (
        f"train_dataloader: the dataset names 2 classes (persons, car), and only 1 of them are "
        f"categories of {root}/annotations.json; not among them: 'persons' (the nearest: 'person'); "
        "name the classes as the json's categories do (its 'categories' list).")
    runner = main(common + _classes('person', 'car'))
    assert runner.iter == 1 and runner.message_hub.get_scalar('val/coco/bbox_mAP') is not None


def _paint_train_labels(data_root, value):
    """Write ``value`` into a 4x4 corner of every training label map of the tiny demo set (raw
    values: its dataset reads them with reduce_zero_label=True, k -> k - 1, 255 stays 255)."""
    import numpy as np
    from PIL import Image
    files = sorted((data_root / 'annotations/training').glob('*.png'))
    for path in files:
        label = np.array(Image.open(path))
        label[:4, :4] = value
        Image.fromarray(label).save(path)
    return files


def _error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith('error')], err


def test_a_label_past_num_classes_is_refused_before_the_loss_in_one_line(tmp_path, capsys):
    """Raw 6 is 5 after reduce_zero_label, one past the demo's 5 classes: torch's loss failed
    with 'IndexError: Target 5 is out of bounds' (a device-side assert on CUDA)."""
    from reparam_mm.cli import run_tool
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    files = _paint_train_labels(tmp_path / 'data', 6)
    capsys.readouterr()
    assert run_tool(main, [cfg, '--work-dir', str(tmp_path / 'w')]) == 1
    lines, err = _error_lines(capsys)
    assert len(lines) == 1 and 'Traceback' not in err and 'out of bounds' not in err, err[-3000:]
    named = [str(f) for f in files if str(f) in lines[0]]
    assert len(named) == 1, lines[0]
    assert lines[0] == (
        f'error: train_dataloader: the label map {named[0]} holds the value 5, not a class of '
        'model.decode_head, whose num_classes is 5 (labels 0..4) and ignore_index 255; if your '
        "labels count more classes, name them all in the dataset's metainfo.classes and set every "
        'head to their number N (--cfg-options model.decode_head.num_classes=N '
        'model.auxiliary_head.num_classes=N), else map this value to 255 in the label maps.')
    assert not (tmp_path / 'w/iter_1.pth').exists()


def test_labels_at_the_ignore_index_train(tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    _paint_train_labels(tmp_path / 'data', 255)
    runner = main([cfg, '--work-dir', str(tmp_path / 'w')])
    assert runner.iter == 1 and any(type(h).__name__ == 'LabelValuesCheckHook' for h in runner.hooks)


def test_labels_1_to_num_classes_without_reduce_zero_label_name_it(tmp_path):
    """The demo's label maps hold 0 (unlabelled) and 1..5: read without reduce_zero_label, 5 is
    one past the 5 classes, and the fix is reduce_zero_label, not a sixth class. Maps that mark
    unlabelled pixels with a value of their own (CamVid's 11) get the keys that ignore it, all in
    one line: setting the heads alone was refused next for the padding, then for the metric."""
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    no_reduce = 'train_dataloader.dataset.reduce_zero_label=False'
    with pytest.raises(ConfigError) as err:
        main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', no_reduce])
    ignore_5 = ('model.decode_head.ignore_index=5 model.auxiliary_head.ignore_index=5 '
                'model.data_preprocessor.seg_pad_val=5 val_evaluator.ignore_index=5')
    assert re.fullmatch(
        rf'train_dataloader: the label map {re.escape(str(tmp_path))}/data/annotations/training/'
        r'demo_\d{5}\.png holds the value 5, not a class of model\.decode_head, whose num_classes '
        r"is 5 \(labels 0\.\.4\) and ignore_index 255; if the maps hold labels 1\.\.5 with 0 as "
        r"unlabelled \(ADE20K's way\), reduce_zero_label=True in the dataset reads them as 0\.\.4 "
        r'with 0 ignored \(--cfg-options train_dataloader\.dataset\.reduce_zero_label=True\); if 5 '
        r"marks unlabelled pixels \(CamVid's 11\), ignore it: map it to 255 in the label maps, or "
        rf'--cfg-options {re.escape(ignore_5)}; if 0\.\.5 are all classes, that is one class more than '
        r"the heads have: count it \(metainfo\.classes and every head's num_classes\)\.", str(err.value))
    runner = main([cfg, '--work-dir', str(tmp_path / 'w'), '--cfg-options', no_reduce,
                   'val_dataloader.dataset.reduce_zero_label=False', *ignore_5.split()])
    assert runner.iter == 1 and runner.model.decode_head.ignore_index == 5


def test_a_class_no_training_map_holds_in_a_pass_is_said_naming_reduce_zero_label(tmp_path):
    """Maps numbering the classes 0..4 (255 unlabelled) read with the ADE-style base's
    reduce_zero_label=True: 0 became 255 and k k - 1, every value stayed in range, and 'ring'
    (label 4) trained without an example, without a word. Said after one pass of the training
    set; the advice trains every class."""
    import numpy as np
    from PIL import Image
    cfg = tiny_demo_config(tmp_path, max_iters=3)  # 6 images, 2 a batch: a pass in 3 iterations

    def passes(*options):
        with mmengine_log() as records:
            main([cfg, '--work-dir', str(tmp_path / 'w')] + (['--cfg-options', *options] if options else []))
        return [r.getMessage() for r in records if 'after one pass' in r.getMessage()]

    assert passes() == []  # the demo's own maps (1..5, 0 unlabelled) hold every class
    for path in (tmp_path / 'data/annotations').rglob('*.png'):
        raw = np.array(Image.open(path))
        Image.fromarray(np.where(raw == 0, 255, raw - 1).astype(np.uint8)).save(path)
    assert passes() == [
        "train_dataloader: after one pass over the 6 training images, no label map held class "
        "'ring' (label 4): it trains without an example, and its IoU will read 0 or nan; "
        "reduce_zero_label=True reads the maps' 0 as unlabelled and k as k - 1, so maps that number "
        'the classes 0..4 lose their class 0 and never hold label 4: if yours do, set it to False '
        '(--cfg-options train_dataloader.dataset.reduce_zero_label=False, and the same in the '
        'validation and test datasets).']
    assert passes('train_dataloader.dataset.reduce_zero_label=False',
                  'val_dataloader.dataset.reduce_zero_label=False') == []
    assert passes('train_cfg.max_iters=2') == []  # no pass completes: nothing to say


def test_the_class_coverage_of_other_causes_and_processes():
    from reparam_mm.data_checks import TrainLabelCoverage
    coverage = TrainLabelCoverage(('a', 'b', 'c', 'd'), 4)
    coverage.count(_samples([0, 255, 2], [0, 0]))
    assert not coverage.complete and coverage.maps == 2
    assert coverage.warning(2) == (
        "train_dataloader: after one pass over the 2 training images, no label map held 2 of the 4 "
        "classes 'b' (label 1), 'd' (label 3): they train without an example, and their IoU will "
        'read 0 or nan; if the maps number the classes otherwise than metainfo.classes lists them, '
        'make them agree (a class rare and small enough may also be cropped out of every batch).')
    coverage.count(_samples([1, 3]))
    assert coverage.complete and coverage.warning(3) is None
    coverage.count(_samples([9]))  # complete: not read again
    assert coverage.maps == 3


def _samples(*maps, reduce_zero_label=False):
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for i, values in enumerate(maps):
        sample = SegDataSample(metainfo=dict(seg_map_path=f'ann/{i}.png',
                                             reduce_zero_label=reduce_zero_label))
        sample.gt_sem_seg = PixelData(data=torch.tensor(values, dtype=torch.int64).view(1, 1, -1))
        samples.append(sample)
    return samples


def test_the_label_check_of_binary_heads_and_negative_values():
    """mmseg's binary form (one sigmoid output: num_classes=1, or 2 with out_channels=1) reads
    labels 0 and 1; a softmax head of num_classes=2 the same; any negative value but the ignore
    index is refused without the reduce_zero_label advice, as is one past the classes in label maps
    that reduce_zero_label already read."""
    import torch
    from mmseg.models.decode_heads import FCNHead

    from reparam_mm.data_checks import check_label_values, segmentation_heads

    def head(**kw):
        return FCNHead(in_channels=4, channels=4, num_convs=1, **kw)

    sigmoid = dict(loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True))
    segmentor = torch.nn.Module()
    segmentor.decode_head = head(num_classes=1, **sigmoid)
    segmentor.auxiliary_head = torch.nn.ModuleList([head(num_classes=2, out_channels=1, **sigmoid),
                                                    head(num_classes=2)])
    heads = segmentation_heads(segmentor)
    assert [key for key, _ in heads] == ['model.decode_head', 'model.auxiliary_head.0',
                                         'model.auxiliary_head.1']
    assert segmentation_heads(torch.nn.Module()) == []  # a detector has no decode_head
    check_label_values(_samples([0, 1, 1, 255], [0, 0]), heads)
    with pytest.raises(ConfigError, match=r'^train_dataloader: the label map ann/1\.png holds the '
                                          r'value 2, not a class of model\.decode_head, whose '
                                          r'num_classes is 1 \(binary: labels 0 and 1\) and '
                                          r'ignore_index 255; if the maps hold labels 1\.\.2'):
        check_label_values(_samples([0, 1], [0, 2, 2]), heads)
    with pytest.raises(ConfigError) as err:
        check_label_values(_samples([-1, 9, 0, -3, 7, 8, 6, 255]),
                           [('model.decode_head', head(num_classes=4))])
    assert str(err.value) == (
        'train_dataloader: the label map ann/0.png holds the values -3, -1, 6, 7 (and 2 more), not a '
        'class of model.decode_head, whose num_classes is 4 (labels 0..3) and ignore_index 255; if '
        "your labels count more classes, name them all in the dataset's metainfo.classes and set "
        'every head to their number N (--cfg-options model.decode_head.num_classes=N), else map these '
        'values to 255 in the label maps.')
    with pytest.raises(ConfigError, match=r'holds the value 4, .*; if your labels count more classes'):
        # read with reduce_zero_label already: raw 5 on 4 classes is no 1..4 with a background
        check_label_values(_samples([0, 4], reduce_zero_label=True),
                           [('model.decode_head', head(num_classes=4))])


def test_coco_classes_none_of_which_the_json_names_are_one_sentence(tmp_path):
    """With no class among the json's categories mmdet keeps no image and stops building the
    dataset with numpy's 'need at least one array to concatenate'."""
    from reparam_mm.data_checks import check_coco_categories
    from reparam_mm.train import config_from_args, parse_args
    root, common = _coco_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        main(common + _classes('human', 'truck'))
    assert str(err.value) == (
        f'train_dataloader: the dataset names 2 classes (human, truck), and none of them is a category '
        f'of {root}/annotations.json (person, car), so no image is left to train on; name the classes '
        "as the json's categories do (its 'categories' list), e.g. 'person', not 'human'.")
    cfg = config_from_args(parse_args(common + _classes('person', 'truck')))
    init_scope(cfg)
    check_coco_categories(cfg)  # one class found: nothing to say (DatasetClassesCheckHook says it)


def _label_warnings(records):
    return [r.getMessage() for r in records
            if r.levelno == logging.WARNING and 'label maps read hold values' in r.getMessage()]


def test_evaluation_label_maps_the_metric_cannot_score_are_said(tmp_path):
    """Validation label maps read without reduce_zero_label hold 5 on 5 classes: IoUMetric
    would score them low in silence. Validation goes on and says so after the loop, as does
    tools/test.py's runner; a right dataset says nothing."""
    from reparam_mm.apis import run_test
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    wd = tmp_path / 'w'
    with mmengine_log() as records:
        runner = main([cfg, '--work-dir', str(wd), '--cfg-options',
                       'val_dataloader.dataset.reduce_zero_label=False'])
    assert runner.iter == 1
    said = _label_warnings(records)
    assert len(said) == 1 and re.fullmatch(
        rf'val_dataloader: 2 of the 2 label maps read hold values that are neither one of the 5 '
        rf'classes \(0\.\.4\) nor the ignore index 255 \(first: {re.escape(str(tmp_path))}/data/'
        r'annotations/validation/demo_\d{5}\.png: 5\); IoUMetric counts the predictions at those '
        r'pixels but not their labels, so its mIoU reads low; if the maps hold labels 1\.\.5 with 0 '
        r'as unlabelled, set reduce_zero_label=True in the dataset \(--cfg-options '
        r'val_dataloader\.dataset\.reduce_zero_label=True\); if 5 marks unlabelled pixels, set '
        r"every head's ignore_index, model\.data_preprocessor\.seg_pad_val and the metric's "
        r'ignore_index to 5; if 0 is a class, count 5 as one more class or map it to 255 in the label '
        r'maps\.', said[0]), said

    with mmengine_log() as records:
        run_test(cfg, str(wd / 'iter_1.pth'), work_dir=str(tmp_path / 't1'),
                 cfg_options={'test_dataloader.dataset.reduce_zero_label': False})
    said = _label_warnings(records)
    assert len(said) == 1 and said[0].startswith('test_dataloader: 2 of the 2 label maps') \
        and 'test_dataloader.dataset.reduce_zero_label=True' in said[0], said

    with mmengine_log() as records:
        run_test(cfg, str(wd / 'iter_1.pth'), work_dir=str(tmp_path / 't2'))
    assert _label_warnings(records) == []


def test_the_evaluation_label_count_reads_tta_batches_and_other_values():
    """The counter of label maps in evaluation: test-time augmentation batches (one tuple per
    view) count each image once; values other than num_classes get the classes-or-ignore advice."""
    from reparam_mm.data_checks import EvalLabelValues
    counter = EvalLabelValues('test_dataloader', 3, 255, 'test_dataloader.dataset.reduce_zero_label')
    a, b = _samples([0, 1, 2, 255], [0, 7, 9, 255])
    counter.count([(a, b), (a, b)])  # two views of two images
    said = counter.warning()
    assert (counter.seen, counter.bad) == (2, 1)
    assert said == ('test_dataloader: 1 of the 2 label maps read hold values that are neither one '
                    'of the 3 classes (0..2) nor the ignore index 255 (first: ann/1.png: 7, 9); '
                    'IoUMetric counts the predictions at those pixels but not their labels, so its '
                    "mIoU reads low; name every class in the dataset's metainfo.classes, or map "
                    'these values to 255 in the label maps.')
    counter = EvalLabelValues('val_dataloader', 3, 255, 'k')
    counter.count(_samples([0, 1, 2, 11]))  # a value of its own for 'unlabelled'?
    assert counter.warning().endswith(
        "mIoU reads low; name every class in the dataset's metainfo.classes, or map this value to "
        "255 in the label maps; if 11 marks unlabelled pixels, set every head's ignore_index, "
        "model.data_preprocessor.seg_pad_val and the metric's ignore_index to 11.")
    clean = EvalLabelValues('val_dataloader', 3, 255, 'k')
    clean.count(_samples([0, 1, 2, 255]))
    assert clean.warning() is None and clean.seen == 1


def _mmengine_builds(schedulers, stop):
    """Whether mmengine builds every scheduler of ``schedulers`` as the runner does (a missing
    ``end`` set to ``stop``, the run's max_iters), on a one-parameter optimizer; else its error."""
    import copy

    import torch
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS
    optim = OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    try:
        for sched in schedulers:
            sched = copy.deepcopy(dict(sched))
            sched.setdefault('end', stop)
            PARAM_SCHEDULERS.build(sched, default_args=dict(optimizer=optim, epoch_length=3))
    except ValueError as error:
        return str(error)
    return True


def _advice(records):
    return [r.getMessage().split('--cfg-options ')[1].split(' fits it')[0] for r in records
            if '--cfg-options ' in r.getMessage()]


@pytest.mark.timeout(60)
def test_the_schedule_advice_for_a_run_shorter_than_the_warm_up_is_one_mmengine_takes():
    """max_iters=2 on the demo: the advice fitted LinearLR 0..20 and PolyLR 20..600 both to end=2,
    and mmengine refused PolyLR 20..2 after building the runner and the datasets. A scheduler
    that begins past the end now moves its begin with the warm-up's end, where the run has room."""
    from reparam_mm.scope import merge_cfg_options
    from reparam_mm.train import check_param_schedulers, parse_args
    base = load_config(str(PLAIN_DEMO))
    init_scope(base)
    both = 'param_scheduler.0.end=2 param_scheduler.1.begin=2 param_scheduler.1.end={}'
    for stop, expected in ((2, ['param_scheduler.0.end=2']),  # no room for both: the poly waits
                           (10, [both.format(10)]), (20, [both.format(20)]),
                           (300, ['param_scheduler.1.end=300'])):  # past the warm-up: the poly's end alone
        cfg = base.copy()
        cfg.param_scheduler = [dict(s) for s in base.param_scheduler]
        cfg.train_cfg = dict(base.train_cfg, max_iters=stop)
        with mmengine_log() as records:
            warn_schedules_past_the_end(cfg)
        assert _advice(records) == expected, [r.getMessage() for r in records]
        if stop == 2:
            assert records[-1].getMessage() == (
                'param_scheduler PolyLR begins at iteration 20, after training ends (iteration 2, '
                'train_cfg.max_iters), so it never starts, and fitting its end alone would put it '
                'at or before its begin, which mmengine refuses; in a run this short it changes '
                'nothing, so leave it as it is, or train past iteration 20.')
            assert records[-1].levelno == logging.INFO  # nothing to do: not a warning
        merge_cfg_options(cfg, parse_args(['c.py', '--cfg-options', *expected[0].split()]).cfg_options)
        check_param_schedulers(cfg)
        assert _mmengine_builds(cfg.param_scheduler, stop) is True  # mmengine takes the advice
        with mmengine_log() as records:
            warn_schedules_past_the_end(cfg)
        assert [r.getMessage() for r in records if '--cfg-options' in r.getMessage()] == []


@pytest.mark.timeout(120)
def test_a_scheduler_ending_at_or_before_its_begin_is_one_sentence_before_the_runner(tmp_path, monkeypatch):
    """The old advice applied (param_scheduler.1.end=2 on PolyLR 20..600) ended in mmengine's
    'end should be larger than begin' traceback after the runner and datasets were built."""
    import reparam_mm.train
    from reparam_mm.train import check_param_schedulers
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built before the schedulers were checked'))
    with pytest.raises(ConfigError) as err:
        main([str(PLAIN_DEMO), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'train_cfg.max_iters=2',
              'param_scheduler.0.end=2', 'param_scheduler.1.end=2'])
    assert str(err.value) == (
        'param_scheduler.1 (PolyLR) begins at iteration 20 and ends at iteration 2, not past its '
        'begin, which mmengine refuses; it begins after training ends (iteration 2), so it never '
        'starts and any end past 20 does: set param_scheduler.1.end past 20 (or leave out an '
        '--cfg-options param_scheduler.1.end that put it there), or train past iteration 20.')
    cfg = load_config(str(PLAIN_DEMO))
    init_scope(cfg)
    check_param_schedulers(cfg)  # as shipped

    def verdict(schedulers, loop=dict(type='IterBasedTrainLoop', max_iters=10)):
        """(our check passes, mmengine builds them) for ``schedulers`` under ``loop``."""
        cfg.param_scheduler, cfg.train_cfg = schedulers, loop
        try:
            check_param_schedulers(cfg)
            ours = True
        except ConfigError as error:
            ours = str(error)
        stop = loop.get('max_epochs', loop.get('max_iters'))
        return ours, _mmengine_builds(schedulers if isinstance(schedulers, list) else [schedulers], stop)

    poly = dict(type='PolyLR', by_epoch=False, eta_min=0.0)
    # mmengine's defaults: begin 0, end the run's (in the scheduler's unit); both taken
    for schedulers in ([dict(poly)], [dict(poly, begin=3)], dict(poly, begin=2, end=8),
                       [dict(type='LinearLR', start_factor=0.1, begin=0, end=2),  # by_epoch default
                        dict(type='CosineAnnealingLR', begin=2, T_max=10, convert_to_iter_based=True)]):
        loop = dict(max_epochs=12) if isinstance(schedulers, list) and len(schedulers) == 2 else \
            dict(type='IterBasedTrainLoop', max_iters=10)
        assert verdict(schedulers, loop) == (True, True)
    # and refused as mmengine refuses them, naming the entry and the fix
    ours, theirs = verdict([dict(poly, begin=12)])  # no end: it ends with the run, at 10
    assert theirs.startswith('end should be larger than begin') and ours == (
        'param_scheduler.0 (PolyLR) begins at iteration 12 and has no end, so mmengine ends it '
        'with training (train_cfg.max_iters) at iteration 10, not past its begin, which mmengine '
        'refuses; it begins after training ends (iteration 10), so it never starts and any end past '
        '12 does: set param_scheduler.0.end past 12 (or leave out an --cfg-options '
        'param_scheduler.0.end that put it there), or train past iteration 12.')
    ours, theirs = verdict(dict(poly, begin=5, end=5))  # one dict: its key has no index
    assert theirs.startswith('end should be larger than begin') and ours == (
        'param_scheduler (PolyLR) begins at iteration 5 and ends at iteration 5, not past its begin, '
        'which mmengine refuses; set param_scheduler.end past 5 (e.g. --cfg-options '
        'param_scheduler.end=10, the end of training).')
    ours, theirs = verdict([dict(type='LinearLR', start_factor=0.1, begin=0, end=2),
                            dict(type='CosineAnnealingLR', begin=4, end=3, T_max=10,
                                 convert_to_iter_based=True)], dict(max_epochs=12))
    assert theirs.startswith('end should be larger than begin') and ours.startswith(
        'param_scheduler.1 (CosineAnnealingLR) begins at epoch 4 and ends at epoch 3, not past its '
        'begin, which mmengine refuses; set param_scheduler.1.end past 4 (e.g. --cfg-options '
        'param_scheduler.1.end=12, the end of training).')
    ours, theirs = verdict([dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
                            dict(poly, begin=20, end=8)])  # a warm-up before it, room to fit both
    assert theirs.startswith('end should be larger than begin') and ours.endswith(
        '; --cfg-options param_scheduler.0.end=2 param_scheduler.1.begin=2 param_scheduler.1.end=10 '
        'fits it and the LinearLR before it into this run, or train past iteration 20 '
        '(train_cfg.max_iters) and end it past that.')
