"""Turn tools/benchmark.py JSON files into markdown tables and PNG plots.

    python tools/bench_report.py work_dirs/bench/*.json [--doc docs/benchmarks.md]
        [--plots docs/benchmarks]

Each file's table replaces the block between ``<!-- bench:STEM -->`` and ``<!-- /bench:STEM -->``
in the doc (STEM = the JSON file name without .json); blocks without a file keep their text
("not yet measured"). tools/cpu_check.sh summaries (docs/benchmarks/cpu_check_*.json) fill
``<!-- bench:cpu-vendors -->`` instead: every CPU's figures side by side. Every model timed on
CUDA also goes into ``<!-- bench:gpu-configs -->`` (the README's GPU table). Without ``--doc`` the
tables are printed. Plots: ``ratios.png`` (every compare file), ``doconv_layers.png`` and
``large_dw_<device>.png``. Logic: benchmarks/report.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import (combined_blocks, fill_doc, load, make_plots, render,  # noqa: E402
                               stem)


def main(argv=None):
    p = argparse.ArgumentParser(description='Benchmark JSON -> markdown tables and PNG plots.')
    p.add_argument('files', nargs='+', help='tools/benchmark.py --out files')
    p.add_argument('--doc', help='markdown file whose <!-- bench:STEM --> blocks are filled')
    p.add_argument('--plots', help='directory for the PNG plots')
    args = p.parse_args(argv)
    loaded = [(f, load(f)) for f in args.files]
    # a CPU check summary shows in the side-by-side block only
    blocks = {stem(f): render(r, os.path.relpath(f))
              for f, r in loaded if r['kind'] != 'cpu_check'}
    blocks.update(combined_blocks(loaded))
    if args.doc:
        with open(args.doc) as f:
            text, missing = fill_doc(f.read(), blocks)
        with open(args.doc, 'w') as f:
            f.write(text)
        print(f'filled {len(blocks) - len(missing)} block(s) of {args.doc}')
        for name in missing:
            print(f'no <!-- bench:{name} --> block in {args.doc}; its table:\n{blocks[name]}\n')
    else:
        for name, body in blocks.items():
            print(f'## {name}\n\n{body}\n')
    if args.plots:
        for path in make_plots(loaded, args.plots):
            print(f'wrote {path}')


if __name__ == '__main__':
    main()
