"""What training loads (``load_from``, ``--resume``) must fill the whole model.

mmengine's runner loads both with ``strict=False``: another model's checkpoint trained on with
its skipped layers at their initialisation (exit status 0), and ``--resume`` from one ended in
a traceback from the optimizer or ``KeyError: 'message_hub'``. ``TrainingLoadCheckHook`` refuses
both in one sentence; ``load_from_partial = True`` opts into a partial ``load_from``.
"""
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, mmengine_log
from test_train_tools import DOCONV_REPLKNET_DEMO, PLAIN_DEMO, tiny_demo_config

import reparam_mm  # noqa: F401
from reparam_mm.apis import build_model
from reparam_mm.checkpoint import CheckpointMismatchError, check_training_load, loadable_state_keys
from reparam_mm.cli import run_tool
from reparam_mm.scope import load_config
from reparam_mm.train import main

# the plain demo model with DO-Conv in its backbone and heads (tools/camvid_study.py's r18 rows)
DOCONV_R18 = {'model.backbone.type': 'DOResNetV1c',
              'model.backbone.stage_with_doconv': (True, True, True, True),
              'model.backbone.doconv_cfg.type': 'DOConv',
              'model.decode_head.conv_cfg.type': 'DOConv',
              'model.auxiliary_head.conv_cfg.type': 'DOConv'}


def _model(config, options=None):
    cfg = load_config(str(config))
    if options:
        cfg.merge_from_dict(options)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture(scope='module')
def plain():
    return _model(PLAIN_DEMO)


@pytest.fixture(scope='module')
def replknet():
    return _model(DOCONV_REPLKNET_DEMO)


def test_another_models_checkpoint_is_refused_naming_the_opt_in(plain, replknet):
    with pytest.raises(CheckpointMismatchError, match=r'^load_from x\.pth does not match the model '
                       r'built from the config: \d+ missing keys .*load_from_partial=True\.$'):
        check_training_load(plain, {'state_dict': replknet.state_dict()}, 'x.pth')
    # opted in: accepted (what it loads is logged)
    check_training_load(plain, {'state_dict': replknet.state_dict()}, 'x.pth', partial=True)
    # the hint names the part that is another network, and its class where the checkpoint
    # records its config (mmengine keeps the text in meta['cfg']; the init_cfg's type is not it)
    with pytest.raises(CheckpointMismatchError, match=r"-- its backbone is another network than the "
                       r"config's \(ResNetV1c here\): use the config it was trained with"):
        check_training_load(plain, {'state_dict': replknet.state_dict()}, 'x.pth')
    text = ("model = dict(\n    backbone=dict(\n        arch='tiny',\n        init_cfg=dict(\n"
            "            checkpoint='w.pth', type='Pretrained'),\n        type='RepLKNet'),\n"
            "    type='EncoderDecoder')\n")
    with pytest.raises(CheckpointMismatchError, match=r"another network than the config's \(RepLKNet "
                       r'in the config it records, ResNetV1c here\)'):
        check_training_load(plain, {'state_dict': replknet.state_dict(), 'meta': {'cfg': text}}, 'x.pth')
    # the fused form of the same network is not another network: the training/deploy hint stays
    import copy
    from reparam_mm.fuse import fuse
    fused = fuse(copy.deepcopy(replknet).eval())
    with pytest.raises(CheckpointMismatchError) as err:
        check_training_load(fused, {'state_dict': replknet.state_dict()}, 'x.pth')
    assert 'another network' not in str(err.value)
    assert 'a training checkpoint needs its training config, not the deploy config' in str(err.value)
    # a resume is never partial, and says what it needs
    with pytest.raises(CheckpointMismatchError, match='resume needs a checkpoint written by training'):
        check_training_load(plain, {'state_dict': replknet.state_dict()}, 'x.pth', resume=True,
                            partial=True)


def test_other_sizes_and_deploy_checkpoints_get_their_own_hint(plain):
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(7, *state['decode_head.conv_seg.weight'].shape[1:])
    with pytest.raises(CheckpointMismatchError, match=r'1 shape mismatches \(decode_head\.conv_seg'
                       r'\.weight .*other sizes.*load_from_partial=True'):
        check_training_load(plain, {'state_dict': state}, 'x.pth')
    deploy = {'state_dict': {'a.weight': torch.zeros(1)},
              'meta': {'reparam_mm': {'deploy': True, 'deploy_config': 'out/m_deploy.py'}}}
    with pytest.raises(CheckpointMismatchError, match=r'deploy \(fused\) checkpoint.*out/m_deploy\.py'):
        check_training_load(plain, deploy, 'x.pth')


def test_a_plain_checkpoint_starts_a_doconv_model_as_torch_loads_it(plain):
    """DO-Conv layers take a plain conv's weight into W and leave D at zero: the keys the check
    allows missing are exactly those torch's own non-strict load leaves missing."""
    doconv = _model(PLAIN_DEMO, DOCONV_R18)
    state = plain.state_dict()
    with mmengine_log() as records:
        check_training_load(doconv, {'state_dict': state}, 'plain.pth')  # no error
    keys, allowed = loadable_state_keys(doconv, state)
    # said once, so that mmengine's list of the D as missing keys does not read as a fault
    assert [r.getMessage() for r in records] == [
        f"load_from plain.pth: {len(allowed)} DO-Conv layer(s) start from the checkpoint's plain "
        'conv (W = its weight, D = 0: the same convolution), e.g. auxiliary_head.convs.0.conv, '
        f"backbone.layer1.0.conv1 ... (+{len(allowed) - 2}); the 'missing keys ... .D' mmengine "
        'logs for them are expected.']
    assert allowed and all(k.endswith('.D') for k in allowed)
    result = doconv.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    assert set(result.missing_keys) == allowed and not result.unexpected_keys
    assert set(keys) == set(doconv.state_dict()) - allowed
    # and a DO-Conv model's checkpoint does not fit the plain model, which the hint says
    with pytest.raises(CheckpointMismatchError, match=r'unexpected keys .* -- layers that are DO-Conv '
                       r'in the checkpoint \(W, D\) are plain convs in the config \(backbone'
                       r'\.layer1\.0\.conv1, .*deploy checkpoint \(tools/fuse\.py\)'):
        check_training_load(plain, {'state_dict': doconv.state_dict()}, 'doconv.pth')


def test_resume_needs_training_state(plain):
    weights_only = {'state_dict': plain.state_dict(), 'meta': {}}
    with pytest.raises(CheckpointMismatchError, match=r'no training state.*load_from=w\.pth '
                       'without --resume'):
        check_training_load(plain, weights_only, 'w.pth', resume=True)
    check_training_load(plain, weights_only, 'w.pth')  # the same file is a fine load_from


def _run(argv, capsys):
    status = run_tool(main, argv)
    return status, capsys.readouterr().err.strip().splitlines()


def test_tools_train_ends_with_one_line_and_partial_opt_in_trains(tmp_path, capsys, replknet):
    other = tmp_path / 'replknet.pth'
    torch.save({'state_dict': replknet.state_dict(), 'meta': {}}, other)
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    wd = tmp_path / 'wd'

    status, err = _run([cfg, '--work-dir', str(wd), '--cfg-options', f'load_from={other}'], capsys)
    assert status == 1
    assert re.match(rf'error: load_from {re.escape(str(other))} does not match the model built '
                    r'from the config: \d+ missing keys', err[-1]), err[-3:]
    assert not (wd / 'iter_1.pth').exists()  # refused before the first iteration

    status, err = _run([cfg, '--work-dir', str(wd), '--resume', str(other)], capsys)
    assert status == 1 and err[-1].startswith(f'error: --resume {other} does not match'), err[-3:]

    runner = main([cfg, '--work-dir', str(wd), '--cfg-options', f'load_from={other}',
                   'load_from_partial=True'])
    assert runner.iter == 1
    log = (Path(runner.log_dir) / f'{runner.timestamp}.log').read_text()
    assert re.search(r'load_from .* loading \d+ of \d+ model tensors \(load_from_partial=True\); '
                     r'left at their initialisation: ', log)

    # its own checkpoint resumes, and loads whole as load_from
    resumed = main([cfg, '--work-dir', str(wd), '--resume', str(wd / 'iter_1.pth'),
                    '--cfg-options', 'train_cfg.max_iters=2'])
    assert resumed.iter == 2


def test_upstream_loads_refuse_a_deploy_checkpoint_in_an_unfused_model(replknet, tmp_path):
    """mmseg.apis.init_model, the upstream inferencers and mmdet.apis.init_detector load through
    mmengine's non-strict load_state_dict: a deploy checkpoint in the training config left the
    large kernels' branches at their initialisation (3,699 of 32,768 demo pixels changed)."""
    import copy
    from mmengine.runner.checkpoint import load_checkpoint
    from reparam_mm.fuse import fuse
    deploy = tmp_path / 'deploy.pth'
    torch.save({'state_dict': fuse(copy.deepcopy(replknet).eval()).state_dict(), 'meta': {}}, deploy)
    model = copy.deepcopy(replknet)
    with pytest.raises(CheckpointMismatchError, match=r'^the checkpoint is the deploy \(fused\) form of '
                       r'this model, which was built unfused .* \d+ tensors of the re-parameterised '
                       r'layers at their initialisation \(backbone\..*lkb_origin.*\*_deploy\.py'):
        load_checkpoint(model, str(deploy), map_location='cpu')
    # DO-Conv alone: its fused weight starts W (D = 0), the same convolution, so it loads
    doconv = _model(PLAIN_DEMO, DOCONV_R18).eval()
    fused = fuse(copy.deepcopy(doconv))
    torch.save({'state_dict': fused.state_dict()}, deploy)
    load_checkpoint(doconv, str(deploy), map_location='cpu')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(doconv.backbone(x)[-1], fused.backbone(x)[-1], rtol=1e-4, atol=1e-5)
    # a training checkpoint into its own model, and another model's partial load, as before
    load_checkpoint(copy.deepcopy(replknet), _saved(replknet, tmp_path / 'train.pth'), map_location='cpu')


def test_upstream_loads_refuse_a_training_checkpoint_in_a_fused_model(replknet, tmp_path):
    """The reverse: a model built from the deploy config (as tools/test.py --deploy-config or
    init_model with the *_deploy.py do) given the training checkpoint left its merged large
    kernels, and DO-Conv's folded weights, at their initialisation, with one warning."""
    import copy
    from mmengine.runner.checkpoint import load_checkpoint
    from reparam_mm.apis import deploy_config
    from reparam_mm.fuse import fuse
    detector = ROOT / ('configs/demo/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_'
                       '1xb4-400i_coco128-person-320.py')  # DO-Conv in the neck and heads too
    for config, options, trained in ((DOCONV_REPLKNET_DEMO, None, replknet),
                                     (PLAIN_DEMO, DOCONV_R18, _model(PLAIN_DEMO, DOCONV_R18)),
                                     (detector, None, _model(detector))):
        cfg = load_config(str(config))
        if options:
            cfg.merge_from_dict(options)
        deployed = build_model(deploy_config(cfg)[0]).eval()
        training = _saved(trained, tmp_path / 'train.pth')
        with pytest.raises(CheckpointMismatchError, match=r'^the checkpoint is the training \(unfused\) form '
                           r'of this model, which was built fused .* \d+ tensors of the re-parameterised '
                           r'layers at their initialisation \(.*tools/fuse\.py TRAINING_CONFIG'):
            load_checkpoint(deployed, training, map_location='cpu')
        # its fused checkpoint loads, and computes what the fused trained model does
        fused = fuse(copy.deepcopy(trained).eval())
        load_checkpoint(deployed, _saved(fused, tmp_path / 'deploy.pth'), map_location='cpu')
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(deployed.backbone(x)[-1], fused.backbone(x)[-1],
                                       rtol=1e-3, atol=1e-4)


def _saved(model, path):
    torch.save({'state_dict': model.state_dict()}, path)
    return str(path)
