"""What ``tools/test.py`` and ``tools/fuse.py`` do, importable for tests.

* :func:`run_test`: mmseg / mmdet ``tools/test.py`` (same arguments), fused by
  default through :class:`~reparam_mm.hooks.FusedEvalHook`, and loading the
  checkpoint **strictly** (:func:`load_checkpoint_strict`) instead of
  mmengine's ``strict=False``, so a deploy checkpoint in the training
  architecture (or the reverse) is an error naming the keys, never a
  silently partial model.
* :func:`export_deploy`: fused weights plus a config that builds the fused
  architecture directly (:func:`deploy_config`), verified to reproduce the
  unfused model before anything is written.
"""
import argparse
import copy
import importlib
import inspect
import itertools
import logging
import os
import os.path as osp
from collections import OrderedDict

import torch
import torch.nn as nn
from mmengine.config import ConfigDict

from .batches import synthetic_batch
from .checkpoint import (
    STRICT_FIX,
    CheckpointMismatchError,
    check_state_dict,
    load_checkpoint_strict,
    read_checkpoint,
    state_dict_of,
)
from .fuse import fuse_with_report
from .outputs import compare_outputs, reference_outputs, tensor_outputs
from .scope import ConfigError, fit_persistent_workers, init_scope, load_config, merge_cfg_options

__all__ = ['CheckpointMismatchError', 'DeployCheckError', 'load_checkpoint_strict', 'check_state_dict',
           'run_test', 'build_test_runner', 'build_test_cfg', 'deploy_config', 'export_deploy', 'build_model']

_RUN_IDS = itertools.count()


# -- tools/test.py -------------------------------------------------------------------------------
def set_fuse_hook(cfg, fuse):
    """``custom_hooks`` with the config's ``FusedEvalHook`` (or a default one), or without any."""
    hooks = [h for h in cfg.get('custom_hooks', []) or [] if h.get('type') != 'FusedEvalHook']
    kept = [h for h in cfg.get('custom_hooks', []) or [] if h.get('type') == 'FusedEvalHook']
    if fuse:
        hooks.append(kept[0] if kept else dict(type='FusedEvalHook'))
    cfg.custom_hooks = hooks


def _trigger_visualization(cfg, scope, show, show_dir, wait_time):
    vis_hook = (cfg.get('default_hooks') or {}).get('visualization')
    if show_dir:  # one PNG per test image (mmseg's hook paints every 50th batch only)
        score_thr = (vis_hook or {}).get('score_thr', 0.3)
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
            dict(type='SavePredictionsHook', out_dir=show_dir, score_thr=score_thr)]
    if not show:
        return
    if vis_hook is None:
        raise ConfigError("--show needs default_hooks.visualization in the config; "
                          f"add visualization=dict(type='{'Seg' if scope == 'mmseg' else 'Det'}"
                          "VisualizationHook').")
    vis_hook.update(draw=True, show=True, wait_time=wait_time)


#: ``--tta`` on a config without ``tta_model``: mmseg's and mmdet's merging wrappers, the latter
#: as mmdet's tools/test.py sets it
DEFAULT_TTA_MODELS = {
    'mmseg': dict(type='SegTTAModel'),
    'mmdet': dict(type='DetTTAModel',
                  tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)),
}


def innermost_dataset(dataset):
    while isinstance(dataset.get('dataset'), dict):  # RepeatDataset, ClassBalancedDataset, ...
        dataset = dataset['dataset']
    return dataset


def flip_tta_pipeline(test_pipeline):
    """``test_pipeline`` with each image also seen flipped horizontally: its packing step (last)
    becomes a ``TestTimeAug`` over both flips, the annotations loaded after the flip so that
    the labels stay as the metric reads them (the merged prediction is flipped back), and the
    packed meta data say which view was flipped."""
    steps = [dict(step) for step in test_pipeline]
    if not steps or not str(steps[-1].get('type', '')).startswith('Pack'):
        raise ConfigError('--tta without tta_pipeline in the config derives one from the test '
                          "pipeline, which must end in its Pack*Inputs step; add tta_pipeline to "
                          'the config.')
    pack = steps.pop()
    if pack.get('meta_keys') is not None:  # the merging wrappers flip each view's prediction back
        pack['meta_keys'] = tuple(pack['meta_keys']) + tuple(
            key for key in ('flip', 'flip_direction') if key not in pack['meta_keys'])
    annotations = [step for step in steps if step.get('type') == 'LoadAnnotations']
    steps = [step for step in steps if step.get('type') != 'LoadAnnotations']
    flips = [dict(type='RandomFlip', prob=prob, direction='horizontal') for prob in (0., 1.)]
    transforms = [flips] + [[step] for step in annotations] + [[pack]]
    return steps + [dict(type='TestTimeAug', transforms=transforms)]


def _mask_head_key(node, key='model'):
    """The config key of the first ``mask_head`` under a model config, or None."""
    if not isinstance(node, dict):
        return None
    for name, value in node.items():
        if name == 'mask_head' and value:
            return f'{key}.{name}'
        found = _mask_head_key(value, f'{key}.{name}')
        if found:
            return found
    return None


def _tta(cfg, scope):
    """``--tta``: the config's ``tta_model`` and ``tta_pipeline``, or, where it has none, the
    defaults (a horizontal flip merged by :data:`DEFAULT_TTA_MODELS`), as mmdet's tools/test.py
    does; mmseg's asks for both, and this project's demo and detection configs have none."""
    tta_type = (cfg.get('tta_model') or DEFAULT_TTA_MODELS.get(scope) or {}).get('type')
    masks = _mask_head_key(cfg.model)
    if masks and tta_type in ('DetTTAModel', 'mmdet.DetTTAModel'):
        raise ConfigError(
            f"--tta: this detector predicts masks ({masks}), and mmdet 3.3.0's DetTTAModel merges "
            "boxes only (it stops with 'TTA of instance segmentation does not support now'; a "
            "cascade's mask head fails before that, flipping its stages' masks as if they were "
            'augmented views): test it without --tta.')
    dataset = innermost_dataset(cfg.test_dataloader.dataset)
    defaults = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if 'tta_model' not in cfg:
        cfg.tta_model = copy.deepcopy(DEFAULT_TTA_MODELS[scope])
    if 'tta_pipeline' not in cfg:
        cfg.tta_pipeline = flip_tta_pipeline(dataset.pipeline)
    if defaults:
        from mmengine.logging import print_log
        print_log(f"--tta: the config has no {' or '.join(defaults)}; testing each image as it "
                  f"is and flipped, merged by {cfg.tta_model['type']} (add them to the config to "
                  'choose other views).', logger='current')
    dataset.pipeline = cfg.tta_pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)


def _amp_test_loop(test_cfg):
    loop = dict(test_cfg or {})
    if loop.get('type', 'TestLoop') not in ('TestLoop', 'AmpTestLoop'):
        raise ConfigError(f"--amp runs the test under AmpTestLoop, a TestLoop; the config's test_cfg "
                          f"is a {loop['type']}: drop --amp, or set fp16=True in its test_cfg.")
    return ConfigDict({**loop, 'type': 'AmpTestLoop', 'fp16': True})


def build_test_cfg(config, work_dir=None, out=None, show=False, show_dir=None, wait_time=2,
                   cfg_options=None, launcher='none', tta=False, fuse=True, amp=False):
    """The test config as mmseg / mmdet ``tools/test.py`` build it, plus the fuse switch.

    ``amp=True`` runs the test loop under autocast (bf16 on CPU, fp16 on CUDA: mmengine's
    defaults; ``amp.AmpTestLoop``), e.g. for CPUs with AMX; the fused-vs-unfused check runs in
    fp32 and again under autocast.
    """
    cfg = load_config(config)
    cfg = copy.deepcopy(cfg)
    cfg.launcher = launcher
    merge_cfg_options(cfg, cfg_options)
    fit_persistent_workers(cfg)
    scope = init_scope(cfg)
    stem = osp.splitext(osp.basename(cfg.filename or 'config'))[0]
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', stem)
    cfg.load_from = None  # loaded strictly by run_test, not by the runner
    cfg.resume = False
    if cfg.get('experiment_name') is None:  # unique, so two runs in a process never share loggers
        cfg.experiment_name = f"{stem}_{'fused' if fuse else 'unfused'}_{os.getpid()}_{next(_RUN_IDS)}"
    if show or show_dir:
        _trigger_visualization(cfg, scope, show, show_dir, wait_time)
    if tta:
        _tta(cfg, scope)
    if out is not None and scope == 'mmseg':
        if osp.splitext(out)[1].lower() in ('.pkl', '.pickle', '.json') and not osp.isdir(out):
            raise ConfigError(f'--out {out}: a segmentor\'s predictions are written as label-map '
                              'PNGs into the folder --out names (as mmseg does; the .pkl file is '
                              f'mmdet\'s form), so give a folder: --out {osp.splitext(out)[0]}/.')
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True
    elif out is not None and not out.endswith(('.pkl', '.pickle')):
        raise ConfigError(f'--out {out}: detection results are dumped to a pickle file; '
                          'give a path ending in .pkl.')
    set_fuse_hook(cfg, fuse)
    if amp:
        cfg.test_cfg = _amp_test_loop(cfg.get('test_cfg'))
    return cfg


def build_test_runner(config, checkpoint, out=None, fuse=True, **kwargs):
    """The runner of :func:`run_test`, checkpoint loaded, not yet run.

    For callers that read more than the metrics after ``runner.test()``: the
    ``FusedEvalHook`` in ``runner.hooks`` holds the fuse report and the fused
    vs unfused output check (``last_report``, ``last_check``).
    """
    # build_runner opens a gloo group on CPU torchrun
    from .data_checks import check_data_roots, check_loader_keys
    from .train import build_runner, check_num_classes
    cfg = build_test_cfg(config, out=out, fuse=fuse, **kwargs)
    check_loader_keys(cfg, ['test_dataloader'])
    check_data_roots(cfg, ['test_dataloader'])
    check_num_classes(cfg, ['test_dataloader'])
    # before the runner logs a page of environment and config: the file, then its keys
    ckpt = read_checkpoint(checkpoint, fix=STRICT_FIX)
    _check_keys_on_meta(cfg, ckpt, checkpoint)
    check_trained_class_order(cfg, ckpt, checkpoint)
    runner = build_runner(cfg, tool='test')
    if out is not None and cfg.default_scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    load_checkpoint_strict(runner.model, checkpoint, checkpoint=ckpt)
    if cfg.default_scope == 'mmseg':  # label maps the IoUMetric cannot score: said after the test
        from .hooks import LabelValuesCheckHook
        runner.register_hook(LabelValuesCheckHook())
    from .hooks import DatasetClassesCheckHook  # the test set's classes, order and metric images
    runner.register_hook(DatasetClassesCheckHook())
    kind = tested_model(ckpt.get('meta'), fuse)
    runner.message_hub.update_info('reparam_mm/tested_model', kind)
    runner.logger.info(f'Loaded checkpoint {checkpoint} (strict); testing the {kind} model'
                       + (DEPLOY_NOTE if kind == 'deploy' else ''))
    return runner


#: said of tools/fuse.py's deploy pair, where '--no-fuse' or 'fused' would mislead
DEPLOY_NOTE = (': its checkpoint is a deploy one (tools/fuse.py wrote it), with nothing left to '
               'fuse, so it runs as loaded, with or without --no-fuse')


def tested_model(meta, fuse=True):
    """What a test or prediction of a checkpoint with ``meta`` runs: 'fused', 'unfused', or
    'deploy' for tools/fuse.py's deploy pair: under ``--no-fuse`` it was called 'unfused', and
    a comparison of the two ran the one model twice."""
    if ((meta or {}).get('reparam_mm') or {}).get('deploy'):
        return 'deploy'
    return 'fused' if fuse else 'unfused'


def check_trained_class_order(cfg, ckpt, filename):
    """The test set must name the classes the checkpoint was trained on in the order it learnt
    them (its ``meta.dataset_meta``): the same classes in another order (a test json listing
    them otherwise, a reordered ``metainfo``) scored each label under another class's name,
    without a word."""
    from .data_checks import few_names
    from .scope import dataset_metainfo
    trained = ((ckpt.get('meta') or {}).get('dataset_meta') or {}).get('classes') \
        if isinstance(ckpt, dict) else None
    meta = dataset_metainfo(cfg, 'test_dataloader')
    if not trained or not meta:
        return
    trained, tested = [str(c) for c in trained], [str(c) for c in meta['classes']]
    if sorted(trained) == sorted(tested) and trained != tested:
        k = next(i for i, (a, b) in enumerate(zip(trained, tested)) if a != b)
        raise ConfigError(
            f'checkpoint {filename} was trained on the classes in the order ({few_names(trained)}), '
            f'and test_dataloader.dataset names them ({few_names(tested)}), so its label {k}, '
            f'{trained[k]!r}, would be scored as {tested[k]!r}; give the test set the trained order: '
            f'metainfo=dict(classes={tuple(trained)!r}) (for COCO, its json\'s categories in that '
            'order too).')


def _check_keys_on_meta(cfg, ckpt, filename):
    """:func:`check_state_dict` against the config's model built on the meta device (no
    memory, no init), so a checkpoint of another model fails before the runner is built. A
    model that does not build there is checked by the strict load after the runner."""
    try:
        with torch.device('meta'):
            model = build_model(cfg)
    except Exception:  # noqa: BLE001 - only an early check; the real load checks again
        return
    check_state_dict(model, state_dict_of(ckpt, f'checkpoint {filename}'), f'checkpoint {filename}',
                     ckpt.get('meta'))


def score_threshold_key(model_cfg):
    """The config key of a detector's test score threshold (two-stage and cascade detectors'
    ``rcnn.score_thr``, one-stage ``score_thr``), or None."""
    test_cfg = (model_cfg or {}).get('test_cfg') or {}
    if isinstance(test_cfg.get('rcnn'), dict) and 'score_thr' in test_cfg['rcnn']:
        return 'model.test_cfg.rcnn.score_thr', test_cfg['rcnn']['score_thr']
    if 'score_thr' in test_cfg:
        return 'model.test_cfg.score_thr', test_cfg['score_thr']
    return None


def warn_empty_detection_metrics(runner, metrics):
    """A detector that kept no box on any test image gets no metric at all from mmdet's
    ``CocoMetric`` (after an ERROR line), and the test ends as if it had passed: say why and how
    to score what the model predicts, as a model trained for a few iterations does this."""
    if metrics or runner.cfg.get('default_scope') != 'mmdet':
        return
    from mmengine.logging import print_log
    found = score_threshold_key(runner.cfg.get('model'))
    fix = (f'; to score what it predicts, lower {found[0]} (now {found[1]}): --cfg-options '
           f'{found[0]}=0.0' if found else '')
    print_log(f'test: no metric was computed: the detector kept no box above its score threshold '
              f'on any test image, and mmdet\'s CocoMetric then returns nothing (a model trained '
              f'for only a few iterations does this){fix}.', logger='current', level=logging.WARNING)


def run_test(config, checkpoint, out=None, fuse=True, **kwargs):
    """Evaluate ``checkpoint``; fused unless ``fuse=False``. Returns the metrics dict."""
    from .data_checks import explain_build_failure
    runner = build_test_runner(config, checkpoint, out=out, fuse=fuse, **kwargs)
    try:
        metrics = runner.test()
    except Exception as error:  # a dataset or evaluator that did not build: say why, if known
        explain_build_failure(runner.cfg, error, ['test_dataloader'])
        raise
    warn_empty_detection_metrics(runner, metrics)
    return metrics


def _positive_int(text, refusal):
    """``text`` as a positive integer, else argparse's error: ``'<text>' <refusal>``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} {refusal}')
    return value


def image_size(text):
    """argparse type of ``--shape H W``: a positive number of pixels."""
    return _positive_int(text, 'is not an image size; give two positive integers, H and W, '
                               'e.g. --shape 512 512')


def count_value(text):
    """argparse type of a count such as ``--num-proposals``: a positive integer."""
    return _positive_int(text, 'is not a count; give a positive integer')


class DeployCheckError(RuntimeError):
    """The deploy model tools/fuse.py built does not reproduce the unfused one; nothing was
    written (the message names the fused layers' methods to check)."""


def tolerance_value(text):
    """argparse type of ``--tolerance``: a relative difference, 0 or more (0: exact)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'{text!r} is not a tolerance; give a relative difference '
                                         '0 or more, e.g. --tolerance 1e-4')
    return value


# -- tools/fuse.py -------------------------------------------------------------------------------
def _registered(type_name, scope):
    if not isinstance(type_name, str):
        return type_name if inspect.isclass(type_name) else None
    try:  # the scope's registry falls back to the root one, where reparam_mm registers
        return importlib.import_module(f'{scope}.registry').MODELS.get(type_name)
    except Exception:  # noqa: BLE001 - unknown names are simply not rewritten
        return None


def _init_args(cls):
    try:
        return inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}


def _fusable_type(spec, scope):
    cls = _registered(spec.get('type'), scope) if isinstance(spec, dict) else None
    return cls is not None and callable(getattr(cls, 'to_fused', None)) and \
        issubclass(cls, nn.Module)


def _rewrite(node, path, changes, scope):
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite(v, f'{path}[{i}]', changes, scope) for i, v in enumerate(node))
    if not isinstance(node, dict):
        return node
    node = type(node)({k: _rewrite(v, f'{path}.{k}', changes, scope) for k, v in node.items()})
    if node.get('type') == 'WithDOConv':  # the wrapped module built plain has the fused keys
        extra = {k: v for k, v in node.items()
                 if k not in ('type', 'module', 'include', 'exclude', 'doconv_cfg')}
        changes.append(f"{path}: WithDOConv -> {node['module']['type']} (plain convs)")
        return type(node)(node['module'], **extra)
    for key in [k for k in node if k == 'conv_cfg']:
        if _fusable_type(node[key], scope):
            changes.append(f'{path}.{key}: {node[key]["type"]} -> None (plain conv)')
            node[key] = None
    if any(node.get('stage_with_doconv') or ()):  # None means no DO-Conv
        changes.append(f'{path}.stage_with_doconv -> all False')
        node['stage_with_doconv'] = tuple(False for _ in node['stage_with_doconv'])
    cls = _registered(node.get('type'), scope)
    if cls is not None and 'small_kernel_merged' in _init_args(cls) and not node.get('small_kernel_merged'):
        changes.append(f'{path}.small_kernel_merged -> True')
        node['small_kernel_merged'] = True
    elif cls is not None and 'deploy' in _init_args(cls) and not node.get('deploy') and any(
            callable(getattr(cls, m, None)) for m in ('switch_to_deploy', 'reparameterize')):
        changes.append(f'{path}.deploy -> True')  # mmpretrain / mmyolo re-parameterisable models
        node['deploy'] = True
    elif cls is not None and 'in_channels' in node and _fusable_type(node, scope):
        # a DO-Conv spelled out as a whole layer (a conv_cfg, without in_channels, became None)
        conv_args = _init_args(nn.Conv2d)
        dropped = [k for k in node if k != 'type' and k not in conv_args]
        changes.append(f'{path}: {node["type"]} -> Conv2d' + (f' (dropped {dropped})' if dropped else ''))
        node = type(node)({k: v for k, v in node.items() if k not in dropped}, type='Conv2d')
    return node


def deploy_config(cfg):
    """Copy of ``cfg`` whose model builds the fused architecture; returns ``(cfg, changes)``.

    DO-Conv ``conv_cfg`` become plain convs, ``stage_with_doconv`` all False,
    ``WithDOConv`` its plain ``module``, every model accepting ``small_kernel_merged``
    gets it True and every one with a ``deploy`` argument and ``switch_to_deploy`` /
    ``reparameterize`` (mmpretrain, mmyolo) ``deploy=True``.
    """
    cfg = copy.deepcopy(cfg)
    changes = []
    cfg.model = _rewrite(cfg.model, 'model', changes, init_scope(cfg))
    cfg.load_from = None
    cfg.resume = False
    return cfg, changes


def apply_dispatch_setting(cfg, reset=False):
    """A config's ``large_dw_dispatch`` ('tuned' / 'fixed', any case), where it sets one, for
    this process (``reset``: where it sets none, ``REPARAM_MM_LARGE_DW`` decides again): the
    tools that build a model without a runner honour it as training and testing do. A value
    that is no mode, in the config or the environment, is a ConfigError now, before the data
    and the model are loaded; it used to surface at the first forward."""
    from .layers.large_kernel import _ENV_MODE, _MODES, active_dispatch_mode, set_dispatch_mode
    mode = cfg.get('large_dw_dispatch')
    if mode is None:
        if reset:
            set_dispatch_mode(None)
        try:
            active_dispatch_mode()
        except ValueError:
            raise ConfigError(f'{_ENV_MODE}={os.environ.get(_ENV_MODE)!r} is not a large-kernel '
                              f"dispatch mode: set it to one of {', '.join(_MODES)}, or unset it "
                              '(tuned).') from None
        return
    try:
        set_dispatch_mode(mode)
    except ValueError:
        raise ConfigError(f"large_dw_dispatch={mode!r} is not a large-kernel dispatch mode: use "
                          f"one of {', '.join(_MODES)} (e.g. --cfg-options large_dw_dispatch=fixed), "
                          'or leave it out (tuned).') from None


def build_model(cfg):
    """The model of ``cfg`` (mmseg or mmdet scope), built in its scope."""
    from mmengine.registry import MODELS
    init_scope(cfg)
    return MODELS.build(cfg.model)


def export_deploy(config, checkpoint, out_dir, shape=(256, 256), tolerance=1e-4, cfg_options=None):
    """Write ``<stem>_deploy.pth`` and ``<stem>_deploy.py`` to ``out_dir``; return a summary dict.

    The deploy model (built from the rewritten config, loaded strictly with
    the fused weights) must reproduce the unfused model on a random input
    within ``tolerance`` relative difference, or nothing is written.
    ``cfg_options`` (``--cfg-options``) change the config first; the deploy config keeps them.
    """
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise FileExistsError(f'{out_dir} is a file; give tools/fuse.py a folder to write the '
                              f'deploy checkpoint and config into (e.g. {out_dir}_deploy/).')
    cfg = merge_cfg_options(copy.deepcopy(load_config(config)), cfg_options)
    apply_dispatch_setting(cfg)
    stem = osp.splitext(osp.basename(cfg.filename or 'config'))[0]
    model = build_model(cfg)
    ckpt = load_checkpoint_strict(model, checkpoint)
    written_by = ((ckpt.get('meta') or {}).get('reparam_mm') or {})
    if written_by.get('deploy'):
        raise ConfigError(f'checkpoint {checkpoint} is already fused: tools/fuse.py wrote it, with '
                          f"{written_by.get('deploy_config', 'its deploy config')}; test or export "
                          'that pair as it is, or fuse the training checkpoint it came from '
                          f"({written_by.get('source_checkpoint', 'see its meta')}).")
    model.eval()
    batch = synthetic_batch(cfg, *shape)
    reference, proposals = reference_outputs(model, batch)  # a detector: both RoI heads on these

    fused, report = fuse_with_report(model)
    if not report.total:
        raise ConfigError(f'nothing to fuse: {config} builds no re-parameterisable layer (a '
                          'deploy config, or a model without DO-Conv and RepLKNet-style blocks), '
                          f'so {checkpoint} already is what tools/fuse.py would write; test, '
                          'export or deploy that pair as it is.')
    state = fused.state_dict()
    dcfg, changes = deploy_config(cfg)
    deploy = build_model(dcfg)
    check_state_dict(deploy, state, f'the fused weights of {checkpoint}')
    deploy.load_state_dict(state, strict=True)
    check = compare_outputs(reference, tensor_outputs(deploy, batch, proposals))
    if not check['same_structure'] or check['max_rel'] > tolerance:
        raise DeployCheckError(
            f"the deploy model does not reproduce the unfused one (max abs diff {check['max_abs']:.3e}, "
            f"max rel diff {check['max_rel']:.3e} > {tolerance:.0e}); nothing written -- check the "
            'fuse method (to_fused, switch_to_deploy, reparameterize, fuse) of the fused layers '
            'and the config rewrite: ' + '; '.join(changes))

    os.makedirs(out_dir, exist_ok=True)
    cfg_path = osp.join(out_dir, f'{stem}_deploy.py')
    ckpt_path = osp.join(out_dir, f'{stem}_deploy.pth')
    replaced = [p for p in (ckpt_path, cfg_path) if osp.exists(p)]
    meta = dict(ckpt.get('meta') or {})
    meta['reparam_mm'] = dict(deploy=True, deploy_config=cfg_path, source_config=cfg.filename,
                              source_checkpoint=str(checkpoint), fuse_report=report.to_dict(),
                              check=dict(check))
    torch.save(dict(meta=meta, state_dict=OrderedDict((k, v.cpu()) for k, v in state.items())),
               ckpt_path)
    dcfg.dump(cfg_path)
    return dict(config=cfg_path, checkpoint=ckpt_path, report=report, check=check, changes=changes,
                replaced=replaced)
