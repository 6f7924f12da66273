"""The demo set generator and the CamVid -> Cityscapes converter."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reparam_mm  # noqa: F401
from reparam_mm.datasets import (CAMVID_CITYSCAPES_CLASSES, DEMO_CLASSES, camvid_to_trainids,
                                 convert_camvid, draw_sample, ensure_demo_ade, generate_demo_ade)

ROOT = Path(__file__).resolve().parent.parent

# Written out by hand from the data README, independently of the package's table.
README_TRAINIDS = {'Sky': 10, 'Building': 2, 'Pole': 5, 'Road': 0, 'Pavement': 1, 'Tree': 8,
                   'SignSymbol': 7, 'Fence': 4, 'Car': 13, 'Pedestrian': 11, 'Bicyclist': 12,
                   'Unlabelled': 255}
CAMVID_ORDER = ['Sky', 'Building', 'Pole', 'Road', 'Pavement', 'Tree', 'SignSymbol', 'Fence',
                'Car', 'Pedestrian', 'Bicyclist', 'Unlabelled']
CITYSCAPES_NAME = {'Sky': 'sky', 'Building': 'building', 'Pole': 'pole', 'Road': 'road',
                   'Pavement': 'sidewalk', 'Tree': 'vegetation', 'SignSymbol': 'traffic sign',
                   'Fence': 'fence', 'Car': 'car', 'Pedestrian': 'person', 'Bicyclist': 'rider'}


# ---------------------------------------------------------------- synthetic demo set
def test_draw_sample_is_deterministic_and_seed_dependent():
    a_img, a_lbl = draw_sample(7, size=48)
    b_img, b_lbl = draw_sample(7, size=48)
    c_img, _ = draw_sample(8, size=48)
    assert a_img.shape == (48, 48, 3) and a_img.dtype == np.uint8
    assert a_lbl.shape == (48, 48) and a_lbl.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lbl, b_lbl)
    assert not np.array_equal(a_img, c_img)


def test_labels_follow_ade_convention_with_border_band():
    seen = set()
    for seed in range(40):
        _, lbl = draw_sample(seed, size=64)
        values = set(np.unique(lbl).tolist())
        assert values <= set(range(len(DEMO_CLASSES) + 1))  # 0 = unlabelled, 1..K classes
        seen |= values
        # regions of different classes never touch: a 0 band separates them
        for a, b in ((lbl[1:, :], lbl[:-1, :]), (lbl[:, 1:], lbl[:, :-1])):
            both = (a > 0) & (b > 0)
            assert np.array_equal(a[both], b[both])
        # the band is thin: most pixels are labelled
        assert (lbl == 0).mean() < 0.3
    assert seen == set(range(len(DEMO_CLASSES) + 1))  # every class is drawn


def test_classes_differ_in_colour():
    """Each foreground class keeps to its own hue range, so the set is learnable."""
    means = {k: [] for k in range(2, len(DEMO_CLASSES) + 1)}
    for seed in range(30):
        img, lbl = draw_sample(seed, size=64)
        for k in means:
            if (lbl == k).sum() > 30:
                means[k].append(img[lbl == k].mean(0))
    centres = np.stack([np.mean(v, 0) for v in means.values()])
    dists = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert dists[~np.eye(len(centres), dtype=bool)].min() > 30


def test_too_small_size_is_refused():
    with pytest.raises(ValueError, match='size=8'):
        draw_sample(0, size=8)


def test_generate_writes_ade_layout(tmp_path):
    root = generate_demo_ade(tmp_path / 'demo', num_train=5, num_val=2, size=32, seed=3)
    for sub, n in (('training', 5), ('validation', 2)):
        imgs = sorted(p.stem for p in (root / 'images' / sub).glob('*.jpg'))
        anns = sorted(p.stem for p in (root / 'annotations' / sub).glob('*.png'))
        assert imgs == anns and len(imgs) == n
        ann = np.array(Image.open(root / 'annotations' / sub / f'{anns[0]}.png'))
        assert ann.shape == (32, 32)
        assert Image.open(root / 'images' / sub / f'{imgs[0]}.jpg').size == (32, 32)
    # image i depends on (seed, split, i) only, not on how many were asked for
    other = generate_demo_ade(tmp_path / 'other', num_train=3, num_val=1, size=32, seed=3)
    for name in ('images/training/demo_00002.jpg', 'annotations/validation/demo_00000.png'):
        assert (root / name).read_bytes() == (other / name).read_bytes()
    # and train / val are not the same images
    assert ((root / 'annotations/training/demo_00000.png').read_bytes()
            != (root / 'annotations/validation/demo_00000.png').read_bytes())


def test_ensure_generates_once_and_regenerates_on_change(tmp_path):
    root = tmp_path / 'demo'
    assert ensure_demo_ade(root, num_train=2, num_val=1, size=32) is True
    assert ensure_demo_ade(root, num_train=2, num_val=1, size=32) is False
    assert ensure_demo_ade(root, num_train=3, num_val=1, size=32) is True
    assert len(list((root / 'images/training').glob('*.jpg'))) == 3
    assert ensure_demo_ade(root, num_train=1, num_val=1, size=32) is True
    assert len(list((root / 'images/training').glob('*.jpg'))) == 1  # stale files removed


def test_ensure_refuses_a_foreign_folder(tmp_path):
    (tmp_path / 'mine.txt').write_text('user data')
    with pytest.raises(FileExistsError, match='not made by this generator'):
        ensure_demo_ade(tmp_path, num_train=1, num_val=1, size=32)
    assert (tmp_path / 'mine.txt').read_text() == 'user data'


def test_demo_dataset_reduces_zero_label(tmp_path):
    from mmengine.registry import DATASETS, init_default_scope
    init_default_scope('mmseg')
    root = generate_demo_ade(tmp_path, num_train=2, num_val=1, size=32, seed=1)
    ds = DATASETS.build(dict(
        type='DemoADEDataset', data_root=str(root),
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='PackSegInputs')]))
    assert len(ds) == 2 and ds.metainfo['classes'] == DEMO_CLASSES
    sample = ds[0]
    raw = np.array(Image.open(root / 'annotations/training/demo_00000.png')).astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    got = sample['data_samples'].gt_sem_seg.data[0].numpy()
    assert np.array_equal(got, expected)
    assert sample['inputs'].shape == (3, 32, 32)


# ---------------------------------------------------------------- CamVid converter
def test_camvid_mapping_matches_readme():
    ids = np.arange(12, dtype=np.uint8).reshape(3, 4)
    expected = np.array([README_TRAINIDS[CAMVID_ORDER[i]] for i in range(12)]).reshape(3, 4)
    assert np.array_equal(camvid_to_trainids(ids), expected)
    assert [c for c in CAMVID_CITYSCAPES_CLASSES] == [
        'road', 'sidewalk', 'building', 'fence', 'pole', 'traffic sign', 'vegetation', 'sky',
        'person', 'rider', 'car']


def test_camvid_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r'\[12, 200\]'):
        camvid_to_trainids(np.array([[0, 12], [200, 3]], np.uint8))
    with pytest.raises(ValueError, match='8-bit'):
        camvid_to_trainids(np.zeros((2, 2), np.int32))


def test_convert_missing_source_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match='images/<split> and labels/<split>'):
        convert_camvid(tmp_path / 'nope', tmp_path / 'out')
    with pytest.raises(ValueError, match='image_mode'):
        convert_camvid(tmp_path, tmp_path / 'out', image_mode='hardlink')


def _converted(shared_data, out, mode='symlink'):
    counts = convert_camvid(shared_data / 'camvid', out, limit=2, image_mode=mode)
    assert counts == {'train': 2, 'val': 2}
    return sorted((shared_data / 'camvid/labels/train').glob('*.png'))[:2]


def test_convert_real_camvid_maps_ids_exactly(shared_data, tmp_path):
    out = tmp_path / 'cv'
    for src_lbl in _converted(shared_data, out):
        stem = src_lbl.stem
        seq = stem.split('_')[0]
        got = np.array(Image.open(out / f'gtFine/train/{seq}/{stem}_gtFine_labelTrainIds.png'))
        raw = np.array(Image.open(src_lbl))
        expected = np.vectorize(lambda v: README_TRAINIDS[CAMVID_ORDER[v]])(raw)
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
        assert len(np.unique(raw)) > 5  # a real street scene, not a blank label
        img = out / f'leftImg8bit/train/{seq}/{stem}_leftImg8bit.jpg'
        assert img.is_symlink()
        assert img.read_bytes() == (shared_data / f'camvid/images/train/{stem}.jpg').read_bytes()
    assert len(list((out / 'gtFine/val').rglob('*_gtFine_labelTrainIds.png'))) == 2


def test_convert_copy_mode_and_rerun(shared_data, tmp_path):
    out = tmp_path / 'cv'
    _converted(shared_data, out, mode='copy')
    _converted(shared_data, out, mode='copy')  # re-running over its own output is fine
    imgs = list((out / 'leftImg8bit/val').rglob('*.jpg'))
    assert len(imgs) == 2 and not any(p.is_symlink() for p in imgs)


def test_cityscapes_dataset_reads_converted_camvid_as_11_classes(shared_data, tmp_path):
    from mmengine.registry import DATASETS, init_default_scope
    init_default_scope('mmseg')
    out = tmp_path / 'cv'
    src_lbls = _converted(shared_data, out)
    ds = DATASETS.build(dict(
        type='CityscapesDataset', data_root=str(out), img_suffix='_leftImg8bit.jpg',
        metainfo=dict(classes=CAMVID_CITYSCAPES_CLASSES),
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='PackSegInputs')]))
    assert len(ds) == 2 and len(ds.metainfo['palette']) == 11
    got = ds[0]['data_samples'].gt_sem_seg.data[0].numpy()
    raw = np.array(Image.open(src_lbls[0]))
    to11 = {i: (CAMVID_CITYSCAPES_CLASSES.index(CITYSCAPES_NAME[n]) if n in CITYSCAPES_NAME
                else 255) for i, n in enumerate(CAMVID_ORDER)}
    assert np.array_equal(got, np.vectorize(to11.get)(raw))


def test_converter_cli(shared_data, tmp_path):
    out = tmp_path / 'cli'
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools/dataset_converters/camvid_to_cityscapes.py'),
         str(shared_data / 'camvid'), '-o', str(out), '--limit', '1', '--splits', 'val'],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'val: 1 images' in proc.stdout
    assert len(list((out / 'gtFine/val').rglob('*.png'))) == 1
    assert not (out / 'gtFine/train').exists()


def _write_trainid_labels(root, labels):
    for i, label in enumerate(labels):
        path = root / 'gtFine' / 'train' / 'seq' / f'seq_{i:03d}_gtFine_labelTrainIds.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(label, np.uint8), mode='L').save(path)


def test_camvid_class_weights_are_median_frequency_balancing(tmp_path):
    from reparam_mm.datasets import camvid_class_weights
    # image 0: road 12 px, sky 4 px; image 1: road 8, car 4, 4 ignored (255)
    a = np.full((4, 4), 0)
    a[0] = 10
    b = np.full((4, 4), 0)
    b[:2, :2] = 13
    b[3] = 255
    _write_trainid_labels(tmp_path, [a, b])
    # frequency = class pixels / pixels of the images holding it (16 px each, ignore included)
    freq = {0: 20 / 32, 10: 4 / 16, 13: 4 / 16}  # road, sky, car; the other 8 classes: absent
    order = [0, 1, 2, 4, 5, 7, 8, 10, 11, 12, 13]  # trainIds in CAMVID_CITYSCAPES_CLASSES order
    median = float(np.median(list(freq.values())))  # over the classes present: 1/4
    want = [median / freq[k] if k in freq else 1.0 for k in order]
    assert camvid_class_weights(tmp_path, power=1.0) == pytest.approx(want)  # road 0.4, sky/car 1
    assert camvid_class_weights(tmp_path) == pytest.approx([w ** 0.5 for w in want])
    with pytest.raises(FileNotFoundError, match='no _gtFine_labelTrainIds.png labels under .*val'):
        camvid_class_weights(tmp_path, split='val')
