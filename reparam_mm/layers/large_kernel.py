"""The one place where large depthwise convolutions are computed: an autotuned dispatch.

Every large-kernel depthwise conv of the backbones (RepLKNet's ``lkb_origin.conv`` while
training and ``lkb_reparam`` after fusing, UniRepLKNet's large kernels) is a
:class:`LargeKernelDWConv2d`, whose forward calls :func:`large_depthwise_conv2d`. That function
computes the call with one of several **candidates**, all equal to
``F.conv2d(x, w, b, stride, padding, dilation, groups=C)`` within float rounding:

* ``direct_nchw`` / ``direct_channels_last``: ``F.conv2d`` (oneDNN on CPU, cuDNN on CUDA) with
  the input in that memory layout;
* ``fft``: a correlation through real FFTs (stride 1, undilated; half precision is computed in
  fp32 and cast back), whose cost follows the image, not the kernel area;
* ``triton``: the Triton kernels of :mod:`reparam_mm.layers.triton_dw` (CUDA, or Triton's
  interpreter).

**Tuned mode** (the default) picks per call *signature* (device, dtype, layout, N, C, the size
buckets of H and W, kernel, stride, padding, dilation, whether gradients are needed) the fastest
candidate by timing each once, as ``torch.backends.cudnn.benchmark`` does, except that sizes
within 1.19x of each other share a timing (:func:`size_bucket`) and, on CPU, a candidate far
behind at every nearby timed size is not run (:meth:`LargeDWTuner.hopeless_nearby`). The choice
is kept in memory and in a JSON file (``$REPARAM_MM_CACHE/large_dw_tuning.json``, default
``~/.cache/reparam_mm``) keyed by the device name and library versions, so a machine times a
signature once (a timing during which other processes used the CPUs it needs is timed again by
the next process: :class:`LargeDWTuner`).
The layout a whole backbone runs in is tuned the same way (:func:`backbone_layout`).
**Fixed mode** applies rules measured on one CPU (:func:`fixed_choice`); choose it with
``REPARAM_MM_LARGE_DW=fixed``, a config's top-level ``large_dw_dispatch = 'fixed'``, or
:func:`dispatch_mode`.

Some candidates are never timed: oneDNN's half-precision channels_last depthwise conv stalls for
minutes (inside its JIT kernel generation) on Intel CPUs with AMX when a kernel wider than 7 is
padded beyond ``k // 2`` (the output larger than the input), and on AMD EPYC (AVX512-BF16) in
bf16 with at most 16 channels and a kernel side of 15 or more, at any padding; such calls run
NCHW (:func:`candidates`). While exporting (ONNX, ``torch.jit`` tracing) or compiling, calls run
plain ``F.conv2d`` so graphs hold a standard Conv. Measurements behind the rules: docs/benchmarks.md section 4; the design:
docs/large_kernel.md.
"""
import contextlib
import copy
import functools
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cpu_load
from ..cpu_malloc import kept_freed_memory

__all__ = ['CHANNELS_LAST_MIN_KERNEL', 'FFT_MIN_KERNEL', 'SIZE_BUCKET_MIN', 'CANDIDATES',
           'candidates',
           'fixed_choice', 'choose', 'dispatch_mode', 'set_dispatch_mode', 'active_dispatch_mode', 'forced_candidate',
           'use_channels_last', 'use_fft', 'backbone_channels_last', 'backbone_layout',
           'forward_in_best_layout', 'times_on_a_copy', 'collective_free_copy',
           'layout_signature', 'fft_min_kernel', 'cpu_native_half', 'SOFT_HALF_FFT_MIN_KERNEL',
           'fft_depthwise_conv2d', 'triton_depthwise_conv2d', 'large_depthwise_conv2d',
           'LargeKernelDWConv2d', 'LargeDWTuner', 'TUNER', 'signature', 'size_bucket',
           'shape_label']

#: fixed rule: smallest kernel side for which CPU calls run channels_last (oneDNN's NCHW
#: depthwise kernel is fast only up to 9x9)
CHANNELS_LAST_MIN_KERNEL = 11
#: fixed rule: smallest kernel side for which CPU fp32/fp64 calls (and half-precision ones that
#: are differentiated) are computed through FFTs
FFT_MIN_KERNEL = 27
#: half-precision channels_last calls with a kernel side above this, padded beyond k // 2, stall
#: oneDNN on AMX CPUs; 7x7 and 7x5 were measured safe there
_CL_HALF_OVERPAD_MAX_KERNEL = 7
#: half-precision channels_last calls on at most this many channels with a kernel side above
#: _CL_HALF_FEW_CHANNELS_MAX_KERNEL stall oneDNN on AMD EPYC (AVX512-BF16) at any padding, on
#: wide enough inputs (where the rule ends was measured: docs/large_kernel.md)
_CL_HALF_FEW_CHANNELS = 16
_CL_HALF_FEW_CHANNELS_MAX_KERNEL = 13
#: spatial sizes from this one on share a tuning signature with their neighbours in a size
#: bucket (:func:`size_bucket`): the fastest candidate follows the kernel, dtype and layout, and
#: barely the image size, so images of many sizes need not each pay for a timing
SIZE_BUCKET_MIN = 16
#: size buckets per doubling of the size (neighbours within 2 ** (1/4) = 1.19x share one)
SIZE_BUCKETS_PER_OCTAVE = 4
#: fixed rule: on a CPU without native half precision (AVX2 only: no AVX512-BF16, AMX or
#: AVX512-FP16), the smallest kernel side for which half-precision calls run through FFTs in
#: inference too, since oneDNN computes them in software there (docs/benchmarks.md)
SOFT_HALF_FFT_MIN_KERNEL = 13
_FFT_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_MODES = ('tuned', 'fixed')
_ENV_MODE = 'REPARAM_MM_LARGE_DW'


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# -- candidates --------------------------------------------------------------------------------
def _fast_fft_size(n):
    """Smallest 2-3-5-smooth integer >= n (sizes FFT libraries handle fastest)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_depthwise_conv2d(x, weight, bias=None, padding=0):
    """Depthwise cross-correlation (``F.conv2d(..., groups=C)``, stride 1) through real FFTs.

    The padded input is transformed at a 2-3-5-smooth size of at least its own: the circular
    correlation then has no wrap-around in the ``H - kh + 1`` rows (and columns) kept. Half
    precision is computed in fp32 and cast back (CPU FFTs have no half kernels, cuFFT only
    power-of-two half ones). Output is NCHW-contiguous.
    """
    c, kh, kw = weight.shape[0], weight.shape[-2], weight.shape[-1]
    if weight.dim() != 4 or weight.shape[1] != 1 or x.shape[1] != c:
        raise ValueError(f'fft_depthwise_conv2d expects a (C, 1, kh, kw) weight with C = input '
                         f'channels {x.shape[1]}, got {tuple(weight.shape)}.')
    ph, pw = _pair(padding)
    h, w = x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw
    oh, ow = h - kh + 1, w - kw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f'kernel {kh}x{kw} is larger than the padded input {h}x{w}.')
    dtype = x.dtype
    if dtype in _HALF_DTYPES:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    fh, fw = _fast_fft_size(h), _fast_fft_size(w)
    xf = torch.fft.rfft2(F.pad(x, (pw, pw, ph, ph)), s=(fh, fw))
    wf = torch.fft.rfft2(weight[:, 0], s=(fh, fw))
    out = torch.fft.irfft2(xf * wf.conj(), s=(fh, fw))[..., :oh, :ow]
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out.to(dtype).contiguous()


def triton_depthwise_conv2d(x, weight, bias=None, padding=None):
    """Depthwise conv through Triton kernels (see :mod:`reparam_mm.layers.triton_dw`)."""
    from .triton_dw import triton_depthwise_conv2d as run
    return run(x, weight, bias, padding)


def _triton_available(x):
    try:
        from .triton_dw import triton_available
    except ImportError:
        return False
    return triton_available(x)


def _in_layout(out, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def _direct(layout):
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format

    def run(x, weight, bias, stride, padding, dilation):
        return F.conv2d(x.contiguous(memory_format=fmt), weight, bias, stride, padding, dilation,
                        x.shape[1])
    run.__name__ = f'direct_{layout}'
    return run


def _fft(x, weight, bias, stride, padding, dilation):
    return fft_depthwise_conv2d(x, weight, bias, padding)


def _triton(x, weight, bias, stride, padding, dilation):
    return triton_depthwise_conv2d(x, weight, bias, padding)


#: name -> ``fn(x, weight, bias, stride, padding, dilation)``; output layout is fixed by the caller
CANDIDATES = {'direct_nchw': _direct('nchw'), 'direct_channels_last': _direct('channels_last'),
              'fft': _fft, 'triton': _triton}


def _stalls_onednn(x, kernel_size, padding):
    """A half-precision channels_last call that stalls oneDNN on some CPU (module docstring)."""
    if x.device.type != 'cpu' or x.dtype not in _HALF_DTYPES:
        return False
    if x.dim() == 4 and x.shape[1] <= _CL_HALF_FEW_CHANNELS \
            and max(kernel_size) > _CL_HALF_FEW_CHANNELS_MAX_KERNEL:
        return True  # AMD EPYC, any padding
    if isinstance(padding, str):
        return False
    return any(k > _CL_HALF_OVERPAD_MAX_KERNEL and 2 * p > k - 1  # AMX, padded beyond k // 2
               for k, p in zip(kernel_size, _pair(padding)))


def _fft_fits(x, kernel_size, stride, padding, dilation):
    if isinstance(padding, str) or _pair(stride) != (1, 1) or _pair(dilation) != (1, 1):
        return False
    ph, pw = _pair(padding)
    return (x.shape[-2] + 2 * ph >= kernel_size[0] and x.shape[-1] + 2 * pw >= kernel_size[1]
            and x.dtype in _FFT_DTYPES + _HALF_DTYPES)


def candidates(x, kernel_size, stride=1, padding=0, dilation=1):
    """Names of the candidates that may compute this call on ``x``'s device, safe ones only."""
    if x.dim() != 4 or x.device.type == 'meta':
        return ['direct_nchw']
    names = ['direct_nchw']
    if not _stalls_onednn(x, kernel_size, padding):
        names.append('direct_channels_last')
    if x.device.type in ('cpu', 'cuda') and _fft_fits(x, kernel_size, stride, padding, dilation):
        names.append('fft')
    # on CPU tensors Triton runs only in its interpreter (tests): never timed, only when forced
    triton_device = x.device.type == 'cuda' or _state['forced'] == 'triton'
    if (triton_device and _pair(stride) == (1, 1) and _pair(dilation) == (1, 1)
            and not isinstance(padding, str) and x.dtype in (torch.float32,) + _HALF_DTYPES
            and _triton_available(x)):
        names.append('triton')
    return names


@functools.lru_cache(maxsize=None)
def cpu_native_half(dtype) -> bool:
    """Whether oneDNN runs ``dtype`` (bf16 / fp16) convs natively on this CPU rather than in
    software (an AVX2-only CPU); read once from torch."""
    check = {torch.bfloat16: '_is_mkldnn_bf16_supported',
             torch.float16: '_is_mkldnn_fp16_supported'}.get(dtype)
    try:
        return bool(torch.backends.mkldnn.is_available() and check
                    and getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without the query: assume native
        return True


def use_fft(x, kernel_size, stride=1, padding=0, dilation=1, grad=False) -> bool:
    """Fixed rule: CPU stride-1 calls with both kernel sides >= ``FFT_MIN_KERNEL``, in fp32 /
    fp64, and in half precision when the call is differentiated (``grad``: bf16 training, where
    oneDNN's direct backward at 27-31 costs 7-26x the FFT; its forward alone is faster); on a
    CPU computing half precision in software, half-precision calls from
    ``SOFT_HALF_FFT_MIN_KERNEL`` on, differentiated or not."""
    if x.device.type != 'cpu' or x.dim() != 4 or not _fft_fits(x, kernel_size, stride, padding,
                                                               dilation):
        return False
    if x.dtype in _HALF_DTYPES and not cpu_native_half(x.dtype):
        return min(kernel_size) >= SOFT_HALF_FFT_MIN_KERNEL
    dtypes = _FFT_DTYPES + (_HALF_DTYPES if grad else ())
    return x.dtype in dtypes and min(kernel_size) >= FFT_MIN_KERNEL


def use_channels_last(x, kernel_size, padding=0) -> bool:
    """Fixed rule: CPU calls with a kernel side >= ``CHANNELS_LAST_MIN_KERNEL``, where safe."""
    return (x.device.type == 'cpu' and x.dim() == 4
            and max(kernel_size) >= CHANNELS_LAST_MIN_KERNEL
            and not _stalls_onednn(x, kernel_size, padding))


def fixed_choice(x, kernel_size, stride=1, padding=0, dilation=1, grad=False):
    """The candidate the fixed rules (measured on an AMD EPYC CPU) give this call.

    CPU: FFT for stride-1 kernels >= 27 in fp32/fp64 (in half precision too when ``grad``: the
    call is differentiated; from 13 on, differentiated or not, where the CPU has no native half
    precision), channels_last direct from 11 on, else direct in the input's layout;
    any call that would stall oneDNN runs NCHW. Other devices: direct in the input's layout
    (cuDNN), until GPU measurements say otherwise.
    """
    if x.dim() != 4:
        return 'direct_nchw'
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.device.type == 'cpu':
        if use_fft(x, kernel_size, stride, padding, dilation, grad):
            return 'fft'
        if use_channels_last(x, kernel_size, padding):
            return 'direct_channels_last'
    if channels_last and not _stalls_onednn(x, kernel_size, padding):
        return 'direct_channels_last'
    return 'direct_nchw'


@contextlib.contextmanager
def fft_min_kernel(kernel):
    """Within the block, fixed rules apply with FFTs from kernel side ``kernel`` on (huge: never).

    For measurements: the direct path of a model, and FLOP counters, which trace
    ``aten::convolution`` and would not see a convolution computed through FFTs.
    """
    global FFT_MIN_KERNEL
    saved, FFT_MIN_KERNEL = FFT_MIN_KERNEL, kernel
    try:
        with dispatch_mode('fixed'):
            yield
    finally:
        FFT_MIN_KERNEL = saved


# -- the tuner -------------------------------------------------------------------------------------
# the readings are shared with tools/benchmark.py (reparam_mm.cpu_load); kept under these names,
# which tests replace to simulate a busy or a quiet machine
_usable_cpus = cpu_load.usable_cpus
_cpu_seconds = cpu_load.cpu_seconds


def _device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    from ..env import cpu_model
    # with glibc's default malloc every large FFT buffer is page-faulted afresh (2.5x slower)
    malloc = ', freed memory kept' if kept_freed_memory() else ''
    return f'{cpu_model() or platform.machine()} ({torch.get_num_threads()} threads{malloc})'


def _library_versions():
    versions = f'torch {torch.__version__}'
    try:
        import triton
        versions += f', triton {triton.__version__}'
    except ImportError:
        pass
    return versions


def _bucket_edge(i):
    return math.ceil(SIZE_BUCKET_MIN * 2 ** (i / SIZE_BUCKETS_PER_OCTAVE) - 1e-9)


def size_bucket(n):
    """``(lo, hi)``: the sizes (spatial, or a RoI head's box count) that share a tuning
    signature with size ``n``.

    Sizes below ``SIZE_BUCKET_MIN`` are their own bucket; from there on the buckets grow
    geometrically, ``SIZE_BUCKETS_PER_OCTAVE`` per doubling (16-19, 20-22, 23-26, 27-31, 32-38,
    ..., 512-608, 609-724, ...). Whole-image inference (mmseg's ``mode='whole'``, mmdet's
    keep-ratio resize) meets a new size with nearly every image; buckets time a handful.
    """
    if n < SIZE_BUCKET_MIN:
        return n, n
    i = int(math.log2(n / SIZE_BUCKET_MIN) * SIZE_BUCKETS_PER_OCTAVE)
    while _bucket_edge(i + 1) <= n:
        i += 1
    while _bucket_edge(i) > n:
        i -= 1
    return _bucket_edge(i), _bucket_edge(i + 1) - 1


def shape_label(shape):
    """A tensor shape as signatures spell it: ``NxCxHxW`` with N, H and W as their size buckets
    (``1x128x128-152x153-181``). N is bucketed for the RoI heads, whose leading dimension is the
    number of boxes the RPN kept and differs with nearly every batch (``3445-4095x256x7x7``)."""
    sizes = [str(n) for n in shape]
    if len(shape) == 4:
        for d in (0, 2, 3):
            lo, hi = size_bucket(shape[d])
            sizes[d] = str(lo) if lo == hi else f'{lo}-{hi}'
    return 'x'.join(sizes)


def differentiated(x, weight):
    """Whether autograd will take this call's backward (training), which can change its best
    candidate."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def signature(x, weight, stride, padding, dilation):
    """A call's tuning key: everything that can change which candidate is fastest, with the
    spatial sizes as size buckets (:func:`size_bucket`)."""
    layout = ('channels_last' if x.dim() == 4 and not x.is_contiguous()
              and x.is_contiguous(memory_format=torch.channels_last) else 'nchw')
    grad = differentiated(x, weight)
    kh, kw = weight.shape[-2:]
    pad = padding if isinstance(padding, str) else 'x'.join(map(str, _pair(padding)))
    return (f'{x.device.type}|{str(x.dtype)[6:]}|{layout}|{shape_label(x.shape)}|k{kh}x{kw}'
            f'|s{"x".join(map(str, _pair(stride)))}|p{pad}|d{"x".join(map(str, _pair(dilation)))}'
            f'|{"fwd+bwd" if grad else "fwd"}')


class LargeDWTuner:
    """Times the candidates of a signature once and remembers the fastest.

    ``time_candidates(runs)`` times them (tests replace it to inject timings); ``cache_path`` is
    the JSON file shared by the processes of one machine. A CPU timing during which other
    processes used the cores this one needs is *contended*: its choice serves this process but
    is saved marked as such, and the next process times that signature again, so one busy
    moment does not fix a slow choice for good.
    """

    #: other processes' CPU use (in cores, beyond those this process leaves free) above which a
    #: timing is called contended and its choice is not reused by later processes
    CONTENDED_CORES = cpu_load.CONTENDED_CORES
    #: on CPU, a candidate whose first run takes this many times the fastest first run (and
    #: over ``HOPELESS_MIN_S``) is not timed further: oneDNN's NCHW 31x31 fp32 conv takes 0.8 s
    #: where the FFT takes 20 ms, and its further runs were half of a new size's timing
    HOPELESS_RATIO = 8
    #: below this a first run may be mostly one-time cost (a primitive's JIT), so never dropped
    HOPELESS_MIN_S = 0.05
    #: on CPU, a candidate this many times slower than the best at every timed size near a new
    #: one (same call otherwise: :meth:`hopeless_nearby`) is not run there at all, as oneDNN's
    #: NCHW direct conv at the 27-31 kernels: even its one run was a large part of a new bucket
    SKIP_RATIO = 16
    #: timed sizes within this factor of a new one, per side, count as near it
    NEAR_FACTOR = 2.

    def __init__(self):
        self.clock = time.perf_counter
        self._warned_contended = False
        self.contended_timings = 0  # how many timings of this process were contended
        self.choices = {}  # (device key, signature) -> name
        self.tables = {}  # (device key, signature without H, W) -> [(H, W, {name: ms})]
        self._device_keys = {}
        self._loaded = set()
        self._safe = set()  # (device key, signature) whose kept choice is among the candidates
        self._kept = None  # (module, input, layout, output) of the last layout timing, if reusable

    @property
    def cache_path(self) -> Path:
        root = os.environ.get('REPARAM_MM_CACHE', Path.home() / '.cache' / 'reparam_mm')
        return Path(root) / 'large_dw_tuning.json'

    def device_key(self, device):
        """Device name and library versions (read once per device, thread count and malloc mode:
        0.3 ms)."""
        cache_key = (str(device), torch.get_num_threads(), kept_freed_memory())
        if cache_key not in self._device_keys:
            self._device_keys[cache_key] = f'{_device_name(device)} | {_library_versions()}'
        return self._device_keys[cache_key]

    def _load(self, key):
        path = self.cache_path
        if (path, key) in self._loaded:
            return
        self._loaded.add((path, key))
        try:
            entries = json.loads(path.read_text()).get(key, {})
        except (OSError, ValueError):
            return
        for sig, entry in entries.items():
            # entries timed under contention, or before contention was recorded, are timed again
            if (isinstance(entry, dict) and entry.get('choice') in (*CANDIDATES, *LAYOUTS)
                    and entry.get('contended') is False):
                self.choices.setdefault((key, sig), entry['choice'])
                self._remember_table(key, sig, entry.get('shape'), entry.get('ms'))

    def _save(self, key, sig, entry):
        path = self.cache_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data.setdefault(key, {})[sig] = entry
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.large_dw_tuning.')
            with os.fdopen(fd, 'w') as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:  # a read-only home must not break training
            warnings.warn(f'reparam_mm: could not write the large-kernel tuning cache {path} ({e}); '
                          'choices are kept in memory only. Set REPARAM_MM_CACHE to a writable folder.')

    def time_candidates(self, runs, warm_up=True, drop_hopeless=False):
        """Seconds of one run of each candidate (its best run), and the errors of those that raised.

        ``runs`` maps names to zero-argument callables. After a warm-up the candidates are timed
        in interleaved rounds, so that a burst of other work on the machine slows every
        candidate alike rather than the one being timed. The warm-up matters: a candidate's first
        calls of a shape run slower (allocator and plan caches settling; the process's first FFT
        several times), so cold timings pick direct convs the FFT beats once warm, and a shorter
        warm-up was measured to choose worse (docs/large_kernel.md). ``warm_up=False``
        (whole backbones, whose every run is long) keeps only the first run as warm-up and
        times 3 rounds. A candidate slower than 0.5 s a run is timed twice only. With
        ``drop_hopeless`` (CPU; on CUDA a first run includes compiling) a candidate whose first
        run is ``HOPELESS_RATIO`` times the fastest first run keeps that time and is not run
        again. ``self.clock`` reads the time (tests replace it).
        """
        sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        times, errors, spent, calls = {}, {}, {}, {}
        self.raised = {}

        def once(name):
            """One timed run of ``name``; a candidate that raises is dropped with its error."""
            try:
                if sync is not None:
                    sync()
                t = self.clock()
                runs[name]()
                if sync is not None:
                    sync()
                return self.clock() - t
            except Exception as e:  # a candidate that cannot run this call is left out
                errors[name] = f'{type(e).__name__}: {e}'[:200]
                self.raised[name] = e
                spent.pop(name, None)
                times.pop(name, None)
                return None

        first = {}
        for name in runs:  # first run: compilation, autotuning, allocation
            t = once(name)
            if t is not None:
                first[name] = t
        fastest = min(first.values(), default=0.)
        for name, t in first.items():
            if drop_hopeless and t > max(self.HOPELESS_MIN_S, self.HOPELESS_RATIO * fastest):
                times[name] = t
            elif t > 0.5:
                second = once(name)
                if second is not None:
                    times[name] = min(t, second)
            else:
                spent[name], calls[name] = t, 1
        for name in list(spent) if warm_up else ():  # warm-up: up to 10 runs or 0.4 s each
            while name in spent and calls[name] < 10 and spent[name] < 0.4:
                t = once(name)
                if t is not None:
                    spent[name], calls[name] = spent[name] + t, calls[name] + 1
        best = dict.fromkeys(spent, float('inf'))
        rounds, total = 0, 0.
        min_total = 0.1 * len(spent) if warm_up else 0.  # 3 rounds, then to 0.1 s each
        while spent and (rounds < 3 or (total < min_total and rounds < 30)):
            for name in list(spent):
                t = once(name)
                if t is not None:
                    best[name], total = min(best[name], t), total + t
            rounds += 1
        times.update((name, best[name]) for name in spent)
        return times, errors

    def _remember_table(self, key, sig, shape, ms):
        """Keep a conv signature's timing table (ms per candidate) under its size-free family,
        for :meth:`hopeless_nearby`; layouts and malformed entries are left out."""
        family = _size_free(sig)
        try:
            h, w = (int(n) for n in str(shape).split('x')[2:])
            ok = family is not None and ms and all(float(t) > 0 for t in ms.values())
        except (TypeError, ValueError, AttributeError):
            return
        if ok:
            self.tables.setdefault((key, family), []).append((h, w, dict(ms)))

    def hopeless_nearby(self, key, sig, shape, names):
        """``{name: why}``: the candidates among ``names`` not worth running for ``sig``.

        A candidate is left out when the timed sizes near this one (the same call in another
        size bucket, within ``NEAR_FACTOR`` per side) that ran it all found it ``SKIP_RATIO``
        times slower than their best. The best candidate of any of them is never left out, so
        at least one always runs; a candidate that raised at a nearby size is still tried.
        """
        family = _size_free(sig)
        if family is None or len(shape) != 4:
            return {}
        h, w = shape[-2:]
        near = [(th, tw, ms) for th, tw, ms in self.tables.get((key, family), ())
                if max(h / th, th / h) <= self.NEAR_FACTOR
                and max(w / tw, tw / w) <= self.NEAR_FACTOR]
        skipped = {}
        for name in names:
            ratios = [(ms[name] / min(ms.values()), f'{th}x{tw}') for th, tw, ms in near
                      if name in ms]
            if ratios and all(r >= self.SKIP_RATIO for r, _ in ratios):
                r, at = min(ratios)
                skipped[name] = f'{r:.0f}x the best at {at}'
        return skipped if len(skipped) < len(names) else {}

    def other_cores(self, before, after, seconds):
        """CPU cores' worth of other processes' work during a timing (:func:`cpu_load.other_cores`)."""
        return cpu_load.other_cores(before, after, seconds)

    def contended(self, other_cores, cpus=None, threads=None):
        """Whether other work took CPU time this process's threads needed: more than
        ``CONTENDED_CORES`` beyond the cores its threads leave free."""
        cpus = _usable_cpus() if cpus is None else cpus
        threads = torch.get_num_threads() if threads is None else threads
        return cpu_load.contended(other_cores, cpus, threads, self.CONTENDED_CORES)

    def choose(self, x, weight, bias, stride, padding, dilation):
        key, sig = self.device_key(x.device), signature(x, weight, stride, padding, dilation)
        self._load(key)
        kept = self.choices.get((key, sig))
        if kept is not None and (key, sig) in self._safe:  # every call after the first ones
            return kept
        # a size bucket's choice serves all its sizes: which candidates can compute a call does
        # not depend on its size (beyond the input covering the kernel, which any conv needs)
        names = candidates(x, weight.shape[-2:], stride, padding, dilation)
        # a choice read from the cache file may predate a rule that now leaves it out (a call
        # that stalls oneDNN): it is used only while it is still a candidate, else timed again
        if kept in names:
            self._safe.add((key, sig))
            return kept
        if len(names) == 1:
            return names[0]
        grad, on_cpu = sig.endswith('fwd+bwd'), x.device.type == 'cpu'
        # on CUDA a first run includes compiling, so no candidate is judged by it
        skipped = self.hopeless_nearby(key, sig, x.shape, names) if on_cpu else {}
        runs = {name: _timed_call(name, x, weight, bias, stride, padding, dilation, grad)
                for name in names if name not in skipped}
        return self._time_and_keep(key, sig, runs, on_cpu,
                                   fixed_choice(x, weight.shape[-2:], stride, padding, dilation,
                                                grad),
                                   x.shape, skipped=skipped)

    def choose_layout(self, module, x, forward, subject='large-kernel dispatch', fixed=None):
        """'channels_last' or 'nchw': the faster layout for a whole backbone ``forward(x,
        channels_last)`` on this input, timed once per signature like the convs (``subject``
        names what is timed in the log line, ``fixed`` the fixed rule's choice recorded beside
        the times: :func:`fixed_layout` by default; ``head_layout`` times necks and heads so).

        The timing runs leave no trace: buffers (BN statistics) are restored, the RNG stream is
        forked, and with gradients the backward goes through ``torch.autograd.grad``, so no
        ``.grad`` is written.
        """
        known = self.known_layout(module, x)
        if known is not None:
            return known
        key, sig = self.device_key(x.device), layout_signature(module, x)
        params = [p for p in module.parameters() if p.requires_grad]
        grad = sig.endswith('fwd+bwd')
        # an eval forward without gradients draws no random numbers and updates no buffers, so
        # its timed run's output is the call's answer (take_output)
        outputs = {} if not grad and not module.training else None

        def timed(channels_last):
            def run():
                if not grad:
                    with torch.no_grad():
                        out = forward(x, channels_last)
                    if outputs is not None:
                        outputs[channels_last] = out
                    return
                outs = forward(x, channels_last)
                total = sum(o.float().sum() for o in outs)
                torch.autograd.grad(total, params, allow_unused=True)
            return run
        saved = {name: b.detach().clone() for name, b in module.named_buffers()}
        known, start, contended = len(self.choices), time.perf_counter(), self.contended_timings
        try:
            # the device's generator too: dropout and drop-path on CUDA draw from it
            with torch.random.fork_rng(devices=[x.device] if x.device.type == 'cuda' else []):
                choice = self._time_and_keep(key, sig, {name: timed(name == 'channels_last')
                                                        for name in LAYOUTS},
                                             x.device.type == 'cpu', fixed or fixed_layout(x),
                                             x.shape, warm_up=False)
        finally:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(saved[name])
        _report_timing(module, x, grad, choice, len(self.choices) - known - 1,
                       time.perf_counter() - start,
                       None if self.contended_timings > contended else self.cache_path, subject)
        cl = choice == 'channels_last'
        self._kept = (module, x, cl, outputs[cl]) if outputs and cl in outputs else None
        return choice

    def known_layout(self, module, x):
        """The layout chosen already (in this process, or read from the cache) for ``module`` on
        ``x``'s :func:`layout_signature`, else None."""
        key = self.device_key(x.device)
        self._load(key)
        return self.choices.get((key, layout_signature(module, x)))

    def take_output(self, module, x, channels_last):
        """The output of the layout timing just run for ``module`` on ``x`` in that layout, if
        it can stand for the call (:meth:`choose_layout`), else None; handed out once."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] is module and kept[1] is x and kept[2] == channels_last:
            return kept[3]
        return None

    def _time_and_keep(self, key, sig, runs, on_cpu, fixed, shape, warm_up=True, skipped=None):
        """Time ``runs`` (name -> callable), keep the fastest for ``sig`` and save it with every
        time, the candidates ``skipped`` (name -> why), the fixed rule's choice, the input
        ``shape`` timed (one size of its buckets) and the other processes' load during the
        timing."""
        before, start = _cpu_seconds() if on_cpu else None, self.clock()
        # a whole backbone's first run also times its convs, so its first runs compare nothing
        times, errors = self.time_candidates(runs, warm_up=warm_up,
                                             drop_hopeless=on_cpu and warm_up)
        seconds = self.clock() - start
        others = self.other_cores(before, _cpu_seconds() if on_cpu else None, seconds)
        if not times:
            raised = list(getattr(self, 'raised', {}).values())
            if len(raised) == len(runs) and len({(type(e), str(e)) for e in raised}) == 1:
                raise raised[0]  # the call itself fails (bad input: its own error says why)
            raise RuntimeError(f'no candidate ran {sig}: {errors}')
        choice = min(times, key=times.get)
        self.choices[(key, sig)] = choice
        contended = on_cpu and self.contended(others)
        self.contended_timings += contended
        if contended and not self._warned_contended:
            self._warned_contended = True
            warnings.warn(
                f'reparam_mm: other processes used {others:.1f} CPU cores while the large-kernel '
                f'dispatch timed {sig}; choices timed under such contention are kept for this '
                'process only and timed again by the next one (lasting choices need a quiet '
                'machine).')
        ms = {n: round(t * 1e3, 4) for n, t in times.items()}
        label = 'x'.join(map(str, shape))
        if not contended:  # load distorts ratios (a 0.3 ms conv timed at 28 ms): never skip by it
            self._remember_table(key, sig, label, ms)
        self._save(key, sig, dict(choice=choice, ms=ms, errors=errors, skipped=skipped or {},
                                  fixed=fixed, shape=label, other_cores=round(others, 2),
                                  contended=contended))
        return choice


def _report_timing(module, x, grad, choice, convs, seconds, path,
                   subject='large-kernel dispatch'):
    """One log line per timed layout signature, so that a slow first forward at a new input
    size says why, and that it is paid once per size bucket (``path`` None: some of the
    timings were contended, so they serve this process only). A backbone's line counts the
    conv signatures its runs timed; a neck's or head's (``subject`` 'memory layout') has none."""
    from mmengine.logging import print_log
    mode = 'train' if module.training else 'eval'
    kept = (f'kept in {path} for every size in the bucket' if path is not None else
            'kept for this process only, since other processes used the CPUs meanwhile')
    if subject != 'large-kernel dispatch':
        convs_said = ''
    elif convs:
        convs_said = f', {convs} conv signature(s)'
    else:
        convs_said = ', its convs timed already (by another copy of the model, e.g. the fused one)'
    print_log(f'reparam_mm: {seconds:.1f} s timing the {subject} of '
              f'{type(module).__name__} ({mode}, {"fwd+bwd" if grad else "fwd"}) for the new '
              f'input size bucket {shape_label(x.shape)}: {choice}{convs_said}; '
              f'{kept} (REPARAM_MM_LARGE_DW=fixed times nothing).',
              logger='current')


def _size_free(sig):
    """A conv signature without its H and W (``cpu|float32|nchw|1x128|k31x31|...``): the
    calls whose timings can speak for each other's sizes; None for a layout signature."""
    fields = sig.split('|')
    if sig.startswith('layout|') or len(fields) < 4:
        return None
    fields[3] = 'x'.join(fields[3].split('x')[:2])
    return '|'.join(fields)


def _timed_call(name, x, weight, bias, stride, padding, dilation, grad):
    """A closure running candidate ``name`` on copies of the call's tensors (fwd, or fwd+bwd)."""
    fn = CANDIDATES[name]
    xs, ws = x.detach(), weight.detach()
    bs = bias.detach() if bias is not None else None
    if not grad:
        def run():
            with torch.no_grad():
                fn(xs, ws, bs, stride, padding, dilation)
        return run
    xs, ws = xs.clone().requires_grad_(), ws.clone().requires_grad_()

    def run():
        # identity hooks shadow those of an enclosing non-reentrant checkpoint, which would
        # otherwise pack this graph's tensors and recompute the caller's block on .grad()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            out = fn(xs, ws, bs, stride, padding, dilation)
            torch.autograd.grad(out, (xs, ws), torch.ones_like(out))
    return run


def _keep(t):
    return t


#: the whole-backbone layouts :func:`backbone_layout` chooses between
LAYOUTS = ('nchw', 'channels_last')
#: the process-wide tuner used by :func:`large_depthwise_conv2d` and :func:`backbone_layout`
TUNER = LargeDWTuner()
_state = dict(mode=None, forced=None)


def _mode():
    if _state['mode'] is not None:
        return _state['mode']
    env = os.environ.get(_ENV_MODE, 'tuned').strip().lower() or 'tuned'
    if env not in _MODES:
        raise ValueError(f'{_ENV_MODE}={env!r} is not a large-kernel dispatch mode; '
                         f'use one of {_MODES}.')
    return env


def active_dispatch_mode():
    """The mode calls run in now: 'tuned' or 'fixed'."""
    return _mode()


def set_dispatch_mode(mode):
    """Set the dispatch mode for the process: 'tuned', 'fixed' (any case, as the environment
    variable), or None (the environment's)."""
    if isinstance(mode, str):
        mode = mode.strip().lower()
    if mode is not None and mode not in _MODES:
        raise ValueError(f'large_dw_dispatch={mode!r} is not a large-kernel dispatch mode; '
                         f'use one of {_MODES}.')
    _state['mode'] = mode


@contextlib.contextmanager
def dispatch_mode(mode):
    """Within the block, use dispatch ``mode`` ('tuned' or 'fixed')."""
    saved = _state['mode']
    set_dispatch_mode(mode)
    try:
        yield
    finally:
        _state['mode'] = saved


@contextlib.contextmanager
def forced_candidate(name):
    """Within the block, compute every call with candidate ``name`` where it can run (benchmarks)."""
    if name not in CANDIDATES:
        raise ValueError(f'unknown large depthwise conv candidate {name!r}; one of {list(CANDIDATES)}.')
    saved, _state['forced'] = _state['forced'], name
    try:
        yield
    finally:
        _state['forced'] = saved


def _exporting():
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    onnx = getattr(torch, 'onnx', None)
    if onnx is not None and onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and (compiler.is_compiling()
                                          or getattr(compiler, 'is_exporting', lambda: False)()))


def choose(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """The candidate :func:`large_depthwise_conv2d` computes this call with."""
    kernel = weight.shape[-2:]
    forced = _state['forced']
    if forced is not None and forced in candidates(x, kernel, stride, padding, dilation):
        return forced
    if _mode() == 'fixed':
        return fixed_choice(x, kernel, stride, padding, dilation, differentiated(x, weight))
    return TUNER.choose(x, weight, bias, stride, padding, dilation)


def backbone_channels_last(x: torch.Tensor) -> bool:
    """The fixed rule: whether a large-kernel backbone runs its whole forward channels_last.

    On CPU, in half precision (the input's dtype or autocast's): oneDNN's convs are native in
    NHWC, and the backbones pad their large kernels by ``k // 2`` (safe). In fp32 the 31/29/27
    kernels were fastest through FFTs, which want NCHW. Tuned mode times both instead
    (:func:`backbone_layout`). The backbone returns features in the input's layout.
    """
    if x.device.type != 'cpu' or x.dim() != 4:
        return False
    autocast_half = torch.is_autocast_enabled('cpu') and \
        torch.get_autocast_dtype('cpu') in _HALF_DTYPES
    return x.dtype in _HALF_DTYPES or autocast_half


def fixed_layout(x):
    return 'channels_last' if backbone_channels_last(x) else 'nchw'


def layout_signature(module, x):
    """A whole-backbone layout choice's tuning key: the backbone (class, size, train / eval), the
    input (its spatial sizes as size buckets), autocast, and whether gradients are needed."""
    autocast = (str(torch.get_autocast_dtype(x.device.type))[6:]
                if torch.is_autocast_enabled(x.device.type) else 'off')
    params = list(module.parameters())
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    size = sum(p.numel() for p in params)
    return (f'layout|{type(module).__name__}:{size}:{"train" if module.training else "eval"}'
            f'|{x.device.type}|{str(x.dtype)[6:]}|autocast {autocast}|{shape_label(x.shape)}'
            f'|{"fwd+bwd" if grad else "fwd"}')


def _distributed():
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def times_on_a_copy(module):
    """Whether a layout timing of ``module`` must run on :func:`collective_free_copy`: in a
    distributed run's training forward (training mode or gradients on). There the timing runs
    would call SyncBN's collectives a number of times the other ranks do not match, and run
    backward through parameters DDP reduces. An evaluation forward without gradients issues no
    collective (SyncBN normalises with its running statistics) and is timed in place."""
    return _distributed() and (module.training or torch.is_grad_enabled())


def collective_free_copy(module):
    """A deep copy of ``module`` whose SyncBN layers (torch's, mmcv's) are BN, for timing runs no
    other rank takes part in. Its forward hooks are the original's own objects, not copies (a
    hook may reference modules outside ``module``, which would be copied with it)."""
    from mmengine.model import revert_sync_batchnorm
    hooks = {id(h): h for m in module.modules()
             for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())}
    return revert_sync_batchnorm(copy.deepcopy(module, hooks))


def backbone_layout(module, x, forward) -> bool:
    """Whether backbone ``module`` runs ``forward(x, channels_last)`` channels_last for ``x``.

    On CPU and CUDA in tuned mode both layouts are timed once per :func:`layout_signature`, as
    the convs are, since which is faster depends on the device and on the convs' choices (NHWC
    suits oneDNN's 1x1 convs and cuDNN's tensor cores under AMP, the FFT wants NCHW). In a
    distributed training step the timing runs on a copy of the backbone
    (:func:`times_on_a_copy`; ``forward`` must then be a method of ``module``), so every rank
    still runs the step's one forward; each rank chooses for itself, which changes no
    collective and no weight (the layout is the activations'). The fixed rule (:func:`backbone_channels_last`) decides in fixed mode and while
    exporting or compiling. Other devices keep the input's layout.
    """
    if x.device.type not in ('cpu', 'cuda') or x.dim() != 4 or not x.is_contiguous():
        return False
    if _mode() == 'fixed' or _exporting():
        return backbone_channels_last(x)
    if times_on_a_copy(module):
        known = TUNER.known_layout(module, x)
        if known is not None:
            return known == 'channels_last'
        if getattr(forward, '__self__', None) is not module:
            return backbone_channels_last(x)
        twin = collective_free_copy(module)
        try:
            return TUNER.choose_layout(twin, x, getattr(twin, forward.__name__)) == 'channels_last'
        except Exception as e:  # noqa: BLE001 - the copy's BN, not the step's SyncBN
            copy_timing_failed(module, e)
            return backbone_channels_last(x)
    return TUNER.choose_layout(module, x, forward) == 'channels_last'


def copy_timing_failed(module, error):
    """Say once per module type that its layout timing on :func:`collective_free_copy` failed.

    The copy's BN layers see this rank's images alone where the step's SyncBN sees every rank's:
    with one image per GPU a BN after 1x1 pooling has one value per channel, which BN refuses
    and SyncBN across ranks does not. The step then runs in the module's layout untimed."""
    name = type(module).__name__
    if name not in _COPY_FAILURES:
        _COPY_FAILURES.add(name)
        from mmengine.logging import print_log
        print_log(f'reparam_mm: the memory layout of {name} is not timed in this distributed run: '
                  f'its timing on a copy without SyncBN failed ({type(error).__name__}: {error}); '
                  'it keeps its layout.', logger='current')


_COPY_FAILURES = set()


def forward_in_best_layout(module, x, forward):
    """``forward(x, channels_last)`` in the layout :func:`backbone_layout` picks for ``x``.

    When that pick was timed on this very input by an eval-mode backbone without gradients, the
    timing's last run in the chosen layout already is the answer and is returned instead of a
    forward more (one per new size bucket in whole-image inference).
    """
    channels_last = backbone_layout(module, x, forward)
    kept = TUNER.take_output(module, x, channels_last)
    return kept if kept is not None else forward(x, channels_last)


def large_depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``.

    ``weight`` is (C, 1, kh, kw) with C the channels of ``x``. The candidate is chosen per call
    (module docstring); the output's memory layout always follows ``x``. Under autocast the call
    runs in the autocast dtype, whatever the candidate.
    """
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(f'large_depthwise_conv2d expects a depthwise (C, 1, kh, kw) weight with '
                         f'C={channels} (the input channels), got {tuple(weight.shape)}.')
    if _exporting() or x.device.type == 'meta':  # meta: shapes only, nothing to choose
        return F.conv2d(x, weight, bias, stride, padding, dilation, channels)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return large_depthwise_conv2d(x, weight, bias, stride, padding, dilation)
    if weight.dtype != x.dtype:
        raise TypeError(f'large_depthwise_conv2d: input is {x.dtype} but weight is {weight.dtype}; '
                        'cast the module (model.to(dtype)) or run under autocast.')
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()
    name = choose(x, weight, bias, stride, padding, dilation)
    out = CANDIDATES[name](x, weight, bias, stride, padding, dilation)
    return _in_layout(out, channels_last) if x.dim() == 4 else out


class LargeKernelDWConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) computed by :func:`large_depthwise_conv2d`.

    Args:
        channels (int): input = output channels = groups.
        kernel_size (int | tuple): kernel side(s).
        stride (int): stride. Defaults to 1.
        padding (int | tuple, optional): defaults to ``kernel_size // 2`` (same size at stride 1).
        dilation (int): dilation. Defaults to 1.
        bias (bool): whether the conv has a bias (True after fusing).
    """

    def __init__(self, channels, kernel_size, stride=1, padding=None, dilation=1, bias=False,
                 **factory):
        if padding is None:
            padding = tuple(d * (k // 2) for k, d in zip(_pair(kernel_size), _pair(dilation)))
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=channels, bias=bias, **factory)

    def forward(self, x):
        if self.padding_mode != 'zeros':  # pragma: no cover - never built so, kept for safety
            return super().forward(x)
        return large_depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                      self.dilation)
