"""Benchmark JSON files (``tools/benchmark.py --out``) as markdown tables and PNG plots.

Each file's table replaces the block between ``<!-- bench:STEM -->`` and ``<!-- /bench:STEM -->``
in the doc (STEM = the JSON file name without .json); blocks without a file keep their text
("not yet measured"). Plots: ``ratios.png`` (every compare file), ``doconv_layers.png`` and
``large_dw_<device>.png``.
"""
import json
import os
import re

from reparam_mm.complexity import format_gmacs

from .cpu_check import render_vendors
from .doconv_layers import LAYER_KEYS
from .doconv_profile import render_breakdown
from .measure import KINDS, SCHEMA

LAYER_LABELS = dict(plain='plain conv', doconv='DOConv2d', doconv_t2d='DOConv2d, 2-D transpose',
                    authors="authors' einsum")


def load(path):
    with open(path) as f:
        result = json.load(f)
    if result.get('schema') != SCHEMA or result.get('kind') not in KINDS:
        raise ValueError(f'{path} is not a tools/benchmark.py result (schema {SCHEMA}); '
                         'regenerate it with tools/benchmark.py --out.')
    return result


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _f(x, fmt='{:.2f}'):
    return '-' if x is None else fmt.format(x)


def env_line(result):
    e, s = result['env'], result['settings']
    dev = e.get('gpu') or e.get('cpu') or 'cpu'
    parts = [f"device {s.get('device', 'cpu')} ({dev})", f"torch {e['torch']}"]
    if e.get('cuda'):
        parts.append(f"CUDA {e['cuda']}, cuDNN {e.get('cudnn')}")
    parts += [f"{e['torch_threads']} threads / {e['cpu_count']} CPUs", f"commit {e.get('git')}",
              e['date']]
    return '*' + '; '.join(parts) + '*'


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def render_models(result):
    s = result['settings']
    faults = all('minor_faults_median' in r['memory'] for r in result['results'])
    rows = []
    for r in result['results']:
        lat, mem = r['latency'], r['memory']
        rows.append([r['name'], r['mode'], _f(lat['median_ms'], '{:.1f}'),
                     _f(100 * lat['spread'], '{:.1f}%'), _f(lat['images_per_s']),
                     _f(mem['peak_mb'], '{:.0f}'), _f(mem.get('delta_mb'), '{:.0f}')]
                    + ([_f(mem['minor_faults_median'] / 1e3, '{:.0f}'),
                        _f(mem['system_s_median'])] if faults else [])
                    + [_f(r['params'] / 1e6), format_gmacs(r['flops'])[0] if r.get('flops') else '-'])
    what = 'inference (test_step)' if s['mode'] == 'infer' else 'training iteration (train_step)'
    notes = {'keep': ', freed CPU blocks kept for reuse',
             'default': ", glibc's default malloc"}.get(s.get('cpu_malloc'), '')
    if any(r['memory'].get('measured') for r in result['results']):
        notes += ' (peak memory from one more run per variant, heap trimmed first)'
    if s.get('weights_held'):
        notes += '; both models start as one function and keep their weights (lr 0)'
    out = [f"{what}, {s['shape'][0]}x{s['shape'][1]}, batch {s['batch']}, {s['repeat']} timed "
           f"runs after {s['warmup']} warm-up{', AMP' if s['amp'] else ''}"
           f"{', channels_last' if s['channels_last'] else ''}{notes}",
           '', table(['variant', 'mode', 'median ms', 'IQR', 'img/s', 'peak MB', '+MB in run']
                     + (['page faults / run (k)', 'system s / run'] if faults else [])
                     + ['params M', 'GMACs (fused)'], rows)]
    if 'ratios' in result:
        q = result['ratios']['latency_b_over_a']
        a, b = (r['name'] for r in result['results'])
        out += ['', f"**{b} / {a} = {q['median_ratio']:.3f}** (ratio of medians; per-round "
                f"paired ratio median {q['paired_median']:.3f}, IQR {q['paired_p25']:.3f}-"
                f"{q['paired_p75']:.3f}, {len(result['results'][0]['latency']['times_ms'])} "
                'rounds, alternating order).']
        if result.get('breakdown'):
            out += ['', render_breakdown(result['breakdown'])]
        diff = s.get('output_difference')
        if diff:
            which = ('Each with its own checkpoint' if s.get('own_checkpoints')
                     else 'Same weights in both')
            out.append(f"{which}: outputs differ by at most {diff['max_rel']:.1e} (relative).")
    return out


def render_doconv_layers(result):
    s = result['settings']
    short = dict(doconv='DOConv2d', doconv_t2d='2-D T', authors='authors')
    rows = []
    for r in result['results']:
        row = [r['name'], r['channels'], f"{r['height']}x{r['width']}"]
        for p in ('forward', 'forward_backward'):
            base = r['plain'][p]['median_ms']
            row.append(_f(base))
            row += [f"{r[k][p]['median_ms'] / base:.2f}x" for k in LAYER_KEYS[1:]]
        row.append(' / '.join(_f(r[k]['compose']['median_ms']) for k in LAYER_KEYS[1:]))
        rows.append(row)
    hdr = ['stage', 'C', 'HxW']
    for p in ('fwd', 'fwd+bwd'):
        hdr += [f'plain {p} ms'] + [f'{p} {short[k]}' for k in LAYER_KEYS[1:]]
    hdr.append('compose ms (' + ' / '.join(short[k] for k in LAYER_KEYS[1:]) + ')')
    return [f"ResNet-50 stride-1 3x3 convs (C->C) for a {s['shape'][0]}x{s['shape'][1]} input, "
            f"batch {s['batch']}, median of >= {s['repeat']} runs. Ratios are time / plain conv; "
            "DOConv2d = reparam_mm's layer, 2-D T = the candidate composition with 2-D "
            "transposes, authors = the authors' einsum formulation.",
            '', table(hdr, rows)]


def render_large_dw(result):
    s = result['settings']
    rows = []
    for r in result['results']:
        fwd, fb = r.get('forward'), r.get('forward_backward')
        rows.append([r['stage'], r['kernel'], r['channels'], f"{r['height']}x{r['width']}",
                     r['dtype'], r['candidate'], r['layout'],
                     _f(fwd['median_ms']) if fwd else r.get('error', '-'),
                     _f(r.get('forward_gflops'), '{:.1f}'),
                     f"{r['bound_ms']:.3f} ({r['bound_by']})",
                     _f(r.get('forward_over_bound'), '{:.1f}x'),
                     _f(fb['median_ms']) if fb else '-',
                     _f(r.get('forward_backward_over_bound'), '{:.1f}x')])
    ceil = '; '.join(f"{d}: {c.get('compute_peak', 'GEMM')} {c['gemm_flops_per_s'] / 1e9:.0f} "
                     f"GFLOP/s, copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s"
                     for d, c in result['ceilings'].items())
    return [f"RepLKNet-{s['arch']} large depthwise convs at a {s['shape'][0]}x{s['shape'][1]} "
            f"input, batch {s['batch']}. Measured ceilings: {ceil}. Bound = max(FLOPs / compute "
            'peak, minimum bytes / copy bandwidth), FLOPs counting a multiply-add as 2; the '
            'fwd+bwd bound is 3x (input and weight gradients are convolutions of the same size).',
            '', table(['stage', 'k', 'C', 'HxW', 'dtype', 'candidate', 'input layout',
                       'fwd ms', 'fwd GFLOP/s', 'fwd bound ms', 'fwd / bound', 'fwd+bwd ms',
                       'fwd+bwd / bound'], rows)]


RENDER = dict(model=render_models, compare=render_models, doconv_layers=render_doconv_layers,
              large_dw=render_large_dw)  # cpu_check summaries: combined_blocks


def render(result, source):
    body = RENDER[result['kind']](result)
    if result.get('unfinished'):  # a run stopped at its time limit, written as it went
        body += ['', f"*Unfinished run: {result['unfinished']}.*"]
    body += [f'*Warning: {w}*' for w in result.get('warnings', ())]  # contention, contradicting ratios
    return '\n'.join(body + ['', env_line(result),
                             f'<sub>generated by tools/bench_report.py from {source}</sub>'])


def _own_peak_mb(mem):
    """A variant's peak without what the other variant of a compare kept on the GPU."""
    return mem.get('own_peak_mb', mem.get('peak_mb'))


def render_gpu_configs(results):
    """The README's GPU table: one row per model run on CUDA (config, what ran, iteration time,
    images/s, peak memory (of the variant alone where two were compared), the fused outputs'
    largest relative difference from the unfused ones, device, torch, CUDA, date)."""
    rows = []
    for r in results:
        s, e = r['settings'], r['env']
        diff = (s.get('output_difference') or {}).get('max_rel')
        for v in r['results']:
            lat, mem = v['latency'], v['memory']
            peak_mb = _own_peak_mb(mem)
            form = re.search(r' \((fused|unfused)\)$', v['name'])  # a compare's variants
            config = v['name'][:form.start()] if form else v['name']
            step = 'training iteration' if v['mode'] == 'train' else \
                f"{form.group(1) + ' ' if form else ''}test step"
            rows.append([config, step, f"{s['batch']} x {s['shape'][0]}x{s['shape'][1]}"
                         f"{', AMP' if s.get('amp') else ''}",
                         _f(lat['median_ms'], '{:.1f}'), _f(lat['images_per_s'], '{:.1f}'),
                         _f(peak_mb / 1024 if peak_mb else None, '{:.1f}'),
                         _f(diff if form and form.group(1) == 'fused' else None, '{:.1e}'),
                         e.get('gpu') or e.get('gpus') or '?', e['torch'],
                         f"{e.get('cuda')} / cuDNN {e.get('cudnn')}", e['date'][:10]])
    return table(['config', 'step', 'batch x crop', 'ms / iteration', 'images / s',
                  'peak GiB', 'fused vs unfused (max rel)', 'device', 'torch', 'CUDA', 'date'],
                 rows)


def _on_cuda(result):
    return str(result['settings'].get('device', 'cpu')).startswith('cuda')


def combined_blocks(loaded):
    """Blocks drawn from several files: ``cpu-vendors``, every CPU's tools/cpu_check.sh summary
    side by side; ``gpu-configs``, every model timed on CUDA (the README's GPU table)."""
    blocks = {}
    checks = [(path, r) for path, r in loaded if r['kind'] == 'cpu_check']
    if checks:
        sources = ', '.join(os.path.relpath(path) for path, _ in checks)
        blocks['cpu-vendors'] = '\n'.join(render_vendors([r for _, r in checks]) + [
            f'<sub>generated by tools/bench_report.py from {sources}</sub>'])
    gpu = [(path, r) for path, r in loaded if r['kind'] in ('model', 'compare') and _on_cuda(r)]
    if gpu:
        sources = ', '.join(os.path.basename(path) for path, _ in gpu)
        blocks['gpu-configs'] = '\n'.join([render_gpu_configs([r for _, r in gpu]), '',
                                           f'<sub>generated by tools/bench_report.py from '
                                           f'{sources}</sub>'])
    return blocks


def fill_doc(text, blocks):
    """Replace each ``<!-- bench:NAME -->...<!-- /bench:NAME -->`` body; return (text, missing)."""
    missing = []
    for name, body in blocks.items():
        pat = re.compile(rf'(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)}'
                         r' -->)', re.S)
        if not pat.search(text):
            missing.append(name)
            continue
        text = pat.sub(lambda m: m.group(1) + body + '\n' + m.group(2), text)
    return text, missing


# -- plots ----------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_ratios(results, path):
    """Horizontal bars: B / A latency (paired median, IQR whiskers) per compare file."""
    plt = _plt()
    items = [(n, r['ratios']['latency_b_over_a']) for n, r in results]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(items) + 1.5))
    y = list(range(len(items)))
    med = [q['paired_median'] for _, q in items]
    err = [[m - q['paired_p25'] for m, q in zip(med, (q for _, q in items))],
           [q['paired_p75'] - m for m, q in zip(med, (q for _, q in items))]]
    ax.barh(y, med, xerr=err, color='tab:blue', alpha=0.8, capsize=3)
    ax.axvline(1.0, color='k', lw=1)
    ax.set_yticks(y, [n for n, _ in items], fontsize=8)
    ax.set_xlabel('latency B / A (paired median, IQR)')
    for yi, m in zip(y, med):
        ax.text(m, yi, f' {m:.3f}', va='center', fontsize=8)
    ax.set_title(f"{results[0][1]['env'].get('cpu') or ''} ({results[0][1]['settings']['device']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def plot_doconv_layers(result, path):
    plt = _plt()
    recs = result['results']
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    width = 0.8 / (len(LAYER_KEYS) - 1)
    for ax, p in zip(axes, ('forward', 'forward_backward')):
        for j, k in enumerate(LAYER_KEYS[1:]):
            vals = [r[k][p]['median_ms'] / r['plain'][p]['median_ms'] for r in recs]
            ax.bar([i + (j - 1) * width for i in range(len(recs))], vals, width,
                   label=LAYER_LABELS[k])
        ax.axhline(1.0, color='k', lw=1)
        ax.set_xticks(range(len(recs)), [f"{r['name']}\nC={r['channels']}" for r in recs])
        ax.set_title(p.replace('_', '+'))
    axes[0].set_ylabel('time / plain conv')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def plot_large_dw(result, path):
    """Forward and forward+backward time per stage and implementation, with the bounds."""
    plt = _plt()
    recs = [r for r in result['results'] if r.get('forward')]
    stages = list(dict.fromkeys(r['stage'] for r in recs))
    keys = list(dict.fromkeys((r['dtype'], r['candidate']) for r in recs))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    width = 0.8 / max(len(keys), 1)
    for ax, phase, bound_key in zip(axes, ('forward', 'forward_backward'),
                                    ('bound_ms', 'bound_fwd_bwd_ms')):
        for j, key in enumerate(keys):
            vals = [next(((r.get(phase) or {}).get('median_ms', 0) for r in recs
                          if r['stage'] == s and (r['dtype'], r['candidate']) == key), 0)
                    for s in stages]
            ax.bar([i + (j - len(keys) / 2 + 0.5) * width for i in range(len(stages))], vals,
                   width, label=' '.join(key))
        bounds = [next(r[bound_key] for r in recs if r['stage'] == s) for s in stages]
        ax.scatter(range(len(stages)), bounds, marker='_', s=900, color='k', zorder=3,
                   label=f'bound ({keys[0][0]})')
        ax.set_yscale('log')
        ax.set_xticks(range(len(stages)), [
            f"{s}\nk={next(r['kernel'] for r in recs if r['stage'] == s)}" for s in stages])
        ax.set_title(phase.replace('_', '+'))
    axes[0].set_ylabel('ms (log scale)')
    axes[1].legend(fontsize=7, ncol=1, loc='center left', bbox_to_anchor=(1.0, 0.5),
                   markerscale=0.3)
    e = result['env']
    fig.suptitle(f"{e.get('gpu') or e.get('cpu')}, torch {e['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def make_plots(loaded, plot_dir):
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    compares = [(stem(p), r) for p, r in loaded if r['kind'] == 'compare']
    if compares:
        written.append(os.path.join(plot_dir, 'ratios.png'))
        plot_ratios(compares, written[-1])
    for p, r in loaded:
        if r['kind'] == 'doconv_layers':
            written.append(os.path.join(plot_dir, 'doconv_layers.png'))
            plot_doconv_layers(r, written[-1])
        elif r['kind'] == 'large_dw':
            dev = r['settings']['device'].split(':')[0]
            written.append(os.path.join(plot_dir, f'large_dw_{dev}.png'))
            plot_large_dw(r, written[-1])
    return written
