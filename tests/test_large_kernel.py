"""The large depthwise conv dispatch point: same results as F.conv2d, the candidate (direct
NCHW / channels_last, FFT, Triton) chosen per call signature by timing or by fixed rules."""
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from reparam_mm.layers import large_kernel
from reparam_mm.layers.large_kernel import (CHANNELS_LAST_MIN_KERNEL, FFT_MIN_KERNEL,
                                            LargeKernelDWConv2d, _fast_fft_size,
                                            backbone_channels_last, fft_depthwise_conv2d,
                                            candidates, dispatch_mode, fixed_choice,
                                            forced_candidate, large_depthwise_conv2d,
                                            use_channels_last, use_fft)
from torch.utils.checkpoint import checkpoint


@pytest.mark.parametrize('k,stride,bias', [(31, 1, False), (13, 1, True), (11, 2, True),
                                           (9, 1, True), (5, 2, True), (3, 2, False)])
@pytest.mark.parametrize('channels_last_input', [False, True])
def test_equals_f_conv2d(k, stride, bias, channels_last_input):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 6, 19, 23, generator=g)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, k, k, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    out = large_depthwise_conv2d(x, w, b, stride, k // 2)
    ref = F.conv2d(x.contiguous(), w, b, stride, k // 2, 1, 6)
    # float rounding grows with the k*k-term sums (and differs between direct and FFT)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # the output keeps the caller's layout whatever layout the conv ran in
    layout = torch.channels_last if channels_last_input else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)


def test_layout_rule():
    x = torch.randn(1, 4, 8, 8)
    assert use_channels_last(x, (CHANNELS_LAST_MIN_KERNEL, CHANNELS_LAST_MIN_KERNEL))
    assert not use_channels_last(x, (CHANNELS_LAST_MIN_KERNEL - 2,) * 2)
    assert not use_channels_last(torch.randn(4, 8, 8), (31, 31))
    assert not use_channels_last(torch.randn(1, 4, 8, 8, device='meta'), (31, 31))
    assert not backbone_channels_last(x)  # fp32: FFTs take the largest kernels, NCHW is faster
    assert backbone_channels_last(x.bfloat16()) and backbone_channels_last(x.half())
    assert not backbone_channels_last(torch.randn(4, 8, 8).bfloat16())
    assert not backbone_channels_last(torch.randn(1, 4, 8, 8, device='meta', dtype=torch.half))


def test_gradients_match_f_conv2d():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 17, 17, generator=g, requires_grad=True)
    w = torch.randn(4, 1, 13, 13, generator=g, requires_grad=True)
    large_depthwise_conv2d(x, w, None, 1, 6).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.conv2d(x, w, None, 1, 6, 1, 4).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-4)


def test_rejects_non_depthwise_weight():
    with pytest.raises(ValueError, match='depthwise'):
        large_depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 7, 7))


def test_module_is_a_conv2d_with_the_same_keys_and_output():
    conv = LargeKernelDWConv2d(8, 29, bias=True)
    assert isinstance(conv, torch.nn.Conv2d)
    assert set(conv.state_dict()) == {'weight', 'bias'}
    assert conv.padding == (14, 14) and conv.groups == 8
    x = torch.randn(1, 8, 21, 21)
    plain = torch.nn.Conv2d(8, 8, 29, padding=14, groups=8)
    plain.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)


@dispatch_mode('fixed')
def test_cpu_runs_large_kernels_in_channels_last(monkeypatch):
    seen = []
    real = F.conv2d

    def spy(x, *args):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(x, *args)

    monkeypatch.setattr(F, 'conv2d', spy)
    x = torch.randn(1, 8, 16, 16)  # NCHW, where oneDNN's large depthwise path is slow
    large_depthwise_conv2d(x, torch.randn(8, 1, 13, 13), None, 1, 6)
    large_depthwise_conv2d(x, torch.randn(8, 1, 5, 5), None, 1, 2)
    assert seen == [True, False]


# -- FFT path ---------------------------------------------------------------------------------
@pytest.mark.parametrize('c,h,w,k,padding,bias', [(3, 11, 9, 7, 3, True), (2, 16, 16, 13, 6, False),
                                                   (4, 8, 10, 5, (1, 4), True),
                                                   (2, 40, 33, 31, 15, True), (3, 20, 12, 27, 0, False)])
def test_fft_depthwise_conv_matches_conv2d_in_float64(c, h, w, k, padding, bias):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, c, h, w, dtype=torch.float64, generator=g)
    wt = torch.randn(c, 1, k, k, dtype=torch.float64, generator=g)
    b = torch.randn(c, dtype=torch.float64, generator=g) if bias else None
    if k > h + 2 * (padding if isinstance(padding, int) else padding[0]):
        with pytest.raises(ValueError, match='larger than the padded input'):
            fft_depthwise_conv2d(x, wt, b, padding)
        return
    out = fft_depthwise_conv2d(x, wt, b, padding)
    torch.testing.assert_close(out, F.conv2d(x, wt, b, 1, padding, 1, c), rtol=1e-9, atol=1e-9)
    # differentiable: gradients match direct convolution too
    xs, ws = x.clone().requires_grad_(), wt.clone().requires_grad_()
    go = torch.randn(out.shape, dtype=torch.float64, generator=g)
    ga = torch.autograd.grad(fft_depthwise_conv2d(xs, ws, None, padding), (xs, ws), go)
    gb = torch.autograd.grad(F.conv2d(xs, ws, None, 1, padding, 1, c), (xs, ws), go)
    for a, b_ in zip(ga, gb):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-8)


def test_fft_rejects_non_depthwise_weight():
    with pytest.raises(ValueError, match=r'\(C, 1, kh, kw\) weight'):
        fft_depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 3, 3, 3), None, 1)


def test_fast_fft_size():
    assert [_fast_fft_size(n) for n in (158, 97, 64, 7)] == [160, 100, 64, 8]


def test_fft_rule():
    x = torch.randn(1, 4, 8, 8)
    k = (FFT_MIN_KERNEL, FFT_MIN_KERNEL)
    assert use_fft(x, k, 1, 13, 1) and use_fft(x.double(), (31, 29), (1, 1), (15, 14), (1, 1))
    assert not use_fft(x, (FFT_MIN_KERNEL - 2,) * 2)  # 13x13: direct channels_last is faster
    assert not use_fft(x, (31, 5))  # both sides must be large
    assert not use_fft(x, k, stride=2) and not use_fft(x, k, dilation=2)
    assert not use_fft(x, k, padding='same')
    assert not use_fft(torch.randn(1, 4, 40, 8), (31, 31), 1, (15, 5))  # too narrow for the kernel
    assert use_fft(torch.randn(1, 4, 40, 8), (31, 31), 1, (15, 12))
    assert not use_fft(x.bfloat16(), k) and not use_fft(x.half(), k)  # inference: direct
    # half-precision training: oneDNN's direct backward is 7-26x the FFT's at 27-31
    assert use_fft(x.bfloat16(), k, 1, 13, grad=True) and use_fft(x.half(), k, 1, 13, grad=True)
    assert not use_fft(x.bfloat16(), (FFT_MIN_KERNEL - 2,) * 2, 1, 12, grad=True)
    assert not use_fft(torch.randn(1, 4, 8, 8, device='meta'), k)


@dispatch_mode('fixed')
def test_fixed_rules_train_half_precision_through_the_fft_and_infer_direct():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 40, 36, generator=g).bfloat16()
    w = (torch.randn(8, 1, 31, 31, generator=g) * 0.05).bfloat16()
    assert large_kernel.choose(x, w, None, 1, 15) != 'fft'  # inference: direct
    with torch.no_grad():
        assert large_kernel.choose(x, w.requires_grad_(), None, 1, 15) != 'fft'
    assert large_kernel.choose(x, w, None, 1, 15) == 'fft'  # differentiated: FFT
    x.requires_grad_()
    out = large_depthwise_conv2d(x, w, None, 1, 15)
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.conv2d(xr, wr, None, 1, 15, 1, 8)
    ref.backward(grad.float())
    for got, want in ((out, ref), (x.grad, xr.grad), (w.grad, wr.grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))


def test_a_call_that_fails_in_every_layout_raises_its_own_error(monkeypatch, tmp_path):
    """A training batch of one image through a pooled BN (mmseg's PPM) fails in either layout:
    the layout timing raises that error, which tools name as bad input, not 'no candidate
    ran'."""
    from reparam_mm.cli import input_error_message
    monkeypatch.setenv('REPARAM_MM_CACHE', str(tmp_path))
    monkeypatch.setattr(large_kernel, '_cpu_seconds', lambda: None)
    nn = torch.nn
    pooled = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4))
    x = torch.randn(1, 4, 8, 8)

    def forward(x, channels_last):
        return (pooled(x.contiguous(memory_format=torch.channels_last) if channels_last else x),)
    with pytest.raises(ValueError, match='Expected more than 1 value per channel') as raised:
        large_kernel.LargeDWTuner().choose_layout(pooled, x, forward)
    assert input_error_message(raised.value) is not None


@dispatch_mode('fixed')
def test_without_native_half_precision_the_fixed_rules_infer_through_the_fft_too(monkeypatch):
    """An AVX2-only CPU computes bf16 convs in software (RepLKNet-31B's stage-1 31x31 conv:
    9 s direct, 52 ms through FFTs): there inference takes the FFT from 13 on, as training
    does; fp32 and smaller kernels keep their rules."""
    monkeypatch.setattr(large_kernel, 'cpu_native_half', lambda dtype: False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 40, 36, generator=g).bfloat16()
    for k, want in ((31, 'fft'), (13, 'fft'), (11, 'direct_channels_last')):
        w = (torch.randn(8, 1, k, k, generator=g) * 0.05).bfloat16()
        with torch.no_grad():
            assert large_kernel.choose(x, w, None, 1, k // 2) == want, k
    w = torch.randn(8, 1, 13, 13, generator=g)
    with torch.no_grad():
        assert large_kernel.choose(x.float(), w, None, 1, 6) != 'fft'  # fp32: from 27 on
        out = large_depthwise_conv2d(x, w.bfloat16(), None, 1, 6)
    ref = F.conv2d(x.float(), w.bfloat16().float(), None, 1, 6, 1, 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


@pytest.mark.parametrize('channels_last_input', [False, True])
@dispatch_mode('fixed')
def test_dispatch_takes_fft_for_large_stride_1_kernels_and_matches(monkeypatch, channels_last_input):
    calls, real_fft = [], large_kernel.fft_depthwise_conv2d
    monkeypatch.setattr(large_kernel, 'fft_depthwise_conv2d',
                        lambda *a: calls.append('fft') or real_fft(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 37, 30, generator=g)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(8, 1, 31, 29, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    out = large_depthwise_conv2d(x, w, b, 1, (15, 14))
    assert calls == ['fft']
    layout = torch.channels_last if channels_last_input else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    go = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (x, w, b), go)
    ref = F.conv2d(x, w, b, 1, (15, 14), 1, 8)
    want = torch.autograd.grad(ref, (x, w, b), go)
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(scale))
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-5 * float(b_.abs().max()))
    # a stride-2 or half-precision call of the same kernel stays on direct convolution
    large_depthwise_conv2d(x.detach(), w.detach(), None, 2, 15)
    large_depthwise_conv2d(x.detach().bfloat16(), w.detach().bfloat16(), None, 1, 15)
    assert calls == ['fft']


# -- calls that stall oneDNN's bf16 channels_last depthwise conv (issue: `make test` hangs) --------
# Intel Xeon with AMX, input (2, 8, 37, 30): a large kernel padded beyond k // 2 never returned;
# NCHW took 0.08 s. AMD EPYC (AVX512-BF16), 16 channels 45x60: 15x15 to 31x31 kernels at k // 2
# padding never returned (inside oneDNN's JIT kernel generation); NCHW took 0.04 s. Each call must
# return and match F.conv2d at bf16 tolerance, in either mode and input layout (pytest-timeout
# turns a stall into a failure naming the test).
STALLING = [((2, 8, 37, 30), (31, 29), (15, 15)), ((2, 8, 37, 30), (31, 31), (15, 16)),  # AMX
            ((2, 16, 45, 60), (31, 31), (15, 15)), ((1, 16, 45, 60), (15, 15), (7, 7))]  # AMD


def _bf16_case(kernel, shape=(2, 8, 37, 30), seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[1], 1, *kernel, generator=g) / (kernel[0] * kernel[1]) ** 0.5
    return x, w


@pytest.mark.parametrize('shape,kernel,padding', STALLING)
@pytest.mark.parametrize('channels_last_input', [False, True])
@pytest.mark.parametrize('mode', ['fixed', 'tuned'])
def test_stalling_bf16_calls_return_and_match(shape, kernel, padding, channels_last_input, mode):
    x, w = _bf16_case(kernel, shape)
    xb = x.bfloat16()
    if channels_last_input:
        xb = xb.contiguous(memory_format=torch.channels_last)
    assert 'direct_channels_last' not in candidates(xb, kernel, 1, padding)
    t = time.perf_counter()
    with dispatch_mode(mode):
        out = large_depthwise_conv2d(xb, w.bfloat16(), None, 1, padding)
    elapsed = time.perf_counter() - t
    print(f'{kernel} pad {padding} channels_last={channels_last_input} {mode}: {elapsed:.3f} s')
    ref = F.conv2d(xb.float().contiguous(), w.bfloat16().float(), None, 1, padding, 1, shape[1])
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    layout = torch.channels_last if channels_last_input else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)


def test_only_stalling_half_precision_calls_lose_channels_last():
    x = torch.randn(2, 32, 37, 30).bfloat16()  # over-padding (AMX)
    assert 'direct_channels_last' in candidates(x, (31, 29), 1, (15, 14))  # k // 2: same size
    assert 'direct_channels_last' in candidates(x, (7, 7), 1, (3, 4))  # measured safe there
    assert 'direct_channels_last' in candidates(x.float(), (31, 29), 1, (15, 15))  # fp32
    assert 'direct_channels_last' not in candidates(x, (31, 29), 1, (15, 15))
    assert 'direct_channels_last' not in candidates(x.half(), (31, 29), 1, (15, 15))  # fp16 too
    assert fixed_choice(x, (31, 29), 1, (15, 15)) == 'direct_nchw'
    assert fixed_choice(x, (31, 29), 1, (15, 14)) == 'direct_channels_last'
    assert not use_channels_last(x, (31, 29), (15, 15)) and use_channels_last(x, (31, 29), (15, 14))
    few = torch.randn(1, 16, 45, 60).bfloat16()  # 16 channels or fewer (AMD), any padding
    for kernel, padding in [((15, 15), (7, 7)), ((31, 29), (15, 14)), ((13, 15), 'same')]:
        assert 'direct_channels_last' not in candidates(few, kernel, 1, padding), kernel
        assert fixed_choice(few, kernel, 1, padding) == 'direct_nchw'
    assert 'direct_channels_last' in candidates(few, (13, 13), 1, (6, 6))
    assert 'direct_channels_last' in candidates(few.float(), (31, 31), 1, (15, 15))
    assert 'direct_channels_last' in candidates(torch.randn(1, 17, 45, 60).bfloat16(), (31, 31),
                                                1, (15, 15))


# -- the tuner -------------------------------------------------------------------------------------
def _call(requires_grad=False, dtype=torch.float32, k=31, padding=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 20, 18, generator=g, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(4, 1, k, k, generator=g, dtype=dtype, requires_grad=requires_grad)
    return x, w, padding


@pytest.mark.parametrize('fastest', ['direct_nchw', 'direct_channels_last', 'fft'])
def test_tuner_picks_the_fastest_and_caches_it(tuner, monkeypatch, fastest):
    tuner.times = {'direct_nchw': 3.0, 'direct_channels_last': 2.0, 'fft': 1.5, fastest: 0.1}
    x, w, p = _call()
    assert large_kernel.choose(x, w, None, 1, p) == fastest
    assert sorted(tuner.measured) == ['direct_channels_last', 'direct_nchw', 'fft']
    assert large_kernel.choose(x, w, None, 1, p) == fastest  # cached: not timed again
    assert len(tuner.measured) == 3
    # the JSON cache names the device and versions, the signature, every time and the choice
    data = json.loads(tuner.cache_path.read_text())
    (key, entries), = data.items()
    assert f'torch {torch.__version__}' in key
    (sig, entry), = entries.items()
    assert sig == 'cpu|float32|nchw|1x4x20-22x16-19|k31x31|s1x1|p15x15|d1x1|fwd'
    assert entry['choice'] == fastest and set(entry['ms']) == set(tuner.times)
    assert entry['fixed'] == 'fft'
    # another process (a fresh tuner) reads the file instead of timing again
    other = large_kernel.LargeDWTuner()
    other.time_candidates = lambda *a, **k: pytest.fail('a cached signature was timed again')
    monkeypatch.setattr(large_kernel, 'TUNER', other)
    assert large_kernel.choose(x, w, None, 1, p) == fastest


def test_size_buckets_tile_the_sizes_geometrically():
    # below SIZE_BUCKET_MIN every size is its own bucket; from there 4 buckets per doubling
    assert large_kernel.size_bucket(1) == (1, 1)
    assert large_kernel.size_bucket(large_kernel.SIZE_BUCKET_MIN - 1) == (15, 15)
    assert [large_kernel.size_bucket(n) for n in (16, 19, 20, 32, 512, 608, 609)] == [
        (16, 19), (16, 19), (20, 22), (32, 38), (512, 608), (512, 608), (609, 724)]
    bucket, previous_hi = None, 15
    for n in range(16, 4100):
        lo, hi = large_kernel.size_bucket(n)
        assert lo <= n <= hi
        if lo != previous_hi + 1:  # inside the bucket met before
            assert (lo, hi) == bucket
        else:  # the next bucket starts where the last one ended, at most 2 ** (1/4) wider
            assert hi + 1 <= math.ceil(lo * 2 ** 0.25) + 1
        bucket, previous_hi = (lo, hi), hi
    assert large_kernel.shape_label((1, 128, 128, 160)) == '1x128x128-152x153-181'
    assert large_kernel.shape_label((3924, 256, 7, 7)) == '3445-4095x256x7x7'  # RoIs
    assert large_kernel.shape_label((2, 3)) == '2x3'  # not an image: as it is


def test_sizes_in_one_bucket_share_a_timing_and_the_entry_names_the_size_timed(tuner):
    tuner.times = {'direct_nchw': 3.0, 'direct_channels_last': 2.0, 'fft': 0.5}
    w = torch.randn(4, 1, 31, 31)
    assert large_kernel.choose(torch.randn(1, 4, 20, 18), w, None, 1, 15) == 'fft'
    assert len(tuner.measured) == 3
    tuner.times['fft'] = 9.0  # were the next size timed, the choice would change
    assert large_kernel.choose(torch.randn(1, 4, 22, 16), w, None, 1, 15) == 'fft'
    assert len(tuner.measured) == 3  # 22 and 16 share the buckets of 20 and 18
    assert large_kernel.choose(torch.randn(1, 4, 23, 18), w, None, 1, 15) == 'direct_channels_last'
    assert len(tuner.measured) == 6  # 23 starts the next bucket
    entries = json.loads(tuner.cache_path.read_text()).popitem()[1]
    assert {sig.split('|')[3]: e['shape'] for sig, e in entries.items()} == {
        '1x4x20-22x16-19': '1x4x20x18', '1x4x23-26x16-19': '1x4x23x18'}
    # the batch and channels stay exact
    large_kernel.choose(torch.randn(2, 4, 20, 18), w.new_zeros(4, 1, 31, 31), None, 1, 15)
    assert len(tuner.measured) == 9


def test_a_candidate_hopeless_at_nearby_sizes_is_not_run_at_a_new_one(tuner, monkeypatch):
    tuner.times = {'direct_nchw': 40.0, 'direct_channels_last': 1.0, 'fft': 1.25}
    w = torch.randn(4, 1, 31, 31)
    assert large_kernel.choose(torch.randn(1, 4, 40, 40), w, None, 1, 15) == 'direct_channels_last'
    assert len(tuner.measured) == 3
    tuner.measured.clear()
    # the next bucket, within 2x: NCHW (40x the best there) is not run; the others are
    assert large_kernel.choose(torch.randn(1, 4, 48, 56), w, None, 1, 15) == 'direct_channels_last'
    assert sorted(tuner.measured) == ['direct_channels_last', 'fft']
    entries = json.loads(tuner.cache_path.read_text()).popitem()[1]
    entry = entries['cpu|float32|nchw|1x4x46-53x54-63|k31x31|s1x1|p15x15|d1x1|fwd']
    assert entry['skipped'] == {'direct_nchw': '40x the best at 40x40'}
    assert set(entry['ms']) == {'direct_channels_last', 'fft'}
    # every other call is timed in full: more than 2x away, another layout, other channels
    for x in (torch.randn(1, 4, 40, 120), torch.randn(1, 4, 19, 40),
              torch.randn(1, 4, 44, 44).contiguous(memory_format=torch.channels_last),
              torch.randn(1, 8, 44, 44)):
        tuner.measured.clear()
        large_kernel.choose(x, w.new_zeros(x.shape[1], 1, 31, 31), None, 1, 15)
        assert sorted(tuner.measured) == ['direct_channels_last', 'direct_nchw', 'fft'], x.shape
    # a candidate only 10x slower keeps being timed
    tuner.times['fft'] = 10.0
    w2 = w[:2]
    large_kernel.choose(torch.randn(1, 2, 40, 40), w2, None, 1, 15)
    tuner.measured.clear()
    large_kernel.choose(torch.randn(1, 2, 64, 64), w2, None, 1, 15)
    assert sorted(tuner.measured) == ['direct_channels_last', 'fft']
    tuner.times['fft'] = 1.25
    # another process reads the timing tables with the choices
    other = large_kernel.LargeDWTuner()
    other.time_candidates, other.measured = tuner.time_candidates, tuner.measured
    monkeypatch.setattr(large_kernel, 'TUNER', other)
    tuner.measured.clear()
    large_kernel.choose(torch.randn(1, 4, 36, 36), w, None, 1, 15)
    assert sorted(tuner.measured) == ['direct_channels_last', 'fft']


def test_a_timing_under_contention_leaves_nothing_out_at_nearby_sizes(tuner, monkeypatch):
    tuner.times = {'direct_nchw': 40.0, 'direct_channels_last': 1.0, 'fft': 1.25}
    w = torch.randn(4, 1, 31, 31)
    monkeypatch.setattr(tuner, 'contended', lambda *a, **k: True)
    with pytest.warns(UserWarning, match='other processes used'):
        large_kernel.choose(torch.randn(1, 4, 40, 40), w, None, 1, 15)
    monkeypatch.setattr(tuner, 'contended', lambda *a, **k: False)
    tuner.measured.clear()
    large_kernel.choose(torch.randn(1, 4, 48, 48), w, None, 1, 15)
    assert sorted(tuner.measured) == ['direct_channels_last', 'direct_nchw', 'fft']


def test_hopeless_nearby_never_leaves_out_every_candidate(tuner):
    key = tuner.device_key(torch.device('cpu'))
    sig = 'cpu|float32|nchw|1x4x46-53x46-53|k31x31|s1x1|p15x15|d1x1|fwd'
    tuner.tables[(key, 'cpu|float32|nchw|1x4|k31x31|s1x1|p15x15|d1x1|fwd')] = [
        (40, 40, {'a': 1.0, 'b': 20.0, 'c': 30.0}), (60, 60, {'a': 20.0, 'b': 1.0, 'c': 50.})]
    # 'b' was the best at 60x60, so only 'c' (hopeless at both) is left out
    assert tuner.hopeless_nearby(key, sig, (1, 4, 48, 48), ['a', 'b', 'c']) == {
        'c': '30x the best at 40x40'}
    assert tuner.hopeless_nearby(key, sig, (1, 4, 48, 48), ['c']) == {}  # one must run
    assert tuner.hopeless_nearby(key, sig, (1, 4, 48, 48), ['c', 'd']) == {
        'c': '30x the best at 40x40'}  # 'd', never timed near here, runs
    layout_sig = 'layout|RepLKNet:1:eval|cpu'
    assert tuner.hopeless_nearby(key, layout_sig, (1, 3, 48, 48), ['c', 'a']) == {}


class _FakeClock:
    """A clock that only the candidates advance (seconds per call, in order)."""

    def __init__(self):
        self.now, self.log = 0., []

    def __call__(self):
        return self.now

    def run(self, name, seconds):
        durations = iter(seconds)

        def call():
            self.log.append(name)
            self.now += next(durations, seconds[-1])
        return call


def test_candidates_are_timed_in_interleaved_rounds_after_a_warm_up():
    tuner, clock = large_kernel.LargeDWTuner(), _FakeClock()
    tuner.clock = clock

    def bad():
        clock.log.append('bad')
        raise RuntimeError('no kernel')

    runs = {'a': clock.run('a', [0.01]), 'b': clock.run('b', [0.05, 0.05, 0.05, 0.02]),
            'slow': clock.run('slow', [0.6, 0.7]), 'bad': bad}
    times, errors = tuner.time_candidates(runs)
    assert times == pytest.approx({'a': 0.01, 'b': 0.02, 'slow': 0.6})  # each one's best, warm
    assert errors == {'bad': 'RuntimeError: no kernel'}
    log = clock.log
    assert log[:5] == ['a', 'b', 'slow', 'bad', 'slow']  # first runs; a slow one runs twice only
    assert log[5:23] == ['a'] * 9 + ['b'] * 9  # warm-up: 10 runs each (under 0.4 s)
    rounds = log[23:]
    assert len(rounds) >= 6 and rounds == ['a', 'b'] * (len(rounds) // 2)  # then alternating


def test_on_cpu_a_hopeless_candidate_keeps_its_first_run_and_is_not_run_again():
    tuner, clock = large_kernel.LargeDWTuner(), _FakeClock()
    tuner.clock = clock
    runs = {'fast': clock.run('fast', [0.02, 0.01]), 'hopeless': clock.run('hopeless', [0.8]),
            'close': clock.run('close', [0.15, 0.05])}
    times, _ = tuner.time_candidates(runs, drop_hopeless=True)
    assert clock.log.count('hopeless') == 1 and times['hopeless'] == pytest.approx(0.8)  # 40x
    assert clock.log.count('close') > 3  # 7.5x on its first run: timed as the others
    assert times == pytest.approx({'fast': 0.01, 'close': 0.05, 'hopeless': 0.8})
    # 11x, but under 50 ms: a first run that short may be mostly a primitive's JIT
    short = {'fast': clock.run('fast', [0.004]), 'short': clock.run('short', [0.045, 0.002])}
    assert tuner.time_candidates(short, drop_hopeless=True)[0]['short'] == pytest.approx(0.002)
    clock.log.clear()
    tuner.time_candidates(runs, drop_hopeless=False)  # CUDA: a first run includes compiling
    assert clock.log.count('hopeless') == 2


def test_a_backbone_layout_is_never_dropped_after_its_first_run(tuner, monkeypatch):
    seen = {}
    monkeypatch.setattr(tuner, 'time_candidates', lambda runs, **options: (
        seen.update(options) or ({'nchw': 1., 'channels_last': 2.}, {})))
    _ToyBackbone()(torch.randn(1, 4, 8, 8))
    assert seen == dict(warm_up=False, drop_hopeless=False)
    large_kernel.choose(*_call()[:2], None, 1, 15)
    assert seen == dict(warm_up=True, drop_hopeless=True)


def test_whole_backbones_are_timed_without_the_long_warm_up():
    tuner, clock = large_kernel.LargeDWTuner(), _FakeClock()
    tuner.clock = clock
    runs = {'nchw': clock.run('nchw', [0.3, 0.1]), 'channels_last': clock.run('cl', [0.3, 0.08])}
    times, _ = tuner.time_candidates(runs, warm_up=False)
    assert times == pytest.approx({'nchw': 0.1, 'channels_last': 0.08})
    assert clock.log == ['nchw', 'cl'] + ['nchw', 'cl'] * 3  # a first run each, then 3 rounds


def test_other_processes_cpu_use_marks_a_timing_contended():
    tuner = large_kernel.LargeDWTuner()
    # 1.5 s of busy CPU in 1 s, 0.5 s of it this process's: others used one core
    assert tuner.other_cores((100., 10., 0.), (101.5, 10.5, 0.), 1.) == pytest.approx(1.)
    assert tuner.other_cores(None, (101.5, 10.5, 0.), 1.) == 0.  # not Linux: never contended
    # within the counters' resolution (3 ticks of 10 ms a reading): no contention
    assert tuner.other_cores((100., 10., .03), (100.05, 10., .03), .05) == 0.
    assert tuner.contended(1., cpus=2, threads=2)
    assert not tuner.contended(0.1, cpus=2, threads=2)
    assert not tuner.contended(1., cpus=16, threads=8)  # the others ran on cores left free


def test_cpu_seconds_count_this_process():
    before = large_kernel._cpu_seconds()
    if before is None:
        pytest.skip('no /proc/stat on this system')
    end = time.process_time() + 0.3
    while time.process_time() < end:  # spin
        pass
    after = large_kernel._cpu_seconds()
    busy, own = after[0] - before[0], after[1] - before[1]
    assert own >= 0.25 and busy >= own - before[2] - after[2]  # the CPUs' busy time holds ours


def test_contended_timing_serves_this_process_and_is_timed_again_by_the_next(tuner, monkeypatch):
    tuner.times = {'direct_nchw': 1.0, 'direct_channels_last': 0.5, 'fft': 2.0}
    readings = iter([(100., 10., 0.), (110., 10., 0.)])  # others kept two cores busy for 5 s
    monkeypatch.setattr(large_kernel, '_cpu_seconds', lambda: next(readings))
    monkeypatch.setattr(large_kernel, '_usable_cpus', lambda: 2)
    tuner.clock = iter([0., 5.]).__next__  # the timing took 5 s
    x, w, p = _call()
    with pytest.warns(UserWarning, match=r'other processes used 2\.0 CPU cores while the '
                                         r'large-kernel dispatch timed cpu\|float32.*kept for this '
                                         'process only and timed again by the next one'):
        assert large_kernel.choose(x, w, None, 1, p) == 'direct_channels_last'
    assert tuner.tables == {}  # its ratios (load distorts them) never leave a candidate out
    monkeypatch.setattr(large_kernel, '_cpu_seconds', lambda: None)  # quiet from now on
    assert large_kernel.choose(x, w, None, 1, p) == 'direct_channels_last'  # kept in memory
    entry, = json.loads(tuner.cache_path.read_text()).popitem()[1].values()
    assert entry['contended'] is True and entry['other_cores'] == 2.0
    # the next process times it again, and keeps its quiet result
    nxt = large_kernel.LargeDWTuner()
    nxt.time_candidates = lambda runs, **options: ({'fft': 0.1, 'direct_nchw': 1.0}, {})
    monkeypatch.setattr(large_kernel, 'TUNER', nxt)
    assert large_kernel.choose(x, w, None, 1, p) == 'fft'
    entry, = json.loads(tuner.cache_path.read_text()).popitem()[1].values()
    assert entry['contended'] is False and entry['choice'] == 'fft'
    last = large_kernel.LargeDWTuner()
    last.time_candidates = lambda *a, **k: pytest.fail('a quiet timing was timed again')
    monkeypatch.setattr(large_kernel, 'TUNER', last)
    assert large_kernel.choose(x, w, None, 1, p) == 'fft'


def test_entries_from_before_contention_was_recorded_are_timed_again(tuner, monkeypatch):
    x, w, p = _call()
    sig = large_kernel.signature(x, w, 1, p, 1)
    key = tuner.device_key(x.device)
    tuner.cache_path.write_text(json.dumps({key: {sig: {'choice': 'direct_nchw', 'ms': {}}}}))
    tuner.times = {'fft': 0.1}
    assert large_kernel.choose(x, w, None, 1, p) == 'fft' and 'fft' in tuner.measured


def test_a_kept_choice_that_a_rule_now_leaves_out_is_timed_again(tuner):
    """A cache written before a stall was known (or by a run at a size of the bucket where the
    call returned) must not walk into it: the kept choice is used only if still a candidate."""
    x, w = _bf16_case((31, 31), (1, 16, 45, 60))
    x, w = x.bfloat16().contiguous(memory_format=torch.channels_last), w.bfloat16()
    sig, key = large_kernel.signature(x, w, 1, 15, 1), tuner.device_key(x.device)
    kept = {'choice': 'direct_channels_last', 'ms': {}, 'contended': False}
    tuner.cache_path.write_text(json.dumps({key: {sig: kept}}))
    tuner.times = {'fft': 0.1}
    assert large_kernel.choose(x, w, None, 1, 15) == 'fft'
    assert set(tuner.measured) == {'direct_nchw', 'fft'}
    x32, w32, p = _call()  # a kept choice that is still a candidate is taken without timing
    sig32 = large_kernel.signature(x32, w32, 1, p, 1)
    tuner.cache_path.write_text(json.dumps({key: {sig32: kept}}))
    fresh = large_kernel.LargeDWTuner()
    fresh.time_candidates = lambda *a, **k: pytest.fail('a safe kept choice was timed again')
    large_kernel.TUNER = fresh  # (the fixture's monkeypatch restores it)
    assert large_kernel.choose(x32, w32, None, 1, p) == 'direct_channels_last'


class _ToyBackbone(torch.nn.Module):
    """A backbone that asks :func:`backbone_layout` for its layout, as RepLKNet does."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.layouts = []

    def forward(self, x):
        return large_kernel.forward_in_best_layout(self, x, self.in_layout)

    def in_layout(self, x, channels_last):
        self.layouts.append(channels_last)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.bn(self.conv(x)) + 0 * torch.rand(())  # draws from the RNG, as drop-path does
        return (out.contiguous(), )


def test_backbone_layout_is_timed_once_and_leaves_no_trace(tuner):
    import copy
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    toy = _ToyBackbone().train()
    ref = copy.deepcopy(toy)
    x, r = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    want = ref.in_layout(x, False)[0]
    (want * r).sum().backward()
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    out = toy(x)[0]
    assert toy.layouts == [False, True, True]  # one timed run each, then the call, channels_last
    assert toy.conv.weight.grad is None  # the timing's backward wrote no .grad
    # one forward's worth of BN statistics, the RNG where it would be without the timing
    torch.testing.assert_close(toy.bn.running_mean, ref.bn.running_mean)
    assert toy.bn.num_batches_tracked.item() == 1
    (out * r).sum().backward()
    torch.testing.assert_close(torch.rand(3), after_ref)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = ref.conv.weight.grad  # the same sums in another order
    torch.testing.assert_close(toy.conv.weight.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    toy(x)  # cached: not timed again
    assert toy.layouts[3:] == [True] and tuner.measured == ['nchw', 'channels_last']
    entry, = json.loads(tuner.cache_path.read_text()).popitem()[1].values()
    assert entry['choice'] == 'channels_last' and entry['fixed'] == 'nchw'
    sig, = json.loads(tuner.cache_path.read_text()).popitem()[1]
    assert sig == 'layout|_ToyBackbone:156:train|cpu|float32|autocast off|2x4x8x8|fwd+bwd'
    with torch.no_grad():  # inference is another signature
        toy.eval()(x)
        assert tuner.measured[2:] == ['nchw', 'channels_last']
        toy(torch.randn(2, 4, 24, 40))
        toy(torch.randn(2, 4, 26, 45))  # the same size buckets (23-26, 39-45): not timed again
        assert tuner.measured[4:] == ['nchw', 'channels_last']
    sigs = json.loads(tuner.cache_path.read_text()).popitem()[1]
    assert sigs['layout|_ToyBackbone:156:eval|cpu|float32|autocast off|2x4x23-26x39-45|fwd'][
        'shape'] == '2x4x24x40'


def test_an_eval_call_returns_its_layout_timing_s_output_instead_of_running_again(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    toy = _ToyBackbone().eval()
    x = torch.randn(2, 4, 24, 40)
    with torch.no_grad():
        out, = toy(x)
        assert toy.layouts == [False, True]  # the two timed runs, and no third for the call
        torch.testing.assert_close(out, toy.in_layout(x, True)[0], rtol=0, atol=0)
        toy.layouts.clear()
        toy(torch.randn(2, 4, 26, 45))  # the same buckets, chosen already: one forward
        assert toy.layouts == [True]
        toy.layouts.clear()
        toy.train()(x)  # training updates BN statistics and draws random numbers: run again
        assert toy.layouts == [False, True, True]
    # a kept output serves only the module and input it was computed for, once
    assert tuner.take_output(toy, x, True) is None


def test_a_backbone_layout_timing_logs_one_line_saying_why_the_forward_was_slow(
        tuner, monkeypatch):
    import mmengine.logging
    lines = []
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda msg, logger=None: lines.append(msg))

    class WithLargeKernel(_ToyBackbone):
        def in_layout(self, x, channels_last):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return (large_kernel.large_depthwise_conv2d(x, torch.ones(4, 1, 13, 13), None, 1, 6),)

    toy = WithLargeKernel().eval()
    with torch.no_grad():
        toy(torch.randn(1, 4, 24, 40))
        toy(torch.randn(1, 4, 26, 45))  # the same buckets: no timing, no line
    line, = lines
    assert line.startswith('reparam_mm: ') and ' s timing the large-kernel dispatch of ' \
        'WithLargeKernel (eval, fwd) for the new input size bucket 1x4x23-26x39-45: ' in line
    assert ', 2 conv signature(s); ' in line  # the 13x13 conv in either layout
    assert str(tuner.cache_path) in line and 'REPARAM_MM_LARGE_DW=fixed' in line
    with torch.no_grad():
        toy(torch.randn(1, 4, 48, 48))
    assert len(lines) == 2 and 'bucket 1x4x46-53x46-53' in lines[1]

    class Unfused(WithLargeKernel):  # another model (here: one parameter more), the same convs
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Parameter(torch.zeros(1))

    with torch.no_grad():
        Unfused().eval()(torch.randn(1, 4, 48, 48))
    assert len(lines) == 3 and 'dispatch of Unfused (eval, fwd)' in lines[2]
    assert ', its convs timed already (by another copy of the model, e.g. the fused one); ' in lines[2]
    # timed while other processes used the CPUs: the line says what its warning says
    monkeypatch.setattr(tuner, 'contended', lambda *a: True)
    with torch.no_grad(), pytest.warns(UserWarning, match='kept for this process only'):
        toy(torch.randn(1, 4, 64, 64))
    assert len(lines) == 4 and 'kept for this process only, since other processes used' in lines[3]
    assert str(tuner.cache_path) not in lines[3]


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device (the GPU check)'))])
def test_on_cuda_the_backbone_layout_is_timed_too(tuner, device):
    # run on the CPU too, so that the assertions the GPU check makes stay those of the code
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    toy = _ToyBackbone().to(device).eval()
    with torch.no_grad():
        toy(torch.randn(1, 4, 8, 8, device=device))
    # the two timed runs; the call returns the faster one's output (no third run)
    assert toy.layouts == [False, True] and tuner.measured == ['nchw', 'channels_last']
    sig, = json.loads(tuner.cache_path.read_text()).popitem()[1]
    assert f'|{device}|float32|' in sig


def test_backbone_layout_follows_the_rule_where_it_is_not_timed(tuner, monkeypatch):
    toy, x = _ToyBackbone(), torch.randn(1, 4, 8, 8)
    with dispatch_mode('fixed'):
        toy(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):  # half precision under autocast too
            toy(x)
    assert toy.layouts == [False, True]
    toy(x.contiguous(memory_format=torch.channels_last))  # not ours to change
    assert toy.layouts[2:] == [False] and tuner.measured == []
    meta = torch.randn(1, 4, 8, 8, device='meta').bfloat16()
    assert large_kernel.backbone_layout(toy, meta, toy.in_layout) is False
    assert backbone_channels_last(x.bfloat16()) and not backbone_channels_last(x)


class _SyncToy(_ToyBackbone):
    """The toy with SyncBN, as the shipped configs' backbones have, and a forward hook that
    reaches a module outside it (as head_layout's decode-head hook on a backbone does)."""

    def __init__(self, elsewhere=None):
        super().__init__()
        self.bn = torch.nn.SyncBatchNorm(4)
        self.calls = 0
        self.bn.register_forward_hook(self.count)
        if elsewhere is not None:
            self.register_forward_hook(lambda m, a, out, other=elsewhere: None)

    def count(self, module, args, out):
        self.calls += 1


def test_a_collective_free_copy_has_bn_for_syncbn_and_shares_the_hooks():
    elsewhere = torch.nn.Linear(1000, 1000)  # referenced by a hook only: not copied
    toy = _SyncToy(elsewhere).train()
    torch.nn.init.normal_(toy.bn.weight)
    twin = large_kernel.collective_free_copy(toy)
    assert isinstance(twin.bn, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(twin.bn, torch.nn.SyncBatchNorm)
    assert type(toy.bn) is torch.nn.SyncBatchNorm and twin.training
    assert twin.bn.weight is not toy.bn.weight and torch.equal(twin.bn.weight, toy.bn.weight)
    assert list(twin._forward_hooks.values()) == list(toy._forward_hooks.values())
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(twin.in_layout(x, False)[0], toy.in_layout(x, False)[0])


def test_a_distributed_training_step_times_the_backbone_layout_on_a_copy(tuner, monkeypatch):
    """Every rank's step must run its one forward through the SyncBN layers (their collectives
    pair up across ranks) and nothing more: the timing runs go to a copy with BN; the step runs
    in the chosen layout; later steps of the signature neither time nor copy."""
    monkeypatch.setattr(large_kernel, '_distributed', lambda: True)
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    toy, x = _SyncToy().train(), torch.randn(2, 4, 8, 8)
    toy(x)
    assert toy.layouts == [True] and toy.calls == 1  # the step's forward only, channels_last
    assert tuner.measured == ['nchw', 'channels_last']
    monkeypatch.setattr(large_kernel, 'collective_free_copy', None)  # a call would fail
    toy(x)
    assert toy.layouts == [True, True] and toy.calls == 2 and len(tuner.measured) == 2
    # evaluation without gradients issues no collective: timed in place
    tuner.times = {'channels_last': 1.0, 'nchw': 0.1}
    with torch.no_grad():
        toy.eval()(x)
    assert toy.calls == 4 and len(tuner.measured) == 4  # one run of each layout, on toy itself
    with torch.no_grad():
        assert tuner.known_layout(toy, x) == 'nchw'
    # a forward that is not a method of the backbone cannot be rebound to a copy: the fixed rule
    other = _SyncToy().train()
    assert large_kernel.backbone_layout(other, x.bfloat16(), lambda *a: toy.in_layout(*a)) is True
    assert other.calls == 0 and len(tuner.measured) == 4


@pytest.mark.parametrize('with_cp', [False, True])
def test_replknet_trains_alike_in_the_layout_it_is_given(tuner, with_cp):
    import copy

    from reparam_mm.backbones import RepLKNet
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0, 'fft': 0.1}
    model = RepLKNet(arch='tiny', out_indices=(0, 1), with_cp=with_cp).train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    outs = model(x)
    assert tuner.choices and all(o.is_contiguous() for o in outs)
    assert any(sig.startswith('layout|RepLKNet') for _, sig in tuner.choices)
    with dispatch_mode('fixed'):  # fp32: NCHW throughout
        want = ref(x)
    grads = [torch.randn_like(o) for o in outs]  # not ones: BN makes those sum to ~0
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(want, grads)
    for a, b in zip(outs, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    # as one vector: BN-fed parameters' grads are sums that nearly cancel, in either layout
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ref_grad = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
    assert got.shape == ref_grad.shape
    assert float((got - ref_grad).norm() / ref_grad.norm()) < 1e-4


def test_signature_separates_what_changes_the_choice(tuner):
    x, w, p = _call()
    base = large_kernel.signature(x, w, 1, p, 1)
    xg, wg, _ = _call(requires_grad=True)
    assert large_kernel.signature(xg, wg, 1, p, 1).endswith('fwd+bwd') and base.endswith('|fwd')
    with torch.no_grad():
        assert large_kernel.signature(xg, wg, 1, p, 1) == base
    assert '|channels_last|' in large_kernel.signature(
        x.contiguous(memory_format=torch.channels_last), w, 1, p, 1)
    assert '|bfloat16|' in large_kernel.signature(x.bfloat16(), w.bfloat16(), 1, p, 1)
    assert large_kernel.signature(x, w, 1, (15, 14), 1) != base


def test_tuner_times_forward_and_backward_when_gradients_are_needed(tuner, monkeypatch):
    ran = []
    real = large_kernel.CANDIDATES['fft']
    monkeypatch.setitem(large_kernel.CANDIDATES, 'fft', lambda *a: ran.append(
        torch.is_grad_enabled()) or real(*a))
    x, w, p = _call(requires_grad=True)
    large_depthwise_conv2d(x, w, None, 1, p).sum().backward()
    assert ran[0] is True  # timed with autograd on (then the chosen candidate ran the call)
    assert x.grad is not None and w.grad is not None


def test_stalling_candidate_is_never_timed(tuner):
    tuner.times = {'direct_channels_last': 0.0}
    x, w = _bf16_case((31, 29))
    out = large_depthwise_conv2d(x.bfloat16(), w.bfloat16(), None, 1, (15, 15))
    assert 'direct_channels_last' not in tuner.measured and set(tuner.measured) == {
        'direct_nchw', 'fft'}
    assert out.dtype == torch.bfloat16


def test_candidate_that_fails_is_left_out(tuner, monkeypatch):
    def broken(*a):
        raise RuntimeError('no kernel for this shape')
    monkeypatch.setitem(large_kernel.CANDIDATES, 'fft', broken)
    tuner.times = {'fft': 0.0, 'direct_nchw': 2.0, 'direct_channels_last': 1.0}
    x, w, p = _call()
    assert large_kernel.choose(x, w, None, 1, p) == 'direct_channels_last'
    entry, = json.loads(tuner.cache_path.read_text()).popitem()[1].values()
    assert 'no kernel for this shape' in entry['errors']['fft']


def test_off_switch_restores_the_fixed_rules(tuner, monkeypatch):
    tuner.times = {'direct_nchw': 0.0}
    x, w, p = _call()
    assert large_kernel.choose(x, w, None, 1, p) == 'direct_nchw'
    with dispatch_mode('fixed'):
        assert large_kernel.choose(x, w, None, 1, p) == 'fft' == fixed_choice(x, (31, 31), 1, p)
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fixed')
    assert large_kernel.choose(x, w, None, 1, p) == 'fft'
    monkeypatch.setenv('REPARAM_MM_LARGE_DW', 'fastest')
    with pytest.raises(ValueError, match="REPARAM_MM_LARGE_DW='fastest' is not a large-kernel "
                                         "dispatch mode; use one of"):
        large_kernel.choose(x, w, None, 1, p)
    with pytest.raises(ValueError, match='large_dw_dispatch'):
        large_kernel.set_dispatch_mode('auto')


def test_forced_candidate_wins_where_it_can_run(tuner):
    x, w, p = _call()
    with forced_candidate('direct_channels_last'):
        assert large_kernel.choose(x, w, None, 1, p) == 'direct_channels_last'
    with forced_candidate('fft'):  # stride 2: FFT cannot compute it, the dispatch decides
        assert large_kernel.choose(x, w, None, 2, p) != 'fft'
    with pytest.raises(ValueError, match='unknown large depthwise conv candidate'):
        with forced_candidate('winograd'):
            pass
    assert not tuner.measured or 'fft' not in tuner.measured[:1]


@pytest.mark.parametrize('name', ['direct_nchw', 'direct_channels_last', 'fft'])
def test_every_cpu_candidate_matches_under_no_grad_autocast_and_checkpointing(name):
    x, w, p = _call(seed=5)
    b = torch.randn(4)
    ref = F.conv2d(x, w, b, 1, p, 1, 4)
    with forced_candidate(name), torch.no_grad():
        torch.testing.assert_close(large_depthwise_conv2d(x, w, b, 1, p), ref,
                                   rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with forced_candidate(name), torch.autocast('cpu', dtype=torch.bfloat16):
        out = large_depthwise_conv2d(x, w, b, 1, p)
        want = F.conv2d(x, w, b, 1, p, 1, 4)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2,
                               atol=2e-2 * float(want.float().abs().max()))
    for reentrant in (False, True):
        xs = x.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        with forced_candidate(name):  # reentrant checkpointing needs .backward(), not .grad()
            checkpoint(large_depthwise_conv2d, xs, ws, None, 1, p,
                       use_reentrant=reentrant).square().sum().backward()
        got = xs.grad, ws.grad
        want = torch.autograd.grad(F.conv2d(xs, ws, None, 1, p, 1, 4).square().sum(), (xs, ws))
        for a, b_ in zip(got, want):
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4 * float(b_.abs().max()))


def test_half_precision_fft_computes_in_fp32():
    x, w, p = _call(seed=7)
    out = fft_depthwise_conv2d(x.bfloat16(), w.bfloat16(), None, p)
    ref = F.conv2d(x.bfloat16().float(), w.bfloat16().float(), None, 1, p, 1, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def test_export_traces_a_plain_conv():
    conv = LargeKernelDWConv2d(4, 31, bias=True).eval()
    traced = torch.jit.trace(conv, torch.randn(1, 4, 20, 18))
    graph = str(traced.graph)
    assert 'convolution' in graph and 'fft' not in graph


def test_weight_dtype_mismatch_is_one_sentence():
    x, w, p = _call()
    with pytest.raises(TypeError, match='input is torch.bfloat16 but weight is torch.float32; cast'):
        large_depthwise_conv2d(x.bfloat16(), w, None, 1, p)


def test_config_key_sets_the_mode_for_a_run(monkeypatch):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from reparam_mm.scope import ConfigError
    from reparam_mm.train import build_runner
    monkeypatch.setattr(Runner, 'from_cfg', classmethod(lambda cls, cfg: 'runner'))
    monkeypatch.setitem(large_kernel._state, 'mode', None)
    x, w, p = _call()
    assert build_runner(Config(dict(large_dw_dispatch='fixed'))) == 'runner'
    assert large_kernel._mode() == 'fixed'
    build_runner(Config(dict()))  # absent: back to the environment's mode (tuned by default)
    assert large_kernel._mode() == 'tuned'
    with pytest.raises(ConfigError, match="large_dw_dispatch='fast' is not a large-kernel"):
        build_runner(Config(dict(large_dw_dispatch='fast')))


def test_dispatch_runs_the_triton_candidate_when_forced():
    pytest.importorskip('triton')
    from reparam_mm.layers.triton_dw import triton_available
    x = torch.randn(1, 3, 9, 11).contiguous(memory_format=torch.channels_last)
    if not triton_available(x):
        pytest.skip('Triton runs CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py)')
    w, b = torch.randn(3, 1, 7, 5), torch.randn(3)
    assert 'triton' not in candidates(x, (7, 5), 1, (3, 2))  # never timed on CPU
    with forced_candidate('triton'):
        assert large_kernel.choose(x, w, b, 1, (3, 2)) == 'triton'
        out = large_depthwise_conv2d(x, w, b, 1, (3, 2))
    ref = F.conv2d(x.contiguous(), w, b, 1, (3, 2), 1, 3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('reentrant', [False, True])
def test_a_signature_first_met_inside_checkpointing_is_timed_there(tuner, reentrant):
    # a cold tuner meets the fwd+bwd signature inside a checkpointed block: the timing must not
    # trigger the block's recomputation (non-reentrant checkpointing packs saved tensors)
    x, w, p = _call(requires_grad=True, seed=9)

    def block(t):
        return large_depthwise_conv2d(t * 2, w, None, 1, p).relu()

    checkpoint(block, x, use_reentrant=reentrant).sum().backward()
    assert tuner.measured  # timed during this call
    want = torch.autograd.grad(F.conv2d(x * 2, w, None, 1, p, 1, 4).relu().sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_meta_tensors_give_shapes_without_choosing():
    x = torch.empty(2, 4, 20, 18, device='meta')
    out = large_depthwise_conv2d(x, torch.empty(4, 1, 31, 31, device='meta'), None, 1, 15)
    assert out.device.type == 'meta' and out.shape == (2, 4, 20, 18)
