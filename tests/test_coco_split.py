"""The fixed coco128 split: disjoint, complete, repeatable; and the detection config that reads
it is checked before anything is built."""
import json
from pathlib import Path

import pytest

from reparam_mm.datasets import class_counts, split_coco

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / 'shared/data/coco128/annotations/instances_train2017.json'
DET_CONFIG = ROOT / ('configs/efficientnet/faster-rcnn_efficientnet-lite0-in1k-pre_fpn_4conv1fc'
                     '_1xb4-400i_coco128-split-person-384x240.py')
needs_coco128 = pytest.mark.skipif(not COCO128.is_file(), reason='../shared/data/coco128 absent')


def _tiny_coco(path, n_images=10):
    images = [dict(id=100 + i, file_name=f'{i}.jpg', width=64, height=48) for i in range(n_images)]
    anns = [dict(id=j, image_id=100 + j % n_images, category_id=1 + j % 3, bbox=[1, 2, 10, 8],
                 area=80, iscrowd=int(j == 0)) for j in range(25)]
    cats = [dict(id=k, name=f'c{k}') for k in (1, 2, 3)]
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return path


def test_split_is_disjoint_complete_and_repeatable(tmp_path):
    src = _tiny_coco(tmp_path / 'all.json')
    assert split_coco(src, tmp_path / 'a', num_val=3, seed=0) == {'train': 7, 'val': 3}
    split_coco(src, tmp_path / 'b', num_val=3, seed=0)
    split_coco(src, tmp_path / 'c', num_val=3, seed=1)
    read = lambda d, s: json.loads((tmp_path / d / f'instances_{s}.json').read_text())  # noqa: E731
    train, val = read('a', 'train'), read('a', 'val')
    train_ids = {im['id'] for im in train['images']}
    val_ids = {im['id'] for im in val['images']}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 10
    for part, ids in ((train, train_ids), (val, val_ids)):
        assert {a['image_id'] for a in part['annotations']} <= ids
        assert part['categories'] == json.loads(src.read_text())['categories']
    assert len(train['annotations']) + len(val['annotations']) == 25
    assert read('b', 'val') == val  # same seed, same split
    assert {im['id'] for im in read('c', 'val')['images']} != val_ids
    counts = class_counts(src)
    assert sum(counts.values()) == 24 and list(counts.values()) == sorted(counts.values())[::-1]
    assert sum(class_counts(src, include_crowd=True).values()) == 25


def test_split_refuses_a_validation_size_it_cannot_take(tmp_path):
    src = _tiny_coco(tmp_path / 'all.json')
    with pytest.raises(ValueError, match=r'num_val=10: .* has 10 images, so the validation split '
                                         r'needs between 1 and 9 of them\.'):
        split_coco(src, tmp_path / 'out', num_val=10)


@needs_coco128
def test_coco128_split_holds_persons_in_both_halves(tmp_path):
    from reparam_mm.train import config_from_args, parse_args
    assert split_coco(COCO128, tmp_path, num_val=32, seed=0) == {'train': 96, 'val': 32}
    cfg = config_from_args(parse_args([str(DET_CONFIG)]))
    train, val = (class_counts(tmp_path / f'instances_{s}.json') for s in ('train', 'val'))
    assert cfg.model.roi_head.bbox_head.num_classes == len(cfg.classes) == 1
    assert (train['person'], val['person']) == (198, 56)  # the numbers the config's comment gives


def test_detection_config_without_its_split_names_the_file_and_the_option(tmp_path, monkeypatch):
    from reparam_mm.data_checks import check_data_roots
    from reparam_mm.train import config_from_args, parse_args
    monkeypatch.chdir(tmp_path)  # data/coco128_split is relative to the working directory
    cfg = config_from_args(parse_args([str(DET_CONFIG)]))
    with pytest.raises(FileNotFoundError) as err:
        check_data_roots(cfg)
    assert str(err.value) == (
        "'data/coco128_split/instances_train.json' (train_dataloader.dataset.ann_file) does not "
        'exist: prepare the dataset there (docs/datasets.md) or pass --cfg-options '
        'train_dataloader.dataset.ann_file=PATH. Also missing: '
        'train_dataloader.dataset.data_prefix.img, val_dataloader.dataset.ann_file, '
        'val_dataloader.dataset.data_prefix.img, val_evaluator.ann_file.')
    # the loaders set right, the evaluator's ground truth (read at the first validation) is named
    (tmp_path / 'images').mkdir()
    for loader in ('train', 'val'):
        (tmp_path / f'{loader}.json').write_text('{}')
        cfg[f'{loader}_dataloader'].dataset.ann_file = str(tmp_path / f'{loader}.json')
        cfg[f'{loader}_dataloader'].dataset.data_prefix.img = str(tmp_path / 'images')
    with pytest.raises(FileNotFoundError) as err:
        check_data_roots(cfg)
    assert str(err.value) == (
        "'data/coco128_split/instances_val.json' (val_evaluator.ann_file) does not exist: the "
        'metric reads its ground truth there; prepare the dataset (docs/datasets.md) or pass '
        '--cfg-options val_evaluator.ann_file=PATH.')
    cfg.val_evaluator.ann_file = str(tmp_path / 'val.json')
    check_data_roots(cfg)
