"""A fixed train / val split of a small COCO-format set, so detection is scored on held-out images.

``../shared/data/coco128`` is 128 COCO train2017 images with one annotation file; trained and
scored on the same images, its mAP says only that the pipeline learns. :func:`split_coco` writes
two annotation files that name disjoint image sets (the images stay where they are; only the
json is new)::

    <out_dir>/instances_train.json    # num_images - num_val images, their annotations
    <out_dir>/instances_val.json      # num_val images drawn with ``seed``

Both keep every category with its official id, so a config may train on any subset of classes.
"""
import json
import random
from pathlib import Path

from ..scope import ConfigError


def split_coco(ann_file, out_dir, num_val=32, seed=0):
    """Write ``instances_train.json`` and ``instances_val.json`` under ``out_dir``; return
    ``{'train': n_images, 'val': n_images}``. The same inputs always give the same split."""
    data = json.loads(Path(ann_file).read_text())
    image_ids = sorted(image['id'] for image in data['images'])
    if not 0 < num_val < len(image_ids):
        raise ConfigError(f'num_val={num_val}: {ann_file} has {len(image_ids)} images, so the '
                          f'validation split needs between 1 and {len(image_ids) - 1} of them.')
    val_ids = set(random.Random(seed).sample(image_ids, num_val))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, keep in (('train', lambda i: i not in val_ids), ('val', lambda i: i in val_ids)):
        subset = dict(data,
                      images=[im for im in data['images'] if keep(im['id'])],
                      annotations=[a for a in data['annotations'] if keep(a['image_id'])])
        (out / f'instances_{split}.json').write_text(json.dumps(subset))
        counts[split] = len(subset['images'])
    return counts


def class_counts(ann_file, include_crowd=False):
    """``{category name: number of boxes}`` in a COCO annotation file, most frequent first."""
    data = json.loads(Path(ann_file).read_text())
    names = {c['id']: c['name'] for c in data['categories']}
    counts = {}
    for a in data['annotations']:
        if include_crowd or not a.get('iscrowd', 0):
            counts[names[a['category_id']]] = counts.get(names[a['category_id']], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
