"""tools/infer.py and reparam_mm.inference: predictions of the fused model on image files, against
the upstream inferencers running the unfused model (an independent reference)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import reparam_mm  # noqa: F401
from conftest import ROOT, load_tool, mmengine_log
from reparam_mm.checkpoint import CheckpointMismatchError
from reparam_mm.cli import run_tool
from reparam_mm.inference import FusedCheckError, fused_inferencer, image_files, predict_images
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
    reference = MMSegInferencer(model=_with_visualizer(cfg, 'SegLocalVisualizer'), weights=ckpt,
                                device='cpu')(files, return_datasamples=True)
    assert len(result['predictions']) == 4
    for i, (pred, ref) in enumerate(zip(result['predictions'], reference)):
        assert np.array_equal(pred, ref.pred_sem_seg.data[0].numpy())
        # named after the image, where upstream writes 0000000i_pred.png
        assert np.array_equal(np.array(Image.open(out / 'pred' / f'ADE_val_{i:08d}.png')), pred)
    assert len(list((out / 'pred').iterdir())) == 4
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
        assert saved['label_names'] == [DET_META['classes'][i] for i in saved['labels']]
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
    from reparam_mm.head_layout import tune_head_layouts
    assert tune_head_layouts(inferencer.model) == []  # its head's layout is timed already
    predictions = inferencer(files)['predictions']
    assert inferencer.last_check is None  # nothing was fused, so nothing to compare
    assert all(np.array_equal(a, b) for a, b in zip(trained, predictions))


def test_the_first_batch_check_catches_a_wrong_fuse(tmp_path):
    images = make_ade(tmp_path / 'ade', n=1) / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    inferencer = fused_inferencer(cfg, ckpt, device='cpu')
    # arrays are for the inferencer's own call: refused before anything runs
    with pytest.raises(TypeError, match=r'^predict_images takes image paths .* got a ndarray; .*'
                       r'inferencer\(images\), which takes arrays\.$'):
        predict_images(inferencer, [np.zeros((8, 8, 3), np.uint8)], str(tmp_path / 'arrays'))
    assert not (tmp_path / 'arrays').exists() and inferencer.last_check is None
    with torch.no_grad():  # as a fuse method that got the arithmetic wrong would leave it
        inferencer.model.decode_head.conv_seg.weight.mul_(1.5)
    with mmengine_log() as records, pytest.raises(FusedCheckError, match=r'above the tolerance 1e-04: '
                                                  r'the predictions written to .* --no-fuse'):
        predict_images(inferencer, image_files([images]), str(tmp_path / 'out'))
    assert inferencer.last_check['max_rel'] > 1e-2 and inferencer.check_failed
    assert (tmp_path / 'out/pred/ADE_val_00000000.png').is_file()  # written, then the error
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and 'ABOVE the tolerance 1e-04' in warned[0] and '--no-fuse' in warned[0]


def test_class_names_come_from_the_checkpoint_else_the_config_and_paint_the_pictures(tmp_path):
    """mmseg 1.2.2's inferencer paints with Cityscapes' names and colours whatever the model,
    and falls back to them (mmdet: to COCO's) for a checkpoint without dataset_meta."""
    make_ade(tmp_path / 'ade', n=1)
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    inferencer = fused_inferencer(cfg, ckpt, device='cpu')
    assert inferencer.visualizer.dataset_meta['classes'] == list(SEG_META['classes'])
    assert inferencer.visualizer.dataset_meta['palette'] == SEG_META['palette']
    bare = tmp_path / 'bare.pth'  # a checkpoint saved by hand: weights only
    torch.save(dict(state_dict=torch.load(ckpt, weights_only=True)['state_dict']), bare)
    with mmengine_log() as records:
        inferencer = fused_inferencer(cfg, str(bare), device='cpu')
    named = ('wall', 'building', 'sky', 'floor')  # the test set's metainfo (seg_config)
    assert inferencer.model.dataset_meta['classes'] == named
    assert inferencer.visualizer.dataset_meta['classes'] == list(named)
    assert any("using those of the config's test dataset (4 classes)" in r.getMessage() for r in records)
    (tmp_path / 'det').mkdir()
    cfg_det, ckpt_det = _case(tmp_path / 'det', det_config(make_coco(tmp_path / 'coco', n=1)), DET_META)
    torch.save(dict(state_dict=torch.load(ckpt_det, weights_only=True)['state_dict']), bare)
    detector = fused_inferencer(cfg_det, str(bare), device='cpu', show_progress=False)
    assert detector.model.dataset_meta['classes'] == ('person', 'car')  # the config's metainfo


def test_inputs_are_checked_before_a_model_is_built(tmp_path):
    make_ade(tmp_path / 'ade', n=2)
    folder = tmp_path / 'ade/images/validation'
    (folder / 'notes.txt').write_text('not an image')  # skipped: not an image name
    assert [p.rsplit('/', 1)[1] for p in image_files([folder])] == ['ADE_val_00000000.jpg',
                                                                   'ADE_val_00000001.jpg']
    (folder / 'fake.jpg').write_text('not an image either')
    with pytest.raises(ConfigError, match=r'fake\.jpg is not an image that can be read '
                                          r'\(UnidentifiedImageError\)'):
        image_files([folder])
    (folder / 'fake.jpg').unlink()
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'ADE_val_00000001.jpg').write_bytes((folder / 'ADE_val_00000000.jpg').read_bytes())
    with pytest.raises(ConfigError, match=r'share the file name ADE_val_00000001, after which '
                                          r'their predictions are written'):
        image_files([folder, other])
    with pytest.raises(ConfigError, match='share the file name'):
        image_files([folder / 'ADE_val_00000000.jpg', folder / 'ADE_val_00000000.jpg'])
    # one stem, two extensions: pred/<stem>.png would be written twice
    Image.open(folder / 'ADE_val_00000000.jpg').save(other / 'ADE_val_00000000.png')
    with pytest.raises(ConfigError, match='share the file name ADE_val_00000000, after which'):
        image_files([folder / 'ADE_val_00000000.jpg', other / 'ADE_val_00000000.png'])


def test_segmentation_batches_need_one_image_size_and_give_the_same_predictions(tmp_path):
    images = make_ade(tmp_path / 'ade', n=3) / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    files = image_files([images])
    inferencer = fused_inferencer(cfg, ckpt, device='cpu')
    one = predict_images(inferencer, files, str(tmp_path / 'one'), paint=False)['predictions']
    two = predict_images(inferencer, files, str(tmp_path / 'two'), batch_size=2, paint=False)['predictions']
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert not (tmp_path / 'one/vis').exists() and len(list((tmp_path / 'two/pred').iterdir())) == 3
    # sizes as the test pipeline (Resize to 64x64, keeping the ratio) makes them: 32x32 becomes
    # 64x64 and batches with the others (it was refused by its file size), 48x40 becomes 64x53
    Image.open(files[2]).resize((32, 32)).save(files[2])
    predict_images(inferencer, files, str(tmp_path / 'small'), batch_size=3, paint=False)
    Image.open(files[1]).resize((48, 40)).save(files[1])
    with pytest.raises(ConfigError, match=r'--batch-size 2: a segmentation batch needs images of one '
                                          r'size after the test pipeline \(mmseg stacks them unpadded\), '
                                          r'and .*_00000000\.jpg comes out 64x64 \(width x height\) where '
                                          r'.*_00000001\.jpg comes out 64x53; use --batch-size 1'):
        predict_images(inferencer, files, str(tmp_path / 'three'), batch_size=2)
    (tmp_path / 'file').write_text('')
    with pytest.raises(ConfigError, match=r'--out-dir .*file is a file; name a folder'):
        predict_images(inferencer, files, str(tmp_path / 'file'))


def test_bad_input_is_one_line_naming_the_fix(tmp_path, capsys):
    from reparam_mm.apis import export_deploy
    images = make_ade(tmp_path / 'ade', n=1) / 'images/validation'
    cfg, ckpt = _case(tmp_path, seg_config(tmp_path / 'ade'), SEG_META)
    (tmp_path / 'det').mkdir()
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
    # a segmentor's checkpoint under a detector's config, and an image for the checkpoint
    det_cfg, _ = _case(tmp_path / 'det', det_config(make_coco(tmp_path / 'coco', n=1)), DET_META)
    image = next(images.iterdir())
    png = tmp_path / 'label.png'
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    assert run_tool(infer, [det_cfg, ckpt, str(images)]) == 1
    assert run_tool(infer, [cfg, str(png), str(image)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error')]
    assert err[0].endswith('-- it is a segmentor checkpoint and the config builds a detector: use '
                           'the config it was trained with.')
    assert err[1] == (f'error: checkpoint {png} is a PNG image, not a PyTorch checkpoint; pass the '
                      '.pth file written by training or tools/fuse.py in its place (the tools take '
                      'the config first, then the checkpoint).')


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


def test_the_config_classes_of_a_checkpoint_without_them_keep_their_colours():
    """A checkpoint without class names (a synthetic or foreign one) is painted with the config's
    classes: CamVid's 11 of Cityscapes' 19 came with Cityscapes' 19 colours, and mmseg's
    visualizer stopped with 'The length of classes should be equal to palette'."""
    from mmseg.datasets import CityscapesDataset
    from reparam_mm.scope import dataset_metainfo, init_scope, load_config
    cfg = load_config(str(ROOT / 'configs/demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py'))
    init_scope(cfg)
    meta = dataset_metainfo(cfg)
    city = CityscapesDataset.METAINFO
    assert len(meta['classes']) == len(meta['palette']) == 11
    assert meta['palette'] == [city['palette'][city['classes'].index(c)] for c in meta['classes']]
    cfg.test_dataloader.dataset.metainfo = dict(classes=('road', 'lava'))  # not all Cityscapes'
    assert dataset_metainfo(cfg) == dict(classes=('road', 'lava'), palette=None)
