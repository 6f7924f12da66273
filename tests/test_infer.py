"""tools/infer.py and reparam_mm.inference: predictions of the fused model on image files, against
the upstream inferencers running the unfused model (an independent reference)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import reparam_mm  # noqa: F401
from conftest import load_tool, mmengine_log
from reparam_mm.checkpoint import CheckpointMismatchError
from reparam_mm.cli import run_tool
from reparam_mm.inference import fused_inferencer, image_files
from reparam_mm.scope import ConfigError
from test_tools_test_fuse import det_config, make_ade, make_coco, seg_config, write_case

SEG_META = dict(classes=('a', 'b', 'c', 'd'), palette=[[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]])
DET_META = dict(classes=('person', 'car'), palette=[(220, 20, 60), (0, 0, 142)])


def _case(tmp_path, cfg_dict, meta):
    """write_case()'s config and checkpoint, the checkpoint with the dataset_meta training writes."""
    cfg, ckpt = write_case(tmp_path, cfg_dict)
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    state['meta'] = dict(dataset_meta=meta)
    torch.save(state, ckpt)
    return cfg, ckpt


def _with_visualizer(cfg, kind):
    """The config with a visualizer, which the upstream inferencers need (the test configs have
    none, so tools/infer.py paints with the package's default one)."""
    from mmengine.config import Config
    cfg = Config.fromfile(cfg)
    cfg.visualizer = dict(type=kind, vis_backends=[dict(type='LocalVisBackend')])
    return cfg


def test_segmentor_fused_predictions_equal_the_upstream_inferencer_unfused(tmp_path, capsys):
    from mmseg.apis import MMSegInferencer
    images = make_ade(tmp_path / 'ade') / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    out = tmp_path / 'out'
    with mmengine_log() as records:
        result = load_tool('infer').main([cfg, ckpt, str(images), '--out-dir', str(out), '--device', 'cpu'])
    log = capsys.readouterr().out
    assert 'fused 29 module(s) (DOConv2d: 29)' in log and 'fused model predicted 4 image(s)' in log
    checks = [r for r in records if 'fused vs unfused outputs' in r.getMessage()]
    assert len(checks) == 1 and checks[0].levelno == logging.INFO  # first batch only, within tolerance
    files = image_files([images])
    reference = MMSegInferencer(model=_with_visualizer(cfg, 'SegLocalVisualizer'), weights=ckpt, device='cpu')(files, return_datasamples=True)
    assert len(result['predictions']) == 4
    for i, (pred, ref) in enumerate(zip(result['predictions'], reference)):
        assert np.array_equal(pred, ref.pred_sem_seg.data[0].numpy())
        assert np.array_equal(np.array(Image.open(out / 'pred' / f'{i:08d}_pred.png')), pred)
    painted = sorted(p.name for p in (out / 'vis').iterdir())
    assert painted == [f'ADE_val_{i:08d}.jpg' for i in range(4)]
    assert Image.open(out / 'vis' / painted[0]).size == (64, 64)


def test_detector_fused_predictions_equal_the_upstream_inferencer_unfused(tmp_path, capsys):
    from mmdet.apis import DetInferencer
    images = make_coco(tmp_path / 'coco') / 'val'
    cfg, ckpt = _case(tmp_path, det_config(tmp_path / 'coco'), DET_META)
    out = tmp_path / 'out'
    load_tool('infer').main([cfg, ckpt, str(images), '--out-dir', str(out), '--device', 'cpu'])
    assert 'fused 27 module(s) (DOConv2d: 27)' in capsys.readouterr().out
    files = image_files([images])
    reference = DetInferencer(model=_with_visualizer(cfg, 'DetLocalVisualizer'), weights=ckpt, device='cpu', show_progress=False)(
        files, return_datasamples=True)['predictions']
    boxes = 0
    for name, ref in zip(files, reference):
        saved = json.loads((out / 'preds' / name.rsplit('/', 1)[1].replace('.jpg', '.json')).read_text())
        ref = ref.pred_instances
        assert saved['labels'] == ref.labels.tolist()
        assert np.allclose(saved['scores'], ref.scores.numpy(), atol=1e-5)
        assert np.allclose(saved['bboxes'], ref.bboxes.numpy(), atol=1e-3)
        boxes += len(saved['labels'])
    assert boxes > 0
    assert sorted(p.name for p in (out / 'vis').iterdir()) == [f'{i:06d}.jpg' for i in range(4)]


def test_deploy_pair_predicts_the_same_and_is_not_fused_again(tmp_path):
    from reparam_mm.apis import export_deploy
    images = make_ade(tmp_path / 'ade') / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    deploy = export_deploy(cfg, ckpt, str(tmp_path / 'deploy'), shape=(64, 64))
    files = image_files([images])
    trained = fused_inferencer(cfg, ckpt, device='cpu')(files)['predictions']
    inferencer = fused_inferencer(deploy['config'], deploy['checkpoint'], device='cpu')
    assert inferencer.fuse_report.total == 0
    predictions = inferencer(files)['predictions']
    assert inferencer.last_check is None  # nothing was fused, so nothing to compare
    assert all(np.array_equal(a, b) for a, b in zip(trained, predictions))


def test_the_first_batch_check_catches_a_wrong_fuse(tmp_path):
    images = make_ade(tmp_path / 'ade', n=1) / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    inferencer = fused_inferencer(cfg, ckpt, device='cpu')
    with torch.no_grad():  # as a fuse method that got the arithmetic wrong would leave it
        inferencer.model.decode_head.conv_seg.weight.mul_(1.5)
    with mmengine_log() as records:
        inferencer(image_files([images]))
    assert inferencer.last_check['max_rel'] > 1e-2
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and 'ABOVE the tolerance 1e-04' in warned[0] and '--no-fuse' in warned[0]


def test_bad_input_is_one_line_naming_the_fix(tmp_path, capsys):
    from reparam_mm.apis import export_deploy
    images = make_ade(tmp_path / 'ade', n=1) / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    deploy = export_deploy(cfg, ckpt, str(tmp_path / 'deploy'), shape=(64, 64))
    # a deploy checkpoint under its training config: upstream would load what matches and predict
    with pytest.raises(CheckpointMismatchError, match=r'deploy \(fused\) checkpoint written by '
                                                      r'tools/fuse\.py: use the deploy config'):
        fused_inferencer(cfg, deploy['checkpoint'], device='cpu')
    with pytest.raises(ConfigError, match='inference needs the trained weights'):
        fused_inferencer(cfg, None, device='cpu')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConfigError, match=r'empty holds no image \(\.jpg'):
        image_files([tmp_path / 'empty'])
    infer = load_tool('infer').main
    capsys.readouterr()
    assert run_tool(infer, [cfg, str(tmp_path / 'nope.pth'), str(images)]) == 1
    assert run_tool(infer, [cfg, ckpt, str(tmp_path / 'missing.jpg')]) == 1
    assert run_tool(infer, [cfg, deploy['checkpoint'], str(images)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith('error: ') for line in err)
    assert 'nope.pth does not exist' in err[0] and 'missing.jpg does not exist' in err[1]
    assert 'use the deploy config written beside it' in err[2]


def test_a_device_this_machine_lacks_is_one_sentence():
    from reparam_mm.inference import check_device
    from reparam_mm.train import NotAvailableHereError
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = 'cuda' if count == 0 else f'cuda:{count}'  # no GPU at all, or one index past the last
    with pytest.raises(NotAvailableHereError, match=rf'^--device {missing} (needs a CUDA GPU and this '
                                                   rf'machine has none|names GPU {count}, but)'):
        check_device(missing)
    with pytest.raises(ConfigError, match=r"^--device 'gpu0' is not a device name; use 'cpu'"):
        check_device('gpu0')
    assert check_device('cpu') == 'cpu' and check_device(None) is None
