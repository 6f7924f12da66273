"""Triton kernels behind :mod:`reparam_mm.layers.triton_dw` (imported on first use only).

This module imports triton at the top and decorates its kernels when it is
imported, so ``TRITON_INTERPRET=1`` must be set before then to run them on CPU
tensors. Nothing else in the package imports it directly.

All three convolution kernels are banded (Toeplitz) matrix products on tensor
cores (``tl.dot``) rather than k*k scalar FMAs on CUDA cores. Index arithmetic
is int32: the caller refuses tensors of 2**31 elements or more.
"""
import os

import triton
import triton.language as tl

#: whether the kernels below were decorated for Triton's interpreter (CPU tensors)
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'


def _fix_interpreter():
    """Two fixes to triton 3.6's interpreter (CPU runs only; compiled kernels are untouched).

    * ``range(n)`` over a run-time int: the interpreter holds scalars as 1-element arrays
      and converts them with ``int(array)``, a TypeError since numpy 2.4. Later triton
      releases ``squeeze()`` first; this takes ``item()`` through the interpreter's own
      patch scope (restored after each launch).
    * ``tl.dot`` of bfloat16 blocks: the interpreter stores bfloat16 as raw uint16 bits and
      multiplied the bits. The operands are widened to float32 first (exact), which is what
      a bf16 tensor-core product with fp32 accumulation computes.
    """
    import numpy as np
    from triton.runtime import interpreter
    if getattr(interpreter, '_reparam_mm_fixed', False):
        return
    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.item()))

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widened(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = (h.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor = patch_lang_tensor_index
    builder.create_dot = create_dot_bf16
    interpreter._reparam_mm_fixed = True


if INTERPRET:
    _fix_interpreter()


@triton.jit(do_not_specialize=['SIZE_KEY'])
def _dw_conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                    N, C, H, W, OH, OW, KH, KW, PH, PW, SIZE_KEY,
                    sxn, sxc, sxh, sxw, swc, swh, sww, syn, syc, syh, syw,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """y[n, c, oy, ox] = b[c] + sum_ij w[c, i, j] * x[n, c, oy + i - PH, ox + j - PW].

    One program computes a (BC channels, BH rows, BW cols) output tile. For each
    kernel row i, the BW outputs of an output row are a product of the input row
    segment (BW + KW - 1 pixels, in chunks of BK) with the banded matrix
    B[t, q] = w[i, t - q]; BH output rows share that matrix, so the tile is
    one (BH x BK) @ (BK x BW) ``tl.dot`` per chunk and kernel row. x, w and y
    are addressed through their strides (NCHW or channels_last alike); PH / PW
    may be any integers (the input gradient calls it with KH - 1 - PH).
    """
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BC)
    n_tw = tl.cdiv(OW, BW)
    n_tiles = tl.cdiv(OH, BH) * n_tw
    cb = pid % n_cb  # channel blocks vary fastest: neighbours share cache lines in channels_last
    rest = pid // n_cb
    tile = rest % n_tiles
    n = rest // n_tiles
    oy0 = (tile // n_tw) * BH
    ox0 = (tile % n_tw) * BW

    oy = oy0 + tl.arange(0, BH)
    ox = ox0 + tl.arange(0, BW)
    kk = tl.arange(0, BK)
    band = kk[:, None] - tl.arange(0, BW)[None, :]  # t - q of the banded matrix, (BK, BW)
    # one flat loop over (kernel row, chunk) pairs, so that the software pipeline spans them all
    # (an inner loop of 2-3 chunks would leave it nothing to overlap)
    n_chunks = tl.cdiv(BW + KW - 1, BK)
    if BC == 1:
        # one channel: 2-D tiles, so that Hopper runs the product as one wgmma per chunk
        x_c = x_ptr + n * sxn + cb * sxc
        w_c = w_ptr + cb * swc
        acc2 = tl.zeros((BH, BW), dtype=tl.float32)
        for step in range(KH * n_chunks):
            i = step // n_chunks
            t0 = (step - i * n_chunks) * BK
            ih = oy + (i - PH)
            iw = ox0 - PW + t0 + kk
            a = tl.load(x_c + ih[:, None] * sxh + iw[None, :] * sxw,
                        mask=((ih >= 0) & (ih < H))[:, None] & ((iw >= 0) & (iw < W))[None, :],
                        other=0.0)
            j = t0 + band
            b = tl.load(w_c + i * swh + j * sww, mask=(j >= 0) & (j < KW), other=0.0)
            acc2 = tl.dot(a, b, acc2, input_precision=PRECISION)
        if HAS_BIAS:
            acc2 += tl.load(b_ptr + cb).to(tl.float32)
        y_mask = (oy < OH)[:, None] & (ox < OW)[None, :]
        y_off = n * syn + cb * syc + oy[:, None] * syh + ox[None, :] * syw
        tl.store(y_ptr + y_off, acc2.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # a channel block: batched (BC, BH, BK) @ (BC, BK, BW) products; in channels_last a
        # block of neighbouring channels is one coalesced load per pixel
        c = cb * BC + tl.arange(0, BC)
        cmask = c < C
        x_c = x_ptr + n * sxn + c[:, None, None] * sxc
        w_c = w_ptr + c[:, None, None] * swc
        acc = tl.zeros((BC, BH, BW), dtype=tl.float32)
        for step in range(KH * n_chunks):
            i = step // n_chunks
            t0 = (step - i * n_chunks) * BK
            ih = oy + (i - PH)
            iw = ox0 - PW + t0 + kk
            a_ok = ((ih >= 0) & (ih < H))[:, None] & ((iw >= 0) & (iw < W))[None, :]
            a = tl.load(x_c + (ih[:, None] * sxh + iw[None, :] * sxw)[None, :, :],
                        mask=cmask[:, None, None] & a_ok[None, :, :], other=0.0)
            j = t0 + band
            b = tl.load(w_c + i * swh + j[None, :, :] * sww,
                        mask=cmask[:, None, None] & ((j >= 0) & (j < KW))[None, :, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None, None]
        y_mask = cmask[:, None, None] & (oy < OH)[None, :, None] & (ox < OW)[None, None, :]
        y_off = n * syn + c[:, None, None] * syc + oy[None, :, None] * syh + ox[None, None, :] * syw
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit(do_not_specialize=['SIZE_KEY'])
def _dw_conv_wgrad_kernel(x_ptr, g_ptr, part_ptr,
                          N, C, H, W, OH, OW, KH, KW, PH, PW, ROWS_PER_SPLIT, SIZE_KEY,
                          sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                          PRECISION: tl.constexpr, BKH: tl.constexpr, BKW: tl.constexpr,
                          BC: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr):
    """part[split, c, i, j] = sum of g[n, c, oy, ox] * x[n, c, oy + i - PH, ox + j - PW].

    The sum runs over this split's output rows (n, oy) and all ox.

    The (n, oy) output rows are cut into splits of ROWS_PER_SPLIT; one program
    owns (BC channels, a BKH x BKW block of kernel taps, one split) and keeps
    its sums in an fp32 register tile. With p = ox + j the padded input column,
    the sum is A[i, (r, p)] @ B[(r, p), j] over BR output rows r at a time and
    BS columns p at a time: A[i, (r, p)] = x[row r + i - PH, p - PW] (plain
    rows of the input) and B[(r, p), j] = g[row r, p - j] (a band of the
    gradient row), a (BKH x BR*BS) @ (BR*BS x BKW) ``tl.dot``.
    """
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BC)
    n_jb = tl.cdiv(KW, BKW)
    n_ij = tl.cdiv(KH, BKH) * n_jb
    cb = pid % n_cb
    rest = pid // n_cb
    ij = rest % n_ij
    split = rest // n_ij
    i0 = (ij // n_jb) * BKH
    j0 = (ij % n_jb) * BKW

    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    i = i0 + tl.arange(0, BKH)
    j = j0 + tl.arange(0, BKW)
    k = tl.arange(0, BR * BS)
    kr = k // BS
    ks = k % BS
    r_lo = split * ROWS_PER_SPLIT
    r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, N * OH)
    p_lo = j0
    # the columns p with 0 <= p - j < OW for some tap j of this block
    p_hi = tl.minimum(j0 + BKW, KW) - 1 + OW
    x_c = x_ptr + c[:, None, None] * sxc
    g_c = g_ptr + c[:, None, None] * sgc
    acc = tl.zeros((BC, BKH, BKW), dtype=tl.float32)
    # one flat loop over (row group, column chunk) pairs, for the software pipeline
    n_chunks = tl.cdiv(p_hi - p_lo, BS)
    for step in range(tl.cdiv(r_hi - r_lo, BR) * n_chunks):
        group = step // n_chunks
        r = r_lo + group * BR + kr
        p = p_lo + (step - group * n_chunks) * BS + ks
        r_ok = r < r_hi
        n = r // OH
        oy = r % OH
        ih = oy[None, :] + i[:, None] - PH  # (BKH, BR*BS)
        iw = p - PW
        a_ok = r_ok[None, :] & (ih >= 0) & (ih < H) & ((iw >= 0) & (iw < W))[None, :]
        a = tl.load(x_c + (n[None, :] * sxn + ih * sxh + iw[None, :] * sxw)[None, :, :],
                    mask=cmask[:, None, None] & a_ok[None, :, :], other=0.0)
        gx = p[:, None] - j[None, :]  # (BR*BS, BKW)
        b_ok = r_ok[:, None] & (gx >= 0) & (gx < OW)
        b = tl.load(g_c + ((n * sgn + oy * sgh)[:, None] + gx * sgw)[None, :, :],
                    mask=cmask[:, None, None] & b_ok[None, :, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ok = cmask[:, None, None] & (i < KH)[None, :, None] & (j < KW)[None, None, :]
    out_off = ((split * C + c[:, None, None]) * KH + i[None, :, None]) * KW + j[None, None, :]
    tl.store(part_ptr + out_off, acc, mask=out_ok)


@triton.jit(do_not_specialize=['SIZE_KEY'])
def _channel_sum_kernel(g_ptr, part_ptr, C, OH, OW, P_PER_SPLIT, P_TOTAL, SIZE_KEY,
                        sgn, sgc, sgh, sgw, BC: tl.constexpr, BP: tl.constexpr):
    """part[split, c] = sum of g[n, c, oy, ox] over this split's (n, oy, ox) positions (fp32)."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BC)
    cb = pid % n_cb
    split = pid // n_cb
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    p_lo = split * P_PER_SPLIT
    p_hi = tl.minimum(p_lo + P_PER_SPLIT, P_TOTAL)
    plane = OH * OW
    acc = tl.zeros((BC, BP), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BP):
        p = p0 + tl.arange(0, BP)
        n = p // plane
        rem = p % plane
        off = n * sgn + (rem // OW) * sgh + (rem % OW) * sgw
        g = tl.load(g_ptr + c[:, None] * sgc + off[None, :],
                    mask=cmask[:, None] & (p < p_hi)[None, :], other=0.0)
        acc += g.to(tl.float32)
    tl.store(part_ptr + split * C + c, tl.sum(acc, axis=1), mask=cmask)


# --- block configurations ------------------------------------------------------------------
# Two families per kernel, chosen by the memory layout of the tensor read: 'cf' (NCHW: a
# channel's plane is contiguous, one or few channels per program) and 'cl' (channels_last:
# neighbouring channels are contiguous, so a program takes a channel block and loads it in one
# coalesced vector). Under the interpreter each family has one small configuration (no tuning).

def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    _CONV_CONFIGS = {'cf': [_cfg(BC=1, BH=16, BW=16, BK=16)],
                     'cl': [_cfg(BC=2, BH=16, BW=16, BK=16)]}
    _WGRAD_CONFIGS = {'cf': [_cfg(BC=1, BR=2, BS=16)], 'cl': [_cfg(BC=2, BR=2, BS=16)]}
    _SUM_CONFIGS = {'cf': [_cfg(BC=1, BP=64)], 'cl': [_cfg(BC=2, BP=32)]}
else:
    _CONV_CONFIGS = {
        # BC = 1 runs 2-D tiles (wgmma on Hopper from BH = 64); a 31-wide kernel wastes least
        # at BW = 32 (62 band columns padded to 64), a 13-wide one at BK = 16
        'cf': [_cfg(BC=1, BH=64, BW=64, BK=32), _cfg(BC=1, BH=64, BW=32, BK=32),
               _cfg(BC=1, BH=64, BW=32, BK=16), _cfg(BC=1, BH=128, BW=32, BK=32, num_warps=8),
               _cfg(BC=1, BH=128, BW=64, BK=32, num_warps=8),
               _cfg(BC=4, BH=16, BW=16, BK=16)],  # small planes (16 x 16 at RepLKNet's stage 4)
        'cl': [_cfg(BC=16, BH=16, BW=16, BK=16), _cfg(BC=8, BH=16, BW=32, BK=32),
               _cfg(BC=8, BH=32, BW=32, BK=16, num_warps=8), _cfg(BC=4, BH=32, BW=32, BK=32),
               _cfg(BC=32, BH=16, BW=16, BK=16, num_warps=8)],
    }
    _WGRAD_CONFIGS = {
        'cf': [_cfg(BC=1, BR=1, BS=64), _cfg(BC=1, BR=2, BS=64), _cfg(BC=1, BR=4, BS=32),
               _cfg(BC=1, BR=8, BS=16), _cfg(BC=2, BR=2, BS=32)],
        'cl': [_cfg(BC=4, BR=4, BS=16), _cfg(BC=8, BR=2, BS=16),
               _cfg(BC=8, BR=4, BS=16, num_warps=8),
               _cfg(BC=4, BR=2, BS=32)],
    }
    _SUM_CONFIGS = {'cf': [_cfg(BC=1, BP=1024), _cfg(BC=4, BP=256)],
                    'cl': [_cfg(BC=32, BP=32), _cfg(BC=64, BP=16), _cfg(BC=16, BP=64)]}

#: smallest channel block of each wgrad family: the number of row splits is sized for it
WGRAD_MIN_BC = {fam: min(c.kwargs['BC'] for c in cfgs) for fam, cfgs in _WGRAD_CONFIGS.items()}

# The autotuner times the configurations once per key. SIZE_KEY (unused by the kernels) stands
# for the batch and the size buckets of the plane (large_kernel.size_bucket), so images of many
# sizes share a timing as the dispatch's own signatures do, instead of one per exact size.
_CONV_KEY = ['C', 'KH', 'KW', 'PH', 'PW', 'SIZE_KEY']
_WGRAD_KEY = ['C', 'KH', 'KW', 'PH', 'PW', 'SIZE_KEY']
_SUM_KEY = ['C', 'SIZE_KEY']


def _tuned(fn, configs, key):
    # timings are kept on disk across processes (triton's cache folder) on a GPU
    return {fam: triton.autotune(configs=cfgs, key=key, cache_results=True)(fn)
            for fam, cfgs in configs.items()}


conv = _tuned(_dw_conv_kernel, _CONV_CONFIGS, _CONV_KEY)
wgrad = _tuned(_dw_conv_wgrad_kernel, _WGRAD_CONFIGS, _WGRAD_KEY)
channel_sum = _tuned(_channel_sum_kernel, _SUM_CONFIGS, _SUM_KEY)


def compile_configs(arch=90, dtypes=('bf16', 'fp16', 'fp32'), first_only=()):
    """Compile every block configuration for CUDA ``sm_<arch>`` here, without a GPU.

    Triton lowers to PTX and runs the ptxas it ships, so a CPU-only machine can check that the
    kernels the interpreter tested also compile for the H200 (sm_90), and what each costs in
    shared memory. Needs the compiled (not interpreted) kernels: ``TRITON_INTERPRET`` unset or 0.
    ``first_only``: dtypes for which only the first configuration of each family is compiled.
    Returns one dict per compiled kernel: kernel, family, dtype, config, seconds, shared (bytes),
    mma ('wgmma', 'mma.sync' or 'none': the tensor-core instruction in the PTX).
    """
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if INTERPRET:
        raise RuntimeError('compile_configs needs TRITON_INTERPRET unset or 0: under the '
                           'interpreter there is nothing to compile.')
    target = GPUTarget('cuda', arch, 32)
    jobs = [('conv', _dw_conv_kernel, _CONV_CONFIGS, {'b_ptr': '*fp32'},
             {'HAS_BIAS': True}),
            ('wgrad', _dw_conv_wgrad_kernel, _WGRAD_CONFIGS, {'part_ptr': '*fp32'},
             {'BKH': 32, 'BKW': 32}),
            ('channel_sum', _channel_sum_kernel, _SUM_CONFIGS, {'part_ptr': '*fp32'}, {})]
    records = []
    for dtype in dtypes:
        precision = 'tf32x3' if dtype == 'fp32' else 'tf32'
        for name, fn, families, pointer_types, constants in jobs:
            for family, configs in families.items():
                for config in configs[:1] if dtype in first_only else configs:
                    consts = dict(constants, **config.kwargs)
                    if 'PRECISION' in fn.arg_names:
                        consts['PRECISION'] = precision
                    signature = {a: 'constexpr' if a in consts else
                                 pointer_types.get(a, f'*{dtype}' if a.endswith('_ptr') else 'i32')
                                 for a in fn.arg_names}
                    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
                    start = time.perf_counter()
                    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts),
                                              target=target, options=options)
                    ptx = compiled.asm['ptx']
                    records.append(dict(
                        kernel=name, family=family, dtype=dtype,
                        config=dict(config.kwargs, **options),
                        seconds=time.perf_counter() - start, shared=compiled.metadata.shared,
                        mma='wgmma' if 'wgmma.mma_async' in ptx else
                        'mma.sync' if 'mma.sync' in ptx else 'none'))
    return records
