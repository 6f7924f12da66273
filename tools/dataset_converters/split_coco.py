"""Split a COCO-format annotation file into fixed train / val halves (images stay in place).

    python tools/dataset_converters/split_coco.py \
        [../shared/data/coco128/annotations/instances_train2017.json] \
        [-o data/coco128_split] [--num-val 32] [--seed 0]

Writes ``instances_train.json`` and ``instances_val.json``; the coco128 detection configs under
``configs/efficientnet`` read them. Prints each half's box counts per class.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from reparam_mm.datasets.coco_split import class_counts, split_coco  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('ann_file', nargs='?',
                        default=str(ROOT.parent / 'shared/data/coco128/annotations/'
                                    'instances_train2017.json'))
    parser.add_argument('-o', '--out-dir', default=str(ROOT / 'data/coco128_split'))
    parser.add_argument('--num-val', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    counts = split_coco(args.ann_file, args.out_dir, num_val=args.num_val, seed=args.seed)
    for split, n in counts.items():
        path = Path(args.out_dir) / f'instances_{split}.json'
        top = ', '.join(f'{k} {v}' for k, v in list(class_counts(path).items())[:8])
        print(f'{split}: {n} images -> {path} (boxes: {top}, ...)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
