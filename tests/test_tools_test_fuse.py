"""tools/test.py (fused vs --no-fuse) and tools/fuse.py (deploy round trip, strict loading)."""
import copy

import pytest
import torch

import reparam_mm  # noqa: F401
from reparam_mm.apis import CheckpointMismatchError, load_checkpoint_strict
from reparam_mm.fuse import fuse
from test_fuse import _nested


def _save(path, state, meta=None):
    torch.save(dict(state_dict=state, meta=meta or {}), path)
    return str(path)


def test_strict_loader_loads_a_matching_checkpoint(tmp_path):
    src, dst = _nested(), _nested()
    for p in src.parameters():
        p.data.add_(1.0)
    ckpt = _save(tmp_path / 'a.pth', {f'module.{k}': v for k, v in src.state_dict().items()})
    load_checkpoint_strict(dst, ckpt)  # 'module.' prefixes (DDP) are stripped as mmengine does
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_deploy_checkpoint_into_unfused_model_names_the_keys(tmp_path):
    fused = fuse(_nested())
    ckpt = _save(tmp_path / 'd.pth', fused.state_dict(),
                 dict(reparam_mm=dict(deploy=True, deploy_config='x_deploy.py')))
    model = _nested()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint_strict(model, ckpt)
    msg = str(err.value)
    assert 'missing keys' in msg and '0.delta' in msg and 'unexpected keys' in msg
    assert '2.fused_conv.weight' in msg and 'x_deploy.py' in msg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_unfused_checkpoint_into_fused_model_is_refused(tmp_path):
    ckpt = _save(tmp_path / 't.pth', _nested().state_dict())
    with pytest.raises(CheckpointMismatchError, match=r'unexpected keys \(0\.delta.*training config'):
        load_checkpoint_strict(fuse(_nested()), ckpt)


def test_shape_mismatch_and_missing_file_are_clear(tmp_path):
    state = _nested().state_dict()
    state['3.weight'] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(CheckpointMismatchError, match=r'1 shape mismatches \(3\.weight \(4, 4, 3, 3\) vs'
                                                       r'.* -- the same layers with other sizes: .*'
                                                       r'use the config it was trained with\.$'):
        load_checkpoint_strict(_nested(), _save(tmp_path / 's.pth', state))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_checkpoint_strict(_nested(), str(tmp_path / 'nope.pth'))


# -- tools/test.py and tools/fuse.py on tiny generated datasets ----------------------------------------
import json  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import ROOT, load_tool, mmengine_log  # noqa: E402
from test_fuse import build, det_model_cfg, perturb, seg_model_cfg  # noqa: E402


def _scene(i):
    """A 64x64 image of three rectangles and its label map (1..3; 0 = unlabelled)."""
    rng = np.random.default_rng(i)
    label = np.zeros((64, 64), np.uint8)
    boxes = []
    for cls in (1, 2, 3):
        x0, y0 = rng.integers(0, 28, 2)
        w, h = rng.integers(20, 36, 2)
        label[y0:y0 + h, x0:x0 + w] = cls
        boxes.append((cls, int(x0), int(y0), int(min(w, 64 - x0)), int(min(h, 64 - y0))))
    palette = np.array([[20, 20, 20], [200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
    img = np.clip(palette[label] + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
    return img, label, boxes


def make_ade(root, n=4):
    """ADE20K layout for mmseg's ADE20KDataset (jpg images, png labels, 0 = ignore)."""
    for sub in ('images/validation', 'annotations/validation'):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, label, _ = _scene(i)
        Image.fromarray(img).save(root / 'images/validation' / f'ADE_val_{i:08d}.jpg', quality=95)
        Image.fromarray(label).save(root / 'annotations/validation' / f'ADE_val_{i:08d}.png')
    return root


def make_coco(root, n=4):
    """A COCO json with two categories (classes 1 and 2 of the scenes) for mmdet's CocoDataset."""
    (root / 'val').mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img, _, boxes = _scene(i)
        Image.fromarray(img).save(root / 'val' / f'{i:06d}.jpg', quality=95)
        images.append(dict(id=i + 1, file_name=f'{i:06d}.jpg', height=64, width=64))
        for cls, x, y, w, h in boxes:
            if cls in (1, 2):
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cls, bbox=[x, y, w, h],
                                 area=w * h, iscrowd=0))
    cats = [dict(id=1, name='person'), dict(id=2, name='car')]
    (root / 'annotations.json').write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return root


def _loader(dataset):
    return dict(batch_size=1, num_workers=0, persistent_workers=False,
                sampler=dict(type='DefaultSampler', shuffle=False), dataset=dataset)


def seg_config(data_root, backbone='doconv'):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(64, 64), keep_ratio=True),
                dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]
    return dict(
        default_scope='mmseg', custom_imports=dict(imports=['reparam_mm'], allow_failed_imports=False),
        model=seg_model_cfg(backbone),
        # the scenes' 4 classes, named as ADE20K's first 4 (the model has 4 outputs; with all 150
        # the metric would score them under other names, which tools/test.py refuses)
        test_dataloader=_loader(dict(type='ADE20KDataset', data_root=str(data_root), pipeline=pipeline,
                                     metainfo=dict(classes=('wall', 'building', 'sky', 'floor')),
                                     data_prefix=dict(img_path='images/validation',
                                                      seg_map_path='annotations/validation'))),
        test_evaluator=dict(type='IoUMetric', iou_metrics=['mIoU']), test_cfg=dict(type='TestLoop'),
        custom_hooks=[dict(type='FusedEvalHook')], log_level='INFO')


def det_config(data_root, detector='faster', backbone='doconv'):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(64, 64), keep_ratio=True),
                dict(type='LoadAnnotations', with_bbox=True),
                dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                                      'scale_factor'))]
    return dict(
        default_scope='mmdet', custom_imports=dict(imports=['reparam_mm'], allow_failed_imports=False),
        model=det_model_cfg(detector, backbone),
        test_dataloader=_loader(dict(type='CocoDataset', data_root=str(data_root), ann_file='annotations.json',
                                     data_prefix=dict(img='val/'), metainfo=dict(classes=('person', 'car')),
                                     test_mode=True, pipeline=pipeline)),
        test_evaluator=dict(type='CocoMetric', ann_file=str(data_root / 'annotations.json'), metric='bbox'),
        test_cfg=dict(type='TestLoop'), custom_hooks=[dict(type='FusedEvalHook')], log_level='INFO')


def write_case(tmp_path, cfg_dict, seed=0):
    """Dump the config and a checkpoint of the (perturbed, untrained) model; return their paths."""
    from mmengine.config import Config
    torch.manual_seed(seed)
    model = perturb(build(cfg_dict['model'], cfg_dict['default_scope']), seed)
    with torch.no_grad():  # a confident classifier, so detection ranks are not near-ties
        for name, p in model.named_parameters():
            if name.endswith(('fc_cls.weight', 'conv_seg.weight')):
                p.mul_(50)
    cfg_path = tmp_path / 'tiny.py'
    Config(cfg_dict).dump(str(cfg_path))
    ckpt = _save(tmp_path / 'tiny.pth', model.state_dict(), dict(dataset_meta=None))
    return str(cfg_path), ckpt


def test_a_checkpoint_of_another_model_fails_before_the_runner_is_built(tmp_path, monkeypatch):
    """Keys are checked against the config's model built on the meta device, so the error is
    not preceded by the runner's page of environment and config."""
    import reparam_mm.train
    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade')))
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    state['decode_head.conv_seg.weight'] = state['decode_head.conv_seg.weight'][:2]
    state['decode_head.conv_seg.bias'] = state['decode_head.conv_seg.bias'][:2]
    other = _save(tmp_path / 'other.pth', state)
    monkeypatch.setattr(reparam_mm.train, 'build_runner',
                        lambda cfg: pytest.fail('the runner was built before the keys were checked'))
    with pytest.raises(CheckpointMismatchError, match=r'2 shape mismatches \(decode_head\.conv_seg'
                                                      r'.*trained with another variant'):
        load_tool('test').main([cfg, other, '--work-dir', str(tmp_path / 'w')])


def test_detection_out_must_be_a_pickle_file(tmp_path):
    from mmengine.config import Config
    from reparam_mm.apis import build_test_cfg
    cfg = Config(det_config(tmp_path / 'coco'))
    with pytest.raises(ValueError, match=r'--out r\.json: detection results are dumped to a '
                                         r'pickle file; give a path ending in \.pkl\.'):
        build_test_cfg(cfg, out='r.json')
    assert build_test_cfg(cfg, out='r.pkl').test_evaluator is not None


def test_segmentation_out_must_be_a_folder(tmp_path):
    """mmseg made a folder named results.pkl, of PNGs, for a user who asked for a pickle."""
    from mmengine.config import Config
    from reparam_mm.apis import build_test_cfg
    cfg = Config(seg_config(tmp_path / 'data'))
    with pytest.raises(ValueError, match=r"^--out results\.pkl: a segmentor's predictions are written as "
                                         r"label-map PNGs into the folder --out names .* give a folder: "
                                         r"--out results/\.$"):
        build_test_cfg(cfg, out='results.pkl')
    assert build_test_cfg(cfg, out=str(tmp_path / 'preds')).test_evaluator['output_dir'] == str(tmp_path / 'preds')


def test_test_cfg_keeps_the_configs_hook_settings_and_loads_only_strictly(tmp_path):
    from mmengine.config import Config
    from reparam_mm.apis import build_test_cfg
    cfg = Config(seg_config(tmp_path / 'ade'))
    cfg.custom_hooks = [dict(type='FusedEvalHook', tolerance=1e-3, fuse_bn=True)]
    cfg.load_from = str(tmp_path / 'other.pth')  # the runner must not load it (strict=False)
    test_cfg = build_test_cfg(cfg)
    assert test_cfg.custom_hooks == [dict(type='FusedEvalHook', tolerance=1e-3, fuse_bn=True)]
    assert test_cfg.load_from is None and test_cfg.resume is False
    assert build_test_cfg(cfg, fuse=False).custom_hooks == []


def test_tools_test_segmentor_fused_equals_unfused(tmp_path, capsys):
    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade')))
    test = load_tool('test')
    fused = test.main([cfg, ckpt, '--work-dir', str(tmp_path / 'wf'), '--out', str(tmp_path / 'pf')])
    log = capsys.readouterr().out
    assert 'fused 29 module(s) (DOConv2d: 29)' in log and 'max rel diff' in log and 'mIoU' in log
    unfused = test.main([cfg, ckpt, '--no-fuse', '--work-dir', str(tmp_path / 'wu'),
                         '--out', str(tmp_path / 'pu')])
    assert 'FusedEvalHook' not in capsys.readouterr().out
    assert fused == unfused and fused['mIoU'] > 0
    preds = sorted((tmp_path / 'pf').glob('*.png'))
    assert len(preds) == 4
    for p in preds:
        assert np.array_equal(np.array(Image.open(p)), np.array(Image.open(tmp_path / 'pu' / p.name)))


def test_tools_test_detector_fused_equals_unfused(tmp_path, capsys):
    cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'coco')))
    test = load_tool('test')
    fused = test.main([cfg, ckpt, '--work-dir', str(tmp_path / 'wf'), '--out', str(tmp_path / 'f.pkl')])
    assert 'fused 27 module(s) (DOConv2d: 27)' in capsys.readouterr().out
    unfused = test.main([cfg, ckpt, '--no-fuse', '--work-dir', str(tmp_path / 'wu'),
                         '--out', str(tmp_path / 'u.pkl')])
    assert fused == unfused and 'coco/bbox_mAP' in fused
    with open(tmp_path / 'f.pkl', 'rb') as f, open(tmp_path / 'u.pkl', 'rb') as u:
        pf, pu = pickle.load(f), pickle.load(u)
    # an untrained model's mAP is luck; its boxes are what both must share
    assert sum(len(p['pred_instances']['labels']) for p in pf) >= 10
    for a, b in zip(pf, pu):
        a, b = a['pred_instances'], b['pred_instances']
        assert torch.equal(a['labels'], b['labels'])
        assert torch.allclose(a['bboxes'], b['bboxes'], atol=1e-3)
        assert torch.allclose(a['scores'], b['scores'], atol=1e-5)


def test_a_detector_that_keeps_no_box_is_said_to(tmp_path):
    """No box above the score threshold on any image: mmdet's CocoMetric returns no metric and
    the test ended as if it had passed; a warning names the threshold and the override."""
    import logging

    from conftest import mmengine_log
    cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'coco', n=1)))
    with mmengine_log() as records:
        metrics = load_tool('test').main([cfg, ckpt, '--work-dir', str(tmp_path / 'w'),
                                          '--cfg-options', 'model.test_cfg.rcnn.score_thr=1.01'])
    said = [r.getMessage() for r in records if r.levelno == logging.WARNING
            and r.getMessage().startswith('test: no metric')]
    assert metrics == {} and said == [
        "test: no metric was computed: the detector kept no box above its score threshold on any "
        "test image, and mmdet's CocoMetric then returns nothing (a model trained for only a few "
        'iterations does this); to score what it predicts, lower model.test_cfg.rcnn.score_thr '
        '(now 1.01): --cfg-options model.test_cfg.rcnn.score_thr=0.0.']
    with mmengine_log() as records:
        assert load_tool('test').main([cfg, ckpt, '--work-dir', str(tmp_path / 'w2')])
    assert not [r for r in records if r.getMessage().startswith('test: no metric')]


@pytest.mark.timeout(120)
@pytest.mark.parametrize('kind', ['seg-replknet', 'det-doconv'])
def test_fuse_tool_deploy_round_trip(tmp_path, kind, capsys):
    from mmengine.config import Config
    from reparam_mm.apis import run_test
    if kind == 'seg-replknet':
        cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'data'), backbone='replknet'))
    else:
        cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'data')))
    result = load_tool('fuse').main([cfg, ckpt, str(tmp_path / 'deploy'), '--shape', '64', '64'])
    assert result['check']['same_structure'] and result['check']['max_rel'] < 1e-5
    dcfg, dckpt = result['config'], result['checkpoint']
    assert result['replaced'] == []
    if kind == 'seg-replknet':  # a second export into the same folder says what it replaced
        again = load_tool('fuse').main([cfg, ckpt, str(tmp_path / 'deploy'), '--shape', '64', '64',
                                        '--cfg-options', 'model.decode_head.dropout_ratio=0.25'])
        assert again['replaced'] == [dckpt, dcfg]
        assert Config.fromfile(dcfg).model.decode_head.dropout_ratio == 0.25  # kept in the deploy config
    src, deploy = Config.fromfile(cfg).model, Config.fromfile(dcfg).model
    assert deploy.backbone.stage_with_doconv == (False,) * 4 and deploy.backbone.type == src.backbone.type

    def heads(m):
        return [m.decode_head, m.auxiliary_head] if kind.startswith('seg') else \
            [m.neck, m.rpn_head, m.roi_head.bbox_head]
    assert all(h.conv_cfg == dict(type='DOConv') for h in heads(src))
    assert all(h.conv_cfg is None for h in heads(deploy))
    if kind == 'seg-replknet':
        assert deploy.backbone.small_kernel_merged is True
    meta = torch.load(dckpt, map_location='cpu', weights_only=True)['meta']['reparam_mm']
    assert meta['deploy'] and meta['fuse_report']['params_after'] < meta['fuse_report']['params_before']
    # the deploy pair is a plain model: its metric is the unfused training checkpoint's
    unfused = run_test(cfg, ckpt, fuse=False, work_dir=str(tmp_path / 'wu'))
    with mmengine_log() as records:
        assert run_test(dcfg, dckpt, work_dir=str(tmp_path / 'wd')) == unfused
    # nothing to fuse: said so, and checked as evaluated vs loaded, not 'fused vs unfused'
    said = [r.getMessage() for r in records if r.getMessage().startswith('FusedEvalHook')]
    assert len(said) == 2 and said[0].startswith(
        'FusedEvalHook: testing the model as it is: nothing to fuse (already in its deploy form'), said
    assert said[1].startswith('FusedEvalHook: evaluated vs loaded outputs on the first batch'), said
    # --no-fuse on the deploy pair tests the same model: it was called 'unfused'
    capsys.readouterr()
    with mmengine_log() as records:
        load_tool('test').main([dcfg, dckpt, '--no-fuse', '--work-dir', str(tmp_path / 'wn')])
    assert f'deploy model metrics: {json.dumps(unfused, default=float)}' in capsys.readouterr().out
    assert any(r.getMessage().endswith('testing the deploy model: its checkpoint is a deploy one '
                                       '(tools/fuse.py wrote it), with nothing left to fuse, so it '
                                       'runs as loaded, with or without --no-fuse') for r in records)
    if kind == 'seg-replknet':
        image = next(p for p in (tmp_path / 'data').rglob('*.jpg'))
        load_tool('infer').main([dcfg, dckpt, str(image), '--no-fuse', '--out-dir', str(tmp_path / 'inf')])
        out = capsys.readouterr().out
        assert 'deploy model predicted 1 image(s)' in out and 'unfused' not in out
    # crossing the pairs is an error naming the keys, never a partial load
    with pytest.raises(CheckpointMismatchError, match=r'missing keys \(.*deploy config written beside it'):
        run_test(cfg, dckpt, work_dir=str(tmp_path / 'x1'))
    with pytest.raises(CheckpointMismatchError, match=r'unexpected keys \(.*training config'):
        run_test(dcfg, ckpt, work_dir=str(tmp_path / 'x2'))
    # fusing the deploy pair again is refused instead of writing *_deploy_deploy.*
    with pytest.raises(ValueError, match=rf'checkpoint {re.escape(dckpt)} is already fused: '
                                         rf'tools/fuse.py wrote it, with {re.escape(dcfg)}; .*'
                                         rf'training checkpoint it came from \({re.escape(ckpt)}\)'):
        load_tool('fuse').main([dcfg, dckpt, str(tmp_path / 'again'), '--shape', '64', '64'])
    assert not (tmp_path / 'again').exists()


def test_fuse_tool_writes_nothing_when_the_deploy_model_differs(tmp_path):
    from reparam_mm.cli import input_error_message
    from reparam_mm.scope import ConfigError
    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'data'), backbone='replknet'))
    with pytest.raises(RuntimeError, match='does not reproduce the unfused one .*nothing written') as err:
        load_tool('fuse').main([cfg, ckpt, str(tmp_path / 'deploy'), '--shape', '64', '64',
                                '--tolerance', '0'])
    assert not (tmp_path / 'deploy').exists()
    assert input_error_message(err.value) == str(err.value)  # printed as one line, no traceback
    # a deploy pair without the meta that names it (a state dict saved by hand): nothing to fuse
    deploy = load_tool('fuse').main([cfg, ckpt, str(tmp_path / 'deploy'), '--shape', '64', '64'])
    bare = tmp_path / 'bare.pth'
    torch.save({'state_dict': torch.load(deploy['checkpoint'], weights_only=True)['state_dict']}, bare)
    with pytest.raises(ConfigError, match=r'^nothing to fuse: .*_deploy\.py builds no '
                       r're-parameterisable layer .*bare\.pth already is what tools/fuse\.py would '
                       r'write; test, export or deploy that pair as it is\.$'):
        load_tool('fuse').main([deploy['config'], str(bare), str(tmp_path / 'again')])
    assert not (tmp_path / 'again').exists()
    # an OUT_DIR that is a file: said before anything is built
    (tmp_path / 'afile').write_text('')
    with pytest.raises(FileExistsError, match=r'afile is a file; give tools/fuse.py a folder') as err:
        load_tool('fuse').main([cfg, ckpt, str(tmp_path / 'afile')])
    assert input_error_message(err.value) == str(err.value)


def test_deploy_config_rewrites_only_reparameterisable_parts():
    from mmengine.config import Config
    from reparam_mm.apis import deploy_config
    cfg = Config(dict(default_scope='mmdet', model=dict(
        type='FasterRCNN', backbone=dict(type='DOResNet', stage_with_doconv=(False, True, True, True),
                                         doconv_cfg=dict(type='DOConv')),
        neck=dict(type='FPN', conv_cfg=dict(type='DOConv', D_mul=12)),
        rpn_head=dict(type='ConvCfgRPNHead', conv_cfg=dict(type='Conv2d')),
        extra=[dict(type='DOConv', in_channels=3, out_channels=4, kernel_size=3, D_mul=9)],
        rep=dict(type='RepLKNet', arch='tiny'))))
    deploy, changes = deploy_config(cfg)
    m = deploy.model
    assert m.backbone.stage_with_doconv == (False,) * 4
    assert m.backbone.doconv_cfg == dict(type='DOConv')  # the switch, not the layer cfg, turns DO-Conv off
    assert m.neck.conv_cfg is None and m.rpn_head.conv_cfg == dict(type='Conv2d')
    assert m.extra[0] == dict(type='Conv2d', in_channels=3, out_channels=4, kernel_size=3)
    assert m.rep.small_kernel_merged is True
    assert len(changes) == 4 and cfg.model.neck.conv_cfg.type == 'DOConv'  # the input is not modified


def test_tools_test_tta_fused_equals_unfused(tmp_path, capsys):
    cfg = seg_config(make_ade(tmp_path / 'ade', n=2))
    cfg['tta_model'] = dict(type='SegTTAModel')
    cfg['tta_pipeline'] = [
        dict(type='LoadImageFromFile'),
        dict(type='TestTimeAug', transforms=[
            [dict(type='Resize', scale=(64, 64), keep_ratio=True)],
            [dict(type='RandomFlip', prob=p, direction='horizontal') for p in (0., 1.)],
            [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])]
    cfg, ckpt = write_case(tmp_path, cfg)
    test = load_tool('test')
    fused = test.main([cfg, ckpt, '--tta', '--work-dir', str(tmp_path / 'wf')])
    log = capsys.readouterr().out
    assert 'fused 29 module(s)' in log
    assert float(re.search(r'max rel diff ([0-9.e+-]+)', log).group(1)) < 1e-5  # checked under TTA too
    assert test.main([cfg, ckpt, '--tta', '--no-fuse', '--work-dir', str(tmp_path / 'wu')]) == fused


def test_tools_test_amp_runs_the_test_loop_under_autocast(tmp_path, capsys, monkeypatch):
    import mmengine.runner.loops as loops
    seen, real = [], loops.autocast

    def spy(*args, **kwargs):
        seen.append(kwargs.get('enabled'))
        return real(*args, **kwargs)

    monkeypatch.setattr(loops, 'autocast', spy)
    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade')))
    test = load_tool('test')
    amp = test.main([cfg, ckpt, '--amp', '--work-dir', str(tmp_path / 'wa')])
    assert seen and set(seen) == {True}  # every test iteration ran under autocast (bf16 on CPU)
    out = capsys.readouterr().out
    assert 'max rel diff' in out  # the fused-vs-unfused check still ran, in fp32
    # and once more under the loop's bf16 autocast, at a bf16 tolerance
    amp_diff = re.search(r'under bf16 autocast: mean rel diff ([0-9.e+-]+) \(max [0-9.e+-]+\), within', out)
    assert amp_diff and 0 < float(amp_diff.group(1)) < 5e-2
    seen.clear()
    fp32 = test.main([cfg, ckpt, '--work-dir', str(tmp_path / 'wf')])
    assert set(seen) == {False}
    assert abs(amp['mIoU'] - fp32['mIoU']) < 5  # bf16 rounding may flip a few pixels, not more


def test_tta_pipeline_derived_from_the_test_pipeline_flips_images_not_labels(tmp_path):
    """--tta on a config without tta_pipeline: each image as it is and flipped, labels as loaded."""
    from mmcv.transforms import Compose
    from mmengine.registry import init_default_scope
    from reparam_mm.apis import flip_tta_pipeline
    init_default_scope('mmseg')
    cfg = seg_config(make_ade(tmp_path / 'ade', n=1))
    tta = flip_tta_pipeline(cfg['test_dataloader']['dataset']['pipeline'])
    assert [t['type'] for t in tta] == ['LoadImageFromFile', 'Resize', 'TestTimeAug']
    root = tmp_path / 'ade'
    sample = dict(img_path=str(root / 'images/validation/ADE_val_00000000.jpg'),
                  seg_map_path=str(root / 'annotations/validation/ADE_val_00000000.png'),
                  reduce_zero_label=True, seg_fields=[])
    views = Compose(tta)(dict(sample))
    plain = Compose(cfg['test_dataloader']['dataset']['pipeline'])(dict(sample))
    (img0, img1), (meta0, meta1) = views['inputs'], views['data_samples']
    assert [meta0.flip, meta1.flip] == [False, True] and meta1.flip_direction == 'horizontal'
    assert torch.equal(img0, plain['inputs']) and torch.equal(img1, plain['inputs'].flip(-1))
    for meta in (meta0, meta1):  # the metric reads the labels as they are on disk
        assert torch.equal(meta.gt_sem_seg.data, plain['data_samples'].gt_sem_seg.data)
    det = flip_tta_pipeline(det_config(tmp_path)['test_dataloader']['dataset']['pipeline'])
    assert det[-1]['transforms'][-1][0]['meta_keys'][-2:] == ('flip', 'flip_direction')
    with pytest.raises(ValueError, match='must end in its Pack'):
        flip_tta_pipeline([dict(type='LoadImageFromFile')])


def test_tta_on_a_detector_that_predicts_masks_is_refused_before_the_run(tmp_path):
    """mmdet 3.3.0's DetTTAModel merges boxes only and asserts so; Cascade Mask R-CNN's mask head
    fails first, in merge_aug_masks on the flipped view (a user audit hit it on the shipped
    RepLKNet and UniRepLKNet configs): refused in one sentence before anything is loaded."""
    from reparam_mm.apis import build_test_cfg
    from reparam_mm.scope import ConfigError
    config = ROOT / ('configs/replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_'
                     '16xb1-ms-crop-3x_coco.py')
    with pytest.raises(ConfigError, match=r"^--tta: this detector predicts masks \(model\.roi_head\.mask_head\), "
                                          r"and mmdet 3\.3\.0's DetTTAModel merges boxes only .*: test it "
                                          r'without --tta\.$'):
        build_test_cfg(str(config), work_dir=str(tmp_path), tta=True)
    cfg = build_test_cfg(str(config), work_dir=str(tmp_path))  # without --tta it builds
    assert cfg.model.type == 'CascadeRCNN'


@pytest.mark.parametrize('kind', ['seg', 'det'])
def test_tools_test_tta_without_tta_settings_uses_flip_tta(tmp_path, capsys, kind):
    if kind == 'seg':
        cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade', n=2)))
        metric = 'mIoU'
    else:
        cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'coco', n=2)))
        metric = 'coco/bbox_mAP'
    test = load_tool('test')
    plain = test.main([cfg, ckpt, '--work-dir', str(tmp_path / 'wp')])
    capsys.readouterr()
    fused = test.main([cfg, ckpt, '--tta', '--work-dir', str(tmp_path / 'wf')])
    log = capsys.readouterr().out
    model = 'SegTTAModel' if kind == 'seg' else 'DetTTAModel'
    assert (f'--tta: the config has no tta_model or tta_pipeline; testing each image as it is and '
            f'flipped, merged by {model}') in log
    assert float(re.search(r'max rel diff ([0-9.e+-]+)', log).group(1)) < 1e-4  # fused check ran
    unfused = test.main([cfg, ckpt, '--tta', '--no-fuse', '--work-dir', str(tmp_path / 'wu')])
    assert fused == unfused and 0 <= fused[metric] <= 100 and metric in plain
