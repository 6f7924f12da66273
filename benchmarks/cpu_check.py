"""One CPU's issue-16 figures, gathered from a ``tools/cpu_check.sh`` folder into one summary, and
the summaries of several CPUs side by side (docs/benchmarks.md, "The same figures on each CPU").

    python -m benchmarks.cpu_check OUT_DIR [--record docs/benchmarks]

writes ``OUT_DIR/cpu_check_summary.json``; ``--record DIR`` also keeps it as
``DIR/cpu_check_<cpu>_<isa>.json`` (:func:`record_name`), the committed record the side-by-side
table is rendered from (``tools/bench_report.py docs/benchmarks/cpu_check_*.json --doc docs/benchmarks.md``).
"""
import argparse
import glob
import json
import os
import re
import shutil

from reparam_mm.layers.large_kernel import shape_label

from .measure import SCHEMA

#: a line of tests/test_large_kernel.py's stalling-call tests (run with -s)
STALL_LINE = re.compile(r'\((\d+), (\d+)\) pad \((\d+), (\d+)\) channels_last=(True|False) '
                        r'(fixed|tuned): ([\d.]+) s')
STEP_LINE = re.compile(r'^== (\w+): rc=(\d+) in (\d+) s$', re.M)
#: tests/test_large_kernel.py's stalling calls: 4 cases x 2 layouts x 2 dispatch modes
STALLING_CALLS = 16
#: the candidates that compute one way each (the rest are the dispatch in a mode)
DIRECT = ('nchw_conv2d', 'cl_conv2d', 'fft')
HALF = ('bf16', 'fp16')
INFER = {'upernet-replknet-31b': 'UperNet-RepLKNet-31B',
         'upernet-r50-doconv': 'DO-Conv UperNet-R50'}
OVERHEAD = {'upernet-r50': 'UperNet-R50', 'faster-rcnn-r50': 'Faster R-CNN R50 4conv1fc'}
#: summary key -> file stem of the overhead step's compares: fp32, and bf16 autocast (--amp)
OVERHEAD_RUNS = {'overhead': 'cpu_train-overhead', 'overhead_bf16': 'cpu_train-amp-overhead'}
#: the widest bf16-capable ISA a CPU flag names -> its name in a record's file name and column
ISA_CLASSES = (('amx_bf16', 'amx', 'AMX'), ('avx512_bf16', 'avx512-bf16', 'AVX512-BF16'),
               ('avx512f', 'avx512', 'AVX-512'), ('avx2', 'avx2', 'AVX2 only'))
#: summary key -> the compare of the neck and heads NCHW (A) against their tuned layout (B)
HEADS_RUNS = {'heads_bf16': 'cpu_heads_upernet-replknet-31b_bf16',
              'heads_train_bf16': 'cpu_heads-train_upernet-replknet-31b_bf16'}


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _json(path):
    text = _read(path)
    return json.loads(text) if text is not None else None


def _median(result, index=0):
    return result['results'][index]['latency']['median_ms'] if result else None


TORCH_DTYPE = dict(fp32='float32', bf16='bfloat16', fp16='float16')
#: the dispatch's candidate names, shortened for table cells
SHORT = dict(direct_nchw='nchw', direct_channels_last='cl', fft='fft', triton='triton')


def large_dw_rules(result, tuning=None):
    """Per stage, dtype and pass: the fastest single candidate, and the tuned and fixed dispatch
    against it, with NCHW and with channels_last input (a backbone hands in either:
    ``backbone_layout``); with the tuner's cache, which candidate it chose for each input."""
    choices = {sig: entry.get('choice') for entries in (tuning or {}).values()
               for sig, entry in entries.items()}
    rows, groups = [], {}
    for r in result['results']:
        groups.setdefault((r['stage'], r['kernel'], r['dtype']), {})[r['candidate']] = r
    for (stage, kernel, dtype), by_cand in groups.items():
        shape = next(iter(by_cand.values()))
        for key, label in (('forward', 'fwd'), ('forward_backward', 'fwd+bwd')):
            def ms(cand):
                rec = by_cand.get(cand) or {}
                return (rec.get(key) or {}).get('median_ms')

            def chosen(layout):  # large_kernel.signature() of the benchmark's call
                p = kernel // 2
                dims = (shape['batch'], shape['channels'], shape['height'], shape['width'])
                # caches written before size buckets spell the exact sizes
                for sizes in (shape_label(dims), 'x'.join(map(str, dims))):
                    sig = (f"cpu|{TORCH_DTYPE.get(dtype, dtype)}|{layout}|{sizes}"
                           f"|k{kernel}x{kernel}|s1x1|p{p}x{p}|d1x1|{label}")
                    if sig in choices:
                        return choices[sig]
                return None
            direct = {c: ms(c) for c in DIRECT if ms(c) is not None}
            if not direct:
                continue
            best = min(direct, key=direct.get)
            rows.append(dict(stage=stage, kernel=kernel, dtype=dtype, step=label, best=best,
                             best_ms=direct[best], tuned_ms=ms('tuned'), tuned_cl_ms=ms('tuned_cl'),
                             fixed_ms=ms('fixed'), fixed_cl_ms=ms('fixed_cl'),
                             tuned_choice=chosen('nchw'), tuned_cl_choice=chosen('channels_last')))
    return rows


#: the backbones that time their own whole-forward layout (``forward_in_best_layout``); the
#: tuner's other layout entries are necks and heads
LAYOUT_BACKBONES = ('RepLKNet',)


def layout_choices(tuning):
    """The layouts the tuner chose (``layout|...`` entries of its cache file): whole backbones',
    and in evaluation the neck's and heads' (``head_layout``)."""
    rows = []
    for entries in (tuning or {}).values():
        for sig, entry in entries.items():
            if not sig.startswith('layout|'):
                continue
            _, module, _, dtype, autocast, shape, step = sig.split('|')
            # the size timed (the signature holds its size buckets)
            rows.append(dict(backbone=module.split(':')[0], mode=module.split(':')[-1],
                             dtype=dtype, autocast=autocast.replace('autocast ', ''),
                             shape=entry.get('shape', shape),
                             step=step, choice=entry['choice'], ms=entry['ms'],
                             contended=entry.get('contended')))
    return rows


def summarize(out_dir):
    """The figures of one ``tools/cpu_check.sh`` run; missing steps are left out."""
    def path(name):
        return os.path.join(out_dir, name)
    results = {}  # file stem -> tools/benchmark.py result, each file read once
    for file in sorted(glob.glob(path('cpu_*.json'))):
        r = _json(file)
        if r and r.get('schema') == SCHEMA and r.get('kind') != 'cpu_check':
            results[os.path.splitext(os.path.basename(file))[0]] = r
    if not results:
        raise ValueError(f'{out_dir} holds no tools/benchmark.py results; run '
                         f'`tools/cpu_check.sh {out_dir}` first.')
    first = next(iter(results.values()))
    env = dict(first['env'])
    large_dw = results.get('cpu_large-dw')
    tuning = _json(path('cache/large_dw_tuning.json'))
    summary = dict(cpu=env.get('cpu'), steps={}, stalls=[], stalling_calls=STALLING_CALLS,
                   infer={}, train_31b={},
                   overhead={}, overhead_bf16={}, large_dw=large_dw_rules(large_dw, tuning) if large_dw else [],
                   layouts=layout_choices(tuning), shape=first['settings'].get('shape'))
    cpu_log = _read(path('cpu.log')) or ''
    summary['flags'] = re.findall(r'^cpu flag: (\S+)', cpu_log, re.M)
    bf16 = re.search(r'^cpu bf16: (native|software)$', cpu_log, re.M)
    summary['bf16'] = bf16.group(1) if bf16 else None  # None: a record made before the line
    for name, rc, seconds in STEP_LINE.findall(_read(path('cpu_check.log')) or ''):
        summary['steps'][name] = dict(rc=int(rc), seconds=int(seconds))
    for kh, kw, ph, pw, cl, mode, seconds in STALL_LINE.findall(_read(path('stalls.log')) or ''):
        summary['stalls'].append(dict(kernel=[int(kh), int(kw)], padding=[int(ph), int(pw)],
                                      channels_last=cl == 'True', mode=mode,
                                      seconds=float(seconds)))
    for model in INFER:
        times = {d: _median(results.get(f'cpu_infer_{model}_{d}')) for d in ('fp32', 'bf16')}
        if any(times.values()):
            summary['infer'][model] = times
    for key, stem in HEADS_RUNS.items():
        heads = results.get(stem)
        if heads:  # B / A: the neck and heads in their tuned layout against NCHW
            ratio = heads['ratios']['latency_b_over_a']
            summary[key] = dict(nchw_ms=_median(heads, 0), tuned_ms=_median(heads, 1),
                                paired=ratio.get('paired_median'))
    for mode in ('tuned', 'fixed'):
        ms = _median(results.get(f'cpu_train_upernet-replknet-31b_{mode}'))
        if ms is not None:
            summary['train_31b'][mode] = ms
    for key, stem in OVERHEAD_RUNS.items():
        for model in OVERHEAD:
            result = results.get(f'{stem}_{model}')
            if result:
                ratio = result['ratios']['latency_b_over_a']
                summary[key][model] = dict(ratio=ratio['median_ratio'],
                                           paired=ratio.get('paired_median'),
                                           plain_ms=_median(result, 0))
                b = result.get('breakdown')
                if b:
                    summary[key][model].update(
                        composition_ms=b['composition_ms'], optimizer_ms=b['optimizer_extra_ms'],
                        rest_ms=b['rest_ms'])
    runs = list(results.values())
    for dtype in ('fp32', 'bf16'):
        b = _json(path(f'size_buckets/size_buckets_{dtype}.json'))
        if b:
            runs.append(b)
            modes, sharing = b['modes'], b['sharing']
            summary.setdefault('buckets', {})[dtype] = dict(
                sizes=b['sizes'], scale=b['scale'],
                signatures=[modes['buckets']['signatures'], modes['alone']['signatures']],
                tuning_s=[modes['buckets']['tuning_s'], modes['alone']['tuning_s']],
                price=sharing['shared_ms'] / sharing['own_ms'] if sharing['own_ms'] else None,
                other_choice=sharing['other_choice'], convs=sharing['convs'])
    # steps re-run later come from later commits: every commit the figures were measured at
    summary['commits'] = list(dict.fromkeys(
        r['env'].get('git') for r in sorted(runs, key=lambda r: r['env'].get('date') or '')))
    suite = _read(path('suite.log')) or ''
    outcome = re.findall(r'^=*\s*(\d+ (?:passed|failed|errors?)\b.*? in [\d.]+s(?: \([\d:]+\))?)'
                         r'\s*=*$', suite, re.M)
    wall = re.search(r'^real\s+(\S+)', suite, re.M)
    if outcome:
        summary['suite'] = outcome[-1] + (f'; wall time {wall.group(1)}' if wall else '')
    return dict(schema=SCHEMA, kind='cpu_check', env=env, settings=dict(out_dir=out_dir),
                results=[summary])


def slug(cpu):
    """A file-name part for a CPU model: 'AMD EPYC' -> 'amd-epyc'."""
    return re.sub(r'[^a-z0-9]+', '-', (cpu or 'unknown-cpu').lower()).strip('-')


def _isa_rank(flags):
    """Index in ``ISA_CLASSES`` of the widest ISA the flags name (widest first), or its length."""
    return next((i for i, (flag, _, _) in enumerate(ISA_CLASSES) if flag in flags),
                len(ISA_CLASSES))


def isa_class(flags):
    """(file-name part, label) of the widest ISA in a summary's CPU flags: one model name covers
    CPUs with and without AVX-512 (an AMD EPYC: Zen 3 or Zen 4), whose figures differ 2-200x."""
    rank = _isa_rank(flags)
    return ISA_CLASSES[rank][1:] if rank < len(ISA_CLASSES) else ('unknown-isa', 'ISA unknown')


def record_name(summary):
    """'cpu_check_amd-epyc_avx512-bf16.json': the CPU model and its ISA class."""
    return f"cpu_check_{slug(summary['cpu'])}_{isa_class(summary['flags'])[0]}.json"


# -- rendering ------------------------------------------------------------------------------------
def _ms(x, unit='ms'):
    if x is None:
        return '-'
    return f'{x / 1e3:.1f} s' if unit == 's' else f'{x:.0f} ms'


def _speedup(a, b):
    return f' ({a / b:.2f}x)' if a and b else ''


def _figures(s, step_ok):
    """figure label -> text, for one CPU's summary."""
    out = {}
    flags = [f for f in ('amx_bf16', 'avx512_bf16', 'avx512f', 'avx2') if f in s['flags']]
    out['CPU flags (AMX / bf16)'] = ', '.join(flags) or 'none of amx_bf16, avx512_bf16, avx512f, avx2'
    if s.get('bf16'):
        out['bf16 convs in oneDNN'] = ('native' if s['bf16'] == 'native' else
                                       'in software: the bf16 figures are left out')
    if s.get('suite'):
        out['`make test` from a clean clone'] = s['suite']
    if s['stalls'] or 'stalls' in s['steps']:
        returned = len(s['stalls'])
        worst = max(s['stalls'], key=lambda r: r['seconds'], default=None)
        text = f"{returned} of {s.get('stalling_calls', 8)} returned"  # records before: 8
        if worst:
            text += f"; slowest {worst['seconds']:.3f} s ({worst['mode']})"
        if 'stalls' not in s['steps']:
            text += '; the step has no status in cpu_check.log'
        elif not step_ok('stalls'):
            text += f"; the step FAILED (rc={s['steps']['stalls']['rc']})"
        out['the bf16 calls that stalled oneDNN (on AMX; on AMD)'] = text
    if 'timeout' in s['steps']:
        out['per-test time limit on a sleeping test'] = (
            'fired, test named' if step_ok('timeout') else 'did NOT fire as expected')
    for model, label in INFER.items():
        t = s['infer'].get(model)
        if t:
            out[f'{label} fused inference, fp32 / bf16 autocast'] = (
                f"{_ms(t.get('fp32'))} / {_ms(t.get('bf16'))}"
                f"{_speedup(t.get('fp32'), t.get('bf16'))}")
    for key, what in (('heads_bf16', 'fused inference'), ('heads_train_bf16', 'training step')):
        heads = s.get(key)
        if heads:
            out[f'UperNet-RepLKNet-31B {what} under bf16 autocast, neck and heads NCHW / in their '
                'tuned layout'] = (f"{_ms(heads['nchw_ms'])} / {_ms(heads['tuned_ms'])}"
                                   + (f", paired {heads['paired']:.3f}" if heads.get('paired')
                                      else ''))
    for row in s.get('layouts', []):
        precision = row['dtype'] if row['autocast'] == 'off' else f"{row['autocast']} autocast"
        times = ' vs '.join(f"{row['ms'][name] / 1e3:.2f} s" for name in ('channels_last', 'nchw')
                            if name in row['ms'])
        whole = 'whole-backbone ' if row['backbone'] in LAYOUT_BACKBONES else ''
        out[f"{row['backbone']} {whole}layout, {row['mode']} {row['shape']} {precision} "
            f"{row['step']} (channels_last vs NCHW)"] = f"{row['choice']}: {times}"
    if s['train_31b']:
        t = s['train_31b']
        out['UperNet-RepLKNet-31B training step, tuned / fixed dispatch'] = (
            f"{_ms(t.get('tuned'), 's')} / {_ms(t.get('fixed'), 's')}")
    for dtype, b in s.get('buckets', {}).items():
        price = f"{b['price']:.3f}x" if b['price'] else '-'
        out[f'size buckets, {dtype}: timing with buckets / every size alone; a bucket\'s choice '
            f'in each size\'s own table'] = (
            f"{b['tuning_s'][0]:.0f} s / {b['tuning_s'][1]:.0f} s over {b['sizes']} sizes "
            f"({b['signatures'][0]} / {b['signatures'][1]} signatures); {price} "
            f"({b['other_choice']} of {b['convs']} convs chose otherwise)")
    for model, label in OVERHEAD.items():
        fp32, bf16 = s['overhead'].get(model), s.get('overhead_bf16', {}).get(model)
        if fp32:
            out[f'DO-Conv training overhead, {label}'] = _overhead(fp32)
        if bf16:
            out[f'DO-Conv training overhead under bf16 autocast (--amp), {label}'] = _overhead(bf16)
        if fp32 and bf16:
            out[f'{label} (plain) training step, fp32 / bf16 autocast'] = (
                f"{_ms(fp32['plain_ms'], 's')} / {_ms(bf16['plain_ms'], 's')}"
                f"{_speedup(fp32['plain_ms'], bf16['plain_ms'])}")
    return out


def _overhead(o):
    paired = f", paired {o['paired']:.3f}" if o.get('paired') else ''
    parts = ''
    if 'composition_ms' in o:
        parts = (f"; extra: composition {o['composition_ms']:.0f} ms, optimizer "
                 f"{o['optimizer_ms']:.0f} ms, rest {o['rest_ms']:.0f} ms")
    return f"{o['ratio']:.3f}{paired} at {_ms(o['plain_ms'], 's')} per plain step{parts}"


def _commits(result):
    """'CPU: commit(s) ...': every commit a CPU's figures were measured at."""
    s = result['results'][0]
    commits = s.get('commits') or [str(result['env'].get('git'))]
    return (f"{s['cpu']} ({isa_class(s['flags'])[1]}): commit{'s' if len(commits) > 1 else ''} "
            f"{', '.join(commits)}")


def render_vendors(results):
    """Markdown: the CPUs' figures side by side, then the large-DW rule table per CPU."""
    results = sorted(results, key=lambda r: (r['results'][0]['cpu'] or '',  # widest ISA first
                                             _isa_rank(r['results'][0]['flags'])))
    heads, columns = [], []
    for r in results:
        s = r['results'][0]
        shape = 'x'.join(map(str, s.get('shape') or [])) or '?'
        cap = r['env'].get('isa_caps')  # measured under a cap: not the CPU's own figures
        heads.append(f"{s['cpu']} ({isa_class(s['flags'])[1]}{'; capped: ' + cap if cap else ''}; "
                     f"{r['env'].get('torch_threads')} threads, {shape}, {r['env']['date'][:10]})")
        columns.append(_figures(s, lambda name, s=s: s['steps'].get(name, {}).get('rc') == 0))
    labels = list(dict.fromkeys(label for col in columns for label in col))
    lines = ['| figure | ' + ' | '.join(heads) + ' |', '|---|' + '---|' * len(heads)]
    lines += [f'| {label} | ' + ' | '.join(col.get(label, 'not measured') for col in columns) + ' |'
              for label in labels]
    rules = {}
    for r, head in zip(results, heads):
        for row in r['results'][0]['large_dw']:
            key = (row['stage'], row['kernel'], row['dtype'], row['step'])
            def ratios(mode):
                nchw, cl = row.get(f'{mode}_ms'), row.get(f'{mode}_cl_ms')
                if not nchw and not cl:
                    return ''
                fmt = []
                for t, layout in ((nchw, ''), (cl, '_cl')):
                    choice = row.get(f'{mode}{layout}_choice') if mode == 'tuned' else None
                    fmt.append((f'{t / row["best_ms"]:.2f}x' if t else '-')
                               + (f' ({SHORT.get(choice, choice)})' if choice else ''))
                return f'; {mode} {fmt[0]} / {fmt[1]}'
            rules.setdefault(key, {})[head] = (f"{row['best']} {row['best_ms']:.2f} ms"
                                               f"{ratios('tuned')}{ratios('fixed')}")
    if rules:
        lines += ['', 'RepLKNet-31B large depthwise convs: the fastest single candidate, and the '
                  'dispatch in each mode as a multiple of it, with the input NCHW / channels_last '
                  '(a backbone hands in either, as its layout is chosen); in brackets the '
                  "candidate the tuner chose (nchw / cl: oneDNN's direct conv in that layout).",
                  '',
                  '| stage | k | dtype | pass | ' + ' | '.join(heads) + ' |',
                  '|---|---|---|---|' + '---|' * len(heads)]
        for (stage, kernel, dtype, step), cells in rules.items():
            lines.append(f'| {stage} | {kernel} | {dtype} | {step} | '
                         + ' | '.join(cells.get(h, 'not measured') for h in heads) + ' |')
    lines += ['', f"*{'; '.join(map(_commits, results))}; torch {results[0]['env']['torch']}*"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description='Summarise a tools/cpu_check.sh folder.')
    p.add_argument('out_dir', help='the folder tools/cpu_check.sh wrote')
    p.add_argument('--record', metavar='DIR',
                   help='also keep the summary as DIR/cpu_check_<cpu>_<isa>.json (docs/benchmarks)')
    args = p.parse_args(argv)
    result = summarize(args.out_dir)
    target = os.path.join(args.out_dir, 'cpu_check_summary.json')
    with open(target, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {target}')
    if args.record:
        os.makedirs(args.record, exist_ok=True)
        kept = os.path.join(args.record, record_name(result['results'][0]))
        shutil.copyfile(target, kept)
        print(f'wrote {kept}')
    print('\n'.join(render_vendors([result])))


if __name__ == '__main__':
    main()
