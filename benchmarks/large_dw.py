"""RepLKNet's large depthwise convs timed at their stage shapes, through the backbone's
dispatch point and alternatives, against a measured compute / bandwidth ceiling."""
import contextlib

import torch
import torch.nn.functional as F

from reparam_mm.backbones.replknet import RepLKNet
from reparam_mm.layers.large_kernel import (dispatch_mode, fft_depthwise_conv2d,
                                            large_depthwise_conv2d, triton_depthwise_conv2d)

from .measure import cpu_timing, new_result, record_cpu_load, summarize, time_calls


def replknet_dw_shapes(arch='31B', height=512, width=512):
    """(name, channels, H, W, kernel) of each stage's large depthwise conv."""
    if min(height, width) < 32:
        raise ValueError(f'input {height}x{width} is smaller than RepLKNet\'s stride 32; use a '
                         'shape of at least 32x32.')
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
    """Measured peak FMA FLOP/s and copy bandwidth (bytes/s) of ``device`` for ``dtype`` data.

    The compute peak is a square GEMM's. On CUDA it is always the fp32 GEMM with TF32 off, i.e.
    the CUDA cores' FMA rate: a depthwise conv has no tensor-core formulation as written (the
    Triton candidate's banded products are one, at 2-2.5x the multiply-adds), so a half-precision
    GEMM's tensor-core peak would be no bound for it. The copy runs in ``dtype``.
    """
    dev = torch.device(device)
    n = size or (4096 if dev.type == 'cuda' else 1024)
    gemm_dtype = torch.float32 if dev.type == 'cuda' else dtype
    a = torch.randn(n, n, device=dev).to(gemm_dtype)
    b = torch.randn(n, n, device=dev).to(gemm_dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = min(time_calls(lambda: torch.mm(a, b), dev, repeat=5, warmup=2, min_time=0.5))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    numel = (256 if dev.type == 'cuda' else 64) * 2**20 // torch.finfo(dtype).bits * 8
    src = torch.empty(numel, device=dev, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    tc = min(time_calls(lambda: dst.copy_(src), dev, repeat=5, warmup=2, min_time=0.5))
    return dict(gemm_flops_per_s=2 * n**3 / t, copy_bytes_per_s=2 * src.numel() *
                src.element_size() / tc, gemm_size=n, gemm_dtype=str(gemm_dtype)[6:],
                compute_peak=('CUDA-core FMA (fp32 GEMM, TF32 off)' if dev.type == 'cuda'
                              else f'{str(dtype)[6:]} GEMM'),
                copy_mb=src.numel() * src.element_size() / 2**20)


def _dispatch(mode):
    def run(x, w, p):
        with dispatch_mode(mode):
            return large_depthwise_conv2d(x, w, None, 1, p)
    return run


def dw_candidates(device):
    """name -> (layout of the input handed in, function(x, w, padding)).

    ``tuned`` / ``fixed`` are the dispatch in each mode, exactly what the backbones run (the
    tuned one times its candidates during the warm-up call); the others call one
    implementation directly: ``F.conv2d`` (oneDNN on CPU, cuDNN on CUDA) in each layout, the
    FFT correlation, and on CUDA the Triton kernels.
    """

    def direct(x, w, p):
        return F.conv2d(x, w, None, 1, p, 1, x.shape[1])

    cands = {
        'tuned': ('nchw', _dispatch('tuned')),
        'tuned_cl': ('channels_last', _dispatch('tuned')),
        'fixed': ('nchw', _dispatch('fixed')),
        'fixed_cl': ('channels_last', _dispatch('fixed')),
        'nchw_conv2d': ('nchw', direct),
        'cl_conv2d': ('channels_last', direct),
        'fft': ('nchw', lambda x, w, p: fft_depthwise_conv2d(x, w, None, p)),
    }
    if torch.device(device).type == 'cuda':
        cands['triton'] = ('nchw', lambda x, w, p: triton_depthwise_conv2d(x, w, None, p))
        cands['triton_cl'] = ('channels_last', cands['triton'][1])
    return cands


DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def benchmark_large_dw(arch='31B', shape=(512, 512), batch=1, device='cpu', dtypes=('fp32', ),
                       candidates=None, repeat=3, warmup=1, min_time=1.0, backward=True,
                       dtype_done=None):
    """Forward (and forward+backward) time of each large depthwise conv per candidate and dtype,
    with the roofline bound ``max(FLOPs / GEMM peak, bytes / copy bandwidth)``.
    ``dtype_done(result, dtype)``, if given, is called with the rows so far after each dtype: a
    run stopped at its time limit then still leaves the dtypes it finished."""
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
    load = cpu_timing(dev)
    with load or contextlib.nullcontext():
        result['ceilings'] = {d: machine_ceilings(dev, DTYPES[d]) for d in dtypes}
        timing = dict(repeat=repeat, warmup=warmup, min_time=min_time)
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
                    rec.update(_time_dw(all_cands[cand], (batch, c, h, w), k, dev, dtype,
                                        backward=backward, **timing))
                    if rec.get('forward'):
                        fwd = rec['forward']['median_ms']
                        rec['forward_gflops'] = flops / fwd / 1e6
                        rec['forward_over_bound'] = fwd / rec['bound_ms']
                    if rec.get('forward_backward'):
                        rec['forward_backward_over_bound'] = (
                            rec['forward_backward']['median_ms'] / rec['bound_fwd_bwd_ms'])
                    result['results'].append(rec)
            if dtype_done is not None:
                dtype_done(result, dname)
    return record_cpu_load(result, load)


def _time_dw(cand, x_shape, k, dev, dtype, backward, **timing):
    """Forward (and forward+backward) times of one candidate on an input of ``x_shape``
    (N, C, H, W) and a k x k depthwise weight; ``timing`` goes to :func:`time_calls`."""
    layout, fn = cand
    batch, c = x_shape[:2]
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    g = torch.Generator(device='cpu').manual_seed(0)
    x = torch.randn(*x_shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(c, 1, k, k, generator=g) * 0.02).to(dev, dtype)
    if layout == 'channels_last':
        wt = wt.contiguous(memory_format=torch.channels_last)
    pad = k // 2
    out = {}
    try:
        with torch.no_grad():
            out['forward'] = summarize(time_calls(lambda: fn(x, wt, pad), dev, **timing), batch)
        if backward:
            xg, wg = x.clone().requires_grad_(), wt.clone().requires_grad_()
            gy = torch.randn_like(fn(x, wt, pad))

            def step():
                xg.grad = wg.grad = None
                fn(xg, wg, pad).backward(gy)

            out['forward_backward'] = summarize(time_calls(step, dev, **timing), batch)
    except RuntimeError as e:  # e.g. an FFT size or dtype a backend does not support
        out.setdefault('forward', None)
        out['error'] = f'{type(e).__name__}: {str(e)[:200]}'
    return out
