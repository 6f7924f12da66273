"""Speed and memory measurements behind ``tools/benchmark.py`` (see docs/benchmarks.md).

Four kinds of run, each written as one JSON document (``SCHEMA``):

* ``model``: one config, inference (``test_step``: preprocessing, forward, post-processing) or
  training (``train_step``: forward, backward, optimizer step) on a synthetic batch.
* ``compare``: two variants (two configs, or fused / unfused of one) measured alternately in one
  process, ABBA order, so machine noise hits both; ratios are B / A.
* ``doconv_layers``: ResNet-50's 3x3 convs as a plain conv, this project's ``DOConv2d``, a
  the earlier candidate composition (``DOConv2d`` over a contiguous W) and the authors' formulation
  (:class:`AuthorsDOConv2d`, kernel recomposed by an einsum every forward).
* ``large_dw``: RepLKNet's large depthwise convs at their stage shapes, through the backbone's
  dispatch point and alternatives, against a measured compute / bandwidth ceiling.

Timings are wall-clock medians over ``repeat`` runs after ``warmup`` runs (CUDA synchronised).
Nothing here asserts a timing; the tests check only the arithmetic and the schema.
"""
import contextlib
import copy
import datetime
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers.large_kernel import fft_depthwise_conv2d, fft_min_kernel

SCHEMA = 'reparam_mm.benchmark/1'
KINDS = ('model', 'compare', 'doconv_layers', 'large_dw')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- measurement primitives --------------------------------------------------------------------
def synchronize(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_calls(fn, device='cpu', repeat=5, warmup=2, min_time=0.0, max_repeat=None):
    """Seconds of each timed call of ``fn()``: ``warmup`` untimed calls, then at least
    ``repeat`` timed ones, more while their total is under ``min_time`` (capped at
    ``max_repeat``, default 50 * repeat)."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f'repeat={repeat} must be >= 1 and warmup={warmup} >= 0.')
    max_repeat = max_repeat or 50 * repeat
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    while len(times) < repeat or (sum(times) < min_time and len(times) < max_repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times_s, batch=1):
    """Latency (ms) and images/s statistics of a list of per-call seconds."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    if t.size == 0:
        raise ValueError('summarize() needs at least one timing.')
    q25, med, q75 = np.percentile(t, [25, 50, 75])
    return dict(
        n=int(t.size), median_ms=float(med), p25_ms=float(q25), p75_ms=float(q75),
        min_ms=float(t.min()), max_ms=float(t.max()),
        spread=float((q75 - q25) / med) if med > 0 else 0.0,  # IQR relative to the median
        images_per_s=float(batch * 1e3 / med) if med > 0 else float('inf'),
        times_ms=[float(x) for x in t])


def ratio_stats(times_a, times_b):
    """B / A: ratio of medians and the distribution of per-round (paired) ratios."""
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError('ratio_stats() needs two equally long, non-empty timing lists '
                         f'(got {len(times_a)} and {len(times_b)}).')
    a, b = np.asarray(times_a, np.float64), np.asarray(times_b, np.float64)
    paired = b / a
    q25, med, q75 = np.percentile(paired, [25, 50, 75])
    return dict(median_ratio=float(np.median(b) / np.median(a)), paired_median=float(med),
                paired_p25=float(q25), paired_p75=float(q75),
                paired_min=float(paired.min()), paired_max=float(paired.max()))


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or CPU peak resident set size (VmHWM).

    On Linux the CPU peak is reset before the block (``/proc/self/clear_refs``), so it is the
    block's own peak; where that is not allowed it is the process's lifetime peak
    (``reset`` is then False). ``delta_mb`` is the peak minus the usage on entry.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = self.base_mb = None
        self.reset = False

    def __enter__(self):
        if self.device.type == 'cuda':
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.reset = True
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
                self.reset = True
            except OSError:
                self.reset = False
            self.base_mb = _proc_status_mb('VmRSS')
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = _proc_status_mb('VmHWM')
            if self.peak_mb is None:  # not Linux: lifetime peak from getrusage
                import resource
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self.peak_mb = rss / 2**20 if sys.platform == 'darwin' else rss / 2**10
        return False

    def to_dict(self):
        delta = None if self.base_mb is None else max(self.peak_mb - self.base_mb, 0.0)
        kind = 'cuda_max_allocated' if self.device.type == 'cuda' else 'cpu_peak_rss'
        return dict(kind=kind, peak_mb=round(self.peak_mb, 1),
                    delta_mb=None if delta is None else round(delta, 1), reset=self.reset)


def _proc_status_mb(field):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def environment(device='cpu'):
    """What a figure depends on: versions, device, threads, commit."""
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        python=platform.python_version(), platform=platform.platform(),
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), cpu=_cpu_model(), device=str(device))
    for name in ('mmengine', 'mmcv', 'mmseg', 'mmdet'):
        mod = sys.modules.get(name)
        if mod is not None:
            env[name] = getattr(mod, '__version__', None)
    if torch.device(device).type == 'cuda':
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu=torch.cuda.get_device_name(device))
    env['git'] = _git_commit()
    return env


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit():
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def to_json(result):
    """``result`` as strict JSON text (non-finite numbers become null)."""
    import json

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        return v

    return json.dumps(clean(result), indent=1, allow_nan=False)


def new_result(kind, device, settings):
    if kind not in KINDS:
        raise ValueError(f'unknown benchmark kind {kind!r}; use one of {KINDS}.')
    return dict(schema=SCHEMA, kind=kind, env=environment(device), settings=dict(settings),
                results=[])


# -- models from configs ------------------------------------------------------------------------
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
    from mmengine.config import Config
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get('default_scope') not in ('mmseg', 'mmdet'):
        raise ValueError(f"{config}: default_scope is {cfg.get('default_scope')!r}; the benchmark "
                         "builds mmseg or mmdet models, so set default_scope to one of them.")

    def strip(d):
        if 'pretrained' in d:
            d['pretrained'] = None
        init = d.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            d['init_cfg'] = None
        elif isinstance(init, (list, tuple)):
            d['init_cfg'] = [c for c in init if c.get('type') != 'Pretrained'] or None
        if d.get('type') in ('SyncBN', 'MMSyncBN'):  # one process, no process group
            d['type'] = 'BN'

    _walk(cfg.model, strip)
    pre = cfg.model.get('data_preprocessor')
    if pre is not None and pre.get('size') is not None:
        pre['size'] = tuple(shape)
    return cfg


def build_bench_model(cfg, device='cpu', checkpoint=None, seed=0):
    """The model of ``cfg`` on ``device`` (seeded init, or a checkpoint loaded strictly)."""
    from mmengine.registry import MODELS

    from .apis import load_checkpoint_strict
    _register_scope(cfg)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint_strict(model, checkpoint)
    return model.to(device)


def _register_scope(cfg):
    import importlib
    for mod in ('backbones', 'models'):  # registers RepLKNet, DOResNet*, heads in MODELS
        importlib.import_module(f'reparam_mm.{mod}')
    scope = cfg.get('default_scope')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    return scope


def synthetic_batch(cfg, height, width, batch=1, train=False, seed=0):
    """``dict(inputs=[uint8 CHW], data_samples=[...])`` as a dataloader yields it; with
    ``train`` the samples carry random ground truth (segmentation map, or boxes + labels)."""
    g = torch.Generator().manual_seed(seed)
    scope = _register_scope(cfg)
    inputs = [torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
              for _ in range(batch)]
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), scale_factor=(1.0, 1.0), flip=False)
    samples = []
    for _ in range(batch):
        if scope == 'mmseg':
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=meta)
            if train:
                classes = _num_classes(cfg.model.decode_head, cfg)
                sample.gt_sem_seg = PixelData(data=torch.randint(
                    0, classes, (1, height, width), generator=g, dtype=torch.long))
        else:
            from mmdet.structures import DetDataSample
            from mmengine.structures import InstanceData
            sample = DetDataSample(metainfo=meta)
            if train:
                sample.gt_instances = _random_boxes(cfg, height, width, g)
                sample.ignored_instances = InstanceData(
                    bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _num_classes(head, cfg):
    heads = head if isinstance(head, (list, tuple)) else [head]
    n = heads[0].get('num_classes')
    if not isinstance(n, int):
        raise ValueError(f'{cfg.filename}: cannot read num_classes from the head config to draw '
                         'synthetic labels; set num_classes in the config.')
    return n


def _random_boxes(cfg, height, width, g, count=8):
    from mmengine.structures import InstanceData
    roi = cfg.model.get('roi_head') or {}
    if roi.get('mask_head') is not None:
        raise ValueError(f'{cfg.filename}: synthetic training batches hold boxes only; benchmark '
                         'training of box detectors (no mask head), or inference.')
    head = roi.get('bbox_head') if roi else cfg.model.get('bbox_head')
    classes = _num_classes(head, cfg)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = (0.1 + 0.2 * torch.rand(count, 2, generator=g)) * torch.tensor([width, height])
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width - 1., height - 1.]))], dim=1)
    return InstanceData(bboxes=boxes, labels=torch.randint(0, classes, (count, ), generator=g))


def parse_variant(spec, default_fuse):
    """``CONFIG`` or ``CONFIG:fused`` / ``CONFIG:unfused`` -> (config path, fuse flag)."""
    path, sep, tag = spec.rpartition(':')
    if sep and tag in ('fused', 'unfused'):
        return path, tag == 'fused'
    return spec, default_fuse


class Variant:
    """One model to time: built, moved, fused (inference) or given an optimizer (training)."""

    def __init__(self, config, fuse, mode, shape, batch, device='cpu', checkpoint=None,
                 amp=False, channels_last=False, cfg_options=None, model=None):
        from .fuse import fuse_with_report
        if mode not in ('infer', 'train'):
            raise ValueError(f"mode={mode!r} must be 'infer' or 'train'.")
        if mode == 'train' and fuse:
            raise ValueError('a fused model is the plain architecture: benchmark training with '
                             '--no-fuse (or compare with the plain-conv config).')
        self.config, self.fuse, self.mode = config, fuse, mode
        self.device, self.amp, self.batch = torch.device(device), amp, batch
        self.cfg = bench_config(config, shape, cfg_options)
        self.model = model if model is not None else build_bench_model(
            self.cfg, device, checkpoint)
        self.fuse_report = None
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
        self.data = synthetic_batch(self.cfg, *shape, batch=batch, train=mode == 'train')
        self.name = f"{os.path.splitext(os.path.basename(config))[0]}" + (
            f" ({'fused' if fuse else 'unfused'})" if mode == 'infer' else '')

    def _optim_wrapper(self):
        from mmengine.optim import build_optim_wrapper
        cfg = copy.deepcopy(self.cfg.get('optim_wrapper') or dict(
            type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9)))
        if self.amp:
            if self.device.type != 'cuda':
                raise ValueError('--amp training needs --device cuda (mmengine mixed precision '
                                 'training is CUDA-only); drop --amp on CPU.')
            cfg['type'] = 'AmpOptimWrapper'
        elif cfg.get('type') == 'AmpOptimWrapper':
            cfg['type'] = 'OptimWrapper'
            cfg.pop('loss_scale', None)
        return build_optim_wrapper(self.model, cfg)

    def _autocast(self):
        if not self.amp or self.mode == 'train':  # training: AmpOptimWrapper autocasts
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self):
        if self.mode == 'infer':
            with torch.no_grad(), self._autocast():
                return self.model.test_step(self.data)
        return self.model.train_step(self.data, self.optim_wrapper)

    def params(self):
        from .fuse import count_params
        return count_params(self.model)

    def flops(self):
        """FLOPs of the fused model in ``mode='tensor'`` (network only), or an error string."""
        return fused_flops(self.model, self.data)


def fused_flops(model, data):
    """(flops, note) of a fused eval copy of ``model`` on ``data`` (mmengine FlopAnalyzer).

    FLOP counters see DO-Conv's composed kernel only as parameters, not the kernel composition,
    so the fused model is counted: its convs are exactly the ones that run at inference. Large
    depthwise convs are traced as direct convolutions (k*k multiply-adds per output), whichever
    algorithm the dispatch runs them with: the counter does not see FFTs.
    """
    from mmengine.analysis import FlopAnalyzer

    from .fuse import fuse
    net = fuse(copy.deepcopy(model).eval())
    with torch.no_grad():
        batch = net.data_preprocessor(copy.deepcopy(data), False)

    class TensorForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, batch['data_samples'], mode='tensor')

    note = ('mmengine FlopAnalyzer, fused model, mode=tensor (network only, no post-processing), '
            'one multiply-add = 1 FLOP, large depthwise convs counted as direct convolutions')
    try:
        with warnings_off(), fft_min_kernel(10**9):
            analyzer = FlopAnalyzer(TensorForward(), (batch['inputs'], ))
            analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analyzer.total()), note
    except Exception as e:  # counting is a by-product: report why it failed, keep the timings
        return None, f'FLOP count failed: {type(e).__name__}: {str(e)[:200]}'


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def _variant_record(v, times, mem, flops=None):
    rec = dict(name=v.name, config=v.config, fused=v.fuse, mode=v.mode, params=v.params(),
               fuse_report=v.fuse_report, latency=summarize(times, v.batch), memory=mem)
    if flops is not None:
        rec['flops'], rec['flops_note'] = flops
    return rec


def run_variants(variants, repeat=5, warmup=2, count_flops=True):
    """Time ``variants`` alternately (ABBA...), warm-up included; per-variant records."""
    for v in variants:
        for _ in range(warmup):
            v.step()
    times = [[] for _ in variants]
    mems = [None] * len(variants)
    for r in range(repeat):
        order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
        for i in order:
            v = variants[i]
            with PeakMemory(v.device) as mem:
                start = time.perf_counter()
                v.step()
                synchronize(v.device)
                times[i].append(time.perf_counter() - start)
            if mems[i] is None or mem.peak_mb > mems[i]['peak_mb']:
                mems[i] = mem.to_dict()
    flops = {}  # per config: fused and unfused of one config share the fused model's count
    for v in variants if count_flops else ():
        if v.config not in flops:
            flops[v.config] = v.flops()
    return [_variant_record(v, t, m, flops.get(v.config))
            for v, t, m in zip(variants, times, mems)]


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


def output_difference(a, b):
    """Max |A - B| over the tensor outputs of both variants on A's batch (inference only)."""
    from .hooks import compare_outputs
    with torch.no_grad():
        batch = a.model.data_preprocessor(copy.deepcopy(a.data), False)
        outs = [v.model(batch['inputs'], copy.deepcopy(batch['data_samples']), mode='tensor')
                for v in (a, b)]
    return compare_outputs(*outs)


def benchmark_models(specs, mode='infer', shape=(512, 512), batch=1, device='cpu',
                     fuse=None, checkpoint=None, amp=False, channels_last=False, repeat=5,
                     warmup=2, count_flops=True, cfg_options=None):
    """One config (``kind='model'``) or two compared (``kind='compare'``); the JSON dict."""
    if len(specs) not in (1, 2):
        raise ValueError(f'benchmark one config or compare two, got {len(specs)}.')
    default_fuse = (mode == 'infer') if fuse is None else fuse
    parsed = [parse_variant(s, default_fuse) for s in specs]
    variants, built = [], {}
    for config, fused in parsed:
        # fused vs unfused of one config: the same weights, fused on a copy
        base = built.get(config)
        model = copy.deepcopy(base.model) if base is not None and not base.fuse else None
        v = Variant(config, fused, mode, shape, batch, device, checkpoint, amp, channels_last,
                    cfg_options, model=model)
        built.setdefault(config, v)
        variants.append(v)
    settings = dict(mode=mode, shape=list(shape), batch=batch, device=str(device), amp=amp,
                    channels_last=channels_last, repeat=repeat, warmup=warmup,
                    checkpoint=checkpoint, specs=list(specs))
    result = new_result('compare' if len(variants) == 2 else 'model', device, settings)
    settings = result['settings']
    if len(variants) == 2 and mode == 'infer':
        a, b = variants
        settings['same_weights'] = a.config == b.config or same_weights(a, b)
        if settings['same_weights']:  # else the outputs differ by construction
            settings['output_difference'] = output_difference(a, b)
    result['results'] = run_variants(variants, repeat, warmup, count_flops)
    if len(variants) == 2:
        a, b = (r['latency']['times_ms'] for r in result['results'])
        result['ratios'] = dict(latency_b_over_a=ratio_stats(a, b))
    return result


# -- DO-Conv: this project's layer vs the authors' formulation ------------------------------------
class AuthorsDOConv2d(nn.Module):
    """DO-Conv as formulated in the authors' reference code, for the benchmark baseline.

    Every forward adds the frozen identity to D and recomposes the kernel with one einsum
    ``'ims,ois->oim'`` over D (Cin, MN, D_mul) and W viewed as (Cout/g, Cin, D_mul), then
    convolves. Written from the paper's formula and their layout, not copied.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, D_mul=None):
        super().__init__()
        from torch.nn.modules.utils import _pair
        kh, kw = _pair(kernel_size)
        mn = kh * kw
        self.D_mul = D_mul or mn
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = (kh, kw), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.W = nn.Parameter(torch.randn(out_channels, in_channels // groups, self.D_mul) * 0.1)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if mn > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, mn, self.D_mul))
            eye = torch.eye(mn).unsqueeze(0).repeat(in_channels, 1, self.D_mul // mn)
            pad = torch.zeros(in_channels, mn, self.D_mul % mn)
            self.D_diag = nn.Parameter(torch.cat([eye, pad], dim=2), requires_grad=False)
        else:
            self.D = self.D_diag = None

    def composed_weight(self):
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.D is None:
            return self.W.reshape(shape)
        W = self.W.reshape(self.out_channels // self.groups, self.in_channels, self.D_mul)
        return torch.einsum('ims,ois->oim', self.D + self.D_diag, W).reshape(shape)

    def forward(self, x):
        return F.conv2d(x, self.composed_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def resnet50_3x3_shapes(height=512, width=512):
    """(name, channels, H, W) of the stride-1 3x3 conv of each ResNet-50 stage (stride 4..32)."""
    if min(height, width) < 32:
        raise ValueError(f'input {height}x{width} is smaller than ResNet-50\'s stride 32; use a '
                         'shape of at least 32x32.')
    return [(f'stage{i + 1}', 64 * 2**i, height // 2**(i + 2), width // 2**(i + 2))
            for i in range(4)]


def _doconv_t2d_class():
    from .layers.doconv import DOConv2d

    class DOConv2dT2D(DOConv2d):
        """``DOConv2d`` with W stored contiguous (Cout, Cin, D_mul): the earlier candidate,
        same 2-D transposes, but the bmm reads W through a transposed view."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.W = nn.Parameter(self.W.detach().contiguous())

    return DOConv2dT2D


LAYER_KEYS = ('plain', 'doconv', 'doconv_t2d', 'authors')


def doconv_layers(channels, seed=0):
    """``{key: module}`` for :data:`LAYER_KEYS` at one 3x3 C->C shape: a plain ``nn.Conv2d``,
    ``DOConv2d``, ``DOConv2d`` with the candidate composition and ``AuthorsDOConv2d``, all
    holding the same W and (random) D, so all four compute the same kernel."""
    from .layers.doconv import DOConv2d
    torch.manual_seed(seed)
    ours = DOConv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        ours.D.normal_(0, 0.05)
    t2d = _doconv_t2d_class()(channels, channels, 3, padding=1, bias=False)
    ref = AuthorsDOConv2d(channels, channels, 3, padding=1)
    plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        for m in (t2d, ref):
            m.W.copy_(ours.W)
            m.D.copy_(ours.D)
        plain.weight.copy_(ours.composed_weight())
    return dict(zip(LAYER_KEYS, (plain, ours, t2d, ref)))


def _fwd_bwd(module, x, grad):
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


def benchmark_doconv_layers(shape=(512, 512), batch=2, device='cpu', repeat=10, warmup=2,
                            min_time=0.5):
    """Forward, forward+backward and kernel-composition time of the three layers per stage."""
    settings = dict(shape=list(shape), batch=batch, device=str(device), repeat=repeat,
                    warmup=warmup, min_time=min_time)
    result = new_result('doconv_layers', device, settings)
    for name, c, h, w in resnet50_3x3_shapes(*shape):
        layers = {k: m.to(device) for k, m in doconv_layers(c).items()}
        x = torch.randn(batch, c, h, w, device=device, requires_grad=True)
        grad = torch.randn(batch, c, h, w, device=device)
        rec = dict(name=name, channels=c, height=h, width=w, batch=batch)
        for key, m in layers.items():
            t = dict(
                forward=time_calls(lambda: m(x.detach()), device, repeat, warmup, min_time),
                forward_backward=time_calls(lambda: _fwd_bwd(m, x, grad), device, repeat,
                                            warmup, min_time))
            if key != 'plain':
                t['compose'] = time_calls(m.composed_weight, device, repeat, warmup, min_time)
            rec[key] = {k: summarize(v, batch) for k, v in t.items()}
        rec['ratios'] = layer_ratios(rec)
        result['results'].append(rec)
    return result


def layer_ratios(rec):
    """Median-time ratios of each DO-Conv formulation over the plain conv and over the authors'."""
    out = {}
    for p in ('forward', 'forward_backward'):
        med = {k: rec[k][p]['median_ms'] for k in LAYER_KEYS}
        for k in LAYER_KEYS[1:]:
            out[f'{k}_over_plain_{p}'] = med[k] / med['plain']
        for k in LAYER_KEYS[1:3]:
            out[f'{k}_over_authors_{p}'] = med[k] / med['authors']
    return out


# -- RepLKNet's large depthwise conv ----------------------------------------------------------------
def replknet_dw_shapes(arch='31B', height=512, width=512):
    """(name, channels, H, W, kernel) of each stage's large depthwise conv."""
    if min(height, width) < 32:
        raise ValueError(f'input {height}x{width} is smaller than RepLKNet\'s stride 32; use a '
                         'shape of at least 32x32.')
    from .backbones.replknet import RepLKNet  # arch table, needs mmcv
    a = RepLKNet.arch_settings[arch]
    dw = [int(c * a['dw_ratio']) for c in a['channels']]
    return [(f'stage{i + 1}', c, height // 2**(i + 2), width // 2**(i + 2), k)
            for i, (c, k) in enumerate(zip(dw, a['large_kernel_sizes']))]


def dw_conv_cost(batch, channels, height, width, kernel, elem_bytes):
    """(FLOPs, minimum bytes) of one stride-1 'same' depthwise conv forward.

    FLOPs count a multiply-add as 2 (hardware convention, unlike mmengine's counter);
    the minimum traffic reads input and weight once and writes the output once.
    """
    flops = 2 * batch * channels * height * width * kernel * kernel
    traffic = (2 * batch * channels * height * width + channels * kernel * kernel) * elem_bytes
    return flops, traffic


def machine_ceilings(device='cpu', dtype=torch.float32, size=None):
    """Measured peak GEMM FLOP/s and copy bandwidth (bytes/s) of ``device`` in ``dtype``.

    A depthwise conv cannot beat either; on GPUs the half-precision GEMM peak uses tensor
    cores, which a depthwise conv cannot, so the compute bound there is loose.
    """
    dev = torch.device(device)
    n = size or (4096 if dev.type == 'cuda' else 1024)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = min(time_calls(lambda: torch.mm(a, b), dev, repeat=5, warmup=2, min_time=0.5))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    numel = (256 if dev.type == 'cuda' else 64) * 2**20 // a.element_size()
    src = torch.empty(numel, device=dev, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    tc = min(time_calls(lambda: dst.copy_(src), dev, repeat=5, warmup=2, min_time=0.5))
    return dict(gemm_flops_per_s=2 * n**3 / t, copy_bytes_per_s=2 * src.numel() *
                src.element_size() / tc, gemm_size=n, copy_mb=src.numel() * src.element_size()
                / 2**20)


def dw_candidates(device):
    """name -> (layout of the input handed in, function(x, w, padding))."""
    from .layers.large_kernel import large_depthwise_conv2d

    def direct(x, w, p):
        return F.conv2d(x, w, None, 1, p, 1, x.shape[1])

    cands = {
        'dispatch': ('nchw', lambda x, w, p: large_depthwise_conv2d(x, w, None, 1, p)),
        'dispatch_cl': ('channels_last', lambda x, w, p: large_depthwise_conv2d(x, w, None, 1, p)),
        'nchw_conv2d': ('nchw', direct),
        'cl_conv2d': ('channels_last', direct),
        'fft': ('nchw', lambda x, w, p: fft_depthwise_conv2d(x, w, None, p)),
    }
    if torch.device(device).type == 'cuda':  # dispatch == F.conv2d there
        for name in ('nchw_conv2d', 'cl_conv2d'):
            cands.pop(name)
    return cands


DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def benchmark_large_dw(arch='31B', shape=(512, 512), batch=1, device='cpu', dtypes=('fp32', ),
                       candidates=None, repeat=3, warmup=1, min_time=1.0, backward=True):
    """Forward (and forward+backward) time of each large depthwise conv per candidate and dtype,
    with the roofline bound ``max(FLOPs / GEMM peak, bytes / copy bandwidth)``."""
    dev = torch.device(device)
    all_cands = dw_candidates(dev)
    names = list(candidates or all_cands)
    unknown = [n for n in names if n not in all_cands]
    if unknown:
        raise ValueError(f'unknown large-DW candidates {unknown}; on {dev.type} use '
                         f'{list(all_cands)}.')
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f'unknown dtypes {bad}; use {list(DTYPES)}.')
    settings = dict(arch=arch, shape=list(shape), batch=batch, device=str(dev),
                    dtypes=list(dtypes), candidates=names, repeat=repeat, warmup=warmup,
                    min_time=min_time, backward=backward)
    result = new_result('large_dw', dev, settings)
    result['ceilings'] = {d: machine_ceilings(dev, DTYPES[d]) for d in dtypes}
    for dname in dtypes:
        dtype, ceil = DTYPES[dname], result['ceilings'][dname]
        for stage, c, h, w, k in replknet_dw_shapes(arch, *shape):
            flops, traffic = dw_conv_cost(batch, c, h, w, k, torch.finfo(dtype).bits // 8)
            bound = max(flops / ceil['gemm_flops_per_s'], traffic / ceil['copy_bytes_per_s'])
            base = dict(stage=stage, channels=c, height=h, width=w, kernel=k, batch=batch,
                        dtype=dname, flops=flops, min_bytes=traffic, bound_ms=bound * 1e3,
                        # backward = two more convolutions of the same size (input, weight grads)
                        bound_fwd_bwd_ms=3 * bound * 1e3,
                        bound_by='compute' if flops / ceil['gemm_flops_per_s'] >=
                        traffic / ceil['copy_bytes_per_s'] else 'bandwidth')
            for cand in names:
                rec = dict(base, candidate=cand, layout=all_cands[cand][0])
                rec.update(_time_dw(all_cands[cand], dev, dtype, batch, c, h, w, k, repeat,
                                    warmup, min_time, backward))
                if rec.get('forward'):
                    fwd = rec['forward']['median_ms']
                    rec['forward_gflops'] = flops / fwd / 1e6
                    rec['forward_over_bound'] = fwd / rec['bound_ms']
                if rec.get('forward_backward'):
                    rec['forward_backward_over_bound'] = (
                        rec['forward_backward']['median_ms'] / rec['bound_fwd_bwd_ms'])
                result['results'].append(rec)
    return result


def _time_dw(cand, dev, dtype, batch, c, h, w, k, repeat, warmup, min_time, backward):
    layout, fn = cand
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    g = torch.Generator(device='cpu').manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(c, 1, k, k, generator=g) * 0.02).to(dev, dtype)
    if layout == 'channels_last':
        wt = wt.contiguous(memory_format=torch.channels_last)
    pad = k // 2
    out = {}
    try:
        with torch.no_grad():
            out['forward'] = summarize(time_calls(lambda: fn(x, wt, pad), dev, repeat, warmup,
                                                  min_time), batch)
        if backward:
            xg, wg = x.clone().requires_grad_(), wt.clone().requires_grad_()
            gy = torch.randn_like(fn(x, wt, pad))

            def step():
                xg.grad = wg.grad = None
                fn(xg, wg, pad).backward(gy)

            out['forward_backward'] = summarize(time_calls(step, dev, repeat, warmup, min_time),
                                                batch)
    except RuntimeError as e:  # e.g. an FFT size or dtype a backend does not support
        out.setdefault('forward', None)
        out['error'] = f'{type(e).__name__}: {str(e)[:200]}'
    return out
