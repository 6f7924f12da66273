"""Triton depthwise conv kernels against F.conv2d: values and the input / weight / bias gradients.

On a CPU-only machine they run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
unless it is set); with TRITON_INTERPRET=0 and a GPU, the same tests run the compiled kernels on
CUDA tensors. References are F.conv2d in float64 from the same (rounded) inputs.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from reparam_mm.layers.triton_dw import bound_seconds, triton_available, triton_depthwise_conv2d

HAS_TRITON = importlib.util.find_spec('triton') is not None
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
DEVICE = 'cpu' if INTERPRET else 'cuda'
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or torch.cuda.is_available()),
    reason='triton is not installed' if not HAS_TRITON
    else 'TRITON_INTERPRET is not 1 and there is no CUDA device to compile for')


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 compared at fp32 tolerance: the compiled kernels then use 3-pass TF32, not TF32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _inputs(n, c, h, w, kh, kw, channels_last, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, kh, kw, generator=g) / (kh * kw) ** 0.5
    b = torch.randn(c, generator=g) if bias else None
    cast = [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (x, weight, b)]
    return cast, g


def _close(actual, ref, rel):
    """|actual - ref| <= rel * max|ref| elementwise (sums of many terms: error follows the max)."""
    assert actual.shape == ref.shape
    err = (actual.detach().double().cpu() - ref.detach().cpu()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f'max error {err:.3g} > {rel} * max|ref| {scale:.3g}'


CASES = [
    # n, c, h, w, kh, kw, padding (None: k // 2), channels_last, bias
    pytest.param(2, 3, 10, 11, 7, 5, None, False, True, id='7x5-nchw-bias'),
    pytest.param(2, 3, 10, 11, 7, 5, None, True, False, id='7x5-cl'),
    # output smaller than the input along H (pad 2 < 9 // 2), larger along W (pad 6 > 9 // 2)
    pytest.param(1, 4, 9, 13, 9, 9, (2, 6), False, True, id='9x9-pad2,6-nchw-bias'),
    pytest.param(1, 4, 9, 13, 9, 9, (2, 6), True, True, id='9x9-pad2,6-cl-bias'),
    pytest.param(1, 2, 6, 7, 31, 31, None, False, True, id='31x31-tiny-nchw-bias'),
    # more than 32 kernel rows: the weight gradient spans two tap blocks
    pytest.param(1, 3, 5, 4, 37, 3, (18, 1), True, False, id='37x3-cl'),
]


@needs_triton
@pytest.mark.parametrize('n,c,h,w,kh,kw,padding,channels_last,bias', CASES)
def test_fp32_values_and_gradients(n, c, h, w, kh, kw, padding, channels_last, bias):
    (x, weight, b), g = _inputs(n, c, h, w, kh, kw, channels_last, bias, torch.float32, kh * kw)
    out = triton_depthwise_conv2d(x, weight, b, padding)
    pad = (kh // 2, kw // 2) if padding is None else padding
    xd, wd = (t.detach().cpu().double().requires_grad_() for t in (x, weight))
    bd = b.detach().cpu().double().requires_grad_() if bias else None
    ref = F.conv2d(xd, wd, bd, 1, pad, 1, c)
    assert out.dtype == torch.float32
    _close(out, ref, 1e-5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)

    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(grad_out.to(out))
    ref.backward(grad_out)
    _close(x.grad, xd.grad, 1e-5)
    _close(weight.grad, wd.grad, 1e-5)
    if bias:
        _close(b.grad, bd.grad, 1e-5)
    assert x.grad.is_contiguous(memory_format=layout)


@needs_triton
@pytest.mark.parametrize('dtype,channels_last', [(torch.bfloat16, True), (torch.float16, False)])
def test_half_precision(dtype, channels_last):
    (x, weight, b), g = _inputs(2, 3, 10, 11, 7, 7, channels_last, True, dtype, 7)
    out = triton_depthwise_conv2d(x, weight, b)
    assert out.dtype == dtype
    xd, wd, bd = (t.detach().cpu().double().requires_grad_() for t in (x, weight, b))
    ref = F.conv2d(xd, wd, bd, 1, 3, 1, 3)
    grad_out = torch.randn(ref.shape, generator=g).to(dtype)
    out.backward(grad_out.to(DEVICE))
    ref.backward(grad_out.double())
    # fp32 accumulation, one rounding to the 16-bit type at the end (the interpreter truncates:
    # up to one bf16 ulp, 2**-7 relative); weight / bias gradients are summed in fp32 too
    rel = 1e-2 if dtype == torch.bfloat16 else 2e-3
    pairs = ((out, ref), (x.grad, xd.grad), (weight.grad, wd.grad), (b.grad, bd.grad))
    for actual, expected in pairs:
        assert actual.dtype == dtype
        _close(actual, expected, rel)


@needs_triton
def test_no_grad_and_checkpoint_and_expanded_gradient():
    (x, weight, b), _ = _inputs(1, 2, 9, 9, 7, 7, False, True, torch.float32, 3)
    with torch.no_grad():
        plain = triton_depthwise_conv2d(x, weight, b)
    assert plain.grad_fn is None and not plain.requires_grad

    # out.sum() hands backward an expanded (all-zero strides) gradient
    triton_depthwise_conv2d(x, weight, b).sum().backward()
    grads = [t.grad.clone() for t in (x, weight, b)]
    for t in (x, weight, b):
        t.grad = None
    out = checkpoint(triton_depthwise_conv2d, x, weight, b, use_reentrant=False)
    assert torch.equal(out.detach(), plain)
    out.sum().backward()
    # per-split partial sums, no atomics: the recomputed backward is bit-identical
    for before, t in zip(grads, (x, weight, b)):
        assert torch.equal(before, t.grad)


@needs_triton
def test_empty_batch():
    (x, weight, b), _ = _inputs(0, 3, 8, 8, 7, 7, False, True, torch.float32, 1)
    out = triton_depthwise_conv2d(x, weight, b)
    assert out.shape == (0, 3, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(b.grad, torch.zeros_like(b))


@needs_triton
def test_autocast_computes_in_the_autocast_dtype_like_f_conv2d():
    (x, weight, b), g = _inputs(1, 3, 8, 9, 7, 7, True, True, torch.float32, 5)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = triton_depthwise_conv2d(x, weight, b)
        ref = F.conv2d(x, weight, b, 1, 3, 1, 3)
    assert out.dtype == ref.dtype == torch.bfloat16
    _close(out, ref.double(), 2e-2)
    out.float().sum().backward()
    # gradients come back in the parameters' own dtype
    assert x.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.float32


@needs_triton
def test_bad_inputs_are_refused_with_one_sentence():
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r'depthwise \(C, 1, kh, kw\) weight with C=3'):
        triton_depthwise_conv2d(x, torch.randn(4, 1, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r'larger than the padded input 8x8'):
        triton_depthwise_conv2d(x, torch.randn(3, 1, 9, 9, device=DEVICE), padding=0)
    with pytest.raises(ValueError, match='padding must be a non-negative int'):
        triton_depthwise_conv2d(x, torch.randn(3, 1, 3, 3, device=DEVICE), padding=-1)
    with pytest.raises(TypeError, match='float32, bfloat16 and float16 inputs, got torch.float64'):
        triton_depthwise_conv2d(x.double(), torch.randn(3, 1, 3, 3, device=DEVICE).double())
    with pytest.raises(ValueError, match="weight and bias must be on the input's device"):
        triton_depthwise_conv2d(x, torch.randn(3, 1, 3, 3, device='meta'))
    with pytest.raises(ValueError, match=r'bias of shape \(3,\)'):
        triton_depthwise_conv2d(x, torch.randn(3, 1, 3, 3, device=DEVICE),
                                torch.randn(2, device=DEVICE))


def test_unavailable_without_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    x = torch.randn(1, 2, 8, 8)
    assert not triton_available(x)
    with pytest.raises(RuntimeError, match='cannot run here: .*use F.conv2d'):
        triton_depthwise_conv2d(x, torch.randn(2, 1, 3, 3))
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert triton_available(x) == HAS_TRITON


def test_package_imports_without_triton_and_refuses_cleanly():
    """``import reparam_mm`` works without triton and loads no Triton kernel module; a call then
    says why it cannot run. (Whether triton ends up imported is not ours to assert: where
    mmpretrain is installed, mmdet imports it, and torchvision's ops import torch._dynamo,
    which imports triton.)"""
    code = (
        'import sys\n'
        'sys.modules["triton"] = None  # as if not installed\n'
        'import torch, reparam_mm, mmseg.models, mmdet.models\n'
        'from reparam_mm.layers.triton_dw import triton_available, triton_depthwise_conv2d\n'
        'kernels = "reparam_mm.layers._triton_dw_kernels"\n'
        'assert kernels not in sys.modules, "Triton kernels imported eagerly"\n'
        'x = torch.randn(1, 2, 8, 8)\n'
        'assert not triton_available(x)\n'
        'try:\n'
        '    triton_depthwise_conv2d(x, torch.randn(2, 1, 3, 3))\n'
        'except RuntimeError as e:\n'
        '    print(e)\n'
    )
    env = dict(os.environ, TRITON_INTERPRET='1')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'cannot run here: triton is not installed' in done.stdout


def test_bound_seconds_hand_computed():
    # 2 x 4 x 8 x 8, 3x3 (padding 1: output 8x8), bf16 (2 bytes).
    # forward: 512 x + 512 y + 36 w elements = 2120 bytes; 2*4*64*9 = 4608 FMAs
    assert bound_seconds(2, 4, 8, 8, 3, 3, torch.bfloat16, 1e3, 1e12, False) == pytest.approx(2.12)
    assert bound_seconds(2, 4, 8, 8, 3, 3, torch.bfloat16, 1e12, 1e3, False) == pytest.approx(4.608)
    # forward + backward: also read gy, x, w and write gx, gw:
    # 2120 + 2 * (3 * 512 + 2 * 36) = 5336 bytes;
    # 3 * 4608 = 13824 FMAs
    assert bound_seconds(2, 4, 8, 8, 3, 3, torch.bfloat16, 1e3, 1e12, True) == pytest.approx(5.336)
    assert bound_seconds(2, 4, 8, 8, 3, 3, torch.bfloat16, 1e12, 1e3, True) == pytest.approx(13.824)
    # fp32 doubles the bytes; an even kernel with padding k // 2 grows the output by one: 9x9
    assert bound_seconds(1, 1, 8, 8, 4, 4, torch.float32, 1, 1e30, False) == 4 * (64 + 16 + 81)
    # the bound is the larger of the two
    assert bound_seconds(2, 4, 8, 8, 3, 3, torch.bfloat16, 1e3, 1e3, False) == pytest.approx(4.608)



@pytest.mark.slow  # ~15 s: 31 kernel compilations through LLVM and ptxas
@pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed')
def test_every_block_configuration_compiles_for_the_h200(tmp_path):
    """No GPU needed: triton lowers each configuration to sm_90 machine code with its own ptxas.

    The interpreter checks values; this checks that the same kernels compile for the GPU (a
    dot shape or layout the compiler refuses would otherwise surface only on the device).
    """
    code = ('import json, sys\n'
            'from reparam_mm.layers._triton_dw_kernels import compile_configs\n'
            'json.dump(compile_configs(90, ("bf16", "fp32"), first_only=("fp32",)), sys.stdout)\n')
    env = dict(os.environ, TRITON_INTERPRET='0', TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout)
    assert {(r['kernel'], r['dtype']) for r in records} == {
        (k, d) for k in ('conv', 'wgrad', 'channel_sum') for d in ('bf16', 'fp32')}
    for r in records:
        if r['kernel'] == 'channel_sum':
            continue
        # the convolutions are tensor-core products; one channel per program at 64+ rows is
        # a 2-D tile, which Hopper runs as warpgroup MMAs
        wide = r['config']['BC'] == 1 and r['config'].get('BH', 0) >= 64
        assert r['mma'] == ('wgmma' if wide else 'mma.sync'), r


@pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed')
def test_autotuning_times_once_per_size_bucket_not_per_size():
    """Whole-image inference meets a new plane size with nearly every image; the autotuner's key
    holds the batch and the size buckets (as the dispatch's signatures do), never exact sizes."""
    from reparam_mm.layers import _triton_dw_kernels as kernels
    from reparam_mm.layers.triton_dw import _size_key
    assert _size_key(1, 20, 18) == _size_key(1, 22, 16)  # buckets 20-22 x 16-19
    assert _size_key(1, 23, 18) != _size_key(1, 20, 18) != _size_key(2, 20, 18)
    assert 0 <= _size_key(64, 4000, 4000) < 2 ** 31  # an int32 kernel argument
    for tuned in (*kernels.conv.values(), *kernels.wgrad.values(), *kernels.channel_sum.values()):
        assert 'SIZE_KEY' in tuned.keys and not {'N', 'H', 'W', 'OH', 'OW'} & set(tuned.keys)
