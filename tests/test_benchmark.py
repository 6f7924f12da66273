"""tools/benchmark.py, tools/bench_report.py and benchmarks/: formulas, arithmetic and schema,
never timings."""
import copy
import json
import math
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import reparam_mm  # noqa: F401
from benchmarks import doconv_layers as DL
from benchmarks import large_dw as LDW
from benchmarks import measure as M
from benchmarks.doconv_profile import composition_ms, doconv_layers, optimizer_step_ms
from benchmarks import models as BM
from benchmarks import report
from conftest import ROOT, load_tool
from reparam_mm.batches import synthetic_batch
from reparam_mm.cpu_malloc import release_freed_memory
from reparam_mm.layers.doconv import DOConv2d
from reparam_mm.scope import ConfigError

DEMO_DO = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'


# -- the authors' DO-Conv formulation (baseline) equals DOConv2d ---------------------------------
@pytest.mark.parametrize('cin,cout,groups,d_mul', [(6, 10, 1, None), (6, 10, 1, 13), (8, 8, 8, 11)])
def test_authors_formulation_equals_doconv2d(cin, cout, groups, d_mul):
    torch.manual_seed(0)
    ours = DOConv2d(cin, cout, 3, padding=1, groups=groups, bias=False, D_mul=d_mul)
    ref = DL.AuthorsDOConv2d(cin, cout, 3, padding=1, groups=groups, D_mul=d_mul)
    with torch.no_grad():
        ours.D.normal_(0, 0.3)
        ref.W.copy_(ours.W)
        ref.D.copy_(ours.D)
    # the frozen identity: MN x MN eyes tiled along D_mul, zero columns after
    assert torch.equal(ref.D_diag[0], ours.identity)
    x = torch.randn(2, cin, 7, 5)
    torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.composed_weight(), ours.composed_weight(), rtol=1e-5,
                               atol=1e-6)


def test_authors_formulation_is_not_trivially_equal():
    """The comparison above can fail: a different D gives a different kernel."""
    torch.manual_seed(0)
    ours = DOConv2d(4, 4, 3, padding=1, bias=False)
    ref = DL.AuthorsDOConv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        ref.W.copy_(ours.W)
        ref.D.normal_(0, 0.3)
    assert not torch.allclose(ref.composed_weight(), ours.composed_weight(), atol=1e-3)


def test_candidate_composition_matches_values_and_gradients():
    torch.manual_seed(0)
    layers = DL.doconv_layers(12)
    ours, cand = layers['doconv'], layers['doconv_t2d']
    k_ours, k_cand = ours.composed_weight(), cand.composed_weight()
    torch.testing.assert_close(k_cand, k_ours, rtol=1e-6, atol=1e-6)
    assert k_cand.is_contiguous()
    g = torch.randn_like(k_ours)
    grads = [torch.autograd.grad(k, (m.W, m.D), g)
             for k, m in ((ours.composed_weight(), ours), (cand.composed_weight(), cand))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_layer_set_computes_one_kernel():
    layers = DL.doconv_layers(8)
    assert tuple(layers) == DL.LAYER_KEYS
    x = torch.randn(1, 8, 6, 6)
    ref = layers['plain'](x)
    for key in DL.LAYER_KEYS[1:]:
        torch.testing.assert_close(layers[key](x), ref, rtol=1e-5, atol=1e-5, msg=key)


# -- arithmetic of the statistics ---------------------------------------------------------------
def test_summarize_statistics():
    s = M.summarize([0.1, 0.3, 0.2, 0.4], batch=2)
    assert s['n'] == 4 and s['times_ms'] == [100.0, 300.0, 200.0, 400.0]
    assert s['median_ms'] == pytest.approx(250.0)
    assert s['p25_ms'] == pytest.approx(175.0) and s['p75_ms'] == pytest.approx(325.0)
    assert s['spread'] == pytest.approx(150.0 / 250.0)
    assert s['images_per_s'] == pytest.approx(2 / 0.25)
    with pytest.raises(ValueError, match='at least one'):
        M.summarize([])


def test_ratio_stats():
    q = M.ratio_stats([1.0, 2.0, 4.0], [1.5, 2.0, 2.0])
    assert q['median_ratio'] == pytest.approx(2.0 / 2.0)
    assert q['paired_median'] == pytest.approx(1.0)  # paired: 1.5, 1.0, 0.5
    assert (q['paired_min'], q['paired_max']) == pytest.approx((0.5, 1.5))
    assert (q['paired_p25'], q['paired_p75']) == pytest.approx((0.75, 1.25))
    with pytest.raises(ValueError, match='equally long'):
        M.ratio_stats([1.0], [1.0, 2.0])


def test_contradicting_ratios_are_flagged():
    """A loaded machine printed 'B / A latency: 0.395 (paired median 1.717, ...)' without a word."""
    assert M.ratio_warning(dict(median_ratio=1.0, paired_median=1.1)) is None
    assert M.ratio_warning(dict(median_ratio=0.99, paired_median=1.01)) is None  # noise around 1
    assert 'point different ways' in M.ratio_warning(dict(median_ratio=0.395, paired_median=1.717))
    assert 'point different ways' in M.ratio_warning(dict(median_ratio=0.9, paired_median=1.1))
    assert M.ratio_warning(dict(median_ratio=0.991, paired_median=1.007)) is None  # docs' DO-Conv
    assert 'differ by 1.36x' in M.ratio_warning(dict(median_ratio=1.5, paired_median=1.1))
    line = load_tool('benchmark').summary_lines(dict(
        kind='compare', results=[], warnings=[M.ratio_warning(dict(median_ratio=0.395,
                                                                   paired_median=1.717))]))
    assert line == ['warning: the B / A ratio of medians (0.395) and the paired median (1.717) '
                    "point different ways: the machine's speed changed between rounds, so neither "
                    'figure is trustworthy; measure again on a quiet machine.']


def test_time_calls_counts_calls():
    calls = []
    t = M.time_calls(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(t) == 3 and len(calls) == 5 and all(x >= 0 for x in t)
    calls.clear()
    t = M.time_calls(lambda: calls.append(1), repeat=1, warmup=0, min_time=10.0, max_repeat=7)
    assert len(t) == 7  # min_time keeps timing, capped by max_repeat
    with pytest.raises(ValueError, match='repeat=0'):
        M.time_calls(lambda: None, repeat=0)


def test_dw_conv_cost_and_shapes():
    flops, traffic = LDW.dw_conv_cost(2, 3, 4, 5, 7, 4)
    assert flops == 2 * 2 * 3 * 4 * 5 * 49
    assert traffic == (2 * 2 * 3 * 4 * 5 + 3 * 49) * 4
    assert DL.resnet50_3x3_shapes(512, 256) == [
        ('stage1', 64, 128, 64), ('stage2', 128, 64, 32), ('stage3', 256, 32, 16),
        ('stage4', 512, 16, 8)]


def test_to_json_is_strict():
    import numpy as np
    text = M.to_json(dict(a=float('nan'), b=[float('inf'), np.float32(1.5)], c=np.int64(3)))
    assert json.loads(text) == dict(a=None, b=[None, 1.5], c=3)


def test_parse_variant():
    assert BM.parse_variant('a/b.py:fused', False) == ('a/b.py', True)
    assert BM.parse_variant('a/b.py:unfused', True) == ('a/b.py', False)
    assert BM.parse_variant('a/b.py', True) == ('a/b.py', True)
    assert BM.split_head_tag('a/b.py:fused:nchw-heads') == ('a/b.py:fused', False)
    assert BM.split_head_tag('a/b.py:unfused') == ('a/b.py:unfused', True)
    with pytest.raises(ConfigError, match=r'a/b\.py:fuzed: unknown variant suffix :fuzed; .*'
                                          r':fused, :unfused, then optionally :nchw-heads'):
        BM.parse_variant('a/b.py:fuzed', True)
    assert BM.parse_variant('C:/configs/b.py', True) == ('C:/configs/b.py', True)  # a drive


def test_peak_memory_reports_cpu_peak():
    # 96 MB: above glibc's largest mmap threshold (32 MB), so the block maps fresh pages even
    # after earlier tests freed big tensors (a smaller buffer can reuse resident heap memory);
    # where an earlier test kept freed memory in the process (cpu_malloc), hand it back first
    release_freed_memory()
    with M.PeakMemory('cpu') as mem:
        buf = torch.ones(96 * 2**20 // 4)
        del buf
    d = mem.to_dict()
    assert d['kind'] == 'cpu_peak_rss' and d['peak_mb'] > 0
    if d['reset']:  # the block's own peak, so at least the 96 MB it allocated
        assert d['delta_mb'] >= 90


# -- the layer table end to end (tiny shapes), CLI and report ------------------------------------
def test_doconv_layers_cli_json_report(tmp_path):
    out = tmp_path / 'doconv-layers.json'
    load_tool('benchmark').main(['--doconv-layers', '--shape', '64', '64', '--batch', '1',
                             '--repeat', '1', '--warmup', '0', '--min-time', '0',
                             '--out', str(out)])
    res = json.loads(out.read_text())
    assert res['schema'] == M.SCHEMA and res['kind'] == 'doconv_layers'
    assert set(res['cpu_load']) == {'other_cores', 'seconds', 'cpus', 'contended'}  # judged too
    assert [r['channels'] for r in res['results']] == [64, 128, 256, 512]
    with pytest.raises(ValueError, match='smaller than ResNet-50'):
        DL.resnet50_3x3_shapes(16, 64)
    for r in res['results']:
        for key in DL.LAYER_KEYS:
            assert r[key]['forward']['n'] == 1 and r[key]['forward_backward']['median_ms'] > 0
        for key in DL.LAYER_KEYS[1:]:
            assert r[key]['compose']['median_ms'] > 0
            for p in ('forward', 'forward_backward'):
                assert r['ratios'][f'{key}_over_plain_{p}'] == pytest.approx(
                    r[key][p]['median_ms'] / r['plain'][p]['median_ms'])
        assert r['ratios']['doconv_over_authors_forward'] == pytest.approx(
            r['doconv']['forward']['median_ms'] / r['authors']['forward']['median_ms'])

    doc = tmp_path / 'bench.md'
    doc.write_text('intro\n<!-- bench:doconv-layers -->\nnot yet measured\n'
                   '<!-- /bench:doconv-layers -->\n<!-- bench:other -->\nkept\n'
                   '<!-- /bench:other -->\n')
    load_tool('bench_report').main([str(out), '--doc', str(doc), '--plots', str(tmp_path / 'png')])
    text = doc.read_text()
    assert 'not yet measured' not in text and 'kept' in text and text.startswith('intro\n')
    assert '| stage4 | 512 | 2x2 |' in text
    assert (tmp_path / 'png' / 'doconv_layers.png').stat().st_size > 1000


def test_report_rejects_foreign_json(tmp_path):
    bad = tmp_path / 'x.json'
    bad.write_text(json.dumps(dict(schema='something/else', kind='model')))
    with pytest.raises(ValueError, match='not a tools/benchmark.py result'):
        load_tool('bench_report').main([str(bad)])


def test_dw_fft_min_kernel_switches_the_large_dw_path_for_one_run_only(tmp_path, monkeypatch):
    from reparam_mm.layers import large_kernel
    calls, real_fft = [], large_kernel.fft_depthwise_conv2d
    monkeypatch.setattr(large_kernel, 'fft_depthwise_conv2d',
                        lambda *a: calls.append(a[1].shape[-1]) or real_fft(*a))
    default = large_kernel.FFT_MIN_KERNEL
    # the 'fixed' candidate is the dispatch in fixed mode, whose FFT threshold the option sets
    args = ['--large-dw', '--arch', 'tiny', '--shape', '64', '64', '--candidates', 'fixed',
            '--repeat', '1', '--warmup', '0', '--min-time', '0', '--no-backward']
    tool = load_tool('benchmark')
    direct = tool.run(tool.parse_args(args + ['--dw-fft-min-kernel', '1000']))
    assert calls == [] and direct['settings']['dw_fft_min_kernel'] == 1000
    assert direct['settings']['large_dw_dispatch'] == 'fixed'
    assert large_kernel.FFT_MIN_KERNEL == default  # restored after the run
    assert large_kernel.active_dispatch_mode() == 'tuned'
    fixed = tool.run(tool.parse_args(args[:-1] + ['--large-dw-dispatch', 'fixed',
                                                  '--no-backward']))
    assert fixed['settings'] == dict(fixed['settings'], dw_fft_min_kernel=default,
                                     large_dw_dispatch='fixed')
    assert set(calls) == {31, 29, 27}  # tiny arch kernels 31/29/27/13: 13 stays direct
    tuned = tool.run(tool.parse_args(args))
    assert tuned['settings']['large_dw_dispatch'] == 'tuned'
    assert tuned['settings']['dw_fft_min_kernel'] is None
    with pytest.raises(SystemExit):  # said by the parser, before any work
        tool.parse_args(args + ['--dw-fft-min-kernel', '9', '--large-dw-dispatch', 'tuned'])


def test_cli_rejects_bad_arguments():
    tool = load_tool('benchmark')
    with pytest.raises(SystemExit):
        tool.parse_args(['--doconv-layers', '--repeat', '0'])
    with pytest.raises(SystemExit):  # a config and --compare at once
        tool.parse_args(['a.py', '--compare', 'b.py', 'c.py'])


def _tool_error(capsys, argv):
    """The exit status of ``tools/benchmark.py argv`` run as from the shell, and its stderr."""
    from reparam_mm.cli import run_tool
    capsys.readouterr()
    status = run_tool(load_tool('benchmark').main, argv)
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_bad_input_is_one_sentence_not_a_traceback(tmp_path, capsys):
    """A misspelt variant suffix was 'file "...py:fuzed" does not exist', a wrong --checkpoint
    and --mode train --fuse ended in tracebacks (the tool did not go through run_tool)."""
    quick = ['--shape', '64', '64', '--repeat', '1', '--warmup', '0', '--no-flops']
    status, err = _tool_error(capsys, [f'{DEMO_DO}:fuzed'] + quick)
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f'error: {DEMO_DO}:fuzed: unknown variant suffix :fuzed;')
    assert ':fused, :unfused' in err[0] and ':nchw-heads' in err[0]
    run = subprocess.run([sys.executable, str(ROOT / 'tools/benchmark.py'), f'{DEMO_DO}:fuzed'],
                         capture_output=True, text=True, timeout=120)  # from the shell: the same
    assert run.returncode == 1 and run.stderr.splitlines()[-1] == err[0], run.stderr[-2000:]
    status, err = _tool_error(capsys, ['--compare', str(DEMO_DO), f'{DEMO_DO}:fused:nchw-head']
                              + quick)
    assert status == 1 and 'unknown variant suffix :nchw-head;' in err[0], err
    bad = tmp_path / 'bad.pth'
    state = BM.build_bench_model(BM.bench_config(str(DEMO_DO), (64, 64))).state_dict()
    state.pop('decode_head.conv_seg.bias')
    torch.save(dict(state_dict=state), bad)
    status, err = _tool_error(capsys, [str(DEMO_DO), '--checkpoint', str(bad)] + quick)
    assert status == 1 and err[-1].startswith(f'error: checkpoint {bad} does not match'), err
    status, err = _tool_error(capsys, ['--compare', f'{DEMO_DO}:unfused', f'{DEMO_DO}:fused',
                                       '--mode', 'train'] + quick)
    assert status == 1 and err == [f'error: {DEMO_DO}: a fused model is the plain architecture, '
                                   'so training is benchmarked unfused: drop --fuse and the :fused '
                                   'suffix (or compare with the plain-conv config).']
    with pytest.raises(SystemExit):  # conflicting options: the parser's usage error
        load_tool('benchmark').parse_args([str(DEMO_DO), '--mode', 'train', '--fuse'])
    assert 'error: --mode train times the unfused model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_tool('benchmark').parse_args(['--doconv-layers', '--cfg-options', 'a=1'])
    assert '--cfg-options sets a config' in capsys.readouterr().err


def test_cfg_options_reach_the_benchmarked_config(capsys):
    """--cfg-options as every other analysis tool takes it: applied, recorded, a misspelt key
    refused by name."""
    tool = load_tool('benchmark')
    quick = ['--shape', '64', '64', '--repeat', '1', '--warmup', '0', '--no-flops']
    res = tool.run(tool.parse_args([str(DEMO_DO), '--cfg-options',
                                    'model.decode_head.num_classes=3'] + quick))
    assert res['settings']['cfg_options'] == {'model.decode_head.num_classes': 3}
    cfg = BM.bench_config(str(DEMO_DO), (64, 64), {'model.decode_head.num_classes': 3})
    assert cfg.model.decode_head.num_classes == 3
    status, err = _tool_error(capsys, [str(DEMO_DO), '--cfg-options',
                                       'model.decode_head.num_clases=3'] + quick)
    assert status == 1 and err[-1].startswith('error: --cfg-options model.decode_head.num_clases:'
                                              ' the config has no'), err


def test_other_processes_cpu_use_is_said_in_the_output_and_the_json(tmp_path, capsys, monkeypatch):
    """The same command gave 6.9 ms and 730 ms minutes apart, each with an IQR of 2%: a steady
    load of other processes, which the tuner detects (reparam_mm.cpu_load) and the benchmark did
    not. Multiply-adds are named and written as tools/get_flops.py writes them."""
    from reparam_mm import cpu_load
    from reparam_mm.complexity import format_gmacs
    tool, out = load_tool('benchmark'), tmp_path / 'b.json'
    argv = [str(DEMO_DO), '--shape', '64', '64', '--repeat', '2', '--warmup', '0', '--out', str(out)]
    readings = iter([(100., 10., 0.), (1100., 10.5, 0.)])  # others: 999.5 CPU seconds
    monkeypatch.setattr(cpu_load, 'cpu_seconds', lambda: next(readings))
    monkeypatch.setattr(cpu_load, 'usable_cpus', lambda: 2)
    tool.main(argv)
    printed = capsys.readouterr().out.splitlines()
    res = json.loads(out.read_text())
    assert res['cpu_load']['contended'] is True and res['cpu_load']['other_cores'] > 2
    warning, = res['warnings']
    assert warning.startswith(f"other processes used {res['cpu_load']['other_cores']:.1f} of this "
                              "machine's 2 CPU cores while the timings ran (")
    assert 'not trustworthy' in warning and f'warning: {warning}' in printed
    r, = res['results']
    line, = [line for line in printed if line.startswith(f"{r['name']} [infer]: ")]
    assert line.endswith(f", {format_gmacs(r['flops'])[0]} GMACs"), line  # 0.0251, not 0.0 GFLOPs
    assert 'GMACs (fused)' in report.render(res, 'b.json') and 'Warning: other processes' in \
        report.render(res, 'b.json')
    monkeypatch.setattr(cpu_load, 'cpu_seconds', lambda: None)  # a quiet machine (or not Linux)
    tool.main(argv + ['--no-flops'])
    res = json.loads(out.read_text())
    assert res['cpu_load']['contended'] is False and 'warnings' not in res
    assert not any(line.startswith('warning:') for line in capsys.readouterr().out.splitlines())


# -- models built from configs (mmseg / mmdet) ---------------------------------------------------
def test_bench_config_strips_weights_and_syncbn():
    cfg = BM.bench_config(str(ROOT / 'configs/replknet/'
                             'upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py'), (96, 64))
    assert cfg.model.backbone.init_cfg is None
    norms = []
    BM._walk(cfg.model, lambda d: norms.append(d['type']) if 'requires_grad' in d else None)
    assert norms and set(norms) == {'BN'}
    assert tuple(cfg.model.data_preprocessor.size) == (96, 64)


def test_compare_unfused_vs_fused_tiny_replknet(tmp_path):
    res = BM.benchmark_models([f'{DEMO_DO}:unfused', f'{DEMO_DO}:fused'], shape=(64, 64),
                             repeat=2, warmup=0)
    assert res['kind'] == 'compare' and res['settings']['same_weights'] is True
    assert res['settings']['output_difference']['max_rel'] < 1e-4  # fused == unfused
    unf, fus = res['results']
    assert (unf['fused'], fus['fused']) == (False, True)
    assert fus['params'] < unf['params'] and fus['fuse_report']['fused']
    assert unf['flops'] == fus['flops'] > 0  # both counted on the fused model
    assert 'fused model' in fus['flops_note']
    # the 31/29/27 kernels run through FFTs, yet count as the direct convolutions they compute
    from reparam_mm.layers import large_kernel
    v = BM.Variant(str(DEMO_DO), False, 'infer', (64, 64), 1)
    from reparam_mm.head_layout import tune_head_layouts
    assert tune_head_layouts(v.model) == []  # the neck and heads run tuned, as in tools/test.py
    nchw = BM.Variant(str(DEMO_DO), False, 'infer', (64, 64), 1, tune_heads=False)
    assert nchw.name.endswith('(unfused, NCHW heads)') and tune_head_layouts(nchw.model)
    # training variants too, as tools/train.py trains (:nchw-heads keeps them NCHW)
    assert tune_head_layouts(BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 2).model) == []
    nchw = BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 2, tune_heads=False)
    assert nchw.name.endswith(' (NCHW heads)') and tune_head_layouts(nchw.model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(large_kernel, 'use_fft', lambda *a, **k: False)
        assert BM.fused_flops(v.model, v.data)[0] == fus['flops']
    q = res['ratios']['latency_b_over_a']
    assert q['median_ratio'] == pytest.approx(
        fus['latency']['median_ms'] / unf['latency']['median_ms'])
    assert fus['memory']['kind'] == 'cpu_peak_rss' and fus['memory']['peak_mb'] > 0
    json.loads(M.to_json(res))
    # the report renders the ratio line
    path = tmp_path / 'cmp.json'
    path.write_text(M.to_json(res))
    body = report.render(json.loads(path.read_text()), 'cmp.json')
    assert f"= {q['median_ratio']:.3f}**" in body


def test_fused_doconv_vs_plain_get_identical_weights(tmp_path):
    """A plain-conv config receives the fused DO-Conv model's weights: same outputs."""
    plain = tmp_path / 'plain.py'
    plain.write_text(f"_base_ = ['{DEMO_DO}']\nmodel = dict(backbone=dict(stage_with_doconv="
                     "(False, False, False, False)), decode_head=dict(conv_cfg=None), "
                     "auxiliary_head=dict(conv_cfg=None))\n")
    res = BM.benchmark_models([str(plain), f'{DEMO_DO}:fused'], shape=(64, 64), repeat=1,
                             warmup=0, count_flops=False)
    assert res['settings']['same_weights'] is True
    assert res['settings']['output_difference']['max_rel'] < 1e-5
    assert 'flops' not in res['results'][0]


def test_train_mode_and_fused_training_refused():
    res = BM.benchmark_models([str(DEMO_DO)], mode='train', shape=(64, 64), batch=2, repeat=1,
                             warmup=0, count_flops=False)
    r = res['results'][0]
    assert res['kind'] == 'model' and r['mode'] == 'train' and r['fused'] is False
    assert r['latency']['images_per_s'] == pytest.approx(2e3 / r['latency']['median_ms'])
    with pytest.raises(ValueError, match='fused model is the plain architecture'):
        BM.benchmark_models([str(DEMO_DO)], mode='train', fuse=True, shape=(64, 64), repeat=1)
    # one image a step: UperNet's pooled 1x1 branch gave torch's BatchNorm error as a traceback
    with pytest.raises(ConfigError, match=r'--mode train with --batch 1: a BatchNorm layer .* use '
                                          r'--batch 2 or more\.$'):
        BM.benchmark_models([str(DEMO_DO)], mode='train', shape=(64, 64), batch=1, repeat=1,
                            warmup=0, count_flops=False)


def test_a_deploy_pair_is_labelled_so_and_compared_with_its_training_checkpoint(tmp_path):
    """tools/fuse.py's deploy pair under ':unfused' was called unfused, and a compare of its
    two suffixes (the one model twice) read as a speed-up of fusion; one --checkpoint served
    both variants, so a training and a deploy pair could not be compared."""
    from reparam_mm.apis import export_deploy
    from test_tools_test_fuse import make_ade, seg_config, write_case
    cfg, ckpt = write_case(tmp_path, seg_config(make_ade(tmp_path / 'ade', n=1), backbone='replknet'))
    deploy = export_deploy(cfg, ckpt, str(tmp_path / 'deploy'), shape=(64, 64))
    dcfg, dckpt = deploy['config'], deploy['checkpoint']
    same = BM.benchmark_models([f'{dcfg}:unfused', f'{dcfg}:fused'], shape=(64, 64), repeat=1,
                               warmup=0, count_flops=False, checkpoint=dckpt)
    assert [r['name'] for r in same['results']] == ['tiny_deploy (deploy)'] * 2
    assert any(w.startswith(f'both variants are the deploy model of {dcfg}') for w in same['warnings'])
    pair = BM.benchmark_models([f'{cfg}:unfused', dcfg], shape=(64, 64), repeat=1, warmup=0,
                               count_flops=False, checkpoint=[ckpt, dckpt])
    assert [r['name'] for r in pair['results']] == ['tiny (unfused)', 'tiny_deploy (deploy)']
    assert pair['settings']['checkpoint'] == [ckpt, dckpt]
    assert pair['settings']['output_difference']['max_rel'] < 1e-4  # the deploy pair is the model
    assert not any('deploy model of' in w for w in pair.get('warnings', []))
    # a fused A's weights fit the deploy B: they were loaded over B's file, which then always
    # agreed; a wrong deploy checkpoint must show
    bad = torch.load(dckpt, map_location='cpu', weights_only=True)
    bad['state_dict']['decode_head.conv_seg.weight'] *= 3
    torch.save(bad, tmp_path / 'bad_deploy.pth')
    wrong = BM.benchmark_models([f'{cfg}:fused', dcfg], shape=(64, 64), repeat=1, warmup=0,
                                count_flops=False, checkpoint=[ckpt, str(tmp_path / 'bad_deploy.pth')])
    assert wrong['settings']['own_checkpoints'] and not wrong['settings']['same_weights']
    assert wrong['settings']['output_difference']['max_rel'] > 0.1
    tool = load_tool('benchmark')
    with pytest.raises(SystemExit):  # more files than variants
        tool.parse_args([cfg, '--checkpoint', ckpt, '--checkpoint', dckpt])
    assert tool.parse_args(['--checkpoint', ckpt, cfg]).config == cfg  # the config is not taken as a file
    assert tool.parse_args(['--compare', cfg, dcfg, '--checkpoint', ckpt, '--checkpoint',
                            dckpt]).checkpoint == [ckpt, dckpt]


def test_amp_training_variant_uses_the_wrapper_of_its_device_and_drops_the_configs():
    v = BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 2, amp=True)
    assert type(v.optim_wrapper).__name__ == 'CPUAmpOptimWrapper'
    seen = []
    v.model.backbone.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    v.step()
    assert seen == [torch.bfloat16]
    # a config's own mixed-precision wrapper is the config's choice for its GPUs: fp32 without --amp
    amp_cfg = {'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.loss_scale': 'dynamic'}
    plain = BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 1, cfg_options=amp_cfg)
    assert type(plain.optim_wrapper).__name__ == 'OptimWrapper'


def test_detector_synthetic_training_batch():
    cfg = BM.bench_config(str(ROOT / 'configs/doconv/faster-rcnn_r50_fpn_1x_coco.py'), (64, 96))
    data = synthetic_batch(cfg, 64, 96, batch=2, train=True)
    assert [tuple(x.shape) for x in data['inputs']] == [(3, 64, 96)] * 2
    boxes = data['data_samples'][0].gt_instances.bboxes
    assert boxes.shape == (8, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert boxes[:, 2].max() < 96 and boxes[:, 3].max() < 64
    assert data['data_samples'][0].gt_instances.labels.max() < 80


def test_mask_detector_synthetic_training_batch_fills_each_box():
    cfg = BM.bench_config(str(ROOT / 'configs/replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_'
                                     'fpn_4conv1fc-giou_16xb1-ms-crop-3x_coco.py'), (64, 96))
    inst = synthetic_batch(cfg, 64, 96, batch=1, train=True)['data_samples'][0].gt_instances
    masks = inst.masks.masks
    assert masks.shape == (8, 64, 96) and masks.dtype == np.uint8
    for m, (x1, y1, x2, y2) in zip(masks, inst.bboxes.round().long().tolist()):
        assert m.sum() == (x2 - x1 + 1) * (y2 - y1 + 1) and m[y1, x1] == m[y2, x2] == 1


def test_large_dw_table_tiny(tmp_path):
    res = LDW.benchmark_large_dw('tiny', (64, 64), batch=1, repeat=1, warmup=0, min_time=0,
                               candidates=['tuned', 'fft'])
    assert res['kind'] == 'large_dw' and res['ceilings']['fp32']['gemm_flops_per_s'] > 0
    assert [(r['stage'], r['kernel'], r['candidate']) for r in res['results']][:2] == [
        ('stage1', 31, 'tuned'), ('stage1', 31, 'fft')]
    for r in res['results']:
        assert r['flops'] == 2 * r['channels'] * r['height'] * r['width'] * r['kernel']**2
        assert r['forward_gflops'] == pytest.approx(r['flops'] / r['forward']['median_ms'] / 1e6)
        assert r['forward_over_bound'] == pytest.approx(r['forward']['median_ms'] / r['bound_ms'])
        assert r['bound_fwd_bwd_ms'] == pytest.approx(3 * r['bound_ms'])
        assert r['forward_backward_over_bound'] == pytest.approx(
            r['forward_backward']['median_ms'] / r['bound_fwd_bwd_ms'])
    with pytest.raises(ValueError, match='unknown large-DW candidates'):
        LDW.benchmark_large_dw('tiny', (32, 32), candidates=['winograd'])
    assert not math.isnan(res['results'][0]['bound_ms'])
    # the report renders one row per record, and the two-panel plot
    body = report.render(json.loads(M.to_json(res)), 'x.json')
    assert len(re.findall(r'^\| stage\d', body, re.M)) == len(res['results'])
    report.plot_large_dw(res, str(tmp_path / 'dw.png'))
    assert (tmp_path / 'dw.png').stat().st_size > 1000


def test_a_large_dw_run_stopped_midway_keeps_the_dtypes_it_finished(tmp_path, monkeypatch):
    """tools/device_check.sh stops a step at its time limit: the JSON is rewritten after each
    dtype, marked unfinished until the run ends."""
    tool = load_tool('benchmark')
    out = tmp_path / 'dw.json'
    timed = LDW._time_dw

    def stop_at_bf16(cand, x_shape, k, dev, dtype, **kw):
        if dtype == torch.bfloat16:
            raise KeyboardInterrupt  # what the step's limit does to the run
        return timed(cand, x_shape, k, dev, dtype, **kw)
    argv = ['--large-dw', '--arch', 'tiny', '--shape', '32', '32', '--candidates', 'fft',
            '--dtypes', 'fp32', 'bf16', '--repeat', '1', '--warmup', '0', '--min-time', '0',
            '--no-backward', '--out', str(out)]
    monkeypatch.setattr(LDW, '_time_dw', stop_at_bf16)
    monkeypatch.setattr(LDW, 'machine_ceilings',  # not this test's subject, and seconds to measure
                        lambda dev, dtype: dict(gemm_flops_per_s=1e11, copy_bytes_per_s=1e10))
    with pytest.raises(KeyboardInterrupt):
        tool.main(argv)
    kept = json.loads(out.read_text())
    assert kept['unfinished'] == 'fp32 measured; the run stopped before bf16'
    assert {r['dtype'] for r in kept['results']} == {'fp32'} and len(kept['results']) == 4
    assert report.render(kept, 'dw.json').count('*Unfinished run: fp32 measured;') == 1
    monkeypatch.setattr(LDW, '_time_dw', timed)
    tool.main(argv)  # the finished run: both dtypes, no mark
    done = json.loads(out.read_text())
    assert 'unfinished' not in done and len(done['results']) == 8


def test_checkpoint_is_loaded_strictly(tmp_path):
    from reparam_mm.apis import CheckpointMismatchError
    cfg = BM.bench_config(str(DEMO_DO), (64, 64))
    model = BM.build_bench_model(cfg, seed=1)
    with torch.no_grad():
        model.decode_head.conv_seg.bias.fill_(0.25)
    good = tmp_path / 'good.pth'
    torch.save(dict(state_dict=model.state_dict()), good)
    v = BM.Variant(str(DEMO_DO), True, 'infer', (64, 64), 1, checkpoint=str(good))
    assert torch.all(v.model.decode_head.conv_seg.bias == 0.25)  # loaded, then fused
    bad = tmp_path / 'bad.pth'
    state = model.state_dict()
    state.pop('decode_head.conv_seg.bias')
    torch.save(dict(state_dict=state), bad)
    with pytest.raises(CheckpointMismatchError, match='decode_head.conv_seg.bias'):
        BM.Variant(str(DEMO_DO), True, 'infer', (64, 64), 1, checkpoint=str(bad))


def test_training_compare_starts_the_doconv_model_as_the_plain_one(tmp_path):
    """--mode train --compare plain doconv: the DO-Conv model takes the plain weights (D = 0), so
    both start as one function (a detector then proposes the same RoIs in both); the other way
    round nothing is loaded."""
    plain = tmp_path / 'plain.py'
    plain.write_text(f"_base_ = ['{DEMO_DO}']\nmodel = dict(backbone=dict(stage_with_doconv="
                     "(False, False, False, False)), decode_head=dict(conv_cfg=None), "
                     "auxiliary_head=dict(conv_cfg=None))\n")
    a = BM.Variant(str(plain), False, 'train', (64, 64), 1)
    b = BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 1)
    assert BM.same_start(a, b)
    a.model.eval(), b.model.eval()
    assert BM.compare_models(a.model, b.model, copy.deepcopy(a.data))['max_rel'] < 1e-5
    before = copy.deepcopy(a.model.state_dict())
    assert not BM.same_start(b, a)  # a DO-Conv model's W and D do not load into plain convs
    assert all(torch.equal(v, before[k]) for k, v in a.model.state_dict().items())
    res = BM.benchmark_models([str(plain), str(DEMO_DO)], mode='train', shape=(64, 64), batch=2,
                             repeat=1, warmup=0, count_flops=False)
    assert res['settings']['same_start'] is True
    assert res['settings']['weights_held'] is True
    for rec in res['results']:  # what each run cost the kernel, beside its time
        assert rec['memory']['minor_faults_median'] >= 0
        assert rec['memory']['system_s_median'] >= 0
    assert 'page faults / run (k)' in "\n".join(report.render_models(res))
    # the step difference split: B composes its kernels and steps more tensors; A neither
    b = res['breakdown']
    (pa, pb) = b['variants']
    assert pa['composition'] is None and pb['composition']['layers'] == len(
        doconv_layers(BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 1).model)) > 0
    assert pb['composition']['forward_ms'] > 0 and pb['optimizer']['tensors'] > pa['optimizer'][
        'tensors']
    assert b['rest_ms'] == pytest.approx(b['step_extra_ms'] - b['composition_ms']
                                         - b['optimizer_extra_ms'])
    assert "Where B's extra" in "\n".join(report.render_models(res))


def test_breakdown_timings_leave_gradients_and_weights_as_they_were():
    v = BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 1)
    with pytest.raises(ValueError, match='only with the weights held'):
        optimizer_step_ms(v, repeat=1)
    v.hold_weights()
    weights = {k: p.detach().clone() for k, p in v.model.named_parameters()}
    comp = composition_ms(v.model, repeat=1)
    opt = optimizer_step_ms(v, repeat=1)
    assert comp['layers'] > 0 and comp['backward_ms'] >= 0 and opt['ms'] > 0
    assert all(p.grad is None for p in v.model.parameters())
    assert all(torch.equal(p, weights[k]) for k, p in v.model.named_parameters())


def test_held_weights_stay_through_training_steps():
    """hold_weights: the optimizer still steps (its state fills) but no parameter moves."""
    v = BM.Variant(str(DEMO_DO), False, 'train', (64, 64), 2)
    before = copy.deepcopy(v.model.state_dict())
    v.step()
    moved = [k for k, t in v.model.state_dict().items()
             if t.is_floating_point() and not torch.equal(t, before[k]) and 'running' not in k]
    assert moved  # a normal step trains
    v.hold_weights()
    params = {k: p.detach().clone() for k, p in v.model.named_parameters()}
    v.step()
    assert all(torch.equal(p, params[k]) for k, p in v.model.named_parameters())
    assert v.optim_wrapper.optimizer.state  # the update ran (momentum buffers exist)


def test_with_kept_memory_the_peak_comes_from_a_run_on_a_trimmed_heap(monkeypatch):
    """Kept freed memory stays resident, so a timed run's peak RSS would be the retained heap:
    the peak is then measured in one extra run after malloc_trim."""
    monkeypatch.setattr(BM, 'kept_freed_memory', lambda: True)
    res = BM.benchmark_models([str(DEMO_DO)], mode='infer', shape=(64, 64), batch=1,
                              repeat=1, warmup=0, count_flops=False)
    mem = res['results'][0]['memory']
    assert mem['measured'] == 'untimed run after malloc_trim(0)' and mem['peak_mb'] > 0


# -- benchmarks/size_buckets.py ---------------------------------------------------------------------
def test_size_buckets_test_sizes_follow_mmdet_keep_ratio_resize_and_padding(tmp_path):
    from benchmarks.size_buckets import padded_test_sizes
    ann = tmp_path / 'instances.json'
    ann.write_text(json.dumps({'images': [dict(height=480, width=640), dict(height=427, width=640),
                                          dict(height=640, width=427)]}))
    # 480x640: x5/3 -> 800x1067, padded to 800x1088; 427x640: x800/427 -> 800x1199 -> 800x1216
    assert padded_test_sizes(ann) == [(800, 1088), (800, 1216), (1216, 800)]
    assert padded_test_sizes(ann, scale=(666, 400)) == [(416, 544), (416, 608), (608, 416)]


def test_size_buckets_price_of_sharing_reads_each_size_s_own_table():
    from benchmarks.size_buckets import price_of_sharing
    tail = '|k31x31|s1x1|p15x15|d1x1|fwd'
    bucketed = {'cpu': {f'cpu|float32|nchw|1x8x128-152x20-22{tail}': dict(choice='fft'),
                        'layout|X:1:eval|cpu|float32|autocast off|1x3x512-608x80-95|fwd':
                            dict(choice='nchw')}}
    alone = {'cpu': {
        f'cpu|float32|nchw|1x8x130x21{tail}': dict(
            choice='direct_channels_last', shape='1x8x130x21',
            ms={'fft': 12.0, 'direct_channels_last': 10.0}),
        f'cpu|float32|nchw|1x8x140x20{tail}': dict(
            choice='fft', shape='1x8x140x20', ms={'fft': 9.0, 'direct_channels_last': 11.0}),
        f'cpu|float32|channels_last|1x8x140x20{tail}': dict(  # never run with buckets
            choice='fft', shape='1x8x140x20', ms={'fft': 9.0})}}
    rows = price_of_sharing(bucketed, alone)
    assert [(r['own'], r['shared'], r['own_ms'], r['shared_ms']) for r in rows] == [
        ('direct_channels_last', 'fft', 10.0, 12.0), ('fft', 'fft', 9.0, 9.0)]


def test_size_buckets_skip_ratio_reaches_the_tuner():
    from benchmarks.size_buckets import run_sizes
    from reparam_mm.layers.large_kernel import LargeDWTuner, LargeKernelDWConv2d, SIZE_BUCKET_MIN
    conv = LargeKernelDWConv2d(3, 13).eval()  # run_sizes feeds images (3 channels)
    sizes = [(40, 40), (48, 48)]  # two buckets within 2x of each other
    tables = {}
    # a timing made while other processes load the CPU is never used to skip (a rule with its own
    # test); here every timing counts as quiet, or the test would fail on a busy machine
    quiet = mock.patch.object(LargeDWTuner, 'contended', lambda self, *a, **k: False)
    for ratio in (1.0001, float('inf')):  # every candidate but the best is hopeless / none is
        with quiet:
            _, _, cache = run_sizes(conv, sizes, SIZE_BUCKET_MIN, skip_ratio=ratio)
        (entries, ) = cache.values()
        first, second = (entries[sig] for sig in sorted(entries, key=lambda s: s.split('|')[3]))
        tables[ratio] = first, second
    first, second = tables[1.0001]
    assert set(second['ms']) == {first['choice']}
    assert set(second['skipped']) == set(first['ms']) - {first['choice']}
    first, second = tables[float('inf')]
    assert second['skipped'] == {} and set(second['ms']) == set(first['ms'])


def test_a_compared_variants_own_peak_leaves_out_what_the_other_keeps():
    """On CUDA both variants of a compare sit in one allocator: each one's peak is taken
    without the other's weights, gradients and optimizer state."""
    from types import SimpleNamespace

    from mmengine.optim import OptimWrapper

    from benchmarks.models import held_by_others_mb, resident_storages
    model = torch.nn.Linear(256, 256)  # 65,792 fp32 values: 257 KiB
    variant = SimpleNamespace(model=model, optim_wrapper=OptimWrapper(
        torch.optim.Adam(model.parameters())))
    assert sum(resident_storages(variant).values()) == 65792 * 4
    model(torch.ones(1, 256)).sum().backward()
    variant.optim_wrapper.step()
    # weights, gradients, Adam's two moments, and its two 4-byte step counters
    assert sum(resident_storages(variant).values()) == 4 * 65792 * 4 + 2 * 4
    a, b, c = {1: 2**20, 2: 2**20}, {3: 3 * 2**20}, {2: 2**20}  # c shares a storage with a
    assert held_by_others_mb([a, b]) == [3.0, 2.0]
    assert held_by_others_mb([a, c]) == [0.0, 1.0]


def test_gpu_configs_block_has_one_row_per_model_run_on_cuda():
    env = dict(gpu='NVIDIA H200', torch='2.11.0+cu130', cuda='13.0', cudnn=91300,
               date='2026-12-01T10:00:00+00:00')

    def result(kind, device, runs, **settings):
        return dict(kind=kind, env=env, settings=dict(device=device, batch=2, shape=[512, 512],
                                                     amp=True, **settings),
                    results=[dict(name=name, mode=mode, latency=dict(median_ms=ms,
                                                                     images_per_s=2e3 / ms),
                                  memory=mb if isinstance(mb, dict) else dict(peak_mb=mb))
                             for name, mode, ms, mb in runs])
    loaded = [
        ('cuda_train_upernet.json',
         result('model', 'cuda', [('upernet_31b', 'train', 400., 20480.)])),
        ('cuda_unfused-vs-fused.json',
         result('compare', 'cuda', [('upernet_31b (unfused)', 'infer', 50., 3072.),
                                    # a compare's variant: its peak less the other's weights
                                    ('upernet_31b (fused)', 'infer', 40.,
                                     dict(peak_mb=2560., own_peak_mb=2048.))],
                output_difference=dict(max_rel=3.2e-4))),
        ('cpu_train_upernet.json', result('model', 'cpu', [('upernet_31b', 'train', 9e3, 9e3)])),
    ]
    block = report.combined_blocks(loaded)['gpu-configs'].splitlines()
    assert block[0].startswith('| config | step | batch x crop | ms / iteration | images / s |')
    tail = '| NVIDIA H200 | 2.11.0+cu130 | 13.0 / cuDNN 91300 | 2026-12-01 |'
    assert block[2:5] == [
        '| upernet_31b | training iteration | 2 x 512x512, AMP | 400.0 | 5.0 | 20.0 | - ' + tail,
        '| upernet_31b | unfused test step | 2 x 512x512, AMP | 50.0 | 40.0 | 3.0 | - ' + tail,
        '| upernet_31b | fused test step | 2 x 512x512, AMP | 40.0 | 50.0 | 2.0 | 3.2e-04 '
        + tail]
    assert block[5] == ''  # the CPU run is not in it
    assert 'cpu_train_upernet.json' not in block[-1] and 'cuda_train_upernet.json' in block[-1]
    assert 'gpu-configs' not in report.combined_blocks(loaded[2:])
