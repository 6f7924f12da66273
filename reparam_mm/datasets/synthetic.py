"""A procedurally drawn segmentation set in ADE20K layout, for ``make demo`` and tests.

No download: images are drawn from a seed, so every machine gets the same
files. Layout and label convention follow mmseg's ``ADE20KDataset``::

    root/images/{training,validation}/demo_00000.jpg
    root/annotations/{training,validation}/demo_00000.png

Annotation value 0 means "unlabelled" and classes are 1..K, so the dataset is
read with ``reduce_zero_label=True`` (0 -> 255 ignored, k -> k-1). The
unlabelled pixels are a one-pixel band on every region border, where JPEG
blurs the two sides together.

Each class has its own shape, texture and hue range (hues jittered, brightness
random), so a tiny network separates them after a few hundred CPU iterations
but has to use more than one pixel's colour to get the borders right.
"""
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_CLASSES = ('backdrop', 'disc', 'box', 'triangle', 'ring')
DEMO_PALETTE = [[120, 120, 120], [220, 60, 60], [60, 180, 75], [60, 90, 220], [230, 200, 40]]
SPLITS = {'train': 'training', 'val': 'validation'}
META_FILE = 'demo_ade.json'
GENERATOR_VERSION = 2

# Hue centre (degrees) of each foreground class; jittered by +-25 per object.
_HUES = {1: 0.0, 2: 120.0, 3: 210.0, 4: 55.0}


def _hsv_to_rgb(h, s, v):
    """One HSV colour (h in degrees, s/v in [0, 1]) to an RGB float triple in [0, 255]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m]) * 255.0


def _texture(cls, yy, xx, rng):
    """Per-class intensity pattern in [0.7, 1]: stripes, checks, dots, flat."""
    period = rng.uniform(4.0, 7.0)
    if cls == 1:  # disc: diagonal stripes
        t = np.sin((xx + yy) * (2 * np.pi / period)) > 0
    elif cls == 2:  # box: checkerboard
        t = ((xx // (period / 2)).astype(int) + (yy // (period / 2)).astype(int)) % 2 == 0
    elif cls == 3:  # triangle: dots
        t = (np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)) > 0.3
    else:  # ring: flat
        t = np.ones_like(xx, dtype=bool)
    return np.where(t, 1.0, 0.7)


def _shape_mask(cls, yy, xx, size, rng):
    """Boolean mask of one object of class ``cls`` at a random place and scale."""
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    r = rng.uniform(0.14, 0.28) * size
    if cls == 1:  # ellipse
        ry, rx = r * rng.uniform(0.7, 1.3, size=2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if cls == 2:  # rotated rectangle
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        hu, hv = r * rng.uniform(0.6, 1.2, size=2)
        return (np.abs(u) <= hu) & (np.abs(v) <= hv)
    if cls == 3:  # triangle: inside all three half-planes
        a0 = rng.uniform(0, 2 * np.pi)
        pts = [(cy + r * 1.2 * np.sin(a0 + k * 2 * np.pi / 3),
                cx + r * 1.2 * np.cos(a0 + k * 2 * np.pi / 3)) for k in range(3)]
        inside = np.ones_like(xx, dtype=bool)
        for (y0, x0), (y1, x1) in zip(pts, pts[1:] + pts[:1]):
            inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
        return inside
    d = np.hypot(yy - cy, xx - cx)  # ring
    return (d <= r) & (d >= r * rng.uniform(0.35, 0.55))


def draw_sample(seed, size=64, max_objects=6):
    """Draw one (image uint8 HxWx3, annotation uint8 HxW) pair from ``seed``.

    The annotation holds 0 (unlabelled border band) and 1..len(DEMO_CLASSES).
    """
    if size < 16:
        raise ValueError(f'size={size} is too small to draw shapes; use size >= 16.')
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)

    # Backdrop: a muted colour modulated by a smooth random field.
    base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.6))
    low = rng.rand(size // 8 + 2, size // 8 + 2)
    field = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize(
        (size, size), Image.BILINEAR), dtype=np.float64) / 255.0
    image = base[None, None, :] * (0.75 + 0.5 * field[..., None])
    label = np.ones((size, size), np.uint8)  # class 1 = backdrop

    for _ in range(rng.randint(3, max_objects + 1)):
        cls = rng.randint(1, len(DEMO_CLASSES))  # foreground class index 1..4
        mask = _shape_mask(cls, yy, xx, size, rng)
        if mask.sum() < 12:
            continue
        colour = _hsv_to_rgb(_HUES[cls] + rng.uniform(-25, 25), rng.uniform(0.6, 1.0),
                             rng.uniform(0.65, 1.0))
        shade = _texture(cls, yy, xx, rng)[..., None] * colour[None, None, :]
        image = np.where(mask[..., None], shade, image)
        label[mask] = cls + 1

    image = np.clip(image + rng.normal(0, 6.0, image.shape), 0, 255).astype(np.uint8)
    # One-pixel unlabelled band wherever a 4-neighbour has another class.
    border = np.zeros_like(label, dtype=bool)
    border[1:, :] |= label[1:, :] != label[:-1, :]
    border[:-1, :] |= label[:-1, :] != label[1:, :]
    border[:, 1:] |= label[:, 1:] != label[:, :-1]
    border[:, :-1] |= label[:, :-1] != label[:, 1:]
    label[border] = 0
    return image, label


def generate_demo_ade(root, num_train=160, num_val=40, size=64, seed=0):
    """Write the set under ``root`` (ADE20K layout) and return ``root`` as a Path.

    Image ``i`` of a split is drawn from its own seed, so the files depend only
    on (seed, split, i, size), not on how many images were asked for.
    """
    root = Path(root)
    for split, count in (('train', num_train), ('val', num_val)):
        if count < 1:
            raise ValueError(f'num_{split}={count}: each split needs at least one image.')
        img_dir = root / 'images' / SPLITS[split]
        ann_dir = root / 'annotations' / SPLITS[split]
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        offset = 0 if split == 'train' else 1_000_003
        for i in range(count):
            image, label = draw_sample(seed * 2_000_003 + offset + i, size=size)
            Image.fromarray(image).save(img_dir / f'demo_{i:05d}.jpg', quality=95)
            Image.fromarray(label, mode='L').save(ann_dir / f'demo_{i:05d}.png')
    meta = dict(version=GENERATOR_VERSION, num_train=num_train, num_val=num_val, size=size,
                seed=seed, classes=list(DEMO_CLASSES))
    (root / META_FILE).write_text(json.dumps(meta, indent=1))
    return root


def ensure_demo_ade(root, num_train=160, num_val=40, size=64, seed=0):
    """Generate the set unless ``root`` already holds it with these parameters.

    Returns True when it (re)generated. A folder with other parameters that we
    generated earlier is replaced; a non-empty folder we did not generate is
    left alone and reported, since deleting it could destroy user data.
    """
    root = Path(root)
    wanted = dict(version=GENERATOR_VERSION, num_train=num_train, num_val=num_val, size=size,
                  seed=seed, classes=list(DEMO_CLASSES))
    meta_path = root / META_FILE
    if meta_path.is_file():
        if json.loads(meta_path.read_text()) == wanted:
            return False
        for sub in ('images', 'annotations'):
            shutil.rmtree(root / sub, ignore_errors=True)
        meta_path.unlink()
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f'{root} is not empty and has no {META_FILE}; it was not made by this generator. '
            'Pass another data root or empty that folder.')
    generate_demo_ade(root, num_train=num_train, num_val=num_val, size=size, seed=seed)
    return True
