"""Models built from configs, timed: one config (``kind='model'``), or two compared in one
process (``kind='compare'``), inference (``test_step``: preprocessing, forward,
post-processing) or training (``train_step``: forward, backward, optimizer step) on a
synthetic batch. Two variants are measured alternately, ABBA order, so machine noise hits
both; ratios are B / A.
"""
import contextlib
import copy
import functools
import os
import re
import time

import numpy as np
import torch

from reparam_mm.amp import cast_mmcv_ops_to_fp32
from reparam_mm.apis import build_model
from reparam_mm.batches import synthetic_batch
from reparam_mm.checkpoint import load_checkpoint_strict
from reparam_mm.complexity import count_macs
from reparam_mm.cpu_malloc import kept_freed_memory, release_freed_memory
from reparam_mm.fuse import count_params, fuse, fuse_with_report
from reparam_mm.head_layout import tune_head_layouts
from reparam_mm.outputs import compare_models
from reparam_mm.scope import CONFIG_SUFFIXES, ConfigError, init_scope, load_config, merge_cfg_options
from reparam_mm.train import sync_bn_as_bn

from .doconv_profile import breakdown
from .measure import (KernelTime, PeakMemory, cpu_timing, new_result, ratio_stats, ratio_warning,
                      record_cpu_load, summarize, synchronize, warnings_off)


def _walk(node, fn):
    """Apply ``fn`` to every dict in a nested config, children first."""
    if isinstance(node, dict):
        for v in node.values():
            _walk(v, fn)
        fn(node)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def bench_config(config, shape, cfg_options=None):
    """The config as benchmarked: no pretrained weights, BN for SyncBN, the preprocessor
    padding to ``shape`` (H, W) instead of the training crop."""
    cfg = load_config(config) if isinstance(config, str) else copy.deepcopy(config)
    merge_cfg_options(cfg, cfg_options)  # a misspelt key is refused, as by the other tools
    init_scope(cfg)

    def strip(d):
        if 'pretrained' in d:
            d['pretrained'] = None
        init = d.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            d['init_cfg'] = None
        elif isinstance(init, (list, tuple)):
            d['init_cfg'] = [c for c in init if c.get('type') != 'Pretrained'] or None

    _walk(cfg.model, strip)
    sync_bn_as_bn(cfg.model)  # one process, no process group
    pre = cfg.model.get('data_preprocessor')
    if pre is not None and pre.get('size') is not None:
        pre['size'] = tuple(shape)
    return cfg


@functools.lru_cache(maxsize=8)
def _is_deploy_checkpoint(checkpoint):
    """Whether tools/fuse.py wrote ``checkpoint`` (its meta says so): such a model has nothing
    to fuse, and was labelled 'unfused' under that suffix."""
    from reparam_mm.apis import tested_model
    from reparam_mm.checkpoint import read_checkpoint
    return tested_model(read_checkpoint(checkpoint).get('meta')) == 'deploy'


def build_bench_model(cfg, device='cpu', checkpoint=None, seed=0):
    """The model of ``cfg`` on ``device`` (seeded init, or a checkpoint loaded strictly)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    if checkpoint:
        load_checkpoint_strict(model, checkpoint)
    return model.to(device)


#: a variant tag: the neck and heads keep NCHW weights instead of their tuned layout
NCHW_HEADS = ':nchw-heads'


def split_head_tag(spec):
    """``SPEC`` or ``SPEC:nchw-heads`` -> (SPEC, whether the neck and heads are layout-tuned)."""
    if spec.endswith(NCHW_HEADS):
        return spec[:-len(NCHW_HEADS)], False
    return spec, True


#: what a variant may append to its config
FUSE_TAGS = (':fused', ':unfused')
# a config file's name, then ':' and what follows it (a Windows drive's 'C:' is no config name)
_TAGGED_CONFIG = re.compile(r'^(.*?(?:%s)):(.*)$' % '|'.join(map(re.escape, CONFIG_SUFFIXES)),
                            re.IGNORECASE)


def parse_variant(spec, default_fuse):
    """``CONFIG`` or ``CONFIG:fused`` / ``CONFIG:unfused`` -> (config path, fuse flag).

    Any other ``:suffix`` after a config file's name is refused by name: read as part of the
    path, a misspelt ``:fuzed`` was reported as a config file that does not exist."""
    path, sep, tag = spec.rpartition(':')
    if sep and f':{tag}' in FUSE_TAGS:
        return path, tag == 'fused'
    tagged = _TAGGED_CONFIG.match(spec)
    if tagged and not os.path.exists(spec):
        known = FUSE_TAGS + (NCHW_HEADS,)
        unknown = next(t for t in tagged.group(2).split(':') if f':{t}' not in known)
        raise ConfigError(f'{spec}: unknown variant suffix :{unknown}; a variant is CONFIG with '
                          f"optionally one of {', '.join(FUSE_TAGS)}, then optionally "
                          f'{NCHW_HEADS} (e.g. {tagged.group(1)}:fused{NCHW_HEADS}).')
    return spec, default_fuse


class Variant:
    """One model to time: built, moved, fused (inference) or given an optimizer (training)."""

    def __init__(self, config, fuse, mode, shape, batch, device='cpu', checkpoint=None,
                 amp=False, channels_last=False, cfg_options=None, model=None, tune_heads=True):
        if mode not in ('infer', 'train'):
            raise ValueError(f"mode={mode!r} must be 'infer' or 'train'.")
        if mode == 'train' and fuse:
            raise ConfigError(f'{config}: a fused model is the plain architecture, so training is '
                              'benchmarked unfused: drop --fuse and the :fused suffix (or compare '
                              'with the plain-conv config).')
        self.config, self.fuse, self.mode = config, fuse, mode
        self.deploy = bool(checkpoint) and _is_deploy_checkpoint(checkpoint)
        self.device, self.amp, self.batch = torch.device(device), amp, batch
        self.cfg = bench_config(config, shape, cfg_options)
        self.model = model if model is not None else build_bench_model(
            self.cfg, device, checkpoint)
        self.fuse_report = None
        if amp and self.device.type == 'cpu':
            cast_mmcv_ops_to_fp32()  # detectors: nms, RoIAlign under bf16 autocast
        if mode == 'infer':
            self.model.eval()
            if fuse:
                self.model, report = fuse_with_report(self.model)
                self.fuse_report = report.to_dict()
        else:
            self.model.train()
            self.optim_wrapper = self._optim_wrapper()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        elif tune_heads:  # as tools/train.py, tools/test.py and tools/infer.py run it
            tune_head_layouts(self.model)
        self.data = synthetic_batch(self.cfg, *shape, batch=batch, train=mode == 'train')
        kind = 'deploy' if self.deploy else 'fused' if fuse else 'unfused'
        self.name = f"{os.path.splitext(os.path.basename(config))[0]}" + (
            f" ({kind}{'' if tune_heads else ', NCHW heads'})"
            if mode == 'infer' else '' if tune_heads else ' (NCHW heads)')

    def _optim_wrapper(self):
        from mmengine.optim import build_optim_wrapper
        cfg = copy.deepcopy(self.cfg.get('optim_wrapper') or dict(
            type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9)))
        if cfg.get('type') in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
            cfg['type'] = 'OptimWrapper'  # --amp decides, as tools/train.py's does
            cfg.pop('loss_scale', None)
            cfg.pop('dtype', None)
        if self.amp:  # fp16 with a loss scale on CUDA, bf16 autocast on CPU
            cfg['type'] = 'AmpOptimWrapper' if self.device.type == 'cuda' else 'CPUAmpOptimWrapper'
        return build_optim_wrapper(self.model, cfg)

    def hold_weights(self):
        """Learning rate 0 from now on: every step still runs the optimizer's full update (the
        work to time), but the weights stay where they are, so two models started as one
        function (:func:`same_start`) stay one function through the timed steps."""
        for group in self.optim_wrapper.optimizer.param_groups:
            group['lr'] = 0.0

    def _autocast(self):
        if not self.amp or self.mode == 'train':  # training: AmpOptimWrapper autocasts
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self):
        if self.mode == 'infer':
            with torch.no_grad(), self._autocast():
                return self.model.test_step(self.data)
        try:
            return self.model.train_step(self.data, self.optim_wrapper)
        except ValueError as e:  # torch's BatchNorm on one value per channel (UperNet's 1x1 pooling)
            if 'Expected more than 1 value per channel' not in str(e) or self.batch > 1:
                raise
            raise ConfigError(f'{self.config}: --mode train with --batch 1: a BatchNorm layer of the '
                              'model sees one value per channel (a 1x1 pooled branch, as in '
                              "UperNet's), which torch refuses in training; use --batch 2 or more.") from None

    def params(self):
        return count_params(self.model)

    def flops(self):
        """FLOPs of the fused model in ``mode='tensor'`` (network only), or an error string."""
        return fused_flops(self.model, self.data)


def fused_flops(model, data):
    """(multiply-adds, note) of a fused eval copy of ``model`` on ``data``: the library's count
    (``reparam_mm.complexity.count_macs``), what ``tools/get_flops.py`` prints. DO-Conv's kernel
    composition is training-time work, so the fused model is counted: its convs are exactly the
    ones that run at inference."""
    net = fuse(copy.deepcopy(model).eval())
    with torch.no_grad():
        batch = net.data_preprocessor(copy.deepcopy(data), False)
    note = ('reparam_mm.complexity.count_macs: fused model, test-time forward, multiply-adds of '
            'convolutions and matrix products (large depthwise convs counted as direct ones)')
    try:
        with warnings_off():
            return count_macs(net, batch['inputs'], batch['data_samples']), note
    except Exception as e:  # counting is a by-product: report why it failed, keep the timings
        return None, f'FLOP count failed: {type(e).__name__}: {str(e)[:200]}'


def _variant_record(v, times, mem, flops=None):
    rec = dict(name=v.name, config=v.config, fused=v.fuse, mode=v.mode, params=v.params(),
               fuse_report=v.fuse_report, latency=summarize(times, v.batch), memory=mem)
    if flops is not None:
        rec['flops'], rec['flops_note'] = flops
    return rec


def _timed_rounds(variants, repeat):
    """``repeat`` rounds, alternating order: per variant its seconds, peak memory and
    KernelTime of each run."""
    times = [[] for _ in variants]
    mems = [None] * len(variants)
    kernel = [[] for _ in variants]  # per run: its KernelTime (page faults, system seconds)
    for r in range(repeat):
        order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
        for i in order:
            v = variants[i]
            with PeakMemory(v.device) as mem, KernelTime() as k:
                start = time.perf_counter()
                v.step()
                synchronize(v.device)
                times[i].append(time.perf_counter() - start)
            kernel[i].append(k)
            if mems[i] is None or mem.peak_mb > mems[i]['peak_mb']:
                mems[i] = mem.to_dict()
    return times, mems, kernel


def run_variants(variants, repeat=5, warmup=2, count_flops=True):
    """Time ``variants`` alternately (ABBA...), warm-up included: (per-variant records, what
    :func:`~.measure.cpu_timing` measured of other processes' CPU use in the timed rounds)."""
    for v in variants:
        for _ in range(warmup):
            v.step()
    load = cpu_timing(variants[0].device)
    with load or contextlib.nullcontext():
        times, mems, kernel = _timed_rounds(variants, repeat)
    for i, runs in enumerate(kernel):
        if all(k.minor_faults is not None for k in runs):
            mems[i].update(minor_faults_median=int(np.median([k.minor_faults for k in runs])),
                           system_s_median=round(float(np.median([k.system_s for k in runs])), 3))
    if len(variants) > 1 and all(v.device.type == 'cuda' for v in variants):
        # CUDA's peak counts every tensor allocated, the other variants' weights, gradients and
        # optimizer state too: each variant's own peak leaves those out (the README's GPU table)
        for mem, held_mb in zip(mems, held_by_others_mb([resident_storages(v) for v in variants])):
            mem.update(others_mb=round(held_mb, 1), own_peak_mb=round(mem['peak_mb'] - held_mb, 1))
    if kept_freed_memory():  # the timed runs' resident size is the retained heap, not their use:
        for i, v in enumerate(variants):  # measure each peak in one more run from a trimmed heap
            release_freed_memory()
            with PeakMemory(v.device) as mem:
                v.step()
            mems[i].update(mem.to_dict(), measured='untimed run after malloc_trim(0)')
    flops = {}  # per config: fused and unfused of one config share the fused model's count
    for v in variants if count_flops else ():
        if v.config not in flops:
            flops[v.config] = v.flops()
    return [_variant_record(v, t, m, flops.get(v.config))
            for v, t, m in zip(variants, times, mems)], load


def resident_storages(variant):
    """{storage address: bytes} of what a variant keeps between steps: its model's parameters,
    buffers and gradients, and its optimizer's state."""
    tensors = [*variant.model.parameters(), *variant.model.buffers()]
    tensors += [p.grad for p in variant.model.parameters() if p.grad is not None]
    wrapper = getattr(variant, 'optim_wrapper', None)
    if wrapper is not None:
        tensors += [t for state in wrapper.optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def held_by_others_mb(held):
    """Per variant, the MiB the other variants keep (:func:`resident_storages` of each),
    storages it shares with them not counted."""
    out = []
    for i, own in enumerate(held):
        others = {ptr: size for j, h in enumerate(held) if j != i for ptr, size in h.items()
                  if ptr not in own}
        out.append(sum(others.values()) / 2**20)
    return out


def same_weights(a, b):
    """Load A's (fused) weights into B when the state dicts match exactly; True if done.

    A fused DO-Conv model and the plain-conv model then compute the same outputs, so only the
    graph is compared, not what random weights make detection post-processing do.
    """
    sa, sb = a.model.state_dict(), b.model.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return False
    b.model.load_state_dict(sa, strict=True)
    return True


def same_start(a, b):
    """Load A's weights into B when B is A over-parameterised (B's DO-Conv layers take A's
    plain ``weight`` into W with D = 0: only D keys missing); True if done, else B is untouched.

    For training, B then starts as the same function as A: a detector's proposals, and so the
    cost of RoI pooling (which grows with the RoIs' size), are the same in both, and the ratio
    measures the DO-Conv work instead of what different random weights make the RPN propose.
    """
    state, before = a.model.state_dict(), copy.deepcopy(b.model.state_dict())
    try:
        result = b.model.load_state_dict(state, strict=False)
    except RuntimeError:  # shape mismatches
        result = None
    if result is None or result.unexpected_keys or not all(
            k.endswith('.D') for k in result.missing_keys):
        b.model.load_state_dict(before, strict=True)
        return False
    return True


def output_difference(a, b):
    """Max |A - B| over the tensor outputs of both variants on A's batch (inference only)."""
    return compare_models(a.model, b.model, copy.deepcopy(a.data))


def benchmark_models(specs, mode='infer', shape=(512, 512), batch=1, device='cpu',
                     fuse=None, checkpoint=None, amp=False, channels_last=False, repeat=5,
                     warmup=2, count_flops=True, cfg_options=None):
    """One config (``kind='model'``) or two compared (``kind='compare'``); the JSON dict."""
    if len(specs) not in (1, 2):
        raise ValueError(f'benchmark one config or compare two, got {len(specs)}.')
    default_fuse = (mode == 'infer') if fuse is None else fuse
    parsed = [(*parse_variant(spec, default_fuse), tune) for spec, tune in map(split_head_tag, specs)]
    checkpoints = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    if len(checkpoints) not in (1, len(parsed)):
        raise ConfigError(f'give one checkpoint, or one per variant ({len(parsed)}), not '
                          f'{len(checkpoints)}.')
    checkpoints *= len(parsed) // len(checkpoints)
    variants, built = [], {}
    for (config, fused, tune_heads), weights in zip(parsed, checkpoints):
        # fused vs unfused of one config and checkpoint: the same weights, fused on a copy
        base = built.get((config, weights))
        model = copy.deepcopy(base.model) if base is not None and not base.fuse else None
        v = Variant(config, fuse=fused, mode=mode, shape=shape, batch=batch, device=device,
                    checkpoint=weights, amp=amp, channels_last=channels_last,
                    cfg_options=cfg_options, model=model, tune_heads=tune_heads)
        built.setdefault((config, weights), v)
        variants.append(v)
    checkpoint = checkpoints[0] if len(set(checkpoints)) == 1 else checkpoints
    settings = dict(mode=mode, shape=list(shape), batch=batch, device=str(device), amp=amp,
                    channels_last=channels_last, repeat=repeat, warmup=warmup,
                    checkpoint=checkpoint, specs=list(specs), cfg_options=cfg_options or None)
    result = new_result('compare' if len(variants) == 2 else 'model', device, settings)
    settings = result['settings']
    if len(variants) == 2 and mode == 'infer':
        a, b = variants
        # each its own checkpoint (a training and a deploy one): compared as loaded, never one
        # loaded into the other (a fused A's weights fit a deploy B, and hid a wrong deploy file)
        own = len(set(checkpoints)) == 2 and None not in checkpoints
        settings['same_weights'] = not own and (a.config == b.config or same_weights(a, b))
        settings['own_checkpoints'] = own
        if settings['same_weights'] or own:  # else the outputs differ by construction
            settings['output_difference'] = output_difference(a, b)
    if len(variants) == 2 and mode == 'train' and variants[0].config != variants[1].config:
        settings['same_start'] = same_start(*variants)
        if settings['same_start']:  # keep them one function: the steps then differ by DO-Conv only
            for v in variants:
                v.hold_weights()
            settings['weights_held'] = True
    result['results'], load = run_variants(variants, repeat, warmup, count_flops)
    record_cpu_load(result, load)
    if len(variants) == 2 and all(v.deploy for v in variants) and variants[0].config == variants[1].config:
        result.setdefault('warnings', []).append(
            f'both variants are the deploy model of {variants[0].config} (tools/fuse.py wrote its '
            'checkpoint: nothing is left to fuse or unfuse), so this compares the model with itself; '
            'compare the training config and checkpoint with their deploy pair (--checkpoint '
            'TRAINING.pth --checkpoint DEPLOY.pth).')
    if len(variants) == 2:
        a, b = (r['latency']['times_ms'] for r in result['results'])
        result['ratios'] = dict(latency_b_over_a=ratio_stats(a, b))
        warning = ratio_warning(result['ratios']['latency_b_over_a'])
        if warning:
            result.setdefault('warnings', []).append(warning)
    if settings.get('weights_held'):  # a plain and a DO-Conv model, one function: split B - A
        result['breakdown'] = breakdown(
            variants, [r['latency']['median_ms'] for r in result['results']], min(repeat, 5))
    return result
