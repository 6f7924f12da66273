"""Checks of the datasets a config reads, against their files and the model's heads: before
anything is built (paths, image / label-map pairing, COCO categories), at the build (the classes a
COCO json names) and while the loops run (label-map values). Each failure is one sentence naming
the config key and the fix, where mmseg / mmdet would stop later with a traceback that names
neither."""
import inspect
import logging
import os
import os.path as osp

import torch
from mmengine.logging import print_log

from .scope import ConfigError, dataset_metainfo


def _innermost(dataset):
    while hasattr(dataset, 'dataset') or hasattr(dataset, 'datasets'):  # dataset wrappers
        dataset = getattr(dataset, 'dataset', None) or dataset.datasets[0]
    return dataset


def few_names(names, n=6):
    """``'a, b, c, ...'``: the first ``n`` of ``names``, for a sentence."""
    return ', '.join(map(str, names[:n])) + (', ...' if len(names) > n else '')


def check_dataset_classes(runner, loaders=('train_dataloader', 'val_dataloader')):
    """The classes of a COCO-style dataset against its json, before the first iteration:

    * every class its ``metainfo`` names must be a category of the json: mmdet keeps only the
      names it finds, so a misnamed class ('human' for 'person') trained without a label and
      the evaluator failed at the first validation;
    * they must come in the json's order: mmdet numbers the labels in the order of the json's
      ``categories`` (pycocotools' ``getCatIds``), so ``classes=('car', 'person')`` on a json
      listing person first trained the person boxes as label 0 and the checkpoint, inference
      and pictures called them 'car' (mmdet issues 10675, 11704);
    * a class without a box in the json is logged: in training the model never sees one; in
      validation its AP reads nan (mmdet's per-class table) and the mAP leaves it out;
    * a validation or test ``CocoMetric``'s own json must order the classes as the dataset does
      and hold the images the loader reads (:func:`_check_metric_json`).

    The json's categories are read only when the config names its own classes."""
    orders = {}  # loader -> (json, the classes in the order the dataset numbers them)
    for loader in loaders:
        try:  # the loops' dataloaders (a run without validation has none to give)
            built = getattr(runner, loader)
        except Exception:  # noqa: BLE001
            continue
        dataset = _innermost(getattr(built, 'dataset', None))
        classes, cat_ids = (dataset.metainfo.get('classes') if dataset is not None else None,
                            getattr(dataset, 'cat_ids', None))
        if not classes or cat_ids is None:
            continue
        ann_file = getattr(dataset, 'ann_file', None)
        twice = sorted({str(c) for c in classes if list(classes).count(c) > 1})
        if twice:
            raise ConfigError(f"{loader}: metainfo.classes names {', '.join(map(repr, twice))} more "
                              'than once; name each class once.')
        if len(cat_ids) > len(classes):  # the json names a category more than once
            counts = {}
            for c in json_categories(ann_file) or []:
                counts[c.get('name')] = counts.get(c.get('name'), 0) + 1
            shared = sorted(str(n) for n, k in counts.items() if k > 1 and n in classes)
            raise ConfigError(
                f"{loader}: {ann_file} has {len(cat_ids)} categories named as the dataset's "
                f"{len(classes)} classes" + (f" ({', '.join(map(repr, shared))} more than once)"
                                             if shared else '')
                + f', and mmdet numbers each as a label of its own ({len(cat_ids)} labels for '
                f'{len(classes)} names and heads); give every category of the json a name of its own.')
        if len(cat_ids) != len(classes):
            unnamed = _unnamed(classes, ann_file)  # reads the json: once
            raise ConfigError(
                f'{loader}: the dataset names {len(classes)} classes ({few_names(classes)}), '
                f'and only {len(cat_ids)} of them are '
                f'categories of {ann_file or "its ann_file"}{unnamed}; name the classes as the '
                "json's categories do (its 'categories' list)"
                + ('.' if unnamed else ", e.g. 'person', not 'human'.")
                + ('' if loader == 'train_dataloader' else
                   " A class this set has no box of stays among the json's categories, without "
                   'annotations: the model keeps the classes it was trained on.'))
        own = tuple((getattr(type(dataset), 'METAINFO', None) or {}).get('classes') or ())
        ordered = tuple(classes) != own and bool(ann_file)  # the config names its own classes
        if ordered:
            names = {c.get('id'): c.get('name') for c in json_categories(ann_file, cat_ids) or []}
            in_json = [names.get(i) for i in cat_ids]
            if None not in in_json:
                _check_class_order(loader, type(dataset).__name__, ann_file, classes, in_json, orders)
        if loader != 'train_dataloader':
            _check_metric_json(runner.cfg, loader, dataset, ordered, orders)
        boxes = getattr(dataset, 'cat_img_map', None)
        empty = [name for name, i in zip(classes, cat_ids) if boxes is not None and not boxes.get(i)]
        if empty:
            print_log(
                f'{loader}: {len(empty)} of the {len(classes)} classes have no box in {ann_file} '
                f'({few_names(empty)}): '
                + ('the model never sees one, so it scores near 0 wherever the validation set has '
                   'boxes of ' + ('it' if len(empty) == 1 else 'them') if loader == 'train_dataloader'
                   else ('its' if len(empty) == 1 else 'their') + ' AP reads nan in the per-class '
                   'table and the mAP is the mean over the other classes')
                + '; check the json\'s '
                "annotations, or leave the class out (metainfo.classes and the heads' num_classes).",
                logger='current', level=logging.WARNING)


def _check_class_order(loader, kind, ann_file, classes, numbered, orders):
    """Refuse ``classes`` that ``kind`` (a COCO-style dataset reading ``ann_file``) numbers in
    another order, ``numbered``; and two loaders whose jsons order the same classes differently,
    which no order of ``classes`` fits (mmdet issue 1732)."""
    for other, (other_file, other_numbered) in orders.items():
        if sorted(map(str, other_numbered)) == sorted(map(str, numbered)) \
                and list(other_numbered) != list(numbered):
            raise ConfigError(
                f'{other} reads {other_file}, whose categories order the classes ({few_names(other_numbered)}), '
                f'and {loader} reads {ann_file}, which orders them ({few_names(numbered)}); mmdet numbers '
                'the labels of each dataset and metric in the order of its own json, so no order of '
                'metainfo.classes fits both: write the categories in the same order in both jsons.')
    orders[loader] = (ann_file, list(numbered))
    if list(numbered) == list(classes):
        return
    k = next(i for i, (a, b) in enumerate(zip(numbered, classes)) if a != b)
    raise ConfigError(
        f'{loader}: the dataset names its classes in the order ({few_names(classes)}), and {kind} numbers '
        f"the labels in the order it reads {ann_file}'s categories ({few_names(numbered)}), so the "
        f'{numbered[k]!r} boxes would be label {k}, called {classes[k]!r}; name the classes in that '
        f'order: metainfo=dict(classes={tuple(numbered)!r}), in every loader.')


def _check_metric_json(cfg, loader, dataset, ordered, orders):
    """The COCO metrics of ``loader``'s evaluator against ``dataset``, each json read once:

    * a json other than the dataset's numbers the labels in the order of its own categories: one
      that orders the classes differently scored each box as another class (refused through
      :func:`_check_class_order`'s comparison of the orders; only when the config names its own
      classes, ``ordered``);
    * mmdet's ``CocoMetric`` scores every image of its json: a json holding more than the loader
      reads (the whole set, with the loader on a part by ``indices`` or on a split of its own)
      counted the unread images as missed, and the mAP read low without a word (perfect boxes
      scored 0.245 on coco128 this way): a warning, since a quick run on a part is fair; a json
      lacking some failed after the loop with pycocotools' 'Results do not correspond to current
      coco set': refused.

    A json is read only when it is not the dataset's own, or the dataset reads a part of it."""
    import json
    own = getattr(dataset, 'ann_file', None)
    whole = getattr(dataset, '_indices', None) is None
    classes = dataset.metainfo['classes']
    for key, metric in evaluator_metrics(cfg, loader.replace('_dataloader', '_evaluator')):
        path, kind = metric.get('ann_file'), metric.get('type')
        if not isinstance(path, str) or '://' in path or 'Coco' not in str(kind) \
                or not osp.isfile(path):
            continue
        other = not (own and osp.abspath(path) == osp.abspath(own))
        if not other and whole:
            continue
        try:
            with open(path, 'rb') as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # not a json we can read: coco_json_problem says why at the build
        if other and ordered:
            wanted = set(map(str, classes))
            numbered = [c.get('name') for c in data.get('categories') or []
                        if str(c.get('name')) in wanted]
            if len(numbered) == len(classes):
                _check_class_order(key, kind, path, classes, numbered, orders)
        try:
            in_json = {img.get('id') for img in data.get('images') or []}
            read = {dataset.get_data_info(i).get('img_id') for i in range(len(dataset))}
        except Exception:  # noqa: BLE001 - not a COCO json we can read: coco_json_problem says
            continue
        extra, missing = in_json - read, read - in_json
        if missing:
            raise ConfigError(
                f'{key}.ann_file {path} lacks {len(missing)} of the {len(read)} images {loader} '
                "reads, so CocoMetric would fail after the loop ('Results do not correspond to "
                f"current coco set'); point {key}.ann_file at the json {loader}.dataset reads.")
        if extra:  # said, not refused: a quick run on a part (indices=N) is a fair test
            print_log(
                f'{key}.ann_file {path} holds {len(extra)} images that {loader} does not read '
                f'({len(in_json)} against {len(read)}), and CocoMetric scores every image of its '
                'json, so those count as missed and the mAP reads low; point '
                f'{key}.ann_file at a json of exactly the images {loader}.dataset reads.',
                logger='current', level=logging.WARNING)


def _categories_list(data):
    """The ``categories`` list at the start of ``data`` (bytes), or None if it is not one."""
    import json
    try:
        value, _ = json.JSONDecoder().raw_decode(data.decode('utf-8', 'replace'))
    except ValueError:
        return None
    ok = isinstance(value, list) and all(isinstance(c, dict) and 'id' in c for c in value)
    return value if ok else None


def json_categories(path, ids=None):
    """The ``categories`` (dicts of ``id`` and ``name``) of the COCO json at ``path``, or None
    if it cannot be read. COCO's own jsons (448 MB for train2017) end with them: past 16 MB and
    given the category ``ids`` to find, the list after the last ``"categories":`` in the file's
    last MB is decoded alone, and taken if it holds every one of ``ids`` (a per-image
    ``categories`` list there would not); else the whole json is read."""
    import json
    import re
    try:
        size = osp.getsize(path)
        if ids is not None and size > 16 << 20:
            with open(path, 'rb') as f:
                f.seek(size - (1 << 20))
                tail = f.read()
            for match in reversed(list(re.finditer(rb'"categories"\s*:\s*', tail))):
                found = _categories_list(tail[match.end():])
                if found is not None and set(ids) <= {c.get('id') for c in found}:
                    return found
        with open(path, 'rb') as f:
            value = json.load(f).get('categories')
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, list) else None


def _json_categories(path):
    """The category names of the COCO json at ``path``, or None if it cannot be read."""
    categories = json_categories(path)
    return None if categories is None else [c.get('name') for c in categories]


def _unnamed(classes, ann_file):
    """``'; not among them: 'cups' (the nearest: 'cup')'``: the classes the COCO json at
    ``ann_file`` does not name, each with its nearest category; '' if the json cannot be read."""
    import difflib
    categories = [str(c) for c in _json_categories(ann_file) or []] if ann_file else []
    said = [repr(c) + ''.join(f' (the nearest: {near!r})' for near in
                              difflib.get_close_matches(str(c), categories, n=1, cutoff=0.6))
            for c in classes if c not in categories]
    return f"; not among them: {', '.join(said)}" if categories and said else ''


def check_coco_categories(cfg, loaders=('train_dataloader', 'val_dataloader')):
    """At least one class of each COCO-style dataset (a local json ``ann_file``) must be a category
    of its json: with none, mmdet keeps no image and stops building the dataset with numpy's
    'need at least one array to concatenate'. Reads the jsons: :func:`explain_build_failure`
    calls it only when the build failed so (COCO's own jsons take seconds to read)."""
    for key, path, ds in _local_coco_jsons(cfg, loaders):
        if ds is None:
            continue  # an evaluator's
        loader = key.split('.')[0]
        meta = dataset_metainfo({'default_scope': cfg.get('default_scope'),
                                 loader: {'dataset': ds}}, loader)
        categories = _json_categories(path)
        if not meta or categories is None or set(meta['classes']) & set(categories):
            continue
        classes = meta['classes']
        raise ConfigError(
            f'{loader}: the dataset names {len(classes)} classes ({few_names(classes)}), and none '
            f'of them is a category of {path} ({few_names(categories)}), '
            "so no image is left to train on; name the classes as the json's categories do (its "
            "'categories' list), e.g. 'person', not 'human'.")


def segmentation_heads(model):
    """``(config key, head)`` of a segmentor's decode and auxiliary heads (through lists:
    cascades), the heads whose loss reads the label maps; none for a detector."""
    found = []
    for name in ('decode_head', 'auxiliary_head'):
        head = getattr(model, name, None)
        heads = list(enumerate(head)) if isinstance(head, torch.nn.ModuleList) else [(None, head)]
        found += [(f'model.{name}' + ('' if i is None else f'.{i}'), h) for i, h in heads
                  if hasattr(h, 'num_classes') and hasattr(h, 'ignore_index')]
    return found


def _few_values(values, n=4):
    return ', '.join(map(str, values[:n])) + (f' (and {len(values) - n} more)' if len(values) > n else '')


def label_values_outside(labels, num_classes, ignore_index):
    """The sorted values of ``labels`` (an integer tensor) that are neither
    ``0 .. num_classes - 1`` nor ``ignore_index`` (empty when all are).

    In NumPy on one thread: it runs in the training process between steps, where torch's
    intra-op threads compete with the data loader's workers (2 threads took 4x one's time on a
    busy 2-core machine)."""
    import numpy as np
    values = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    as_unsigned = values.astype(np.int64, copy=False).view(np.uint64)  # negatives wrap past n
    bad = as_unsigned >= num_classes
    if ignore_index is not None and bad.any():
        bad &= values != ignore_index
    return sorted(np.unique(values[bad]).tolist()) if bad.any() else []


def reduce_zero_label_key(cfg, loader):
    """The config key of ``reduce_zero_label`` in ``loader``'s dataset, through wrappers."""
    node, key = (cfg.get(loader) or {}).get('dataset') or {}, f'{loader}.dataset'
    while isinstance(node, dict) and ('dataset' in node or 'datasets' in node):
        if 'dataset' in node:
            node, key = node['dataset'], f'{key}.dataset'
        else:  # ConcatDataset: whichever of its datasets reads this label map
            return f'{key}.datasets.N.reduce_zero_label'
    return f'{key}.reduce_zero_label'


def ignore_setting_keys(cfg, heads):
    """The config keys that must all hold the label a segmentor ignores: each of ``heads``'
    ``ignore_index`` (:func:`segmentation_heads`), the preprocessor's ``seg_pad_val`` and the
    validation ``IoUMetric``'s ``ignore_index``."""
    keys = [f'{key}.ignore_index' for key, _ in heads] + ['model.data_preprocessor.seg_pad_val']
    if cfg.get('val_cfg'):
        keys += [f'{key}.ignore_index' for key, _ in iou_metrics(cfg, 'val_evaluator')]
    return keys


def check_label_values(data_samples, heads, loader='train_dataloader', reduce_key=None, ignore_keys=None):
    """Every value of the label maps of ``data_samples`` (a batch before the data preprocessor)
    must be a class of each of ``heads`` (:func:`segmentation_heads`: ``0 .. num_classes - 1``,
    0 and 1 for a head of one output channel, mmseg's binary form) or its ``ignore_index``:
    torch's loss fails on any other, with "Target N is out of bounds" on CPU and a device-side
    assert far from the cause on CUDA."""
    for sample in data_samples:
        labels = getattr(getattr(sample, 'gt_sem_seg', None), 'data', None)
        if labels is None:
            continue
        checked = set()  # a decode and an auxiliary head of one class count: one check
        for key, head in heads:
            n = 2 if getattr(head, 'out_channels', None) == 1 else head.num_classes
            ignore = head.ignore_index
            if (n, ignore) in checked:
                continue
            checked.add((n, ignore))
            values = label_values_outside(labels, n, ignore)
            if not values:
                continue
            meta = sample.metainfo
            where = meta.get('seg_map_path') or meta.get('img_path') or 'of a training image'
            valid = ('binary: labels 0 and 1' if getattr(head, 'out_channels', None) == 1
                     else f'labels 0..{n - 1}')
            said = (f'{loader}: the label map {where} holds the value{"s" if len(values) > 1 else ""} '
                    f'{_few_values(values)}, not a class of {key}, whose num_classes is '
                    f'{head.num_classes} ({valid}) and ignore_index {ignore}')
            unlabelled = ''
            if (len(values) == 1 and ignore is not None and not meta.get('reduce_zero_label')
                    and not bool((labels == ignore).any())):  # the maps' own 'unlabelled'?
                keys = ignore_keys or [f'{k}.ignore_index' for k, _ in heads] + [
                    'model.data_preprocessor.seg_pad_val']
                unlabelled = (f'; if {values[0]} marks unlabelled pixels (CamVid\'s 11), ignore it: map it '
                              f'to {ignore} in the label maps, or --cfg-options '
                              + ' '.join(f'{key}={values[0]}' for key in keys))
            if values == [n] and not meta.get('reduce_zero_label'):
                raise ConfigError(
                    f'{said}; if the maps hold labels 1..{n} with 0 as unlabelled (ADE20K\'s '
                    f'way), reduce_zero_label=True in the dataset reads them as 0..{n - 1} with 0 '
                    f'ignored (--cfg-options {reduce_key or loader + ".dataset.reduce_zero_label"}'
                    f'=True){unlabelled}; if 0..{n} are all classes, that is one class more than '
                    f'the heads have: count it (metainfo.classes and every head\'s num_classes)'
                    + ('.' if unlabelled else f' or map it to {ignore}.'))
            heads_n = ' '.join(f'{k}.num_classes=N' for k, _ in heads)
            raise ConfigError(
                f'{said}; if your labels count more classes, name them all in the dataset\'s '
                f'metainfo.classes and set every head to their number N (--cfg-options {heads_n})'
                + (f'{unlabelled}.' if unlabelled else
                   f', else map {"this value" if len(values) == 1 else "these values"} '
                   + (f'to {ignore} in the label maps.' if ignore is not None
                      else 'out of the label maps.')))


class TrainLabelCoverage:
    """Which of a segmentor's classes the training label maps hold, over one pass of the training
    set. A class never seen trains without an example; the common cause is
    ``reduce_zero_label=True`` on maps whose 0 is a class (mmseg's ADE20K bases set it): 0 is
    read as unlabelled and k as k - 1, every value stays in range, nothing fails, and the last
    class never appears. :meth:`warning` says which classes and why."""

    def __init__(self, classes, num_classes, loader='train_dataloader', reduce_key=None):
        import numpy as np
        self.classes, self.n, self.loader, self.reduce_key = classes, num_classes, loader, reduce_key
        self.seen, self.maps, self.reduced = np.zeros(num_classes, dtype=bool), 0, False

    @property
    def complete(self):
        return bool(self.seen.all())

    def count(self, data_samples):
        import numpy as np
        for sample in data_samples:
            labels = getattr(getattr(sample, 'gt_sem_seg', None), 'data', None)
            if labels is None or self.complete:
                continue
            values = labels.detach().cpu().numpy().ravel() if torch.is_tensor(labels) else np.ravel(labels)
            values = values[(values >= 0) & (values < self.n)]
            self.seen |= np.bincount(values.astype(np.int64), minlength=self.n)[:self.n] > 0
            self.maps += 1
            self.reduced = self.reduced or bool(sample.metainfo.get('reduce_zero_label'))

    def gather(self):
        """OR the classes every process saw (each reads its own shard); a no-op in one process."""
        from mmengine.dist import all_gather_object, is_distributed
        if not is_distributed():
            return
        parts = all_gather_object((self.seen.tolist(), self.maps, self.reduced))
        import numpy as np
        self.seen = np.any([p[0] for p in parts], axis=0)
        self.maps, self.reduced = sum(p[1] for p in parts), any(p[2] for p in parts)

    def warning(self, images):
        """The sentence to log after a pass over ``images`` training images, or None when every
        class appeared."""
        missing = [i for i in range(self.n) if not self.seen[i]]
        if not missing or not self.maps:
            return None
        names = few_names([f'{self.classes[i]!r} (label {i})' if i < len(self.classes) else f'label {i}'
                           for i in missing])
        said = (f'{self.loader}: after one pass over the {images} training images, no label map held '
                f"{'class' if len(missing) == 1 else f'{len(missing)} of the {self.n} classes'} "
                f'{names}: {"it trains" if len(missing) == 1 else "they train"} without an example, and '
                f'{"its" if len(missing) == 1 else "their"} IoU will read 0 or nan')
        if self.reduced and self.n - 1 in missing:
            return (f'{said}; reduce_zero_label=True reads the maps\' 0 as unlabelled and k as k - 1, '
                    f'so maps that number the classes 0..{self.n - 1} lose their class 0 and never '
                    f'hold label {self.n - 1}: if yours do, set it to False (--cfg-options '
                    f'{self.reduce_key or self.loader + ".dataset.reduce_zero_label"}=False, and the '
                    'same in the validation and test datasets).')
        return (f'{said}; if the maps number the classes otherwise than metainfo.classes lists them, '
                'make them agree (a class rare and small enough may also be cropped out of every '
                'batch).')


class EvalLabelValues:
    """Counts the label maps of a validation or test loop that hold values mmseg's
    ``IoUMetric`` cannot score (:func:`label_values_outside` its dataset's classes and its
    ``ignore_index``). The metric drops those pixels' labels but counts the predictions there,
    so the mIoU reads low without a word; :meth:`warning` says how many maps and why."""

    def __init__(self, loader, num_classes, ignore_index, reduce_key):
        self.loader, self.num_classes, self.ignore_index = loader, num_classes, ignore_index
        self.reduce_key, self.seen, self.bad, self.first = reduce_key, 0, 0, None

    @classmethod
    def of(cls, evaluator, loader, cfg):
        """The counter for ``evaluator``'s first ``IoUMetric``, or None (no such metric)."""
        from mmseg.evaluation import IoUMetric
        for metric in getattr(evaluator, 'metrics', []):
            classes = (getattr(metric, 'dataset_meta', None) or {}).get('classes')
            if isinstance(metric, IoUMetric) and classes:
                return cls(loader, len(classes), metric.ignore_index,
                           reduce_zero_label_key(cfg, loader))
        return None

    def count(self, data_samples):
        if data_samples and isinstance(data_samples[0], (list, tuple)):
            data_samples = data_samples[0]  # test-time augmentation: one tuple per view
        for sample in data_samples:
            labels = getattr(getattr(sample, 'gt_sem_seg', None), 'data', None)
            if labels is None:
                continue
            self.seen += 1
            values = label_values_outside(labels, self.num_classes, self.ignore_index)
            if values:
                self.bad += 1
                if self.first is None:
                    meta = sample.metainfo
                    self.first = (meta.get('seg_map_path') or meta.get('img_path') or 'a label map',
                                  values, bool(meta.get('reduce_zero_label')))

    def gather(self):
        """Sum the counts of every process (each reads its own shard of the dataset), keeping the
        first example of the lowest rank that has one; a no-op in one process."""
        from mmengine.dist import all_gather_object, is_distributed
        if not is_distributed():
            return
        parts = all_gather_object((self.seen, self.bad, self.first))
        self.seen, self.bad = sum(p[0] for p in parts), sum(p[1] for p in parts)
        self.first = next((p[2] for p in parts if p[2] is not None), None)

    def warning(self):
        """The sentence to log after the loop, or None when every map could be scored."""
        if not self.bad:
            return None
        where, values, reduced = self.first
        n, ignore = self.num_classes, self.ignore_index
        own = (f'; if {values[0]} marks unlabelled pixels, set every head\'s ignore_index, '
               f'model.data_preprocessor.seg_pad_val and the metric\'s ignore_index to {values[0]}'
               if len(values) == 1 and not reduced else '')
        if values == [n] and not reduced:
            fix = (f'if the maps hold labels 1..{n} with 0 as unlabelled, set reduce_zero_label=True '
                   f'in the dataset (--cfg-options {self.reduce_key}=True){own}; if 0 is a class, '
                   f'count {n} as one more class or map it to {ignore} in the label maps')
        elif own:
            fix = (f'name every class in the dataset\'s metainfo.classes, or map this value to '
                   f'{ignore} in the label maps{own}')
        else:
            fix = (f'name every class in the dataset\'s metainfo.classes, or map '
                   f'{"this value" if len(values) == 1 else "these values"} to {ignore} '
                   'in the label maps')
        return (f'{self.loader}: {self.bad} of the {self.seen} label maps read hold values that are '
                f'neither one of the {n} classes (0..{n - 1}) nor the ignore index {ignore} '
                f'(first: {where}: {_few_values(values)}); IoUMetric counts the predictions at '
                f'those pixels but not their labels, so its mIoU reads low; {fix}.')


def _datasets(dataset, key):
    """Yield (config key, dataset config) of ``dataset`` and the datasets it wraps."""
    if not isinstance(dataset, dict):
        return
    yield key, dataset
    yield from _datasets(dataset.get('dataset'), f'{key}.dataset')  # RepeatDataset, ...
    for i, inner in enumerate(dataset.get('datasets') or ()):  # ConcatDataset
        yield from _datasets(inner, f'{key}.datasets.{i}')


def _dataset_paths(ds):
    """``(config key part, path)`` of a dataset's annotation file and data_prefix folders."""
    parts = [('ann_file', ds.get('ann_file'))] + [
        (f'data_prefix.{name}', rel) for name, rel in (ds.get('data_prefix') or {}).items()]
    return [(part, path) for part, path in parts
            if isinstance(path, str) and path and '://' not in path]


def _missing_data_paths(cfg, loader):
    """``(config key, sentence)`` for each path of ``loader``'s datasets that does not exist."""
    for key, ds in _datasets((cfg.get(loader) or {}).get('dataset'), f'{loader}.dataset'):
        root = ds.get('data_root')
        backend = (ds.get('backend_args') or {}).get('backend', 'local')
        if backend != 'local' or (root and not isinstance(root, str)) or '://' in (root or ''):
            continue
        if not root:  # paths are taken as they are, relative to the working directory
            for part, path in _dataset_paths(ds):
                if not osp.exists(path):
                    yield f'{key}.{part}', (
                        f'{path!r} ({key}.{part}) does not exist: prepare the dataset there '
                        f'(docs/datasets.md) or pass --cfg-options {key}.{part}=PATH.')
            continue
        if not osp.isdir(root):
            where = '' if osp.isabs(root) else f', relative to the current folder {os.getcwd()}'
            yield f'{key}.data_root', (
                f'data root {root!r} ({key}.data_root{where}) does not exist: prepare the dataset '
                f'there (docs/datasets.md) or pass --cfg-options {key}.data_root=PATH.')
            continue
        for part, rel in _dataset_paths(ds):
            if not osp.exists(osp.join(root, rel)):
                yield f'{key}.{part}', (
                    f'{osp.join(root, rel)!r} ({key}.{part} under data_root) does not '
                    f'exist: the dataset at {root!r} is not laid out as the config expects '
                    '(docs/datasets.md), or data_root points at the wrong folder.')


def _seg_dataset_class(cfg, ds):
    """The mmseg ``BaseSegDataset`` class a dataset config builds, or None (another scope, type
    or a type that is not registered)."""
    if cfg.get('default_scope') != 'mmseg':
        return None
    from mmseg.datasets import BaseSegDataset
    from mmseg.registry import DATASETS
    kind = ds.get('type')
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    return cls if isinstance(cls, type) and issubclass(cls, BaseSegDataset) else None


def _first_file(folder, suffix=''):
    """The path, relative to ``folder``, of a file under it whose name ends with ``suffix``;
    None if there is none. Listed as mmengine lists a dataset's images: recursively, through
    symlinked folders, leaving out names that start with '.' (macOS's ``._*`` files)."""
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(suffix) and not name.startswith('.'):
                return osp.relpath(osp.join(top, name), folder)
    return None


def _suffix_hint(folder, stem, key, which):
    """The fix for a file ``stem + suffix`` missing from ``folder``: the suffix of a file there
    whose name starts with ``stem``, as a --cfg-options override of ``key``'s ``which``."""
    near = sorted(n for n in os.listdir(folder) if n.startswith(stem)) if osp.isdir(folder) else []
    if near:
        return (f'{folder!r} holds {near[0]!r}: pass --cfg-options '
                f'{key}.{which}={near[0][len(stem):]}.')
    return None


def _split_file_problems(key, ann_file, img_dir, ann_dir, img_suffix, seg_suffix):
    """``(config key, sentence)`` when a segmentation split file (VOC's ``ImageSets/Segmentation/
    train.txt``: one image name per line, without its suffix) names images or label maps that do
    not exist. mmseg reads the list as it is and stops at the first such file, in a data loader
    worker, with a FileNotFoundError naming no config key. Every line is checked (a stat each),
    so a partly extracted dataset is counted, not just met."""
    with open(ann_file) as f:
        names = [line.strip() for line in f]
    if not any(names):
        yield f'{key}.ann_file', (
            f'the split file {ann_file!r} ({key}.ann_file) lists no image: put one image name '
            'per line there (without its suffix), or leave ann_file out to list the image folder.')
        return
    missing_images = [(n, i) for i, n in enumerate(names, 1)
                      if not osp.isfile(osp.join(img_dir, n + img_suffix))]
    no_image = {i for _, i in missing_images}
    missing_labels = [] if ann_dir is None else [
        (n, i) for i, n in enumerate(names, 1)
        if i not in no_image and not osp.isfile(osp.join(ann_dir, n + seg_suffix))]
    for missing, folder, suffix, which in ((missing_images, img_dir, img_suffix, 'img_suffix'),
                                           (missing_labels, ann_dir, seg_suffix, 'seg_map_suffix')):
        if not missing:
            continue
        name, line = missing[0]
        path = osp.join(folder, name + suffix)
        what = 'image' if which == 'img_suffix' else 'label map'
        if not name:
            fix = f'delete the blank line from {ann_file!r}.'
        elif osp.isfile(osp.join(folder, name)):
            fix = (f'{name!r} is there: the lines must name images without their suffix; strip '
                   f'it in {ann_file!r}.')
        else:
            fix = (_suffix_hint(osp.dirname(path), osp.basename(name), key, which)
                   or f'check {key}.{which}, {key}.data_prefix and whether the dataset is fully '
                      'extracted there (docs/datasets.md).')
        yield f'{key}.{which}', (
            f'{len(missing)} of the {len(names)} names in the split file {ann_file!r} '
            f'({key}.ann_file) have no {what}: line {line}, {name!r}, would be {path!r} '
            f'({which} {suffix!r}), which does not exist; {fix}')
        return


def _seg_pairing_problems(cfg, loader):
    """``(config key, sentence)`` for a segmentation dataset that would list no image (no file
    under its image folder ends with ``img_suffix``: mmengine then stops with numpy's 'need at
    least one array to concatenate') or whose first image's label map, named by swapping
    ``img_suffix`` for ``seg_map_suffix``, does not exist (a FileNotFoundError naming neither
    key at the first iteration). A dataset listed by a split file (``ann_file``) has every
    listed name checked (:func:`_split_file_problems`)."""
    for key, ds in _datasets((cfg.get(loader) or {}).get('dataset'), f'{loader}.dataset'):
        cls = _seg_dataset_class(cfg, ds)
        root, prefix = ds.get('data_root') or '', ds.get('data_prefix') or {}
        if cls is None or not isinstance(root, str) \
                or not isinstance(prefix.get('img_path'), str):
            continue
        defaults = inspect.signature(cls.__init__).parameters
        img_suffix = ds.get('img_suffix', defaults['img_suffix'].default)
        seg_suffix = ds.get('seg_map_suffix', defaults['seg_map_suffix'].default)
        img_dir = osp.join(root, prefix['img_path'])
        if not osp.isdir(img_dir):
            continue  # _missing_data_paths says so
        ann_file = ds.get('ann_file')
        if isinstance(ann_file, str) and ann_file:
            ann_file = osp.join(root, ann_file)
            if osp.isfile(ann_file):  # a folder given as ann_file is listed, as by mmseg
                ann_dir = prefix.get('seg_map_path')
                yield from _split_file_problems(
                    key, ann_file, img_dir,
                    osp.join(root, ann_dir) if isinstance(ann_dir, str) else None,
                    img_suffix, seg_suffix)
                continue
        elif ann_file:
            continue  # not a local path we can read
        image = _first_file(img_dir, img_suffix)
        if image is None:
            other = _first_file(img_dir)
            yield f'{key}.img_suffix', (
                f'no file under {img_dir!r} ends with img_suffix {img_suffix!r} ({key}.img_suffix), '
                f'so the dataset would list no image; ' + (
                    f'it holds e.g. {other!r}: pass --cfg-options {key}.img_suffix='
                    f'{osp.splitext(other)[1] or "SUFFIX"} (the end of the image names that the '
                    "label maps' names do not share)." if other else
                    'the folder is empty: prepare the dataset there (docs/datasets.md).'))
            continue
        ann_dir = prefix.get('seg_map_path')
        if not isinstance(ann_dir, str):
            continue
        label = osp.join(root, ann_dir, image[:-len(img_suffix)] + seg_suffix)
        if osp.isfile(label):
            continue
        stem, folder = osp.basename(image[:-len(img_suffix)]), osp.dirname(label)
        yield f'{key}.seg_map_suffix', (
            f'the label map of {osp.join(img_dir, image)!r} would be {label!r} (its name with '
            f'img_suffix {img_suffix!r} replaced by seg_map_suffix {seg_suffix!r}), which does not '
            'exist; ' + (_suffix_hint(folder, stem, key, 'seg_map_suffix') or
                         f'no file in {folder!r} starts with {stem!r}: check {key}.seg_map_suffix '
                         f'and {key}.data_prefix.seg_map_path.'))


def evaluator_metrics(cfg, evaluator):
    """``(config key, metric config)`` of each metric ``cfg[evaluator]`` names: one dict (key
    ``val_evaluator``) or a list of them (``val_evaluator.0``, ...)."""
    metrics = cfg.get(evaluator)
    listed = isinstance(metrics, (list, tuple))
    for i, metric in enumerate(metrics if listed else [metrics]):
        if isinstance(metric, dict):
            yield (f'{evaluator}.{i}' if listed else evaluator), metric


def iou_metrics(cfg, evaluator):
    """``(config key, metric config)`` of ``evaluator``'s mmseg ``IoUMetric`` (or subclass)."""
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import METRICS
    for key, metric in evaluator_metrics(cfg, evaluator):
        kind = metric.get('type')
        cls = METRICS.get(kind) if isinstance(kind, str) else kind
        if isinstance(cls, type) and issubclass(cls, IoUMetric):
            yield key, metric


def _missing_evaluator_files(cfg, evaluator):
    """``(config key, sentence)`` for each local ``ann_file`` of ``evaluator``'s metrics (COCO's
    ground truth) that does not exist."""
    for key, metric in evaluator_metrics(cfg, evaluator):
        path = metric.get('ann_file')
        if isinstance(path, str) and path and '://' not in path and not osp.exists(path):
            key = f'{key}.ann_file'
            yield key, (f'{path!r} ({key}) does not exist: the metric reads its ground truth '
                        f'there; prepare the dataset (docs/datasets.md) or pass --cfg-options '
                        f'{key}=PATH.')


def check_data_roots(cfg, loaders=('train_dataloader', 'val_dataloader')):
    """Fail before building anything when a dataset's ``data_root``, or an annotation file or
    image / label folder under it, or the annotation file a loader's evaluator reads, does not
    exist, or a segmentation dataset's images and label maps do not pair up through
    ``img_suffix`` / ``seg_map_suffix`` (:func:`_seg_pairing_problems`); the error names the
    first and the config keys of the others.

    mmseg / mmdet would stop later, in the middle of building the runner or the first
    epoch (the evaluator's file at the first validation), with a FileNotFoundError traceback
    naming neither the config key nor the fix.
    """
    problems = []
    for loader in loaders:
        problems += _missing_data_paths(cfg, loader)
        problems += _missing_evaluator_files(cfg, loader.replace('_dataloader', '_evaluator'))
    if not problems:  # the folders exist: do the images and their label maps pair up?
        for loader in loaders:
            problems += _seg_pairing_problems(cfg, loader)
    if problems:
        others = [key for key, _ in problems[1:]]
        raise FileNotFoundError(problems[0][1] + (
            f' Also missing: {", ".join(others)}.' if others else ''))


#: what mmengine's ``Runner.build_dataloader`` reads from a loader's config before handing the
#: rest to torch's ``DataLoader``
_RUNNER_LOADER_KEYS = frozenset({'num_batch_per_epoch', 'disable_subprocess_warning'})

#: packages whose dataset classes take only the arguments their signatures name (a class of
#: another can pop more from ``**kwargs`` in its ``__init__``: only near misses are refused there)
_SIGNED_PACKAGES = frozenset({'mmengine', 'mmdet', 'mmseg', 'mmpretrain', 'reparam_mm'})


def _init_parameters(cls):
    """The keyword arguments ``cls(...)`` takes, through the ``**kwargs`` its ``__init__`` passes
    up the class hierarchy; None when some ``**kwargs`` goes past the classes (anything goes)."""
    names = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {'self'}
    return None


def _nearest(name, names):
    import difflib
    near = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.75)
    return near[0] if near else None


def _unknown_key(key, name, accepted, what):
    near = _nearest(name, accepted)
    return (f'{key}.{name} is not {what}' + (f'; did you mean {near!r}?' if near else
                                             f"; it takes {', '.join(sorted(accepted))}."))


def _dataset_class(cfg, ds):
    kind = ds.get('type')
    if not isinstance(kind, str):
        return kind if isinstance(kind, type) else None
    try:  # in the dataset's own _scope_ where it names one, as the registry builds it
        import importlib
        scope = ds.get('_scope_') or cfg.get('default_scope')
        return importlib.import_module(f'{scope}.registry').DATASETS.get(kind)
    except Exception:  # noqa: BLE001 - another scope or an unregistered type: the build says
        return None


#: the ``data_prefix`` keys each family reads: mmseg's ``img_path`` / ``seg_map_path``, mmdet's
#: COCO-style ``img`` (and ``seg`` for panoptic maps)
_PREFIX_KEYS = (('mmseg.datasets', 'BaseSegDataset', ('img_path', 'seg_map_path'), ('img', 'seg')),
                ('mmdet.datasets', 'CocoDataset', ('img', 'seg'), ('img_path', 'seg_map_path')))


def _check_data_prefix(key, cls, prefix):
    """Refuse the other family's ``data_prefix`` keys: mmdet's ``img=`` in an mmseg dataset ended
    in a TypeError inside its ``__init__``, mmseg's ``img_path=`` in an mmdet one in KeyError 'img'
    at the build."""
    import importlib
    if not isinstance(prefix, dict) or not isinstance(cls, type):
        return
    for module, base, own, other in _PREFIX_KEYS:
        try:
            family = getattr(importlib.import_module(module), base)
        except (ImportError, AttributeError):
            continue
        if not issubclass(cls, family):
            continue
        wrong = [k for k in other if k in prefix and own[other.index(k)] not in prefix]
        if wrong:
            right = [own[other.index(k)] for k in wrong]
            raise ConfigError(
                f"{key}.data_prefix has {', '.join(map(repr, wrong))}, which {cls.__name__} does not "
                f"read ({module.split('.')[0]} names {'it' if len(wrong) == 1 else 'them'} "
                f"{', '.join(map(repr, right))}); write data_prefix=dict("
                + ', '.join(f'{r}={prefix[k]!r}' for r, k in zip(right, wrong)) + ').')


def check_loader_keys(cfg, loaders=('train_dataloader', 'val_dataloader')):
    """Refuse a key of a loader's config, or of its datasets' (wrappers included), that nothing
    takes, naming the nearest that is taken: written in a config file (``batch_szie=2``,
    ``reduce_zero_lable=True``) it stopped the run after a page of logs with torch's or the
    registry's "unexpected keyword argument" TypeError. A slip in a ``metainfo`` key
    (``clases=...``) is refused too: mmengine keeps any key there, so the dataset kept its
    class's own classes (COCO's 80) and the class-count check blamed the heads."""
    from torch.utils.data import DataLoader
    loader_keys = set(inspect.signature(DataLoader).parameters) | _RUNNER_LOADER_KEYS
    for loader in loaders:
        node = cfg.get(loader)
        if not isinstance(node, dict):
            continue
        for name in node:
            if name not in loader_keys:
                raise ConfigError(_unknown_key(loader, name, loader_keys, 'a data loader setting')
                                  + ' (mmengine hands these to torch.utils.data.DataLoader).')
        for key, ds in _datasets(node.get('dataset'), f'{loader}.dataset'):
            cls = _dataset_class(cfg, ds)
            if cls is None:
                continue
            accepted = _init_parameters(cls)
            signed = cls.__module__.split('.')[0] in _SIGNED_PACKAGES
            for name in [] if accepted is None else ds:
                if name not in accepted and name not in ('type', '_scope_') \
                        and (signed or _nearest(name, accepted)):
                    raise ConfigError(_unknown_key(key, name, accepted,
                                                   f'an argument of {cls.__name__}'))
            _check_data_prefix(key, cls, ds.get('data_prefix'))
            meta = ds.get('metainfo')
            if isinstance(meta, dict) and isinstance(meta.get('classes'), str):
                name = meta['classes']
                raise ConfigError(
                    f"{key}.metainfo.classes is the string {name!r}, which mmengine reads as "
                    f'{len(name)} classes ({", ".join(name[:4])}, ...); write a tuple: '
                    f'classes=({name!r},) (the comma makes it one).')
            palette, named = (meta.get('palette'), meta.get('classes')) if isinstance(meta, dict) \
                else (None, None)
            if isinstance(palette, (list, tuple)) and isinstance(named, (list, tuple)) \
                    and len(palette) != len(named):
                raise ConfigError(
                    f'{key}.metainfo names {len(named)} classes and {len(palette)} palette colours; '
                    'give one colour per class (or leave palette out: one is drawn for each).')
            known = set(getattr(cls, 'METAINFO', None) or {})
            for name in meta if isinstance(meta, dict) else ():
                near = None if name in known else _nearest(name, known)
                near = None if near in meta else near  # given too: this key is something else
                if near:
                    own = cls.METAINFO.get(near)
                    kept = (f"{cls.__name__}'s {len(own)} classes" if near == 'classes' and own
                            else 'no classes' if near == 'classes' else f"{cls.__name__}'s own {near}")
                    raise ConfigError(f'{key}.metainfo.{name} is read by nothing, so the dataset '
                                      f'keeps {kept}; did you mean {near!r}?')


def _local_coco_jsons(cfg, loaders):
    """``(config key, path, dataset config or None)`` of every local COCO json ``loaders`` read:
    their datasets' ``ann_file`` and their evaluators' (None for an evaluator's)."""
    for loader in loaders:
        for key, ds in _datasets((cfg.get(loader) or {}).get('dataset'), f'{loader}.dataset'):
            ann_file, root = ds.get('ann_file'), ds.get('data_root') or ''
            if ds.get('dataset') or ds.get('datasets') or not isinstance(ann_file, str) \
                    or not ann_file.endswith('.json') or '://' in ann_file + str(root):
                continue
            yield (f'{key}.ann_file', osp.join(root, ann_file) if isinstance(root, str) else ann_file,
                   ds)
        for key, metric in evaluator_metrics(cfg, loader.replace('_dataloader', '_evaluator')):
            path = metric.get('ann_file')
            if isinstance(path, str) and path.endswith('.json') and '://' not in path:
                yield f'{key}.ann_file', path, None


def coco_json_problem(path, key, dataset=None):
    """The sentence saying why the COCO json at ``path`` (``key`` in the config) cannot serve,
    or None (:func:`_coco_json_problem`)."""
    found = _coco_json_problem(path, key, dataset)
    return found and found[1]


def _coco_json_problem(path, key, dataset=None):
    """``(kind, sentence)`` when the COCO json at ``path`` cannot serve, else None: ``'json'``
    empty or not JSON (cut short); ``'shape'`` not an object of ``images``, ``annotations`` and
    ``categories`` lists (test-dev's json, without boxes, has no ``annotations``: only a
    training ``dataset`` needs them); ``'empty'`` no image or category, or no annotation for a
    training ``dataset`` that keeps only images with boxes (mmdet's ``filter_empty_gt``, off
    unless its ``filter_cfg`` says so)."""
    import json
    if not osp.isfile(path):
        return None  # check_data_roots says so
    if osp.getsize(path) == 0:
        return 'json', f'{path} ({key}) is empty (0 bytes): write the COCO json there again.'
    try:
        with open(path, 'rb') as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        where = f' at line {e.lineno} column {e.colno}' if hasattr(e, 'lineno') else ''
        return 'json', (f'{path} ({key}) is not valid JSON ({getattr(e, "msg", e)}{where}); a '
                        'download or copy cut short leaves it so: write it again.')
    shape = ("a COCO json is an object holding 'images', 'annotations' and 'categories' lists "
             '(https://cocodataset.org/#format-data)')
    if not isinstance(data, dict):
        return 'shape', f'{path} ({key}) holds a JSON {type(data).__name__}, not an object; {shape}.'
    training = dataset is not None and not dataset.get('test_mode')
    missing = [name for name in ('images', 'annotations', 'categories')  # test-dev has no boxes
               if not isinstance(data.get(name), list) and (training or name != 'annotations')]
    if missing:
        return 'shape', (f"{path} ({key}) has no {' / '.join(repr(m) for m in missing)} "
                         f"list{'s' if len(missing) > 1 else ''}; {shape}.")
    for name, what in (('images', 'lists no image'), ('categories', 'names no category')):
        if not data[name]:
            return 'empty', f"{path} ({key}) {what} (its '{name}' list is empty); {shape}."
    filters = dataset.get('filter_cfg') if training else None
    if training and not data['annotations'] and filters is not None \
            and filters.get('filter_empty_gt', False):
        return 'empty', (f"{path} ({key}) has no annotation (its 'annotations' list is empty), and "
                         'the training set keeps only images with boxes (filter_cfg.filter_empty_gt), '
                         'so no image is left to train on: annotate the images, or point ann_file at '
                         'the json that holds their boxes.')
    return None


def _json_kinds(error):
    """The kinds of :func:`_coco_json_problem` that can have raised ``error`` in a dataset's or
    an evaluator's build (json's decoder, pycocotools, mmengine's 'need at least one array')."""
    import json
    if isinstance(error, json.JSONDecodeError):
        return {'json'}
    if isinstance(error, ValueError) and str(error) == 'need at least one array to concatenate':
        return {'shape', 'empty'}
    if isinstance(error, KeyError) and error.args and error.args[0] in ('images', 'annotations',
                                                                        'categories') \
            or isinstance(error, (AssertionError, TypeError, AttributeError)):
        return {'shape'}
    return set()


#: where a traceback passes when mmengine / mmdet build a dataset or an evaluator
_BUILD_FRAMES = frozenset({'full_init', 'load_data_list', 'build_evaluator', 'build_dataloader'})


def explain_build_failure(cfg, error, loaders):
    """Raise the one sentence that says why ``error`` stopped the building of a dataset or an
    evaluator of ``loaders`` (a broken COCO json, classes none of which it names), from it;
    return when the cause is another. Only errors that a broken json raises there are looked
    into, and the jsons are read only then: COCO's own take seconds to read."""
    import traceback
    frames = traceback.extract_tb(error.__traceback__)
    kinds = _json_kinds(error)
    if not kinds or not any(f.name in _BUILD_FRAMES or '/pycocotools/' in f.filename for f in frames):
        return
    for key, path, dataset in _local_coco_jsons(cfg, loaders):
        found = _coco_json_problem(path, key, dataset)
        if found and found[0] in kinds:
            raise ConfigError(found[1]) from error
    if isinstance(error, ValueError) and str(error) == 'need at least one array to concatenate':
        check_coco_categories(cfg, loaders)
