"""reparam_mm.data_checks: slips in a loader's or dataset's keys and broken COCO jsons are one
sentence naming the key or the file and the fix, where mmengine / mmdet stopped with a TypeError,
a KeyError or a JSONDecodeError (or, for a ``metainfo`` slip, trained on the wrong classes)."""
import json

import pytest

import reparam_mm  # noqa: F401
from conftest import ROOT
from reparam_mm.data_checks import check_loader_keys, coco_json_problem
from reparam_mm.scope import ConfigError, init_scope
from reparam_mm.train import main
from test_train_checks import COCO_DEMO, _classes, _coco_run
from test_train_tools import tiny_demo_config


def _det_cfg(loader=None, dataset=None):
    from mmengine.config import Config
    ds = dict(dict(type='CocoDataset', data_root='d', ann_file='a.json', pipeline=[],
                   metainfo=dict(classes=('person', ))), **(dataset or {}))
    cfg = Config(dict(default_scope='mmdet', train_dataloader=dict(
        batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler'), dataset=ds, **(loader or {}))))
    init_scope(cfg)
    return cfg


def test_loader_keys_nothing_reads_are_refused_naming_the_nearest():
    check_loader_keys(_det_cfg(loader=dict(persistent_workers=False, num_batch_per_epoch=4),
                               dataset=dict(metainfo=dict(classes=('person', ), source='mine'))))
    with pytest.raises(ConfigError) as err:
        check_loader_keys(_det_cfg(loader=dict(batch_szie=4)))
    assert str(err.value) == ("train_dataloader.batch_szie is not a data loader setting; did you mean "
                              "'batch_size'? (mmengine hands these to torch.utils.data.DataLoader).")
    with pytest.raises(ConfigError) as err:  # no near name: what the class takes
        check_loader_keys(_det_cfg(dataset=dict(img_scale=(320, 320))))
    assert str(err.value).startswith('train_dataloader.dataset.img_scale is not an argument of '
                                     'CocoDataset; it takes ann_file, backend_args, ')
    with pytest.raises(ConfigError) as err:  # through a wrapper, whose own arguments are known
        cfg = _det_cfg()
        cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=2,
                                            dataset={**cfg.train_dataloader.dataset, 'filter_cgf': {}})
        check_loader_keys(cfg)
    assert str(err.value) == ("train_dataloader.dataset.dataset.filter_cgf is not an argument of "
                              "CocoDataset; did you mean 'filter_cfg'?")


def test_loader_keys_that_mmengine_or_a_users_class_reads_are_not_refused():
    from mmdet.datasets import CocoDataset
    from mmengine.config import Config

    class MineCoco(CocoDataset):
        def __init__(self, *args, **kwargs):
            self.min_visibility = kwargs.pop('min_visibility', 0.0)
            super().__init__(*args, **kwargs)

    check_loader_keys(_det_cfg(loader=dict(disable_subprocess_warning=True),  # mmengine pops it
                               dataset=dict(type=MineCoco, min_visibility=0.5,
                                            metainfo=dict(classes=('person', ), class_names=['p']))))
    with pytest.raises(ConfigError, match=r"^train_dataloader\.dataset\.filter_cgf is not an argument of "
                                          r"MineCoco; did you mean 'filter_cfg'\?$"):
        check_loader_keys(_det_cfg(dataset=dict(type=MineCoco, filter_cgf={})))
    mix = dict(type='MultiImageMixDataset', _scope_='mmdet', max_refetch=3, pipeline=[],
               dataset=dict(type='ADE20KDataset', data_root='d', pipeline=[]))
    cfg = Config(dict(default_scope='mmseg', train_dataloader=dict(batch_size=1, dataset=mix)))
    init_scope(cfg)
    check_loader_keys(cfg)  # mmdet's wrapper, built in its own scope, takes max_refetch


def test_a_slip_in_a_metainfo_key_is_refused_before_the_class_count_check(tmp_path):
    """``metainfo=dict(clases=...)`` kept COCO's 80 classes: the class-count check then told the
    user to give the heads 80 classes."""
    with pytest.raises(ConfigError) as err:
        check_loader_keys(_det_cfg(dataset=dict(metainfo=dict(clases=('person', 'car')))))
    assert str(err.value) == ("train_dataloader.dataset.metainfo.clases is read by nothing, so the "
                              "dataset keeps CocoDataset's 80 classes; did you mean 'classes'?")
    config = tmp_path / 'mine.py'  # in a config file of the user's, on the demo detector
    config.write_text(f"_base_ = [{str(COCO_DEMO)!r}]\nmodel = dict(roi_head=dict(bbox_head=dict("
                      "num_classes=2)))\ntrain_dataloader = dict(dataset=dict(metainfo=dict(palete="
                      "[(1, 2, 3), (4, 5, 6)], classes=('person', 'car'))))\n")
    with pytest.raises(ConfigError) as err:
        main([str(config), '--work-dir', str(tmp_path / 'w')])
    assert str(err.value) == ("train_dataloader.dataset.metainfo.palete is read by nothing, so the "
                              "dataset keeps CocoDataset's own palette; did you mean 'palette'?")


def test_a_loader_key_slip_in_a_config_file_stops_before_the_build(tmp_path):
    """Written in a file (not on --cfg-options, which knows the base's keys), ``batch_szie``
    stopped the run after the model's build with torch's 'unexpected keyword argument'."""
    config = tiny_demo_config(tmp_path, extra='val_dataloader = dict(batch_szie=1)')
    with pytest.raises(ConfigError, match=r"^val_dataloader\.batch_szie is not a data loader setting; "
                                          r"did you mean 'batch_size'\?"):
        main([config, '--work-dir', str(tmp_path / 'w')])
    config = tiny_demo_config(tmp_path, extra='train_dataloader = dict(dataset=dict(reduce_zero_lable=True))')
    with pytest.raises(ConfigError, match=r"^train_dataloader\.dataset\.reduce_zero_lable is not an "
                                          r"argument of DemoADEDataset; did you mean 'reduce_zero_label'\?$"):
        main([config, '--work-dir', str(tmp_path / 'w')])


def test_every_shipped_config_passes_the_loader_key_metric_ignore_and_padding_checks():
    from reparam_mm.scope import ConfigImportError, load_config
    from reparam_mm.train import check_crop_padding, check_metric_ignore_index, check_pad_label
    checked = 0
    for path in sorted((ROOT / 'configs').rglob('*.py')):
        if '_base_' in path.parts:
            continue
        try:
            cfg = load_config(str(path))
        except ConfigImportError:  # mmpretrain's configs: it does not import here
            continue
        init_scope(cfg)
        check_loader_keys(cfg, ('train_dataloader', 'val_dataloader', 'test_dataloader'))
        check_metric_ignore_index(cfg, ('val_evaluator', 'test_evaluator'))
        check_pad_label(cfg)
        check_crop_padding(cfg)
        checked += 1
    assert checked >= 50


BROKEN = {
    'empty': ('', 'is empty (0 bytes): write the COCO json there again.'),
    'cut short': ('{"images": [{"id": 1}], "annot',
                  "is not valid JSON (Unterminated string starting at at line 1 column 25); a download "
                  "or copy cut short leaves it so: write it again."),
    'a list': ('[]', 'holds a JSON list, not an object; a COCO json is an object holding'),
    'no lists': ('{}', "has no 'images' / 'annotations' / 'categories' lists; a COCO json"),
    'no images': ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
                  "lists no image (its 'images' list is empty)"),
    'no categories': ('{"images": [{"id": 1}], "annotations": [], "categories": []}',
                      "names no category (its 'categories' list is empty)"),
    'no boxes': ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
                 "has no annotation (its 'annotations' list is empty), and the training set keeps only "
                 "images with boxes (filter_cfg.filter_empty_gt), so no image is left to train on"),
}


@pytest.mark.parametrize('case', sorted(BROKEN))
def test_a_broken_coco_json_is_named_with_what_is_wrong(tmp_path, case):
    text, said = BROKEN[case]
    path = tmp_path / 'a.json'
    path.write_text(text)
    training = dict(test_mode=False, filter_cfg=dict(filter_empty_gt=True))
    found = coco_json_problem(str(path), 'train_dataloader.dataset.ann_file', training)
    assert found.startswith(f'{path} (train_dataloader.dataset.ann_file) {said}')


def test_a_coco_json_that_can_serve_is_not_refused(tmp_path):
    """Test-dev's json has no 'annotations'; a test set and an evaluator need none, nor does a
    training set that keeps images without boxes."""
    path = tmp_path / 'a.json'
    path.write_text(json.dumps(dict(images=[dict(id=1)], categories=[dict(id=1, name='a')])))
    assert coco_json_problem(str(path), 'k', dict(test_mode=True)) is None
    assert coco_json_problem(str(path), 'k') is None
    path.write_text(json.dumps(dict(images=[dict(id=1)], annotations=[], categories=[dict(id=1, name='a')])))
    assert coco_json_problem(str(path), 'k', dict(filter_cfg=dict(filter_empty_gt=False))) is None
    assert coco_json_problem(str(path), 'k', dict(filter_cfg=None)) is None  # mmdet filters nothing
    assert coco_json_problem(str(tmp_path / 'missing.json'), 'k') is None  # check_data_roots says it


def test_only_errors_a_broken_json_raises_are_explained_by_one(tmp_path):
    """A pipeline typo failed the build beside a training json without boxes (which mmdet
    accepts without filter_empty_gt): the json was blamed and the registry's KeyError hidden."""
    from mmengine.config import Config
    from reparam_mm.data_checks import explain_build_failure
    path = tmp_path / 'a.json'
    path.write_text(json.dumps(dict(images=[dict(id=1)], annotations=[], categories=[dict(id=1, name='a')])))
    cfg = Config(dict(default_scope='mmdet', train_dataloader=dict(dataset=dict(
        type='CocoDataset', ann_file=str(path), filter_cfg=dict(filter_empty_gt=True)))))

    def full_init(error):  # where mmengine builds a dataset
        raise error

    def explained(error):
        try:
            full_init(error)
        except Exception as e:  # noqa: BLE001
            try:
                explain_build_failure(cfg, e, ['train_dataloader'])
            except ConfigError as said:
                return str(said)
        return None

    assert explained(KeyError('Resise is not in the mmdet::transform registry')) is None
    assert explained(json.JSONDecodeError('Expecting value', '', 0)) is None  # the json decodes
    assert explained(ValueError('need at least one array to concatenate')).startswith(
        f"{path} (train_dataloader.dataset.ann_file) has no annotation (its 'annotations' list is empty)")
    path.write_text('{"images": [')
    assert explained(KeyError('Resise is not in the mmdet::transform registry')) is None
    assert explained(json.JSONDecodeError('Expecting value', '', 0)).startswith(
        f'{path} (train_dataloader.dataset.ann_file) is not valid JSON')


def test_a_cut_short_coco_json_stops_training_and_testing_in_one_sentence(tmp_path):
    """It stopped mmdet's dataset build with json's 'Expecting ...' traceback, naming no file."""
    root, common = _coco_run(tmp_path)
    ann = root / 'annotations.json'
    good = ann.read_text()
    ann.write_text(good[:120])
    with pytest.raises(ConfigError) as err:
        main(common + _classes('person', 'car'))
    assert str(err.value).startswith(f'{ann} (train_dataloader.dataset.ann_file) is not valid JSON (')
    assert isinstance(err.value.__cause__, ValueError)  # the original error stays attached
    ann.write_text(good)
    runner = main(common + _classes('person', 'car'))
    ckpt = tmp_path / 'w' / 'iter_1.pth'
    assert runner.iter == 1 and ckpt.is_file()
    from reparam_mm.apis import run_test
    test_data = [o.replace('val_dataloader', 'test_dataloader').replace('val_evaluator', 'test_evaluator')
                 for o in common[common.index('--cfg-options') + 1:] if 'val_' in o]
    options = dict(o.split('=', 1) for o in test_data)
    options['test_dataloader.dataset.metainfo.classes'] = ('person', 'car')
    options['model.roi_head.bbox_head.num_classes'] = 2
    ann.write_text('')
    with pytest.raises(ConfigError) as err:
        run_test(str(COCO_DEMO), str(ckpt), work_dir=str(tmp_path / 't'), cfg_options=options)
    assert str(err.value) == (f'{ann} (test_dataloader.dataset.ann_file) is empty (0 bytes): write '
                              'the COCO json there again.')


def test_coco_classes_in_another_order_than_the_json_are_refused(tmp_path):
    """mmdet numbers the labels in the json's category order: ('car', 'person') on a json that
    lists person first trained the person boxes as label 0, which the checkpoint called 'car'."""
    root, common = _coco_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        main(common + _classes('car', 'person'))
    assert str(err.value) == (
        f"train_dataloader: the dataset names its classes in the order (car, person), and CocoDataset "
        f"numbers the labels in the order it reads {root}/annotations.json's categories (person, car), "
        "so the 'person' boxes would be label 0, called 'car'; name the classes in that order: "
        "metainfo=dict(classes=('person', 'car')), in every loader.")


def test_a_class_without_a_box_is_logged_for_training_and_validation(tmp_path):
    from conftest import mmengine_log
    root, common = _coco_run(tmp_path)
    ann = root / 'annotations.json'
    data = json.loads(ann.read_text())
    data['annotations'] = [a for a in data['annotations'] if a['category_id'] == 1]
    ann.write_text(json.dumps(data))
    with mmengine_log() as records:
        runner = main(common + _classes('person', 'car'))
    assert runner.iter == 1
    said = [r.getMessage() for r in records if 'have no box' in r.getMessage()]
    assert said == [
        f"train_dataloader: 1 of the 2 classes have no box in {ann} (car): the model never sees one, "
        "so it scores near 0 wherever the validation set has boxes of it; check the json's "
        "annotations, or leave the class out (metainfo.classes and the heads' num_classes).",
        f"val_dataloader: 1 of the 2 classes have no box in {ann} (car): its AP reads nan in the "
        "per-class table and the mAP is the mean over the other classes; check the json's "
        "annotations, or leave the class out (metainfo.classes and the heads' num_classes)."]


def test_json_categories_of_a_large_json_are_read_from_its_end(tmp_path, monkeypatch):
    """Past 16 MB, given the ids to find, the list after the last '"categories":' in the last MB
    is decoded alone; one there without those ids (a per-image list), or categories written
    first, read the whole json."""
    from reparam_mm.data_checks import json_categories
    cats = [dict(id=3, name='cup'), dict(id=7, name='fork')]
    filler = [dict(id=i, file_name='x' * 200) for i in range(80_000)]  # ~17 MB
    path = tmp_path / 'big.json'
    path.write_text(json.dumps(dict(images=filler, annotations=[], categories=cats)))
    assert path.stat().st_size > 16 << 20
    with monkeypatch.context() as patch:  # the tail alone: reading the whole would fail here
        patch.setattr(json, 'load', lambda f: pytest.fail('the whole json was read'))
        assert json_categories(str(path), ids=[3, 7]) == cats
    path.write_text(json.dumps(dict(categories=cats, images=filler + [
        dict(id=-1, categories=[dict(id=9, name='night')])])))  # a per-image list in the tail
    assert json_categories(str(path), ids=[3, 7]) == cats
    assert json_categories(str(path)) == cats  # no ids: always the whole json
    path.write_text(json.dumps(dict(categories=cats, images=filler)) + ' trailing')  # not JSON
    assert json_categories(str(path), ids=[3]) is None


def test_the_class_order_error_names_the_first_label_out_of_place_and_jsons_that_disagree(tmp_path):
    from reparam_mm.data_checks import _check_class_order
    with pytest.raises(ConfigError, match=r"so the 'b' boxes would be label 1, called 'c'; name the classes "
                                          r"in that order: metainfo=dict\(classes=\('a', 'b', 'c'\)\)"):
        _check_class_order('train_dataloader', 'CocoDataset', 'a.json', ('a', 'c', 'b'), ['a', 'b', 'c'], {})
    root, common = _coco_run(tmp_path)  # the validation json lists car first
    data = json.loads((root / 'annotations.json').read_text())
    data['categories'] = data['categories'][::-1]
    (root / 'val.json').write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        main(common + _classes('person', 'car') + ['val_dataloader.dataset.ann_file=val.json',
                                                   f'val_evaluator.ann_file={root}/val.json'])
    assert str(err.value) == (
        f'train_dataloader reads {root}/annotations.json, whose categories order the classes (person, '
        f'car), and val_dataloader reads {root}/val.json, which orders them (car, person); mmdet numbers '
        'the labels of each dataset and metric in the order of its own json, so no order of '
        'metainfo.classes fits both: write the categories in the same order in both jsons.')


def test_a_class_named_twice_in_the_config_or_the_json_is_said_as_such(tmp_path):
    """Both gave 'names 2 classes (a, b), and only 3 of them are categories ... e.g. person'."""
    root, common = _coco_run(tmp_path)
    with pytest.raises(ConfigError, match=r"^train_dataloader: metainfo\.classes names 'car' more than "
                                          r"once; name each class once\.$"):
        main(common + _classes('person', 'car', 'car')
             + ['model.roi_head.bbox_head.num_classes=3'])
    data = json.loads((root / 'annotations.json').read_text())
    data['categories'].append(dict(id=3, name='car'))
    (root / 'annotations.json').write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        main(common + _classes('person', 'car'))
    assert str(err.value) == (
        f"train_dataloader: {root}/annotations.json has 3 categories named as the dataset's 2 classes "
        "('car' more than once), and mmdet numbers each as a label of its own (3 labels for 2 names and "
        "heads); give every category of the json a name of its own.")


def test_a_metric_json_that_orders_the_classes_otherwise_is_refused(tmp_path):
    """CocoMetric numbers the classes in its own json's order: with the dataset's json listing
    person first and the metric's car first, each box was scored as the other class."""
    root, common = _coco_run(tmp_path)
    data = json.loads((root / 'annotations.json').read_text())
    data['categories'] = data['categories'][::-1]
    (root / 'metric.json').write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        main(common + _classes('person', 'car') + [f'val_evaluator.ann_file={root}/metric.json'])
    assert str(err.value) == (
        f'train_dataloader reads {root}/annotations.json, whose categories order the classes (person, '
        f'car), and val_evaluator reads {root}/metric.json, which orders them (car, person); mmdet numbers '
        'the labels of each dataset and metric in the order of its own json, so no order of '
        'metainfo.classes fits both: write the categories in the same order in both jsons.')


def test_classes_written_as_a_string_are_refused_with_the_comma():
    """('person') is the string 'person': mmengine read 6 classes, and the advice to set the
    heads to 6 led to a second refusal."""
    with pytest.raises(ConfigError) as err:
        check_loader_keys(_det_cfg(dataset=dict(metainfo=dict(classes='person'))))
    assert str(err.value) == ("train_dataloader.dataset.metainfo.classes is the string 'person', which "
                              "mmengine reads as 6 classes (p, e, r, s, ...); write a tuple: "
                              "classes=('person',) (the comma makes it one).")


def test_segmentation_heads_that_ignore_different_labels_are_named_together():
    """Each padding advice fitted one head and not the other: following it flipped the refusal."""
    from mmengine.config import Config
    from reparam_mm.train import check_metric_ignore_index, check_pad_label
    model = dict(data_preprocessor=dict(seg_pad_val=4), decode_head=dict(num_classes=4, ignore_index=4),
                 auxiliary_head=dict(num_classes=4, ignore_index=255))
    with pytest.raises(ConfigError, match=r'^model\.decode_head\.ignore_index is 4 and '
                                          r'model\.auxiliary_head\.ignore_index is 255: the heads read '
                                          r'the same label maps, so they must ignore the same label'):
        check_pad_label(Config(dict(default_scope='mmseg', model=model)))
    model['auxiliary_head']['ignore_index'] = 4
    cfg = Config(dict(default_scope='mmseg', model=model, val_evaluator=dict(
        type='IoUMetric', ignore_index=4, iou_metrics=['mIOU'])))
    check_pad_label(cfg)
    with pytest.raises(ConfigError, match=r"^val_evaluator\.iou_metrics names 'mIOU', which IoUMetric does "
                                          r"not compute .* did you mean 'mIoU'\?$"):
        check_metric_ignore_index(cfg)
    cfg.val_evaluator.iou_metrics = ['mIoU', 'mFscore']
    check_metric_ignore_index(cfg)


def test_a_metric_json_of_other_images_than_the_loader_reads_is_said(tmp_path):
    """CocoMetric scores every image of its json: a json of more images counted the unread ones
    as missed (perfect boxes scored 0.245 on coco128): logged, as a quick run on a part is fair;
    one lacking some failed after training: refused."""
    from conftest import mmengine_log
    root, common = _coco_run(tmp_path)
    data = json.loads((root / 'annotations.json').read_text())
    more = dict(data, images=data['images'] + [dict(id=99, file_name='x.jpg', height=64, width=64)])
    (root / 'more.json').write_text(json.dumps(more))

    def said(*options):
        with mmengine_log() as records:
            assert main(common + _classes('person', 'car') + list(options)).iter == 1
        return [r.getMessage() for r in records if 'CocoMetric scores every image' in r.getMessage()]

    assert said(f'val_evaluator.ann_file={root}/more.json') == [
        f'val_evaluator.ann_file {root}/more.json holds 1 images that val_dataloader does not read '
        '(3 against 2), and CocoMetric scores every image of its json, so those count as missed '
        'and the mAP reads low; point val_evaluator.ann_file at a json of exactly the images '
        'val_dataloader.dataset reads.']
    assert said('val_dataloader.dataset.indices=1')[0].startswith(  # its own json, a part read
        f'val_evaluator.ann_file {root}/annotations.json holds 1 images that val_dataloader does not '
        'read (2 against 1)')
    assert said() == []
    fewer = dict(data, images=data['images'][:1])
    (root / 'fewer.json').write_text(json.dumps(fewer))
    with pytest.raises(ConfigError, match=r'^val_evaluator\.ann_file .*/fewer\.json lacks 1 of the 2 images '
                                          r"val_dataloader reads, so CocoMetric would fail after the loop"):
        main(common + _classes('person', 'car') + [f'val_evaluator.ann_file={root}/fewer.json'])


def test_the_test_set_is_checked_against_the_checkpoints_class_order_and_its_json(tmp_path):
    """tools/test.py ran a reordered test set to an mAP without a word; tools/train.py refused it."""
    from reparam_mm.apis import run_test
    root, common = _coco_run(tmp_path)
    runner = main(common + _classes('person', 'car'))
    ckpt = tmp_path / 'w' / 'iter_1.pth'
    assert runner.iter == 1
    options = {o.split('=', 1)[0].replace('val_', 'test_'): o.split('=', 1)[1]
               for o in common[common.index('--cfg-options') + 1:] if 'val_' in o}
    options['model.roi_head.bbox_head.num_classes'] = 2

    def test(classes, **more):
        return run_test(str(COCO_DEMO), str(ckpt), work_dir=str(tmp_path / 't'), cfg_options={
            **options, 'test_dataloader.dataset.metainfo.classes': classes, **more})

    with pytest.raises(ConfigError) as err:
        test(('car', 'person'))
    assert str(err.value).startswith(
        f"checkpoint {ckpt} was trained on the classes in the order (person, car), and "
        "test_dataloader.dataset names them (car, person), so its label 0, 'person', would be scored "
        "as 'car'; give the test set the trained order: metainfo=dict(classes=('person', 'car'))")
    data = json.loads((root / 'annotations.json').read_text())
    data['categories'] = data['categories'][::-1]  # car first: mmdet would number car 0
    (root / 'car_first.json').write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"^test_dataloader: the dataset names its classes in the order "
                                          r"\(person, car\), and CocoDataset numbers the labels in the "
                                          r"order it reads .*car_first\.json's categories \(car, person\)"):
        test(('person', 'car'), **{'test_dataloader.dataset.ann_file': 'car_first.json',
                                   'test_evaluator.ann_file': f'{root}/car_first.json'})
    assert test(('person', 'car'))['coco/bbox_mAP'] >= 0  # as trained: tested


def test_the_other_familys_data_prefix_keys_and_a_short_palette_are_refused():
    """mmdet's img= in an mmseg dataset ended in a TypeError in its __init__, mmseg's img_path=
    in mmdet in KeyError 'img'; a palette shorter than the classes in mmseg's ValueError."""
    from mmengine.config import Config
    with pytest.raises(ConfigError) as err:
        check_loader_keys(_det_cfg(dataset=dict(data_prefix=dict(img_path='train2017/'))))
    assert str(err.value) == ("train_dataloader.dataset.data_prefix has 'img_path', which CocoDataset "
                              "does not read (mmdet names it 'img'); write "
                              "data_prefix=dict(img='train2017/').")
    check_loader_keys(_det_cfg(dataset=dict(data_prefix=dict(img='train2017/'))))
    seg = dict(type='BaseSegDataset', data_root='d', pipeline=[], data_prefix=dict(img='i/', seg='a/'),
               metainfo=dict(classes=('a', 'b'), palette=[[0, 0, 0], [1, 1, 1]]))
    cfg = Config(dict(default_scope='mmseg', train_dataloader=dict(batch_size=1, dataset=seg)))
    init_scope(cfg)
    with pytest.raises(ConfigError, match=r"^train_dataloader\.dataset\.data_prefix has 'img', 'seg', which "
                                          r"BaseSegDataset does not read \(mmseg names them 'img_path', "
                                          r"'seg_map_path'\); write data_prefix=dict\(img_path='i/', "
                                          r"seg_map_path='a/'\)\.$"):
        check_loader_keys(cfg)
    cfg.train_dataloader.dataset.data_prefix = dict(img_path='i/', seg_map_path='a/')
    check_loader_keys(cfg)
    cfg.train_dataloader.dataset.metainfo.palette = [[0, 0, 0]]
    with pytest.raises(ConfigError, match=r'^train_dataloader\.dataset\.metainfo names 2 classes and 1 '
                                          r'palette colours; give one colour per class'):
        check_loader_keys(cfg)


CROP_48 = """
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='RandomResize', scale=(32, 32), ratio_range=(0.5, 2.0), keep_ratio=True),
                  dict(type='RandomCrop', crop_size=(48, 48)), dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root, pipeline=train_pipeline))
"""


def test_a_crop_larger_than_the_preprocessor_pads_to_is_refused_and_the_advice_trains(tmp_path):
    """A crop raised in a config whose preprocessor size stayed at its base's: an image smaller
    than the crop came out smaller than the others, and torch stopped with 'stack expects each
    tensor to be equal size' at that batch."""
    config = tiny_demo_config(tmp_path, max_iters=3, extra=CROP_48)
    with pytest.raises(ConfigError, match=r"^train_dataloader\.dataset\.pipeline\.3 crops to 48x48 but "
                                          r"model\.data_preprocessor\.size is \(32, 32\): .* torch cannot "
                                          r"stack the batch; pad to the crop: --cfg-options "
                                          r'model\.data_preprocessor\.size="\(48, 48\)"'):
        main([config, '--work-dir', str(tmp_path / 'w')])
    runner = main([config, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                   'model.data_preprocessor.size=(48, 48)'])
    assert runner.iter == 3


def test_a_preprocessor_with_neither_or_both_padding_settings_is_refused():
    """mmseg's SegDataPreProcessor asserts 'only one of size and size_divisor should be valid'
    at the first training iteration (mmseg issues 2938, 3425; its own upernet_r18 configs)."""
    from mmengine.config import Config
    from reparam_mm.train import check_crop_padding
    crop = dict(type='RandomCrop', crop_size=96)
    cfg = Config(dict(default_scope='mmseg', model=dict(data_preprocessor=dict(type='SegDataPreProcessor')),
                      train_dataloader=dict(batch_size=2, dataset=dict(
                          type='RepeatDataset', times=2, dataset=dict(pipeline=[crop])))))
    with pytest.raises(ConfigError, match=r'^model\.data_preprocessor has neither size nor size_divisor: '
                                          r'.* set the size \(the training crop, train_dataloader\.dataset'
                                          r'\.dataset\.pipeline\.0\.crop_size\): --cfg-options '
                                          r'model\.data_preprocessor\.size="\(96, 96\)"\.$'):
        check_crop_padding(cfg)
    cfg.model.data_preprocessor.update(size=(96, 96), size_divisor=32)
    with pytest.raises(ConfigError, match=r'^model\.data_preprocessor sets both size \(96, 96\) and '
                                          r'size_divisor 32: .* --cfg-options '
                                          r'model\.data_preprocessor\.size_divisor=None\.$'):
        check_crop_padding(cfg)
    cfg.model.data_preprocessor.size_divisor = None
    check_crop_padding(cfg)
    cfg.model.data_preprocessor.size = (64, 96)
    with pytest.raises(ConfigError, match=r'crops to 96x96 but model\.data_preprocessor\.size is \(64, 96\)'):
        check_crop_padding(cfg)
    cfg.train_dataloader.batch_size = 1  # nothing to stack: any crop fits
    check_crop_padding(cfg)
