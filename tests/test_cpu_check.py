"""tools/cpu_check.sh: issue 16's CPU figures in one command. Here only its cheap steps run
(the CPU report, the per-test time limit firing on a throwaway sleeping test, a step stopped at
its own limit), and its summary (benchmarks/cpu_check.py) is built from a folder written here."""
import json
import os
import subprocess
import sys

from conftest import ROOT

from benchmarks.cpu_check import record_name, render_vendors, summarize
from benchmarks.measure import SCHEMA

SCRIPT = ROOT / 'tools' / 'cpu_check.sh'


def run(*args, **env):
    return subprocess.run(['bash', str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=200, env={**os.environ, 'CPU_CHECK_PYTHON': sys.executable,
                                            **env})


def test_bad_arguments_say_what_is_accepted(tmp_path):
    r = run('--fast')
    assert r.returncode == 2 and 'unknown option --fast' in r.stderr
    r = run(str(tmp_path / 'a'), str(tmp_path / 'b'))
    assert r.returncode == 2 and 'give one OUT_DIR' in r.stderr
    assert run().returncode == 2
    r = run(str(tmp_path), '--quick', '--record')
    assert r.returncode == 2 and "--record keeps figures at the docs' sizes" in r.stderr
    r = run(str(tmp_path), '--record', ONEDNN_MAX_CPU_ISA='AVX2')
    assert r.returncode == 2 and r.stderr.startswith(
        "cpu_check: ONEDNN_MAX_CPU_ISA=AVX2 caps the instruction sets, so the figures are not this "
        "CPU's own; unset it to --record")
    assert not (tmp_path / 'cpu_check.log').exists()
    from reparam_mm.env import ISA_CAPS  # the script names the same caps
    assert f"for cap in {' '.join(ISA_CAPS)}; do" in SCRIPT.read_text()


def test_cpu_report_and_the_time_limit_firing(tmp_path):
    # oneDNN capped below AVX-512 computes bf16 in software, as an AVX2-only CPU does
    r = run(str(tmp_path), '--quick', CPU_CHECK_STEPS='cpu,timeout', ONEDNN_MAX_CPU_ISA='AVX2')
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / 'cpu_check.log').read_text()
    assert '== cpu: rc=0' in log and '== timeout: rc=0' in log
    assert 'large_dw' not in log  # only the steps asked for
    assert '== bf16: left out: oneDNN computes bf16 in software' in log
    cpu = (tmp_path / 'cpu.log').read_text()
    assert 'cpu: ' in cpu and 'cpu bf16: software' in cpu
    out = (tmp_path / 'timeout.log').read_text()
    assert 'Timeout' in out and 'in test_sleeps_past_the_limit' in out
    assert 'pytest exit status: 1' in out


def test_a_step_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    # the quick sleeping test would run 35 s (pytest stops it at 5 s); the step limit is 2 s
    r = run(str(tmp_path), '--quick', CPU_CHECK_STEPS='timeout', CPU_CHECK_LIMIT_S='2')
    assert r.returncode == 1
    log = (tmp_path / 'cpu_check.log').read_text()
    assert '== timeout: stopped at its 2 s limit' in log and '== timeout: rc=124' in log
    left = subprocess.run(['pgrep', '-f', 'test_throwaway_sleep'], capture_output=True, text=True)
    assert left.stdout == ''  # pytest, started by the step, went with it
    # a later run of another step into the same folder appends, and its status is its own
    assert run(str(tmp_path), '--quick', CPU_CHECK_STEPS='cpu').returncode == 0
    log = (tmp_path / 'cpu_check.log').read_text()
    assert '== timeout: rc=124' in log and '== cpu: rc=0' in log and log.count('== run ') == 2


# -- the summary ----------------------------------------------------------------------------------
def _result(kind, cpu, results, **extra):
    env = dict(cpu=cpu, torch='2.13.0+cpu', torch_threads=2, cpu_count=2, git='abc1234',
               date='2026-11-30T06:00:00+00:00', device='cpu')
    return dict(schema=SCHEMA, kind=kind, env=env, settings=dict(shape=[512, 512]),
                results=results, **extra)


def _model(ms):
    return dict(latency=dict(median_ms=ms))


def _dw(stage, dtype, cand, fwd, fwd_bwd):
    return dict(stage=stage, kernel=31, dtype=dtype, candidate=cand, batch=1, channels=128,
                height=128, width=128,
                forward=dict(median_ms=fwd), forward_backward=dict(median_ms=fwd_bwd))


def _check_folder(path, cpu, overhead=True, flags=('avx512f', 'amx_bf16'), bf16='native'):
    path.mkdir()
    (path / 'cpu.log').write_text(f'cpu: {cpu}\n' + ''.join(f'cpu flag: {f}\n' for f in flags)
                                  + (f'cpu bf16: {bf16}\n' if bf16 else ''))
    (path / 'cpu_check.log').write_text('== cpu: rc=0 in 4 s\n== timeout: rc=0 in 300 s\n')
    (path / 'stalls.log').write_text(
        '(31, 29) pad (15, 15) channels_last=True fixed: 0.012 s\n'
        '.(31, 31) pad (15, 16) channels_last=False tuned: 0.281 s\n.\n8 passed in 4s\n')
    (path / 'suite.log').write_text('===== 556 passed, 4 skipped in 217.83s (0:03:37) =====\n'
                                    'real\t4m47.283s\n')
    files = {
        'cpu_infer_upernet-replknet-31b_fp32.json': _result('model', cpu, [_model(1600.)]),
        'cpu_infer_upernet-replknet-31b_bf16.json': _result('model', cpu, [_model(800.)]),
        'cpu_train_upernet-replknet-31b_tuned.json': _result('model', cpu, [_model(15000.)]),
        'cpu_heads_upernet-replknet-31b_bf16.json': _result(
            'compare', cpu, [_model(2667.), _model(1767.)],
            ratios=dict(latency_b_over_a=dict(median_ratio=0.6625, paired_median=0.666))),
        'cpu_heads-train_upernet-replknet-31b_bf16.json': _result(
            'compare', cpu, [_model(11759.), _model(10541.)],
            ratios=dict(latency_b_over_a=dict(median_ratio=0.8964, paired_median=0.896))),
        'cpu_large-dw.json': _result('large_dw', cpu, [
            _dw('stage1', 'fp32', 'fft', 10., 30.), _dw('stage1', 'fp32', 'cl_conv2d', 15., 900.),
            _dw('stage1', 'fp32', 'tuned', 10.5, 31.), _dw('stage1', 'fp32', 'fixed', 20., 30.),
            _dw('stage1', 'bf16', 'cl_conv2d', 8., 600.),
            _dw('stage1', 'bf16', 'tuned_cl', 8., 40.),
            _dw('stage1', 'bf16', 'tuned', 99., 99.)]),
    }
    (path / 'cache').mkdir()
    sig = 'layout|RepLKNet:78500224:eval|cpu|float32|autocast off|1x3x512-608x512-608|fwd'
    head = 'layout|UPerHead:33315990:eval|cpu|bfloat16|autocast bfloat16|1x128x128-152x128-152|fwd'
    (path / 'cache' / 'large_dw_tuning.json').write_text(json.dumps({'AMD EPYC (2 threads)': {
        sig: dict(choice='channels_last', ms={'channels_last': 531.8, 'nchw': 590.2},
                  contended=False, shape='1x3x512x512'),
        head: dict(choice='channels_last', ms={'channels_last': 981.0, 'nchw': 1302.0},
                   contended=False, shape='1x128x128x128'),
        'cpu|float32|nchw|1x128x128-152x128-152|k31x31|s1x1|p15x15|d1x1|fwd': dict(choice='fft'),
        # written before size buckets: exact sizes
        'cpu|bfloat16|channels_last|1x128x128x128|k31x31|s1x1|p15x15|d1x1|fwd':
            dict(choice='direct_channels_last')}}))
    if overhead:
        (path / 'size_buckets').mkdir()
        (path / 'size_buckets' / 'size_buckets_bf16.json').write_text(json.dumps(dict(
            sizes=21, scale=[666, 400], env=dict(git='def5678', date='2026-11-30T09:00:00+00:00'),
            modes=dict(buckets=dict(signatures=86, tuning_s=48.8),
                       alone=dict(signatures=189, tuning_s=110.4)),
            sharing=dict(convs=163, other_choice=7, own_ms=732.2, shared_ms=735.2, rows=[]))))
        files['cpu_train-overhead_upernet-r50.json'] = _result(
            'compare', cpu, [_model(8000.), _model(8200.)],
            ratios=dict(latency_b_over_a=dict(median_ratio=1.025, paired_median=1.02)))
        files['cpu_train-amp-overhead_upernet-r50.json'] = _result(
            'compare', cpu, [_model(5000.), _model(5100.)],
            ratios=dict(latency_b_over_a=dict(median_ratio=1.02, paired_median=1.018)),
            breakdown=dict(composition_ms=120., optimizer_extra_ms=1., rest_ms=-21.))
    for name, data in files.items():
        (path / name).write_text(json.dumps(data))
    return path


def test_summary_gathers_every_step_of_a_folder(tmp_path):
    s, = summarize(str(_check_folder(tmp_path / 'amd', 'AMD EPYC')))['results']
    assert s['cpu'] == 'AMD EPYC' and s['flags'] == ['avx512f', 'amx_bf16'] and s['bf16'] == 'native'
    assert s['steps'] == {'cpu': dict(rc=0, seconds=4), 'timeout': dict(rc=0, seconds=300)}
    assert [(r['kernel'], r['channels_last'], r['mode'], r['seconds']) for r in s['stalls']] == [
        ([31, 29], True, 'fixed', 0.012), ([31, 31], False, 'tuned', 0.281)]
    assert s['infer'] == {'upernet-replknet-31b': {'fp32': 1600., 'bf16': 800.}}
    assert s['train_31b'] == {'tuned': 15000.}  # the fixed run is missing: left out
    assert s['overhead']['upernet-r50'] == dict(ratio=1.025, paired=1.02, plain_ms=8000.)
    assert s['overhead_bf16'] == {'upernet-r50': dict(ratio=1.02, paired=1.018, plain_ms=5000.,
                                                      composition_ms=120., optimizer_ms=1.,
                                                      rest_ms=-21.)}
    assert s['suite'] == '556 passed, 4 skipped in 217.83s (0:03:37); wall time 4m47.283s'
    rules = {(r['dtype'], r['step']): r for r in s['large_dw']}
    # the fastest single candidate, and the dispatch with each input layout
    assert rules['fp32', 'fwd']['best'] == 'fft' and rules['fp32', 'fwd']['fixed_ms'] == 20.
    assert rules['fp32', 'fwd+bwd']['best'] == 'fft' and rules['fp32', 'fwd+bwd']['tuned_ms'] == 31.
    assert rules['bf16', 'fwd']['tuned_cl_ms'] == 8. and rules['bf16', 'fwd']['tuned_ms'] == 99.
    assert rules['fp32', 'fwd']['fixed_cl_ms'] is None  # not measured
    assert rules['fp32', 'fwd']['tuned_choice'] == 'fft'  # from the tuner's cache
    assert rules['fp32', 'fwd+bwd']['tuned_choice'] is None  # not in it
    assert rules['bf16', 'fwd']['tuned_cl_choice'] == 'direct_channels_last'  # an older cache
    assert s['commits'] == ['abc1234', 'def5678']  # the bucket step ran later, at another commit
    assert s['buckets'] == {'bf16': dict(sizes=21, scale=[666, 400], signatures=[86, 189],
                                         tuning_s=[48.8, 110.4], price=735.2 / 732.2,
                                         other_choice=7, convs=163)}
    layout, head = s['layouts']
    assert layout == dict(backbone='RepLKNet', mode='eval', dtype='float32', autocast='off',
                          shape='1x3x512x512', step='fwd', choice='channels_last',
                          ms={'channels_last': 531.8, 'nchw': 590.2}, contended=False)
    assert head['backbone'] == 'UPerHead' and head['choice'] == 'channels_last'
    assert s['heads_bf16'] == dict(nchw_ms=2667., tuned_ms=1767., paired=0.666)
    assert s['heads_train_bf16'] == dict(nchw_ms=11759., tuned_ms=10541., paired=0.896)


def test_two_cpus_side_by_side_and_in_the_doc(tmp_path):
    amd = summarize(str(_check_folder(tmp_path / 'amd', 'AMD EPYC', flags=('avx512f', 'avx512_bf16'),
                                      bf16=None)))  # a record made before the bf16 line
    intel = summarize(str(_check_folder(tmp_path / 'intel', 'Intel Xeon', overhead=False)))
    lines = render_vendors([intel, amd])
    assert lines[0].startswith('| figure | AMD EPYC (AVX512-BF16; 2 threads, 512x512, 2026-11-30) | '
                               'Intel Xeon (AMX; 2 threads')
    row = next(line for line in lines if line.startswith('| bf16 convs in oneDNN'))
    assert row == '| bf16 convs in oneDNN | not measured | native |'
    row = next(line for line in lines if 'UperNet-RepLKNet-31B fused inference' in line)
    assert row.count('1600 ms / 800 ms (2.00x)') == 2
    row = next(line for line in lines if 'stalled oneDNN' in line)
    assert '| 2 of 16 returned; slowest 0.281 s (tuned); the step has no status in' in row
    amd['results'][0].pop('stalling_calls')  # a record made when the test had 8 stalling calls
    row = next(line for line in render_vendors([amd]) if 'stalled oneDNN' in line)
    assert '| 2 of 8 returned;' in row
    row = next(line for line in lines if 'overhead, UperNet-R50' in line)
    assert '1.025, paired 1.020 at 8.0 s per plain step' in row and row.endswith('not measured |')
    row = next(line for line in lines if 'under bf16 autocast (--amp), UperNet-R50' in line)
    assert ('1.020, paired 1.018 at 5.0 s per plain step; extra: composition 120 ms, optimizer '
            '1 ms, rest -21 ms | not measured |') in row
    row = next(line for line in lines if 'UperNet-R50 (plain) training step' in line)
    assert '| 8.0 s / 5.0 s (1.60x) | not measured |' in row
    assert any(line.startswith('| stage1 | 31 | fp32 | fwd | fft 10.00 ms; tuned 1.05x (fft) / -; '
                               'fixed 2.00x / -') for line in lines)
    assert any(line.startswith('| stage1 | 31 | bf16 | fwd | cl_conv2d 8.00 ms; tuned 12.38x / '
                               '1.00x (cl) |') for line in lines)
    row = next(line for line in lines if 'size buckets, bf16' in line)
    assert '| 49 s / 110 s over 21 sizes (86 / 189 signatures); 1.004x (7 of 163 convs chose ' \
           'otherwise) | not measured |' in row
    row = next(line for line in lines if 'whole-backbone layout' in line)
    assert row.startswith('| RepLKNet whole-backbone layout, eval 1x3x512x512 float32 fwd '
                          '(channels_last vs NCHW) | channels_last: 0.53 s vs 0.59 s |')
    row = next(line for line in lines if line.startswith('| UPerHead '))
    assert row.startswith('| UPerHead layout, eval 1x128x128x128 bfloat16 autocast fwd '
                          '(channels_last vs NCHW) | channels_last: 0.98 s vs 1.30 s |')
    row = next(line for line in lines if 'inference under bf16 autocast, neck and heads NCHW' in line)
    assert row.count('| 2667 ms / 1767 ms, paired 0.666 ') == 2
    row = next(line for line in lines if 'training step under bf16 autocast, neck and heads' in line)
    assert row.count('| 11759 ms / 10541 ms, paired 0.896 ') == 2
    assert lines[-1] == ('*AMD EPYC (AVX512-BF16): commits abc1234, def5678; Intel Xeon (AMX): '
                         'commit abc1234; torch 2.13.0+cpu*')
    # tools/bench_report.py fills the doc's side-by-side block from the kept summaries
    for name, result in (('cpu_check_amd-epyc.json', amd), ('cpu_check_intel-xeon.json', intel)):
        (tmp_path / name).write_text(json.dumps(result))
    doc = tmp_path / 'doc.md'
    doc.write_text('x\n<!-- bench:cpu-vendors -->\nnot yet measured\n'
                   '<!-- /bench:cpu-vendors -->\n')
    kept = [str(tmp_path / 'cpu_check_amd-epyc.json'), str(tmp_path / 'cpu_check_intel-xeon.json')]
    r = subprocess.run([sys.executable, 'tools/bench_report.py', *kept, '--doc', str(doc)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert 'not yet measured' not in text and '| figure | AMD EPYC' in text and 'Intel Xeon' in text
    assert 'no <!-- bench:' not in r.stdout  # the summaries have no blocks of their own


def test_one_cpu_model_with_and_without_avx512_keeps_two_records(tmp_path):
    """An AMD EPYC is Zen 4 (AVX512-BF16) on one VM and Zen 3 (AVX2 only) on another: two records,
    two columns, and the software-bf16 one says why its bf16 figures are missing."""
    zen4 = summarize(str(_check_folder(tmp_path / 'zen4', 'AMD EPYC',
                                       flags=('avx512f', 'avx512_bf16', 'avx2'))))
    zen3 = summarize(str(_check_folder(tmp_path / 'zen3', 'AMD EPYC', flags=('avx2',),
                                       bf16='software')))
    assert record_name(zen4['results'][0]) == 'cpu_check_amd-epyc_avx512-bf16.json'
    assert record_name(zen3['results'][0]) == 'cpu_check_amd-epyc_avx2.json'
    lines = render_vendors([zen3, zen4])  # a model's widest ISA first
    assert lines[0].startswith('| figure | AMD EPYC (AVX512-BF16; 2 threads, 512x512, 2026-11-30) | '
                               'AMD EPYC (AVX2 only; 2 threads')
    row = next(line for line in lines if line.startswith('| bf16 convs in oneDNN'))
    assert row == '| bf16 convs in oneDNN | native | in software: the bf16 figures are left out |'
    row = next(line for line in lines if line.startswith('| CPU flags'))
    assert row == '| CPU flags (AMX / bf16) | avx512_bf16, avx512f, avx2 | avx2 |'
    zen3['env']['isa_caps'] = 'ONEDNN_MAX_CPU_ISA=AVX2'  # a rehearsal on an AVX-512 machine
    assert render_vendors([zen3])[0] == ('| figure | AMD EPYC (AVX2 only; capped: ONEDNN_MAX_CPU_ISA=AVX2; '
                                         '2 threads, 512x512, 2026-11-30) |')
    # --record keeps each under its own name
    folder = _check_folder(tmp_path / 'zen3-run', 'AMD EPYC', flags=('avx2',), bf16='software')
    r = subprocess.run([sys.executable, '-m', 'benchmarks.cpu_check', str(folder),
                        '--record', str(tmp_path / 'kept')], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / 'kept') == ['cpu_check_amd-epyc_avx2.json']


def test_bf16_computed_in_software_leaves_the_bf16_steps_out(tmp_path):
    # (the cpu step's detection: test_cpu_report_and_the_time_limit_firing) the bf16 steps are not
    # started; each step stops at once: its command line is what counts
    steps = dict(CPU_CHECK_STEPS='stalls,large_dw', CPU_CHECK_LIMIT_S='1')
    run(str(tmp_path / 'fp32'), '--quick', CPU_CHECK_BF16='0', **steps)
    log = (tmp_path / 'fp32' / 'cpu_check.log').read_text()
    assert '--dtypes fp32 --repeat 3' in log and '== stalls' not in log
    run(str(tmp_path / 'both'), '--quick', CPU_CHECK_BF16='1', **steps)
    log = (tmp_path / 'both' / 'cpu_check.log').read_text()
    assert '--dtypes fp32 bf16 --repeat 3' in log and '== stalls: ' in log
    assert 'left out' not in log


def test_environment_report_says_bf16_is_in_software_under_an_isa_cap():
    from reparam_mm.env import ISA_CAPS
    env = {k: v for k, v in os.environ.items() if k not in ISA_CAPS}  # (a run already capped)
    r = subprocess.run([sys.executable, '-m', 'reparam_mm.env'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**env, 'ONEDNN_MAX_CPU_ISA': 'AVX2'})
    assert r.returncode == 0, r.stderr
    assert 'onednn_bf16: software' in r.stdout.splitlines()
    assert 'isa_caps: ONEDNN_MAX_CPU_ISA=AVX2' in r.stdout.splitlines()


def test_collect_env_has_a_parser():
    """tools/collect_env.py ignored unknown arguments and -h, printing the report regardless."""
    tool = [sys.executable, str(ROOT / 'tools/collect_env.py')]
    r = subprocess.run(tool + ['--bogus'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'unrecognized arguments: --bogus' in r.stderr and not r.stdout
    r = subprocess.run(tool + ['-h'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'bug report' in r.stdout and 'torch:' not in r.stdout
