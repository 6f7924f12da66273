"""Measure speed and memory of models and layers; write one JSON file (docs/benchmarks.md).

    # one config: inference (fused by default) or training iterations
    python tools/benchmark.py CONFIG [--checkpoint F] [--shape H W] [--batch N]
        [--mode infer|train] [--fuse|--no-fuse] [--device cpu|cuda] [--amp] [--channels-last]
        [--large-dw-dispatch tuned|fixed]
        [--repeat R] [--warmup W] [--no-flops] [--dw-fft-min-kernel K] [--cfg-options K=V ...]
        [--out FILE.json]
    # two variants timed alternately in one process (ratios B / A); a variant is CONFIG,
    # CONFIG:fused or CONFIG:unfused, each with :nchw-heads appended for a neck and heads kept
    # NCHW instead of the layout timed fastest (reparam_mm.head_layout)
    python tools/benchmark.py --compare A B [same options]
    # layer tables
    python tools/benchmark.py --doconv-layers [--shape H W] [--batch N] [--device D] [--repeat R]
    python tools/benchmark.py --large-dw [--arch 31B] [--dtypes fp32 bf16 fp16]
        [--candidates ...] [--no-backward] [--shape H W] [--batch N] [--device D] [--repeat R]

Then ``python tools/bench_report.py work_dirs/bench/*.json`` renders tables and plots.
The measurements live in benchmarks/ (measure, models, doconv_layers, large_dw).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401  (registers everything, checkpoint loading fixes)
from benchmarks.doconv_layers import LAYER_KEYS, benchmark_doconv_layers  # noqa: E402
from benchmarks.large_dw import DTYPES, benchmark_large_dw  # noqa: E402
from benchmarks.measure import to_json  # noqa: E402
from benchmarks.models import benchmark_models  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.complexity import format_gmacs  # noqa: E402
from reparam_mm.cpu_malloc import keep_freed_memory  # noqa: E402
from reparam_mm.layers import large_kernel  # noqa: E402
from reparam_mm.scope import CfgOptionsAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Benchmark reparam_mm models and layers.')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument('config', nargs='?', help='config to benchmark')
    what.add_argument('--compare', nargs=2, metavar=('A', 'B'),
                      help='two variants (CONFIG[:fused|:unfused][:nchw-heads]) timed alternately')
    what.add_argument('--doconv-layers', action='store_true',
                      help="ResNet-50 3x3 convs: plain vs DOConv2d vs the authors' formulation")
    what.add_argument('--large-dw', action='store_true',
                      help="RepLKNet's large depthwise convs at their stage shapes")
    p.add_argument('--checkpoint', action='append', metavar='F',
                   help='weights loaded strictly before fusing (optional); with --compare, one '
                   'for both variants, or given twice: one each (a training and a deploy checkpoint)')
    p.add_argument('--shape', nargs=2, type=int, default=[512, 512], metavar=('H', 'W'))
    p.add_argument('--batch', type=int, default=None,
                   help='images per step (default 1; 2 for --doconv-layers)')
    p.add_argument('--mode', choices=['infer', 'train'], default='infer')
    p.add_argument('--fuse', action=argparse.BooleanOptionalAction, default=None,
                   help='infer: fuse before timing (default); train: not allowed')
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--amp', action='store_true',
                   help='mixed precision: fp16 autocast on CUDA (training: AmpOptimWrapper), bf16 '
                   'autocast on CPU (training: CPUAmpOptimWrapper)')
    p.add_argument('--channels-last', action='store_true', help='model in channels_last')
    p.add_argument('--repeat', type=int, default=None,
                   help='timed runs per variant (default 5; 10 for --doconv-layers, 3 for '
                        '--large-dw, which also time at least --min-time seconds)')
    p.add_argument('--warmup', type=int, default=None, help='untimed runs first (default 2)')
    p.add_argument('--min-time', type=float, default=None,
                   help='layer tables: keep timing until this many seconds (default 0.5 / 1.0)')
    p.add_argument('--cpu-malloc', choices=['keep', 'default'], default='keep',
                   help="CPU: 'keep' freed large blocks in the process for reuse, as tools/train.py "
                        "and tools/test.py do (reparam_mm.cpu_malloc); 'default': glibc's "
                        'mmap / unmap per block, which page-faults every step')
    p.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch default)')
    p.add_argument('--no-flops', action='store_true', help='skip the FLOP count')
    p.add_argument('--arch', default='31B', help='RepLKNet arch of the --large-dw shapes')
    p.add_argument('--dtypes', nargs='+', default=['fp32'], choices=list(DTYPES))
    p.add_argument('--candidates', nargs='+', help='--large-dw implementations (default all)')
    p.add_argument('--no-backward', action='store_true', help='--large-dw: forward only')
    p.add_argument('--large-dw-dispatch', choices=['tuned', 'fixed'],
                   help="large depthwise convs: 'tuned' (time the candidates once per call "
                        "signature) or 'fixed' (the rules measured on one CPU; cuDNN on CUDA). "
                        'Default: the environment\'s, REPARAM_MM_LARGE_DW (tuned)')
    p.add_argument('--dw-fft-min-kernel', type=int, metavar='K',
                   help='fixed dispatch with CPU FFTs from kernel side K (default: '
                        'reparam_mm.layers.large_kernel.FFT_MIN_KERNEL; a huge K measures '
                        'direct convolution)')
    p.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                   help='override settings of the config(s) (KEY=VALUE ...), as the other tools')
    p.add_argument('--out', help='JSON file to write (default: print only)')
    args = p.parse_args(argv)
    if args.mode == 'train' and args.fuse:
        p.error('--mode train times the unfused model (a fused one is the plain architecture): '
                'drop --fuse.')
    if args.cfg_options and (args.doconv_layers or args.large_dw):
        p.error('--cfg-options sets a config, and the layer tables (--doconv-layers, --large-dw) '
                'read none: drop it.')
    if args.dw_fft_min_kernel is not None and args.large_dw_dispatch == 'tuned':
        p.error('--dw-fft-min-kernel sets a fixed rule; drop --large-dw-dispatch tuned (or the '
                'threshold).')
    for name in ('batch', 'repeat'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1.')
    if args.warmup is not None and args.warmup < 0:
        p.error('--warmup must be at least 0.')
    if args.checkpoint and len(args.checkpoint) > (len(args.compare) if args.compare else 1):
        p.error(f'--checkpoint: give one file, or one per --compare variant (--checkpoint A.pth '
                f'--checkpoint B.pth), not {len(args.checkpoint)}.')
    if min(args.shape) < 1:
        p.error('--shape H W must be positive.')
    if args.device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            p.error(f'--device {args.device}: no CUDA device is visible to torch '
                    f'{torch.__version__}; use --device cpu.')
    return args


def run(args):
    if args.dw_fft_min_kernel is not None:
        mode, threshold = 'fixed', args.dw_fft_min_kernel
        scope = large_kernel.fft_min_kernel(threshold)
    else:
        mode = args.large_dw_dispatch or large_kernel.active_dispatch_mode()
        threshold = large_kernel.FFT_MIN_KERNEL if mode == 'fixed' else None
        scope = large_kernel.dispatch_mode(mode)
    kept = (not args.device.startswith('cuda') and args.cpu_malloc == 'keep'
            and keep_freed_memory())
    with scope:
        result = _run(args)
    result['settings'].update(large_dw_dispatch=mode, dw_fft_min_kernel=threshold,
                              cpu_malloc='keep' if kept else 'default')
    return result


def _run(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = 2 if args.warmup is None else args.warmup
    if args.doconv_layers:
        return benchmark_doconv_layers(
            shape=tuple(args.shape), batch=args.batch or 2, device=args.device,
            repeat=args.repeat or 10, warmup=warmup,
            min_time=0.5 if args.min_time is None else args.min_time)
    if args.large_dw:
        return benchmark_large_dw(
            arch=args.arch, shape=tuple(args.shape), batch=args.batch or 1, device=args.device,
            dtypes=tuple(args.dtypes), candidates=args.candidates, repeat=args.repeat or 3,
            warmup=1 if args.warmup is None else args.warmup,
            min_time=1.0 if args.min_time is None else args.min_time,
            backward=not args.no_backward,
            dtype_done=lambda result, dtype: write_partial(result, dtype, args.out))
    specs = list(args.compare) if args.compare else [args.config]
    return benchmark_models(
        specs, mode=args.mode, shape=tuple(args.shape), batch=args.batch or 1,
        device=args.device, fuse=args.fuse, checkpoint=args.checkpoint, amp=args.amp,
        channels_last=args.channels_last, repeat=args.repeat or 5, warmup=warmup,
        count_flops=not args.no_flops, cfg_options=args.cfg_options)


def summary_lines(result):
    """Short human-readable lines of a result (the JSON holds everything)."""
    lines = []
    if result['kind'] in ('model', 'compare'):
        for r in result['results']:
            lat, mem = r['latency'], r['memory']
            flops = f", {format_gmacs(r['flops'])[0]} GMACs" if r.get('flops') else ''
            lines.append(f"{r['name']} [{r['mode']}]: {lat['median_ms']:.1f} ms median "
                         f"(IQR {100 * lat['spread']:.1f}%), {lat['images_per_s']:.2f} img/s, "
                         f"peak {mem['peak_mb']:.0f} MB, {r['params'] / 1e6:.2f} M params{flops}")
        if 'ratios' in result:
            q = result['ratios']['latency_b_over_a']
            lines.append(f"B / A latency: {q['median_ratio']:.3f} (paired median "
                         f"{q['paired_median']:.3f}, IQR {q['paired_p25']:.3f}-"
                         f"{q['paired_p75']:.3f})")
    elif result['kind'] == 'doconv_layers':
        for r in result['results']:
            q = r['ratios']
            parts = [f"{k} {q[f'{k}_over_plain_forward']:.2f} / "
                     f"{q[f'{k}_over_plain_forward_backward']:.2f}" for k in LAYER_KEYS[1:]]
            lines.append(f"{r['name']} C={r['channels']} {r['height']}x{r['width']} (time / plain "
                         f"conv, fwd / fwd+bwd): " + ', '.join(parts))
    else:
        for r in result['results']:
            fwd = r.get('forward')
            t = f"{fwd['median_ms']:.2f} ms" if fwd else r.get('error', 'failed')
            fb = r.get('forward_backward')
            t += f", fwd+bwd {fb['median_ms']:.2f} ms" if fb else ''
            lines.append(f"{r['stage']} {r['kernel']}x{r['kernel']} C={r['channels']} "
                         f"{r['dtype']} {r['candidate']}: {t} (bound {r['bound_ms']:.2f} ms, "
                         f"{r['bound_by']})")
    lines += [f'warning: {w}' for w in result.get('warnings', ())]
    return lines


def write_partial(result, dtype, out):
    """``out`` with the rows measured so far, marked unfinished (the finished run overwrites
    it): a step stopped at its time limit (tools/device_check.sh) keeps the dtypes it timed."""
    if not out or dtype == result['settings']['dtypes'][-1]:
        return
    dtypes = result['settings']['dtypes']
    done = dtypes[:dtypes.index(dtype) + 1]
    write_json(dict(result, unfinished=f"{', '.join(done)} measured; the run stopped before "
                                       f"{', '.join(dtypes[len(done):])}"), out)


def write_json(result, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        f.write(to_json(result))


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    for line in summary_lines(result):
        print(line)
    if args.out:
        write_json(result, args.out)
        print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    sys.exit(run_tool(main))
