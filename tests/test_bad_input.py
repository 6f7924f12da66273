"""Bad input, tried as a new user would: a truncated checkpoint and a missing data root are
one sentence naming the file and the fix, through every tool that reads them."""
import pytest
import torch

import reparam_mm  # noqa: F401
from conftest import ROOT, load_tool
from reparam_mm.checkpoint import CheckpointReadError, load_checkpoint_strict
from reparam_mm.scope import load_config
from test_fuse import _nested
from test_tools_test_fuse import det_config, make_ade, make_coco, seg_config, write_case
from test_train_tools import tiny_demo_config


def truncated_copy(path, out):
    """``path`` cut to half its size, as an interrupted copy or download leaves it."""
    data = open(path, 'rb').read()
    out.write_bytes(data[:len(data) // 2])
    return str(out)


def _assert_one_sentence(err, path):
    msg = str(err.value)
    assert msg.startswith(f'checkpoint {path} is truncated (') and msg.count('. ') == 0, msg
    assert 'copy or download it again' in msg and msg.endswith('.'), msg
    assert 'PytorchStreamReader' not in msg
    assert err.value.__cause__ is None and err.value.__context__ is None  # no torch traceback


def test_truncated_checkpoint_is_one_sentence_for_the_strict_loader(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save(dict(state_dict=_nested().state_dict()), good)
    bad = truncated_copy(good, tmp_path / 'cut.pth')
    with pytest.raises(CheckpointReadError) as err:
        load_checkpoint_strict(_nested(), bad)
    _assert_one_sentence(err, bad)
    legacy = tmp_path / 'legacy.pth'  # torch's pickle format (before 1.6, still written by some)
    torch.save(dict(state_dict=_nested().state_dict()), legacy, _use_new_zipfile_serialization=False)
    bad = truncated_copy(legacy, tmp_path / 'legacy_cut.pth')
    with pytest.raises(CheckpointReadError) as err:
        load_checkpoint_strict(_nested(), bad)
    _assert_one_sentence(err, bad)
    assert 'its data ends early' in str(err.value)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointReadError, match=r'empty\.pth is empty \(0 bytes\)'):
        load_checkpoint_strict(_nested(), str(empty))
    page = tmp_path / 'page.pth'  # what a failed download often saves
    page.write_text('<!DOCTYPE html><html>Access denied</html>')
    with pytest.raises(CheckpointReadError, match=r"page\.pth is not a PyTorch checkpoint "
                                                  r"\(it starts with b'<!DO'\)"):
        load_checkpoint_strict(_nested(), str(page))


class NotAllowListed:
    """An object the safe unpickler refuses."""


def test_a_sound_file_keeps_torchs_own_error(tmp_path):
    """Only broken files are reworded: the safe unpickler refusing an object still says so."""
    path = tmp_path / 'object.pth'
    torch.save(dict(state_dict={}, extra=NotAllowListed()), path)
    with pytest.raises(Exception, match='Weights only load failed') as err:
        load_checkpoint_strict(_nested(), str(path))
    assert not isinstance(err.value, CheckpointReadError)


def test_truncated_checkpoint_in_test_fuse_and_train(tmp_path):
    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade', n=1)))
    bad = truncated_copy(ckpt, tmp_path / 'cut.pth')
    with pytest.raises(CheckpointReadError) as err:  # tools/test.py
        load_tool('test').main([cfg, bad, '--work-dir', str(tmp_path / 'wt')])
    _assert_one_sentence(err, bad)
    with pytest.raises(CheckpointReadError) as err:  # tools/fuse.py (deploy export)
        load_tool('fuse').main([cfg, bad, str(tmp_path / 'deploy'), '--shape', '64', '64'])
    _assert_one_sentence(err, bad)
    assert not (tmp_path / 'deploy').exists()

    from reparam_mm.train import main as train_main
    train_cfg = tiny_demo_config(tmp_path, max_iters=1)
    wd = tmp_path / 'wd'
    train_main([train_cfg, '--work-dir', str(wd)])
    cut = truncated_copy(wd / 'iter_1.pth', tmp_path / 'iter_1_cut.pth')
    with pytest.raises(CheckpointReadError) as err:  # tools/train.py --resume PATH
        train_main([train_cfg, '--work-dir', str(wd), '--resume', cut])
    _assert_one_sentence(err, cut)
    (wd / 'last_checkpoint').write_text(cut)  # --resume alone: mmengine finds and loads it
    with pytest.raises(CheckpointReadError) as err:
        train_main([train_cfg, '--work-dir', str(wd), '--resume'])
    _assert_one_sentence(err, cut)


def test_truncated_pretrained_weights(tmp_path):
    from reparam_mm.backbones import RepLKNet
    good = tmp_path / 'replknet.pth'
    torch.save(RepLKNet(arch='tiny').state_dict(), good)
    bad = truncated_copy(good, tmp_path / 'replknet_cut.pth')
    model = RepLKNet(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=bad))
    with pytest.raises(CheckpointReadError) as err:
        model.init_weights()
    _assert_one_sentence(err, bad)


def test_missing_data_root_names_the_path_and_the_option(tmp_path):
    from reparam_mm.train import main as train_main
    train_cfg = tiny_demo_config(tmp_path)
    missing = tmp_path / 'no_such_data'
    with pytest.raises(FileNotFoundError) as err:
        train_main([train_cfg, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                    f'train_dataloader.dataset.data_root={missing}'])
    assert str(err.value) == (
        f"data root '{missing}' (train_dataloader.dataset.data_root) does not exist: prepare the "
        'dataset there (docs/datasets.md) or pass --cfg-options '
        'train_dataloader.dataset.data_root=PATH.')
    assert not (tmp_path / 'wd').exists()  # stopped before the runner made anything
    import os
    with pytest.raises(FileNotFoundError) as err:  # a relative one: from where the tool ran
        train_main([train_cfg, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                    'train_dataloader.dataset.data_root=data/nowhere'])
    assert str(err.value).startswith(
        "data root 'data/nowhere' (train_dataloader.dataset.data_root, relative to the current "
        f'folder {os.getcwd()}) does not exist: ')

    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade', n=1)))
    with pytest.raises(FileNotFoundError, match=r"data root '.*no_such_data' \(test_dataloader"
                       r"\.dataset\.data_root\) does not exist.*--cfg-options "
                       r'test_dataloader\.dataset\.data_root=PATH\.$'):
        load_tool('test').main([cfg, ckpt, '--work-dir', str(tmp_path / 'wt'), '--cfg-options',
                                f'test_dataloader.dataset.data_root={missing}'])
    (tmp_path / 'ade' / 'annotations' / 'validation').rename(tmp_path / 'labels_elsewhere')
    with pytest.raises(FileNotFoundError, match=r"ade/annotations/validation' \(test_dataloader"
                       r'\.dataset\.data_prefix\.seg_map_path under data_root\) does not exist: '
                       'the dataset at .* is not laid out as the config expects'):
        load_tool('test').main([cfg, ckpt, '--work-dir', str(tmp_path / 'wt')])


def test_a_config_whose_custom_import_fails_is_one_sentence_in_every_tool(tmp_path):
    """mmengine's own message says to set PYTHONPATH, whatever the module; ours names the
    config, the module, why it failed and what to install."""
    cfg = tmp_path / 'needs_missing.py'
    cfg.write_text("custom_imports = dict(imports=['reparam_mm', 'no_such_pkg_xyz.models'], "
                   "allow_failed_imports=False)\ndefault_scope = 'mmseg'\n")
    expected = (rf"^config {cfg} imports no_such_pkg_xyz\.models \(custom_imports\), which fails "
                r"here \(ModuleNotFoundError: No module named 'no_such_pkg_xyz'\); install the "
                r"package that provides no_such_pkg_xyz, or take no_such_pkg_xyz\.models out of "
                r"custom_imports\.$")
    calls = [lambda: load_tool('train').main([str(cfg), '--work-dir', str(tmp_path / 'w')]),
             lambda: load_tool('test').main([str(cfg), str(tmp_path / 'x.pth')]),
             lambda: load_tool('fuse').main([str(cfg), str(tmp_path / 'x.pth'), str(tmp_path / 'd')])]
    for call in calls:
        with pytest.raises(ImportError, match=expected) as err:
            call()
        assert err.value.__cause__ is None and err.value.__suppress_context__


def test_mmpretrain_configs_without_mmpretrain_say_what_to_install():
    try:
        import mmpretrain  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip('mmpretrain imports here')
    with pytest.raises(ImportError, match=r'imports mmpretrain\.models \(custom_imports\).*'
                                          r'torchvision, which must match the installed torch'):
        load_config(str(ROOT / 'configs/mmpretrain/upernet_repvgg-A0_4xb4-160k_ade20k-512x512.py'))


def test_a_run_folder_for_a_checkpoint_names_the_file_to_pass(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'iter_10.pth').write_bytes(b'x')
    (run / 'iter_20.pth').write_bytes(b'x')
    (run / 'last_checkpoint').write_text(str(run / 'iter_20.pth'))
    with pytest.raises(IsADirectoryError, match=rf'^checkpoint {run} is a folder, not a file; pass '
                                                rf'a \.pth file in it, such as the latest, '
                                                rf'{run}/iter_20\.pth\.$'):
        load_checkpoint_strict(_nested(), str(run))


@pytest.mark.parametrize('tool,extra', [('fuse', ['out_dir']), ('export_onnx', ['out.onnx'])])
@pytest.mark.parametrize('shape', [['0', '64'], ['-5', '64'], ['64', 'x']])
def test_a_bad_shape_is_argparses_one_line(tool, extra, shape, capsys):
    with pytest.raises(SystemExit) as err:
        load_tool(tool).parse_args(['c.py', 'c.pth', *extra, '--shape', *shape])
    assert err.value.code == 2
    bad = next(s for s in shape if not s.isdigit() or s == '0')
    assert f"argument --shape: '{bad}' is not an image size; give two positive integers" in \
        capsys.readouterr().err


def test_onnx_export_into_a_folder_is_refused_before_any_work(tmp_path):
    from reparam_mm.export import export_onnx
    with pytest.raises(IsADirectoryError, match=rf'^{tmp_path} is a folder; give the \.onnx file'):
        export_onnx(str(tmp_path / 'never_read.py'), str(tmp_path / 'never_read.pth'), str(tmp_path))


def test_export_honours_and_checks_the_configs_dispatch_setting():
    from mmengine.config import Config

    from reparam_mm.apis import apply_dispatch_setting
    from reparam_mm.cli import input_error_message
    from reparam_mm.layers.large_kernel import active_dispatch_mode, dispatch_mode
    from reparam_mm.scope import ConfigError
    with dispatch_mode('tuned'):
        apply_dispatch_setting(Config(dict(large_dw_dispatch='fixed')))
        assert active_dispatch_mode() == 'fixed'
        apply_dispatch_setting(Config(dict()))  # no setting: the mode stays
        assert active_dispatch_mode() == 'fixed'
        with pytest.raises(ConfigError) as err:
            apply_dispatch_setting(Config(dict(large_dw_dispatch='fxed')))
        assert input_error_message(err.value) == (
            "large_dw_dispatch='fxed' is not a large-kernel dispatch mode: use one of tuned, fixed "
            '(e.g. --cfg-options large_dw_dispatch=fixed), or leave it out (tuned).')
        apply_dispatch_setting(Config(dict(large_dw_dispatch='Tuned')))  # any case, as the env's
        assert active_dispatch_mode() == 'tuned'
    # the environment's value is checked when the tools start, not at the first forward
    with dispatch_mode(None), pytest.MonkeyPatch.context() as env:
        env.setenv('REPARAM_MM_LARGE_DW', 'fast')
        with pytest.raises(ConfigError, match=r"^REPARAM_MM_LARGE_DW='fast' is not a large-kernel "
                                              r'dispatch mode: set it to one of tuned, fixed, or '
                                              r'unset it \(tuned\)\.$'):
            apply_dispatch_setting(Config(dict()), reset=True)


def test_tools_print_an_input_errors_sentence_alone(tmp_path):
    """From the shell: one line and exit status 1; REPARAM_MM_TRACEBACK=1 shows the traceback."""
    import os
    import subprocess
    import sys
    config = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'
    argv = [sys.executable, str(ROOT / 'tools/fuse.py'), str(config), str(tmp_path / 'no.pth'),
            str(tmp_path / 'out')]
    env = {k: v for k, v in os.environ.items() if k != 'REPARAM_MM_TRACEBACK'}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
    lines = [line for line in run.stderr.splitlines() if 'Warning' not in line
             and not line.startswith('  ')]  # library warnings at import
    assert run.returncode == 1 and lines == [
        f'error: checkpoint {tmp_path}/no.pth does not exist; pass the .pth file written by '
        'training (work_dirs/...) or by tools/fuse.py.'], run.stderr
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                         env=dict(env, REPARAM_MM_TRACEBACK='1'))
    assert run.returncode == 1 and 'Traceback (most recent call last)' in run.stderr
    missing = subprocess.run([sys.executable, str(ROOT / 'tools/train.py'), 'configs/nope.py'],
                             capture_output=True, text=True, env=env, timeout=240)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == (
        'error: config configs/nope.py does not exist; pass the path of a config file, e.g. one '
        'under configs/ (docs/configs.md lists them).')


def test_a_misspelt_cfg_option_is_refused_naming_the_key_the_config_has(tmp_path):
    from mmengine.config import Config

    from reparam_mm.scope import ConfigError, merge_cfg_options
    cfg = Config(dict(train_cfg=dict(max_iters=2), custom_hooks=[dict(type='FusedEvalHook')],
                      optim_wrapper=dict(type='AmpOptimWrapper'),
                      model=dict(backbone=dict(arch='tiny', stage_with_dcn=(False,) * 4, dcn=None))))
    for key, has in [('train_cfg.max_iter', 'train_cfg.max_iters'),
                     ('model.backbone.archh', 'model.backbone.arch'),
                     ('custom_hooks.0.tpye', 'custom_hooks.0.type')]:
        with pytest.raises(ConfigError, match=rf'^--cfg-options {key}: the config has no {key}, '
                                              rf'but has {has}; fix the spelling'):
            merge_cfg_options(cfg, {key: 1})
    assert cfg.train_cfg == dict(max_iters=2)  # nothing merged
    # new keys are merged, as mmengine does, related names included (DO-Conv beside DCN, dtype
    # beside type)
    merge_cfg_options(cfg, {'load_from_partial': True, 'model.backbone.init_cfg.type': 'Pretrained',
                            'train_cfg.max_iters': 5, 'model.backbone.stage_with_doconv': (True,) * 4,
                            'model.backbone.doconv_cfg.type': 'DOConv', 'optim_wrapper.dtype': 'bfloat16'})
    assert cfg.load_from_partial and cfg.model.backbone.init_cfg.type == 'Pretrained'
    assert cfg.model.backbone.stage_with_doconv == (True,) * 4
    assert cfg.train_cfg.max_iters == 5


def test_a_cfg_option_without_a_value_is_argparses_one_line(capsys):
    from reparam_mm.train import parse_args
    with pytest.raises(SystemExit) as err:
        parse_args(['c.py', '--cfg-options', 'a=1', 'model.backbone.drop_path_rate'])
    assert err.value.code == 2
    assert ("error: --cfg-options takes KEY=VALUE items; 'model.backbone.drop_path_rate' has no "
            "'=' (write model.backbone.drop_path_rate=VALUE).") in capsys.readouterr().err
    # a dict(...) value, on which mmengine's parser recursed until Python stopped it
    with pytest.raises(SystemExit):
        parse_args(['c.py', '--cfg-options', "train_dataloader.dataset.metainfo=dict(classes=('a','b'))"])
    assert ("a dict(...) value is not read by mmengine's --cfg-options parser; set its fields one "
            'by one, e.g. train_dataloader.dataset.metainfo.FIELD=VALUE') in capsys.readouterr().err
    # and the form it names is read
    args = parse_args(['c.py', '--cfg-options', "train_dataloader.dataset.metainfo.classes=[a,b]"])
    assert args.cfg_options == {'train_dataloader.dataset.metainfo.classes': ['a', 'b']}


def test_registry_errors_from_the_config_are_one_sentence_and_code_errors_are_not():
    from mmengine.registry import MODELS, init_default_scope

    from reparam_mm.cli import input_error_message
    init_default_scope('mmseg')
    with pytest.raises(KeyError) as unknown:
        MODELS.build(dict(type='RepLKNett'))
    assert input_error_message(unknown.value) == (
        "the config names type='RepLKNett', which is not in the mmseg::model registry: fix the "
        'spelling, or import the module that registers it (custom_imports).')
    with pytest.raises(TypeError) as keyword:  # through ResNetV1c's super().__init__(**kwargs)
        MODELS.build(dict(type='ResNetV1c', depth=18, archh='tiny'))
    assert input_error_message(keyword.value) == (
        "ResNet does not take 'archh', which the config (or --cfg-options) gives it: fix or "
        'remove that key (REPARAM_MM_TRACEBACK=1 shows where it was built).')

    def buggy():  # the same TypeError raised by code, not by building a config
        return torch.nn.Conv2d(1, 1, 1, archh='tiny')
    with pytest.raises(TypeError) as code:
        buggy()
    assert input_error_message(code.value) is None
    assert input_error_message(KeyError('no_such_key')) is None


@pytest.mark.parametrize('case', ['auto-scale-lr', 'out-json', 'arch'])
def test_config_errors_end_the_tools_with_their_sentence(tmp_path, capsys, case):
    from reparam_mm.cli import run_tool
    from reparam_mm.train import main as train_main
    if case == 'auto-scale-lr':
        status = run_tool(train_main, [tiny_demo_config(tmp_path), '--auto-scale-lr',
                                       '--work-dir', str(tmp_path / 'w')])
        expected = 'error: --auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config.'
    elif case == 'out-json':
        cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'coco', n=1)))
        status = run_tool(load_tool('test').main, [cfg, ckpt, '--out', str(tmp_path / 'd.json')])
        expected = (f'error: --out {tmp_path}/d.json: detection results are dumped to a pickle '
                    'file; give a path ending in .pkl.')
    else:
        from test_train_tools import DOCONV_REPLKNET_DEMO
        config = tiny_demo_config(tmp_path, base=DOCONV_REPLKNET_DEMO)  # with its data, as a clone lacks it
        status = run_tool(train_main, [config, '--work-dir', str(tmp_path / 'w'),
                                       '--cfg-options', 'model.backbone.arch=tinny'])
        expected = "error: RepLKNet arch 'tinny' is unknown; use one of 31B, 31L, XL, tiny"
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(expected)


def test_training_batchnorm_on_one_image_per_process_names_the_batch_size(tmp_path, capsys):
    """UPerHead's pool scale 1 leaves BatchNorm one value per channel at batch size 1 (torch's
    ValueError, which mmseg's own tool prints as a traceback after the first forward)."""
    from reparam_mm.cli import run_tool
    from reparam_mm.train import main as train_main
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    capsys.readouterr()
    assert run_tool(train_main, [cfg, '--work-dir', str(tmp_path / 'wd'),
                                 '--cfg-options', 'train_dataloader.batch_size=1']) == 1
    # (only the error lines: a logging handler of an earlier test may complain on stderr here)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith('error')] == [
        'error: a BatchNorm layer got one value per channel in training (input size [1, 128, 1, 1]): '
        "one image per process, pooled to 1x1 (as UPerHead / PSPHead's pool scale 1), leaves it "
        'nothing to normalise over; train with at least 2 images per process (--cfg-options '
        'train_dataloader.batch_size=2), or on several GPUs with SyncBN, which normalises over the '
        'images of all processes.']


def test_groupnorm_on_one_value_per_group_names_the_input_size():
    """GroupNorm with one channel per group on one image's 1x1 map (FCOS's head at a small
    export shape) raises torch's ValueError in eval mode too, with the size as a list: the
    tools print what to change instead of a traceback."""
    import torch.nn.functional as F

    from reparam_mm.cli import input_error_message
    with pytest.raises(ValueError) as err:
        F.group_norm(torch.randn(1, 32, 1, 1), 32)
    assert input_error_message(err.value) == (
        'a GroupNorm layer got one value per group (its input, as images x channels per group, '
        'groups, height, width: [1, 32, 1, 1]): a 1x1 feature map of one image with one channel '
        'per group leaves it nothing to normalise over, in eval mode too; use a larger input '
        '(tools/export_onnx.py --shape, tools/benchmark.py --shape, or a larger crop) or more '
        'images per batch.')
    with pytest.raises(ValueError) as err:  # BatchNorm's form keeps its own sentence
        torch.nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))
    assert input_error_message(err.value).startswith('a BatchNorm layer got one value per channel')


def test_own_classes_on_a_dataset_type_with_fixed_classes_name_the_type_to_use():
    """Keeping a shipped config's dataset type (ADE20K, the demo's) with one's own classes: mmengine's
    'new classes ... is not a subset' traceback becomes the fix."""
    from mmseg.datasets import ADE20KDataset

    from reparam_mm.cli import input_error_message
    with pytest.raises(ValueError) as err:
        ADE20KDataset(data_root='/nonexistent', data_prefix=dict(img_path='i', seg_map_path='a'),
                      metainfo=dict(classes=('other', 'road', 'car')), lazy_init=True)
    assert input_error_message(err.value) == (
        "the config gives a dataset the classes ('other', 'road', 'car'), but its type only takes (a "
        'subset of) its own, (wall, building, sky, floor, ...): for a dataset of your own, replace '
        "the type too, e.g. dataset=dict(_delete_=True, type='BaseSegDataset', metainfo=dict("
        'classes=..., palette=...), ...) (mmdet: CocoDataset takes any classes).')


def _tool_error(capsys, tool, argv):
    """The lines ``tools/<tool>.py argv`` writes to stderr through run_tool, and its status."""
    from reparam_mm.cli import run_tool
    main = __import__('reparam_mm.train', fromlist=['main']).main if tool == 'train' else load_tool(tool).main
    status = run_tool(main, argv)
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.timeout(60)
def test_what_is_not_a_config_is_one_sentence_naming_it(tmp_path, capsys):
    """CONFIG and CHECKPOINT swapped ended in mmengine's 'OSError: Only py/yml/yaml/json type are
    supported now!' after 27 lines, a script in a bare RuntimeError, and a folder 'does not exist'."""
    from reparam_mm.scope import ConfigError
    config = str(ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py')
    ckpt = tmp_path / 'iter_600.pth'
    ckpt.write_bytes(b'x')
    from PIL import Image
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    swapped = (f'error: config {ckpt} is a checkpoint, not a config: give the config file first and '
               'the checkpoint after it (tools/test.py CONFIG CHECKPOINT; tools/train.py CONFIG '
               '--resume CHECKPOINT).')
    for tool, argv in (('test', [str(ckpt), config]), ('infer', [str(ckpt), config, str(tmp_path / 'a.png')]),
                       ('train', [str(ckpt)])):
        assert _tool_error(capsys, tool, argv) == (1, [swapped]), tool
    for name in ('model.safetensors', 'weights.bin', 'last.ckpt'):  # missing or not, same sentence
        with pytest.raises(ConfigError, match=rf'^config \S*{name} is a checkpoint, not a config'):
            load_config(str(tmp_path / name))
    assert _tool_error(capsys, 'test', [str(ROOT / 'configs/demo'), str(ckpt)]) == (1, [
        f"error: config {ROOT / 'configs/demo'} is a folder, not a config file; pass a config file "
        f"in it, e.g. {ROOT / 'configs/demo'}/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-"
        '400i_coco128-person-320.py (docs/configs.md lists them).'])
    with pytest.raises(ConfigError, match=r'README\.md is not a config file: mmengine reads configs '
                                          r'ending in \.py, \.json, \.yaml or \.yml; pass one'):
        load_config(str(ROOT / 'README.md'))
    # a script: mmengine reads a .py with imports as a lazy-import config and fails at its first call
    with pytest.raises(ConfigError) as err:
        load_config(str(ROOT / 'tools/demo.py'))
    line = next(i for i, text in enumerate(open(ROOT / 'tools/demo.py'), 1)
                if text.startswith('ROOT = '))
    assert str(err.value) == (
        f"config {ROOT / 'tools/demo.py'} does not read as a config: mmengine reads a .py file that "
        f'imports modules as a lazy-import config, in which line {line} (`ROOT = Path(__file__)'
        '.resolve().parents[1]`) cannot call what it imports; pass a config file, e.g. one under '
        'configs/ (docs/configs.md lists them).')


@pytest.mark.timeout(60)
def test_an_error_in_a_real_config_names_its_file_and_line(tmp_path, capsys):
    """A config's own mistakes keep their cause, and now name the file and the line (a syntax
    error said '<unknown>, line 2'; a missing base, errno 2 on a path, naming no config)."""
    from reparam_mm.scope import ConfigError
    base = tmp_path / 'base.py'
    base.write_text("data_root = 'data/x'\ncrop_size = (64, 64\n")
    child = tmp_path / 'child' / 'mine.py'
    child.parent.mkdir()
    child.write_text("_base_ = ['../base.py']\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(child))
    assert str(err.value) == (f"config {child} has a syntax error at line 2 of {base} (a base it "
                              "reads): '(' was never closed (in `crop_size = (64, 64`); fix it there.")
    assert isinstance(err.value.__cause__, SyntaxError)  # REPARAM_MM_TRACEBACK=1 shows it
    base.write_text("data_root = 'data/x'\nnum_classes = num_class + 1\n")
    with pytest.raises(ConfigError, match=rf"^config {child} fails at line 2 of {base} \(a base it "
                                          r"reads\): NameError: name 'num_class' is not defined "
                                          r'\(in `num_classes = num_class \+ 1`\); fix it there\.$'):
        load_config(str(child))
    child.write_text("_base_ = ['./base.py']\n")
    assert _tool_error(capsys, 'train', [str(child)]) == (1, [
        f"error: config {child} reads {child.parent / 'base.py'} (its _base_), which does not exist; "
        'fix that path in _base_ (it is relative to the folder of the config that names it).'])
    bad = tmp_path / 'bad.json'
    bad.write_text('{"default_scope": "mmseg",')
    with pytest.raises(ConfigError, match=rf'^config {bad} is not valid JSON \(Expecting property '
                                          r'name enclosed in double quotes: line 1 column 27'):
        load_config(str(bad))
    # an error raised in code the config did not run stays what it is
    import reparam_mm.scope as scope
    assert scope._unreadable_config(str(child), ValueError('from elsewhere')) is None


@pytest.mark.timeout(60)
def test_a_cfg_option_on_a_config_files_variable_is_refused_naming_the_keys_to_set(tmp_path, monkeypatch):
    """--cfg-options data_root=data/nope trained on the real data without a word: the file's
    data_root had been copied into the dataloaders when it was read."""
    import copy
    import re

    import reparam_mm.train
    from reparam_mm.scope import ConfigError, merge_cfg_options
    from test_train_tools import PLAIN_DEMO
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built with the override ignored'))
    with pytest.raises(ConfigError) as err:
        reparam_mm.train.main([str(PLAIN_DEMO), '--cfg-options', 'data_root=data/nope'])
    assert str(err.value) == (
        '--cfg-options data_root=data/nope changes nothing: data_root is a variable of the config '
        'file, copied into train_dataloader.dataset.data_root, val_dataloader.dataset.data_root and '
        'test_dataloader.dataset.data_root when the file was read, so set those instead '
        "(docs/datasets.md lists each dataset's): --cfg-options train_dataloader.dataset.data_root="
        'data/nope val_dataloader.dataset.data_root=data/nope test_dataloader.dataset.data_root=data/nope.')
    with pytest.raises(ConfigError, match=r'^--cfg-options crop_size=\[32,32\] changes nothing: .* '
                                          r'--cfg-options model\.data_preprocessor\.size=\[32,32\]\.$'):
        reparam_mm.train.main([str(PLAIN_DEMO), '--cfg-options', 'crop_size=[32,32]'])
    shipped = load_config(str(PLAIN_DEMO))
    cfg = copy.deepcopy(shipped)
    for key, value, keys in [('max_iters', 2, 'train_cfg.max_iters=2'),
                             ('norm_cfg.type', 'SyncBN', 'model.backbone.norm_cfg.type=SyncBN '
                              'model.decode_head.norm_cfg.type=SyncBN '
                              'model.auxiliary_head.norm_cfg.type=SyncBN'),
                             ('num_classes', 6,
                              'model.decode_head.num_classes=6 model.auxiliary_head.num_classes=6'),
                             ('data_preprocessor.size', (32, 32), 'model.data_preprocessor.size=(32,32)'),
                             ('train_pipeline.2.prob', 0.0, 'train_dataloader.dataset.pipeline.2.prob=0.0'),
                             ('vis_backends.0.type', 'TensorboardVisBackend',
                              'visualizer.vis_backends.0.type=TensorboardVisBackend')]:
        with pytest.raises(ConfigError, match=rf'^--cfg-options {re.escape(key)}=\S+ changes nothing: '
                                              rf'.* so set th(at|ose) instead: --cfg-options '
                                              rf'{re.escape(keys)}\.$'):
            merge_cfg_options(cfg, {key: value})
    assert cfg.to_dict() == shipped.to_dict()  # nothing merged
    # the keys the runners and the tools read are merged, as are new keys and a variable whose
    # value the config does not hold elsewhere; crop_size is read by tools/export_onnx.py
    options = {'work_dir': str(tmp_path), 'load_from': 'x.pth', 'resume': True, 'randomness.seed': 1,
               'log_level': 'DEBUG', 'default_scope': 'mmseg', 'visualizer.name': 'v', 'launcher': 'none',
               'env_cfg.cudnn_benchmark': True, 'tta_model.type': 'SegTTAModel', 'crop_size': (32, 32),
               'custom_imports.allow_failed_imports': True, 'log_processor.window_size': 5,
               'test_evaluator.type': 'IoUMetric', 'test_dataloader.batch_size': 1,
               'load_from_partial': True, 'large_dw_dispatch': 'fixed', 'dataset_type_unused': 'x'}
    merge_cfg_options(cfg, options)
    assert cfg.work_dir == str(tmp_path) and cfg.crop_size == (32, 32) and cfg.randomness.seed == 1
    del cfg.model['data_preprocessor']  # mmengine gives a model without one the top-level one
    merge_cfg_options(cfg, {'data_preprocessor.size': (32, 32)})
    assert cfg.data_preprocessor.size == (32, 32)
    cfg.img_ratios = [0.5, 1.0]  # not copied anywhere: nothing tells it is unread, so it is merged
    merge_cfg_options(cfg, {'img_ratios': [1.0]})


@pytest.mark.timeout(60)
def test_an_error_in_a_module_of_custom_imports_stays_what_it_is(tmp_path, monkeypatch):
    """A module of custom_imports opening a missing file was said to be a missing _base_ of the
    config ('fix that path in _base_'), and one with a syntax error 'a base it reads'."""
    from reparam_mm.scope import ConfigError
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / 'opens_missing_labels.py').write_text("open('/nonexistent/labels.txt')\n")
    (tmp_path / 'has_a_syntax_error.py').write_text('x = (1,\n')
    for module, error in (('opens_missing_labels', FileNotFoundError), ('has_a_syntax_error', SyntaxError)):
        config = tmp_path / f'imports_{module}.py'
        config.write_text(f"custom_imports = dict(imports=['{module}'], allow_failed_imports=False)\n"
                          "default_scope = 'mmseg'\n")
        with pytest.raises(error) as err:
            load_config(str(config))
        assert not isinstance(err.value, ConfigError) and err.value.__cause__ is None, err.value
        assert (err.value.filename == '/nonexistent/labels.txt' if error is FileNotFoundError
                else err.value.filename == str(tmp_path / 'has_a_syntax_error.py'))
    # the config's and its bases' own errors keep their sentences, missing JSON and mmseg:: bases
    # included (mmengine's 'file "..." does not exist' named no config)
    child = tmp_path / 'child.py'
    child.write_text("_base_ = ['./nothing_here.json']\n")
    with pytest.raises(ConfigError, match=rf"^config {child} reads {tmp_path}/nothing_here\.json "
                                          r'\(its _base_\), which does not exist; fix that path'):
        load_config(str(child))
    child.write_text("_base_ = ['mmseg::_base_/datasets/no_such_set.py']\n")
    with pytest.raises(ConfigError, match=rf'^config {child} reads mmseg::_base_/datasets/no_such_set'
                                          r'\.py \(its _base_\), which the installed mmseg does not '
                                          r'have \(\S+/no_such_set\.py does not exist\); fix that '
                                          r'path in _base_\.$'):
        load_config(str(child))
    child.write_text('x = (1,\n')
    with pytest.raises(ConfigError, match=rf"^config {child} has a syntax error at line 1: '\(' was "
                                          r'never closed \(in `x = \(1,`\); fix it there\.$'):
        load_config(str(child))


@pytest.fixture(scope='module')
def shipped_configs():
    """``load(rel)``: a copy of ``configs/<rel>`` as load_config reads it, each file read once per
    module; mmengine's YAML reads of mmseg's / mmdet's metafiles (for each ``mmdet::`` config it
    resolves) are cached meanwhile, as tests/test_configs.py does."""
    import copy
    import functools

    import mmengine.config.utils as cfg_utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg_utils, 'load', functools.lru_cache(maxsize=None)(cfg_utils.load))
        read = functools.lru_cache(maxsize=None)(lambda rel: load_config(str(ROOT / 'configs' / rel)))
        yield lambda rel: copy.deepcopy(read(rel))


def _refusal(cfg, options, unread=('crop_size', )):
    """The sentence merge_cfg_options refuses ``options`` with on a copy of ``cfg``, or None."""
    import copy

    from reparam_mm.scope import ConfigError, merge_cfg_options
    try:
        merge_cfg_options(copy.deepcopy(cfg), options, unread)
    except ConfigError as error:
        return str(error)
    return None


def _advice(message):
    """The ``--cfg-options`` items a refusal ends with, as the shell passes them."""
    import shlex
    return shlex.split(message.rsplit(': --cfg-options ', 1)[1].removesuffix('.'))


REPLKNET_ADE = 'replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py'


@pytest.mark.timeout(120)
def test_a_variable_of_an_mmseg_base_is_refused_too(shipped_configs):
    """mmengine gives the top-level dicts of an mmseg:: base (vis_backends, norm_cfg) a _scope_ key
    that their copies lack, so the override was taken and changed nothing."""
    cfg = shipped_configs(REPLKNET_ADE)
    assert cfg.vis_backends[0]._scope_ == 'mmseg'  # what hid the copies
    assert _refusal(cfg, {'vis_backends.0.type': 'TensorboardVisBackend'}) == (
        '--cfg-options vis_backends.0.type=TensorboardVisBackend changes nothing: vis_backends is a '
        'variable of the config file, copied into visualizer.vis_backends.0.type when the file was '
        'read, so set that instead: --cfg-options visualizer.vis_backends.0.type=TensorboardVisBackend.')
    assert _refusal(cfg, {'norm_cfg.type': 'BN'}).endswith(
        ': --cfg-options model.backbone.norm_cfg.type=BN model.decode_head.norm_cfg.type=BN '
        'model.auxiliary_head.norm_cfg.type=BN.')


@pytest.mark.timeout(300)
def test_everyday_cfg_options_pass_and_each_refusals_advice_is_taken_on_every_config(shipped_configs):
    """On every config mmseg / mmdet read here (configs/mmpretrain needs mmpretrain): the options
    a user sets every day are merged, and for each variable of the file that is refused, the
    command the refusal prints, with the variable, is taken and sets every copy."""
    import collections

    from reparam_mm.scope import _variable_copies, merge_cfg_options
    from reparam_mm.train import parse_args
    configs = sorted(p.relative_to(ROOT / 'configs').as_posix() for p in (ROOT / 'configs').rglob('*.py')
                     if not {'_base_', 'mmpretrain'} & set(p.parts))
    assert len(configs) > 40
    refused = collections.defaultdict(set)  # variable: the configs that refused it
    for rel in configs:
        cfg = shipped_configs(rel)
        everyday = {
            'load_from': 'x.pth', 'resume': True, 'work_dir': 'work_dirs/x', 'randomness.seed': 1,
            'env_cfg.cudnn_benchmark': True, 'visualizer.vis_backends.0.type': 'TensorboardVisBackend',
            'default_hooks.checkpoint.interval': 100, 'auto_scale_lr.enable': True,
            'model.backbone.drop_path_rate': 0.1, 'train_dataloader.batch_size': 1,
            'optim_wrapper.optimizer.lr': 1e-4, 'custom_imports.imports': ['reparam_mm'],
            'param_scheduler.0.end' if isinstance(cfg.param_scheduler, list) else 'param_scheduler.end': 10,
            'tta_model.type': 'SegTTAModel' if cfg.default_scope == 'mmseg' else 'DetTTAModel'}
        for key, value in everyday.items():
            assert _refusal(cfg, {key: value}) is None, (rel, key)
        for top in cfg.keys():
            value = cfg[top]  # a new value of its kind, set where the option reaches it
            key, new = ((f'{top}.type', 'New') if isinstance(value, dict) and 'type' in value else
                        (f'{top}.0.type', 'New') if isinstance(value, list) and value
                        and isinstance(value[0], dict) and 'type' in value[0] else
                        (top, '/new/root') if isinstance(value, str) or value is None else (None, None))
            found = key and _variable_copies(cfg, key, new, ('crop_size', ))
            if not found:
                continue
            message = _refusal(cfg, {key: new})
            assert message and 'more)' not in message, (rel, key)
            refused[top].add(rel)
            options = parse_args(['c.py', '--cfg-options', f'{key}={new}', *_advice(message)]).cfg_options
            merged = merge_cfg_options(shipped_configs(rel), options, ('crop_size', ))
            for path, expected, _ in found[1]:
                node = merged
                for part in path.split('.'):
                    node = node[int(part)] if isinstance(node, list) else node[part]
                assert node == expected, (rel, path)
    # what the sweep reached: vis_backends of every config, those an mmseg:: or mmdet:: base gives
    # included (with a _scope_ their copies lack), and the dataset's and the model's variables
    assert refused['vis_backends'] == set(configs), set(configs) - refused['vis_backends']
    assert all(refused[name] for name in ('data_root', 'norm_cfg', 'train_pipeline', 'backend_args'))


UNIREPLKNET_ADE = 'unireplknet/upernet_unireplknet-t-in1k-pre_8xb2-160k_ade20k-512x512.py'


@pytest.mark.timeout(120)
def test_a_variable_set_with_all_its_copies_is_taken(shipped_configs):
    """data_root=/d with the three loaders' data_root=/d did what it says before the variable
    check, which then refused it ('changes nothing')."""
    from reparam_mm.scope import merge_cfg_options
    loaders = {f'{loader}.dataset.data_root': '/d' for loader in ('train_dataloader', 'val_dataloader',
                                                                   'test_dataloader')}
    cfg = merge_cfg_options(shipped_configs(UNIREPLKNET_ADE), dict(data_root='/d', **loaders))
    assert cfg.data_root == '/d' and cfg.test_dataloader.dataset.data_root == '/d'
    del loaders['test_dataloader.dataset.data_root']  # one copy left as it is: still refused
    assert _refusal(shipped_configs(UNIREPLKNET_ADE), dict(data_root='/d', **loaders)).startswith(
        '--cfg-options data_root=/d changes nothing:')


COCO = 'doconv/faster-rcnn_r50_fpn_1x_coco.py'


@pytest.mark.timeout(120)
def test_the_data_root_advice_on_coco_moves_the_evaluators_json_too(shipped_configs):
    """COCO's evaluators read data_root + 'annotations/instances_val2017.json': the advice left
    them out, so the run evaluated against the old root's json."""
    from reparam_mm.scope import merge_cfg_options
    from reparam_mm.train import parse_args
    message = _refusal(shipped_configs(COCO), {'data_root': '/d'})
    assert message == (
        '--cfg-options data_root=/d changes nothing: data_root is a variable of the config file, '
        'copied into train_dataloader.dataset.data_root, val_dataloader.dataset.data_root and '
        'test_dataloader.dataset.data_root, and to the start of val_evaluator.ann_file and '
        'test_evaluator.ann_file when the file was read, so set those instead (docs/datasets.md '
        "lists each dataset's): --cfg-options train_dataloader.dataset.data_root=/d "
        'val_dataloader.dataset.data_root=/d test_dataloader.dataset.data_root=/d '
        'val_evaluator.ann_file=/d/annotations/instances_val2017.json '
        'test_evaluator.ann_file=/d/annotations/instances_val2017.json.')
    options = parse_args(['c.py', '--cfg-options', *_advice(message)]).cfg_options
    cfg = merge_cfg_options(shipped_configs(COCO), options)
    assert cfg.val_evaluator.ann_file == '/d/annotations/instances_val2017.json'
    assert cfg.test_evaluator.ann_file == '/d/annotations/instances_val2017.json'
    assert cfg.val_dataloader.dataset.ann_file == 'annotations/instances_val2017.json'  # under data_root
    # a root given with its trailing '/' or without reads the same
    assert _advice(_refusal(shipped_configs(COCO), {'data_root': '/d/'}))[-1] == (
        'test_evaluator.ann_file=/d/annotations/instances_val2017.json')


@pytest.mark.timeout(120)
def test_the_advice_names_every_copy_however_many(shipped_configs):
    """With more than 6 copies the printed command ended in '(and 2 more)': not runnable. (Here
    the copies are None, into which mmengine merges keys only with _delete_=True.)"""
    from reparam_mm.scope import merge_cfg_options
    from reparam_mm.train import parse_args
    rel = 'unireplknet/cascade-mask-rcnn_unireplknet-s-in1k-pre_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py'
    message = _refusal(shipped_configs(rel), {'backend_args.backend': 'petrel'})
    assert message.startswith('--cfg-options backend_args.backend=petrel changes nothing: backend_args '
                              'is a variable of the config file, copied into 8 keys when the file '
                              'was read, so set those instead (with _delete_=True, which lets mmengine '
                              'put keys where the file has None): --cfg-options '
                              'train_dataloader.dataset.pipeline.0.backend_args._delete_=True '
                              'train_dataloader.dataset.pipeline.0.backend_args.backend=petrel '), message
    assert 'more)' not in message
    items = _advice(message)
    assert len(items) == 16 and all(item.endswith(('backend_args.backend=petrel',
                                                   'backend_args._delete_=True')) for item in items)
    cfg = merge_cfg_options(shipped_configs(rel), parse_args(['c.py', '--cfg-options', *items]).cfg_options)
    assert cfg.val_evaluator.backend_args == dict(backend='petrel')
    assert cfg.test_dataloader.dataset.backend_args == dict(backend='petrel')
    assert cfg.backend_args is None  # the variable, as the file left it


@pytest.mark.timeout(60)
def test_a_folder_for_a_config_names_only_a_config_and_lists_little(tmp_path, monkeypatch):
    """`tools/train.py .` suggested ./benchmarks/cpu_check.py, `tools/train.py tools` a script of
    tools/, and a dataset's folder was walked file by file."""
    import os
    monkeypatch.chdir(ROOT)
    for folder, example in (('.', './configs/demo/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_'
                                  '1xb4-400i_coco128-person-320.py'),
                            ('tools', None), ('benchmarks', None), ('configs/_base_', None)):
        with pytest.raises(IsADirectoryError) as err:
            load_config(folder)
        assert str(err.value) == (f'config {folder} is a folder, not a config file; pass a config '
                                  'file in it' + (f', e.g. {example}' if example else '')
                                  + ' (docs/configs.md lists them).')
    scripts = tmp_path / 'mine'  # a script beside a config: the config is named
    scripts.mkdir()
    (scripts / 'a_script.py').write_text('import sys\nmodel = sys.argv[1]\n')
    (scripts / 'b_config.py').write_text("_base_ = ['x.py']\n")
    with pytest.raises(IsADirectoryError, match=rf', e\.g\. {scripts}/b_config\.py \(docs'):
        load_config(str(scripts))
    data = tmp_path / 'dataset'
    for part in range(3):
        (data / f'images{part}').mkdir(parents=True)
        for i in range(1500):
            (data / f'images{part}' / f'{i}.jpg').touch()
    listed, scandir = [], os.scandir

    class Counted:
        def __init__(self, path):
            self.it = scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            return self

        def __next__(self):
            entry = next(self.it)
            listed.append(entry.name)
            return entry

    monkeypatch.setattr(os, 'scandir', Counted)
    with pytest.raises(IsADirectoryError) as err:
        load_config(str(data))
    assert str(err.value) == (f'config {data} is a folder, not a config file; pass a config file in '
                              'it (docs/configs.md lists them).')
    assert len(listed) < 2500  # of 4503 names
