"""The configs of the real-data runs (CamVid table, coco128 detection) load, build what their
names say, and the CamVid study's printed commands reproduce the configs it trains."""
import json
import shlex

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict

import reparam_mm  # noqa: F401
from conftest import ROOT, load_tool
from reparam_mm.layers import DOConv2d
from reparam_mm.train import config_from_args, parse_args

study = load_tool('camvid_study')
det_study = load_tool('coco128_study')
COCO128 = ('configs/demo/'
           'faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-400i_coco128-person-320.py')


def build_meta(cfg):
    from mmengine.registry import MODELS, DefaultScope
    with DefaultScope.overwrite_default_scope(cfg.default_scope), torch.device('meta'):
        return MODELS.build(ConfigDict(cfg.model.to_dict()))


def _kxk(m):
    return isinstance(m, nn.Conv2d) and not isinstance(m, DOConv2d) and m.kernel_size != (1, 1)


def doconv_split(model):
    """(DO-Conv layers in the backbone, outside it, plain k x k convs outside it)."""
    named = dict(model.named_modules())
    inside = [n for n, m in named.items() if n.startswith('backbone.') and isinstance(m, DOConv2d)]
    outside = [n for n, m in named.items()
               if not n.startswith(('backbone', 'data_preprocessor')) and isinstance(m, DOConv2d)]
    plain_out = [n for n, m in named.items()
                 if not n.startswith(('backbone', 'data_preprocessor')) and _kxk(m)]
    return inside, outside, plain_out


@pytest.mark.parametrize('variant', list(study.VARIANTS))
def test_camvid_variant_builds_with_doconv_where_its_name_says(variant):
    cfg = study.row_config(variant, seed=3, iters=40)
    assert cfg.param_scheduler[0].end == study.WARMUP_ITERS
    assert cfg.randomness.seed == 3 and cfg.train_cfg.max_iters == 40
    assert cfg.param_scheduler[1].end == 40 and cfg.train_cfg.val_interval == 40
    assert cfg.model.decode_head.num_classes == 11
    model = build_meta(cfg)
    inside, outside, plain_out = doconv_split(model)
    backbone_on = 'doconv-backbone' in variant or 'doconv-both' in variant
    heads_on = 'doconv-heads' in variant or 'doconv-both' in variant
    assert bool(inside) == backbone_on, inside
    assert bool(outside) == heads_on, outside
    if heads_on:
        assert not plain_out, plain_out
    assert type(model.backbone).__name__ == (
        'RepLKNet' if variant.startswith('replknet') else
        'EfficientNetLite' if variant.startswith('effl0') else  # WithDOConv keeps the class
        'DOResNetV1c' if backbone_on else 'ResNetV1c')


def test_camvid_r18_and_replknet_tiny_have_the_same_width():
    r18 = build_meta(study.row_config('r18-plain')).backbone
    replk = build_meta(study.row_config('replknet-tiny-plain')).backbone
    x = torch.empty(1, 3, 128, 128, device='meta')
    assert [f.shape[1] for f in r18(x)] == [f.shape[1] for f in replk(x)] == [16, 32, 64, 128]


@pytest.mark.parametrize('variant', ['r18-doconv-both', 'replknet-tiny-plain'])
def test_printed_command_trains_the_same_config(variant):
    argv = shlex.split(study.row_command(variant, 1, 500, 'data/cv'))
    assert argv[:2] == ['python', 'tools/train.py']
    argv[2] = str(ROOT / argv[2])
    from_command = config_from_args(parse_args(argv[2:]))
    direct = study.row_config(variant, 1, 500, 'data/cv')
    assert from_command.model == direct.model
    assert from_command.train_dataloader == direct.train_dataloader
    assert from_command.randomness == direct.randomness == {'seed': 1}


def test_loader_workers_are_an_option_of_the_row_and_of_its_printed_command():
    assert study.row_config('r18-plain').train_dataloader.num_workers == 0  # 2 cores: main process
    cfg = study.row_config('r18-plain', workers=6)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert loader.num_workers == 6 and loader.persistent_workers is True
    argv = shlex.split(study.row_command('r18-plain', 0, 500, workers=6))
    argv[2] = str(ROOT / argv[2])
    assert config_from_args(parse_args(argv[2:])).train_dataloader == cfg.train_dataloader


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp picks AmpOptimWrapper on a GPU')
def test_amp_rows_train_under_bf16_and_their_command_says_so():
    assert study.row_config('r18-plain').optim_wrapper.type == 'OptimWrapper'
    cfg = study.row_config('r18-plain', amp=True)
    assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper'
    argv = shlex.split(study.row_command('r18-plain', 0, 500, amp=True))
    assert argv[3] == '--amp'
    argv[2] = str(ROOT / argv[2])
    assert config_from_args(parse_args(argv[2:])).optim_wrapper == cfg.optim_wrapper


def test_unknown_variant_is_named():
    with pytest.raises(KeyError, match="unknown CamVid study variant 'r19'.*r18-plain"):
        study.row_options('r19', 0, 10, 'data')


def test_results_table_means_over_seeds_in_variant_order():
    def row(variant, seed, miou):
        return dict(variant=variant, seed=seed, mIoU=miou, aAcc=80.0 + seed, train_params=2.5e6,
                    train_seconds=100.0 + seed)
    table = study.results_table([row('replknet-tiny-plain', 0, 30.0), row('r18-plain', 1, 36.0),
                                 row('r18-plain', 0, 34.0)]).splitlines()
    assert len(table) == 4
    assert table[2] == '| r18-plain | 35.00 ± 1.41 (s0 34.00, s1 36.00) | 80.50 | 2.50 M | 100 |'
    assert table[3].startswith('| replknet-tiny-plain | 30.00 (s0 30.00) |')


def test_coco128_person_config_builds_doconv_everywhere_and_reads_the_official_json(shared_data):
    cfg = Config.fromfile(str(ROOT / COCO128))
    model = build_meta(cfg)
    inside, outside, plain_out = doconv_split(model)
    assert type(model.backbone).__name__ == 'DOResNet' and model.backbone.depth == 18
    assert len(inside) == 16 and not plain_out  # 8 BasicBlocks x 2 convs; FPN / RPN / box head
    assert any(n.startswith('neck.') for n in outside)
    assert any(n.startswith('rpn_head.') for n in outside)
    assert any(n.startswith('roi_head.') for n in outside)

    from mmdet.registry import DATASETS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        ds_cfg = cfg.train_dataloader.dataset.to_dict()
        ds_cfg['data_root'] = str(shared_data / 'coco128')
        dataset = DATASETS.build(ds_cfg)
        sample = dataset[0]
    assert len(dataset) == 61  # the coco128 images with a person; the others are filtered
    assert dataset.metainfo['classes'] == ('person', ) and model.roi_head.bbox_head.num_classes == 1
    assert (sample['data_samples'].gt_instances.labels == 0).all()
    assert max(sample['inputs'].shape[1:]) <= 512 and min(sample['inputs'].shape[1:]) <= 320
    assert cfg.val_evaluator.ann_file.endswith('coco128/annotations/instances_train2017.json')


def test_study_trains_a_row_and_reports_it(shared_data, tmp_path, capsys):
    """The study's own path end to end on a 4-image CamVid subset, 21 iterations: the result
    file, a kept row on re-run, and the table."""
    from reparam_mm.datasets import convert_camvid
    data = tmp_path / 'cv'
    convert_camvid(shared_data / 'camvid', data, limit=4)
    out = tmp_path / 'study'
    with pytest.raises(SystemExit):  # said by the parser, before any folder is made
        study.main(['--iters', '20', '--data-root', str(data), '--out-dir', str(tmp_path / 'early')])
    assert '--iters 20: the CamVid configs warm up for 20 iterations; train more than that' in \
        capsys.readouterr().err
    assert not (tmp_path / 'early').exists()
    args = ['--variants', 'r18-doconv-heads', '--seeds', '5', '--iters', '21',
            '--data-root', str(data), '--out-dir', str(out)]
    assert study.main(args) == 0
    result = study.load_results(out)
    assert len(result) == 1 and result[0]['variant'] == 'r18-doconv-heads'
    assert result[0]['seed'] == 5 and result[0]['iters'] == 21 and result[0]['fused_modules'] > 0
    assert 0 <= result[0]['mIoU'] <= 100
    assert result[0]['command'] == study.row_command('r18-doconv-heads', 5, 21, data,
                                                     work_dir=out / 'r18-doconv-heads_seed5_21i')
    assert not (out / 'r18-doconv-heads_seed5_21i' / 'claim.pid').exists()  # released when done
    capsys.readouterr()
    assert study.main(args) == 0  # finished rows are kept, not retrained
    printed = capsys.readouterr().out
    assert 'r18-doconv-heads_seed5_21i: done before, kept' in printed
    assert '| r18-doconv-heads |' in (out / 'table_21i.md').read_text()


def test_effl0_camvid_class_weights_are_the_train_labels_median_frequency(shared_data, tmp_path):
    from reparam_mm.datasets import camvid_class_weights, convert_camvid
    convert_camvid(shared_data / 'camvid', tmp_path, splits=('train', ))
    cfg = study.row_config('effl0-plain')
    want = [round(w, 3) for w in camvid_class_weights(tmp_path)]
    assert cfg.class_weight == want
    assert cfg.model.decode_head.loss_decode.class_weight == want
    assert cfg.model.auxiliary_head.loss_decode.class_weight == want


def test_paired_table_compares_each_doconv_row_with_its_plain_row_seed_by_seed():
    rows = [dict(variant=v, seed=s, mIoU=m) for v, s, m in [
        ('effl0-plain', 0, 60.0), ('effl0-plain', 1, 62.0), ('effl0-doconv-both', 0, 61.0),
        ('effl0-doconv-both', 1, 61.5), ('effl0-doconv-both', 2, 70.0), ('r18-plain', 0, 30.0)]]
    assert study.baseline_of('effl0-doconv-heads') == 'effl0-plain'
    table = study.paired_table(rows).splitlines()
    assert len(table) == 3  # seed 2 has no plain row; r18 has no DO-Conv row
    assert table[2] == ('| effl0-doconv-both − effl0-plain | +0.25 ± 1.06 (s0 +1.00, s1 -0.50) '
                        '| 1 of 2 |')


def test_claimed_rows_are_shared_and_a_dead_owner_is_replaced(tmp_path):
    import os
    row = tmp_path / 'row'
    assert study.claim_row(row)
    assert (row / 'claim.pid').read_text() == str(os.getpid())
    assert not study.claim_row(row)  # held by a live process (this one)
    (row / 'claim.pid').write_text('999999999')  # no such process
    assert study.claim_row(row) and (row / 'claim.pid').read_text() == str(os.getpid())


@pytest.mark.parametrize('variant', list(det_study.VARIANTS))
def test_coco128_split_variant_builds_on_pretrained_effl0(variant):
    cfg = det_study.row_config(variant, seed=2, iters=60)
    assert cfg.randomness.seed == 2 and cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == 60
    assert cfg.param_scheduler[1].T_max == 60 - det_study.WARMUP_ITERS
    assert cfg.param_scheduler[1].end == 60
    assert cfg.train_dataloader.dataset.ann_file == 'data/coco128_split/instances_train.json'
    assert cfg.val_evaluator.ann_file == 'data/coco128_split/instances_val.json'
    model = build_meta(cfg)
    inside, outside, plain_out = doconv_split(model)
    assert type(model.backbone).__name__ == 'EfficientNetLite'
    assert model.roi_head.bbox_head.num_classes == 1 and cfg.classes == ('person', )
    if variant == 'effl0-plain':
        assert not inside and not outside
    else:
        assert len(inside) == 17 and not plain_out  # 16 depthwise + the stem; all heads DO-Conv
        assert {n.split('.')[0] for n in outside} == {'neck', 'rpn_head', 'roi_head'}


def test_coco128_printed_command_trains_the_same_config():
    argv = shlex.split(det_study.row_command('effl0-doconv-both', 1, 400))
    argv[2] = str(ROOT / argv[2])
    from_command = config_from_args(parse_args(argv[2:]))
    direct = det_study.row_config('effl0-doconv-both', 1, 400)
    assert from_command.model == direct.model and from_command.param_scheduler == direct.param_scheduler
    with pytest.raises(KeyError, match="unknown coco128 study variant 'x'"):
        det_study.row_options('x', 0, 400)
    with pytest.raises(ValueError, match='warm up for 50 iterations'):
        det_study.row_options('effl0-plain', 0, 50)


def test_coco128_study_refuses_a_run_shorter_than_the_warm_up_before_making_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        det_study.main(['--iters', '50', '--out-dir', str(tmp_path / 'study')])
    assert '--iters 50: the coco128 configs warm up for 50 iterations' in capsys.readouterr().err
    assert not (tmp_path / 'study').exists()


def test_coco128_results_table_and_paired_line():
    def row(variant, seed, m):
        return dict(variant=variant, seed=seed, bbox_mAP=m, bbox_mAP_50=3 * m, bbox_mAP_75=m / 2,
                    train_params=4.0e6, train_seconds=600.0)
    table = det_study.results_table([row('effl0-plain', 0, 10.0), row('effl0-plain', 1, 12.0),
                                     row('effl0-doconv-both', 1, 11.0)]).splitlines()
    assert table[2] == '| effl0-plain | 11.0 ± 1.4 (s0 10.0, s1 12.0) | 33.0 | 5.5 | 4.00 M | 600 |'
    assert table[3].startswith('| effl0-doconv-both | 11.0 (s1 11.0) |')
    assert table[-1] == 'effl0-doconv-both − effl0-plain, paired by seed: -1.0 mAP (s1 -1.0)'


def _finished_runner(metrics, name):
    """What a study reads from a finished run: mmengine's message hub after validation (filled
    by mmengine's own RuntimeInfoHook), the FusedEvalHook's report and the model."""
    from types import SimpleNamespace

    from mmengine.hooks import RuntimeInfoHook
    from mmengine.logging import MessageHub

    from reparam_mm.hooks import FusedEvalHook
    runner = SimpleNamespace(message_hub=MessageHub.get_instance(name), hooks=[FusedEvalHook()],
                             model=nn.Linear(3, 2))
    runner.hooks[0].last_report = SimpleNamespace(total=17)
    RuntimeInfoHook().after_val_epoch(runner, metrics=metrics)
    return runner


def test_study_rows_read_the_metrics_where_mmengine_puts_them(tmp_path, monkeypatch):
    det = _finished_runner({'coco/bbox_mAP': 0.057, 'coco/bbox_mAP_50': 0.165,
                            'coco/bbox_mAP_75': 0.012}, 'det-study-row')
    monkeypatch.setattr(det_study, 'train', lambda cfg: det)
    (tmp_path / 'det').mkdir()  # the study's claim makes it before training
    (tmp_path / 'seg').mkdir()
    r = det_study.run_row('effl0-doconv-both', 1, 400, tmp_path / 'det')
    assert (r['bbox_mAP'], r['bbox_mAP_50'], r['bbox_mAP_75']) == pytest.approx((5.7, 16.5, 1.2))
    assert r['fused_modules'] == 17 and r['train_params'] == 8
    assert det_study.load_results(tmp_path) == [r]

    seg = _finished_runner({'mIoU': 61.6, 'aAcc': 90.1, 'mAcc': 75.0}, 'seg-study-row')
    monkeypatch.setattr(study, 'train', lambda cfg: seg)
    r = study.run_row('effl0-plain', 2, 600, 'data/cv', tmp_path / 'seg')
    assert (r['mIoU'], r['aAcc'], r['mAcc'], r['seed']) == (61.6, 90.1, 75.0, 2)


def _command_config(command):
    """The config ``tools/train.py`` trains with a row's recorded ``command``."""
    argv = shlex.split(command)
    assert argv[:2] == ['python', 'tools/train.py']
    argv[2] = str(ROOT / argv[2])
    return config_from_args(parse_args(argv[2:]))


def test_a_rows_recorded_command_is_the_exact_line_it_trained_with(tmp_path, monkeypatch):
    """--data-root /tmp/... and --out-dir were recorded as the default data root and no work dir:
    the line in result.json trained something else, somewhere else."""
    seg = _finished_runner({'mIoU': 50.0, 'aAcc': 80.0, 'mAcc': 60.0}, 'seg-study-command')
    trained = []
    monkeypatch.setattr(study, 'train', lambda cfg: trained.append(cfg) or seg)
    work_dir = tmp_path / 'seg'
    work_dir.mkdir()
    r = study.run_row('r18-plain', 0, 25, tmp_path / 'cv', work_dir, workers=2)
    cfg = _command_config(r['command'])
    assert cfg.work_dir == trained[0].work_dir == str(work_dir)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == trained[0][loader].dataset.data_root == \
            str(tmp_path / 'cv')
        assert cfg[loader].num_workers == 2
    det = _finished_runner({'coco/bbox_mAP': 0.1, 'coco/bbox_mAP_50': 0.2,
                            'coco/bbox_mAP_75': 0.05}, 'det-study-command')
    monkeypatch.setattr(det_study, 'train', lambda cfg: trained.append(cfg) or det)
    (tmp_path / 'det').mkdir()
    r = det_study.run_row('effl0-plain', 1, 60, tmp_path / 'det')
    assert _command_config(r['command']).work_dir == trained[-1].work_dir == str(tmp_path / 'det')


def _finished_row(out, iters, amp=False, variant='r18-plain'):
    row = out / f'{variant}_seed0_{iters}i'
    row.mkdir(parents=True)
    (row / 'result.json').write_text(json.dumps(dict(
        variant=variant, seed=0, iters=iters, amp=amp, mIoU=40.0, aAcc=80.0, train_params=1e6,
        train_seconds=10.0, bbox_mAP=1.0, bbox_mAP_50=2.0, bbox_mAP_75=0.5)))


def test_report_only_without_rows_says_what_the_folder_holds(tmp_path, capsys):
    """Rows of another --iters printed bare headers and wrote an empty table_500i.md; a missing
    --out-dir was created, with an empty table in it."""
    out = tmp_path / 'study'
    _finished_row(out, 25)
    assert study.main(['--report-only', '--out-dir', str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f'error: no rows of 500 iterations in {out}; it holds rows of 25 iterations: pass --iters 25.']
    assert not (out / 'table_500i.md').exists()
    assert study.main(['--report-only', '--out-dir', str(out), '--iters', '25', '--amp']) == 1
    assert capsys.readouterr().err.strip() == (f'error: the rows of 25 iterations in {out} were '
                                               'trained without --amp: leave out --amp.')
    assert study.main(['--report-only', '--out-dir', str(out), '--iters', '25']) == 0
    assert '| r18-plain | 40.00 (s0 40.00) |' in (out / 'table_25i.md').read_text()
    missing = tmp_path / 'nowhere'
    assert det_study.main(['--report-only', '--out-dir', str(missing)]) == 1
    assert capsys.readouterr().err.strip() == (
        f'error: {missing} does not exist; pass the --out-dir the rows were trained into (or '
        'train them: leave out --report-only).')
    assert not missing.exists()
    _finished_row(tmp_path / 'det', 60, variant='effl0-plain')
    _finished_row(tmp_path / 'det', 100, variant='effl0-doconv-both')
    assert det_study.main(['--report-only', '--out-dir', str(tmp_path / 'det')]) == 1
    assert 'it holds rows of 60, 100 iterations: pass --iters with one of them.' in \
        capsys.readouterr().err
    assert list((tmp_path / 'det').glob('table_*')) == []


def test_a_finished_row_keeps_no_claim(tmp_path):
    """claim.pid stayed in every finished row folder: the row is known by its result.json."""
    def train_row(variant, seed, work_dir):
        assert (work_dir / 'claim.pid').exists()  # held while training
        (work_dir / 'result.json').write_text('{}')
        return {}
    study.train_rows(tmp_path, ['r18-plain'], [0], 25, train_row, lambda r: 'done')
    row = tmp_path / 'r18-plain_seed0_25i'
    assert (row / 'result.json').exists() and not (row / 'claim.pid').exists()

    def fails(variant, seed, work_dir):
        raise RuntimeError('stopped')
    with pytest.raises(RuntimeError):
        study.train_rows(tmp_path, ['r18-doconv-heads'], [0], 25, fails, lambda r: '')
    assert not (tmp_path / 'r18-doconv-heads_seed0_25i' / 'claim.pid').exists()
    other = tmp_path / 'r18-doconv-both_seed0_25i'  # another live process's claim is left alone
    other.mkdir()
    (other / 'claim.pid').write_text('1')
    study.release_row(other)
    assert (other / 'claim.pid').read_text() == '1'
