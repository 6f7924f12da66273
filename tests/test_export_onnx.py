"""tools/export_onnx.py: fused models exported to ONNX and checked in onnxruntime.

Tiny UperNet (RepLKNet-tiny: kernels 31/29/27/13, DO-Conv) and Faster R-CNN (DO-Conv)
at 64x64; each export takes a few seconds.
"""
import os.path as osp
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import reparam_mm  # noqa: F401
from conftest import load_tool
from test_tools_test_fuse import det_config, make_ade, make_coco, seg_config, write_case


def _ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    outputs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    return [torch.from_numpy(o) for o in outputs]


def _rel(ref, out):
    return ((ref.double() - out.double()).abs().max() / ref.double().abs().max()).item()


def _conv_kernels(path):
    """{(kh, kw, group)} of the Conv nodes and the op types of an ONNX file."""
    model = onnx.load(str(path))
    kernels = set()
    for node in model.graph.node:
        if node.op_type == 'Conv':
            attrs = {a.name: a for a in node.attribute}
            kernels.add((*attrs['kernel_shape'].ints, attrs['group'].i if 'group' in attrs else 1))
    return kernels, {n.op_type for n in model.graph.node}, {n.domain for n in model.graph.node}


def _seg_case(tmp_path):
    return write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade', n=1), backbone='replknet'))


def test_segmentor_export_matches_the_unfused_model_in_onnxruntime(tmp_path, capsys):
    cfg, ckpt = _seg_case(tmp_path)
    out = tmp_path / 'seg.onnx'
    result = load_tool('export_onnx').main([cfg, ckpt, str(out), '--shape', '64', '64', '--dynamic',
                                           '--argmax'])
    log = capsys.readouterr().out
    assert 'fused 29 module(s)' in log and log.count('-- PASS') == 2  # 64x64, then another size
    assert all(c['ok'] for c in result['checks']) and result['output_names'] == ['logits', 'labels']

    # standard ops only: one plain depthwise Conv per large kernel, no FFT (DFT) nodes
    kernels, ops, domains = _conv_kernels(out)
    assert {k[:2] for k in kernels if k[2] > 1} >= {(31, 31), (29, 29), (27, 27), (13, 13)}
    assert 'DFT' not in ops and 'STFT' not in ops and domains <= {'', 'ai.onnx'}

    # independent reference: the UNFUSED model through mmseg's own inference, at a new size
    from mmengine.config import Config
    from reparam_mm.apis import build_model, load_checkpoint_strict
    c = Config.fromfile(cfg)
    unfused = build_model(c).eval()
    load_checkpoint_strict(unfused, ckpt)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(3))
    metas = [dict(img_shape=(96, 80), pad_shape=(96, 80), ori_shape=(96, 80))] * 2
    with torch.no_grad():
        ref = unfused.inference(x, metas)
    logits, labels = _ort(out, {'input': x})
    assert logits.shape == ref.shape == (2, 4, 96, 80)
    assert _rel(ref, logits) < 1e-4
    assert (labels == ref.argmax(1)).double().mean() > 0.999


def test_large_kernel_dispatch_exports_a_plain_conv_even_when_fft_is_forced(tmp_path):
    from reparam_mm.layers.large_kernel import LargeKernelDWConv2d, forced_candidate
    conv = LargeKernelDWConv2d(8, 31, bias=True).eval()
    x = torch.randn(1, 8, 40, 36)
    with forced_candidate('fft'), torch.no_grad():
        eager = conv(x)  # computed through FFTs
        torch.onnx.export(conv, (x,), str(tmp_path / 'dw.onnx'), dynamo=False, opset_version=17,
                          input_names=['x'])
    kernels, ops, _ = _conv_kernels(tmp_path / 'dw.onnx')
    assert kernels == {(31, 31, 8)} and 'DFT' not in ops
    assert _rel(F.conv2d(x, conv.weight, conv.bias, padding=15, groups=8), eager) < 1e-5
    assert _rel(eager, _ort(tmp_path / 'dw.onnx', {'x': x})[0]) < 1e-5


def test_detector_export_dense_and_roi_outputs(tmp_path, capsys):
    cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'coco', n=1)))
    out = tmp_path / 'det.onnx'
    result = load_tool('export_onnx').main([cfg, ckpt, str(out), '--shape', '64', '64', '--dynamic',
                                           '--num-proposals', '40'])
    assert capsys.readouterr().out.count('-- PASS') == 2
    names = result['output_names']
    assert names[:5] == [f'rpn_cls_score_l{i}' for i in range(5)]
    assert names[-2:] == ['roi_cls_score', 'roi_bbox_pred']
    assert result['input_names'] == ['input', 'proposals']
    _, ops, domains = _conv_kernels(out)
    assert 'RoiAlign' in ops and domains <= {'', 'ai.onnx'}

    # proposals that all fall on the finest FPN level (mmdet's extractor skips empty levels):
    # the exported graph still pools each RoI from its own level
    graph = result['model']
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(5))
    boxes = torch.tensor([[2., 3., 12., 14.], [30., 40., 41., 47.], [10., 50., 20., 60.]])
    with torch.no_grad():
        ref = graph(x, boxes)
    got = _ort(out, {'input': x, 'proposals': boxes})
    assert len(got) == len(ref) == 12
    for r, g in zip(ref, got):
        assert r.shape == g.shape and _rel(r, g) < 1e-4


def test_export_refuses_bad_input_and_fails_loudly_above_the_tolerance(tmp_path, capsys):
    from reparam_mm.export import NotExportableError, OnnxCheckError
    tool = load_tool('export_onnx')
    coco = make_coco(tmp_path / 'coco', n=1)
    cfg, ckpt = write_case(tmp_path, det_config(coco))
    with pytest.raises(ValueError, match='pads its inputs to multiples of 32.*a multiple of 32'):
        tool.main([cfg, ckpt, str(tmp_path / 'a.onnx'), '--shape', '64', '70'])
    with pytest.raises(ValueError, match='needs opset 16'):
        tool.main([cfg, ckpt, str(tmp_path / 'a.onnx'), '--shape', '64', '64', '--opset', '13'])
    out = tmp_path / 'b.onnx'
    with pytest.raises(OnnxCheckError, match=r"output .* differs from PyTorch's .* > 0e\+00") as err:
        tool.main([cfg, ckpt, str(out), '--shape', '64', '64', '--tolerance', '0'])
    assert not out.exists()  # nothing left to deploy by mistake
    from reparam_mm.cli import input_error_message  # printed as one line, no traceback
    assert input_error_message(err.value) == str(err.value)
    # a failure of any kind after the export began leaves no file either (here: onnxruntime)
    import reparam_mm.export as export

    def no_session(path):
        assert osp.isfile(path)
        raise RuntimeError('onnxruntime could not load it')
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match='could not load'):
        mp.setattr(export, 'ort_session', no_session)
        tool.main([cfg, ckpt, str(out), '--shape', '64', '64'])
    assert not out.exists()
    # arguments no export can use are refused by the parser, before anything is built
    for flag, value, said in [('--num-proposals', '0', "'0' is not a count"),
                              ('--tolerance', '-1', "'-1' is not a tolerance"),
                              ('--opset', '7', 'invalid choice: 7')]:
        with pytest.raises(SystemExit):
            tool.parse_args([cfg, ckpt, str(out), flag, value])
        assert said in capsys.readouterr().err
    (tmp_path / 'cascade').mkdir()
    cfg, ckpt = write_case(tmp_path / 'cascade', det_config(coco, detector='cascade'))
    with pytest.raises(NotExportableError, match='CascadeRoIHead has 3 stages.*single-stage RoI') as err:
        tool.main([cfg, ckpt, str(out), '--shape', '64', '64'])
    from reparam_mm.cli import input_error_message  # the tools print it as one line
    assert input_error_message(err.value) == str(err.value)


def test_export_checks_the_fused_model_against_the_trained_one_and_notes_a_sliding_test(tmp_path, capsys):
    """onnxruntime was compared with the fused model only: a layer that fused wrongly exported
    with a PASS. And a config that tests by sliding a window exported whole-image inference
    without a word (its mIoU differs)."""
    import reparam_mm.export as export
    from reparam_mm.apis import DeployCheckError
    from reparam_mm.fuse import fuse_with_report
    cfg, ckpt = _seg_case(tmp_path)
    tool = load_tool('export_onnx')
    slide = ['--cfg-options', 'model.test_cfg.mode=slide', 'model.test_cfg.crop_size=(32,32)',
             'model.test_cfg.stride=(16,16)']
    tool.main([cfg, ckpt, str(tmp_path / 'ok.onnx'), '--shape', '64', '64', *slide])
    log = capsys.readouterr().out
    assert re.search(r'fused vs unfused \(PyTorch, input 1x3x64x64\): max rel diff [0-9.e+-]+ '
                     r'\(tolerance 1e-04\)', log)
    assert ("note: the config tests by sliding a window (model.test_cfg.mode='slide', crops (32, 32) "
            "every (16, 16)); the exported graph runs the whole input at once") in log

    def fused_wrongly(model):
        fused, report = fuse_with_report(model)
        with torch.no_grad():
            fused.decode_head.conv_seg.weight.mul_(1.5)
        return fused, report
    out = tmp_path / 'bad.onnx'
    with pytest.MonkeyPatch.context() as mp, \
            pytest.raises(DeployCheckError, match=r'^the fused model differs from the unfused one '
                                                  r'\(max rel diff .* > 1e-04 on input 1x3x64x64\); '
                                                  r'nothing was exported'):
        mp.setattr(export, 'fuse_with_report', fused_wrongly)
        tool.main([cfg, ckpt, str(out), '--shape', '64', '64'])
    assert not out.exists()


def test_adaptive_pool_rewrite_matches_pytorch_on_uneven_sizes():
    from reparam_mm.export import _adaptive_avg_pool_forward
    for size in [(16, 16), (13, 22), (7, 6), (5, 9)]:
        x = torch.randn(2, 3, *size)
        for bins in (1, 2, 3, 6, (2, 5)):
            pool = torch.nn.AdaptiveAvgPool2d(bins)
            assert torch.allclose(_adaptive_avg_pool_forward(pool, x), pool(x), atol=1e-6)


def test_deploy_pair_from_fuse_tool_exports_with_nothing_left_to_fuse(tmp_path, capsys):
    cfg, ckpt = _seg_case(tmp_path)
    deploy = load_tool('fuse').main([cfg, ckpt, str(tmp_path / 'deploy'), '--shape', '64', '64'])
    result = load_tool('export_onnx').main([deploy['config'], deploy['checkpoint'],
                                           str(tmp_path / 'd.onnx'), '--shape', '64', '64'])
    assert result['report'].total == 0 and result['checks'][0]['ok']
    assert 'nothing to fuse' in capsys.readouterr().out
    assert np.isfinite(result['checks'][0]['worst']['max_rel'])


def test_onnx_grid_predicts_what_the_mmseg_pipeline_predicts(tmp_path):
    """normalise_image feeds the ONNX file what mmseg's pipeline feeds the model (RGB order,
    mean, std): its logits are the fused model's test_step ones on the same file (with the
    channels swapped they were 0.24 off, relative), and the grid paints their argmax."""
    from mmengine.dataset import pseudo_collate
    from mmseg.registry import DATASETS
    from PIL import Image
    from reparam_mm.export import load_fused, normalise_image
    from reparam_mm.visualization import colorize, onnx_segmentation_grid
    cfg, ckpt = _seg_case(tmp_path)
    out = tmp_path / 'seg.onnx'
    load_tool('export_onnx').main([cfg, ckpt, str(out), '--shape', '64', '64'])
    c, model, _ = load_fused(cfg, ckpt)
    item = DATASETS.build(c.test_dataloader.dataset)[0]
    with torch.no_grad():
        result = model.test_step(pseudo_collate([item]))[0]
    sample = item['data_samples']
    image = np.array(Image.open(sample.img_path).convert('RGB'))
    logits = _ort(out, {'input': normalise_image(image, c)})[0][0]
    assert _rel(result.seg_logits.data, logits) < 1e-4
    pred = result.pred_sem_seg.data[0].numpy()
    palette = [[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]]
    grid = np.array(Image.open(onnx_segmentation_grid(
        out, c, [(sample.img_path, sample.seg_map_path)], palette, tmp_path / 'grid.png')))
    assert grid.shape == (14 + 128, 3 * 128 + 2 * 4, 3)  # title row, three 2x-upscaled tiles
    tile = grid[14:, 2 * (128 + 4):][::2, ::2]
    assert (tile == colorize(pred, palette)).all()
    truth = grid[14:, 128 + 4:2 * 128 + 4][::2, ::2]
    label = np.array(Image.open(sample.seg_map_path)).astype(np.int64)
    assert (truth == colorize(np.where(label == 0, 255, label - 1), palette)).all()
