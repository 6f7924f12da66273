"""What size buckets save in whole-image inference: a fused RepLKNet backbone run over the test
sizes of real images, its large-kernel dispatch and layout tuned from an empty cache, once with
sizes sharing a timing per size bucket (the default) and once with every size timed alone.

    python -m benchmarks.size_buckets [--coco ../shared/data/coco128] [--scale 666 400]
        [--arch 31B] [--amp] [--sizes N] [--skip-ratio R] [--out work_dirs/size_buckets.json]

The sizes are those mmdet's test pipeline gives the images of a COCO annotation file: a
keep-ratio resize to ``--scale``, then padding to a multiple of 32. Each distinct size is run
twice in the images' order: the first forward pays any timing, the second is the steady
forward. Besides the seconds, the run compares the choices: for every conv signature timed
alone, the time of the choice its bucket made, read from that signature's own timing table, so
the price of sharing is measured, not assumed. ``--skip-ratio inf`` runs every candidate at every
size (the tuner leaves out those hopeless at nearby sizes: ``LargeDWTuner.hopeless_nearby``).
"""
import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from reparam_mm.backbones.replknet import RepLKNet
from reparam_mm.cpu_malloc import keep_freed_memory
from reparam_mm.fuse import fuse
from reparam_mm.layers import large_kernel

from .measure import environment

ROOT = Path(__file__).resolve().parents[1]
#: a size bucket no size reaches: every size timed alone
NO_BUCKETS = 10**9


def padded_test_sizes(annotation_file, scale=(1333, 800), divisor=32):
    """The padded (H, W) mmdet's keep-ratio test resize gives each image, in the file's order."""
    images = json.loads(Path(annotation_file).read_text())['images']
    long_side, short_side = max(scale), min(scale)
    sizes = []
    for im in images:
        h, w = im['height'], im['width']
        r = min(long_side / max(h, w), short_side / min(h, w))
        sizes.append(tuple(math.ceil(int(n * r + 0.5) / divisor) * divisor for n in (h, w)))
    return sizes


def run_sizes(model, sizes, bucket_min, amp=False, skip_ratio=None):
    """Seconds of the first and second forward of each distinct size, and the tuning cache;
    ``amp``: under bf16 autocast, as ``tools/test.py --amp`` on CPU; ``skip_ratio``: the tuner's
    ``SKIP_RATIO`` (None: its own)."""
    tuner = large_kernel.LargeDWTuner()
    if skip_ratio is not None:
        tuner.SKIP_RATIO = skip_ratio
    with tempfile.TemporaryDirectory() as cache, \
            mock.patch.dict(os.environ, REPARAM_MM_CACHE=cache), \
            mock.patch.multiple(large_kernel, SIZE_BUCKET_MIN=bucket_min, TUNER=tuner):
        first, steady = {}, {}
        for size in dict.fromkeys(sizes):
            x = torch.randn(1, 3, *size)
            with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=amp):
                for times in (first, steady):
                    start = time.perf_counter()
                    model(x)
                    times[size] = time.perf_counter() - start
        return first, steady, json.loads(large_kernel.TUNER.cache_path.read_text())


def price_of_sharing(bucketed, alone):
    """Per conv size timed alone: the bucket's choice vs its own, in its own timing table (ms)."""
    by_bucket = {}
    for entries in bucketed.values():
        for sig, e in entries.items():
            if not sig.startswith('layout|'):
                by_bucket[sig] = e['choice']
    rows = []
    for entries in alone.values():
        for sig, e in entries.items():
            if sig.startswith('layout|'):
                continue
            parts = sig.split('|')
            parts[3] = large_kernel.shape_label(tuple(int(n) for n in e['shape'].split('x')))
            shared = by_bucket.get('|'.join(parts))
            if shared is None or shared not in e['ms']:
                continue  # the bucketed run never made this call (it ran the other layout)
            rows.append(dict(signature=sig, own=e['choice'], shared=shared,
                             own_ms=e['ms'][e['choice']], shared_ms=e['ms'][shared]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--coco', default=str(ROOT.parent / 'shared/data/coco128'),
                        help='a folder with annotations/*.json (default: ../shared/data/coco128)')
    parser.add_argument('--scale', type=int, nargs=2, default=(666, 400),
                        help="the test resize's (long, short) bound (mmdet: 1333 800)")
    parser.add_argument('--arch', default='31B', choices=sorted(RepLKNet.arch_settings))
    parser.add_argument('--amp', action='store_true', help='run under bf16 autocast')
    parser.add_argument('--sizes', type=int, default=None,
                        help='only the images up to the N-th distinct size (default: all)')
    parser.add_argument('--skip-ratio', type=float, default=None,
                        help="the tuner's SKIP_RATIO (default: its own; inf: run every candidate)")
    parser.add_argument('--out', default='work_dirs/size_buckets.json')
    args = parser.parse_args()
    annotations = sorted(Path(args.coco).glob('annotations/*.json'))
    if not annotations:
        parser.error(f'no annotations/*.json under {args.coco}; pass --coco with a COCO folder '
                     '(e.g. ../shared/data/coco128).')
    kept = keep_freed_memory()  # as tools/test.py does
    sizes = padded_test_sizes(annotations[0], args.scale)
    if args.sizes is not None:
        keep = set(list(dict.fromkeys(sizes))[:args.sizes])
        sizes = [size for size in sizes if size in keep]
    torch.manual_seed(0)
    model = fuse(RepLKNet(arch=args.arch).eval())
    skip_ratio = args.skip_ratio
    if skip_ratio is None:
        skip_ratio = large_kernel.LargeDWTuner.SKIP_RATIO
    result = dict(env=environment('cpu'), arch=args.arch, scale=list(args.scale), amp=args.amp,
                  skip_ratio=skip_ratio if math.isfinite(skip_ratio) else 'off',
                  images=len(sizes), sizes=len(set(sizes)), freed_memory_kept=kept, modes={})
    caches = {}
    for mode, bucket_min in (('buckets', large_kernel.SIZE_BUCKET_MIN), ('alone', NO_BUCKETS)):
        first, steady, caches[mode] = run_sizes(model, sizes, bucket_min, args.amp, skip_ratio)
        signatures = sum(len(entries) for entries in caches[mode].values())
        skipped = sum(len(e.get('skipped', {})) for entries in caches[mode].values()
                      for e in entries.values())
        result['modes'][mode] = dict(
            signatures=signatures, skipped_candidates=skipped,
            first_s=round(sum(first.values()), 2),
            steady_s=round(sum(steady.values()), 2),
            tuning_s=round(sum(first.values()) - sum(steady.values()), 2))
        print(f'{mode:8s} {signatures:4d} signatures timed ({skipped} hopeless candidates not '
              'run); first forwards '
              f'{sum(first.values()):7.1f} s, steady forwards {sum(steady.values()):6.1f} s '
              f'({len(first)} sizes)', flush=True)
    rows = price_of_sharing(caches['buckets'], caches['alone'])
    differ = [r for r in rows if r['own'] != r['shared']]
    own, shared = sum(r['own_ms'] for r in rows), sum(r['shared_ms'] for r in rows)
    result['sharing'] = dict(convs=len(rows), other_choice=len(differ), own_ms=round(own, 2),
                             shared_ms=round(shared, 2), rows=rows)
    print(f'{len(rows)} conv sizes: the bucket chose otherwise for {len(differ)}; their own '
          f'choices {own:.1f} ms, the buckets\' {shared:.1f} ms in their own tables '
          f'({shared / own:.3f}x)')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
