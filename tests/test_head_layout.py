"""The neck's and heads' memory layout, timed per machine (reparam_mm.head_layout)."""
import copy

import pytest
import torch

import reparam_mm  # noqa: F401
from conftest import ROOT, mmengine_log
from reparam_mm.apis import build_model
from reparam_mm.batches import synthetic_batch
from reparam_mm.fuse import fuse
from reparam_mm.head_layout import head_modules, module_layout, tune_head_layouts
from reparam_mm.layers import large_kernel
from reparam_mm.scope import init_scope, load_config

pytestmark = pytest.mark.timeout(300)

SEG = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'
DET = ROOT / 'configs/demo/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-400i_coco128-person-320.py'


def _built(config, options=None):
    cfg = load_config(str(config))
    cfg.merge_from_dict(options or {})
    init_scope(cfg)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _fused(config, size, batch=1, options=None):
    cfg, model = _built(config, options)
    model = fuse(model.eval())
    with torch.no_grad():
        data = model.data_preprocessor(synthetic_batch(cfg, size, size, batch=batch), False)
    return model, data


def _predict(model, data):
    with torch.no_grad():
        return model(data['inputs'], copy.deepcopy(data['data_samples']), mode='predict')


def _head_choices(tuner):
    """The layout choices the tuner made for necks and heads: {signature: choice}."""
    return {sig: c for (_, sig), c in tuner.choices.items()
            if sig.startswith('layout|') and not sig.startswith('layout|RepLKNet:')}


def _layouts(model):
    return {name: module_layout(m) for name, m, _ in head_modules(model)}


def test_the_segmentor_s_decode_head_runs_in_the_faster_layout_with_the_same_predictions(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(SEG, 64)
    plain = copy.deepcopy(model)
    assert tune_head_layouts(model) == ['decode_head', 'auxiliary_head']
    assert tune_head_layouts(model) == []  # hooked once
    with mmengine_log() as records:
        out = _predict(model, data)
    # the auxiliary head, which evaluation never calls, is not timed there
    assert _layouts(model) == {'decode_head': 'channels_last', 'auxiliary_head': 'nchw'}
    assert _layouts(plain) == {'decode_head': 'nchw', 'auxiliary_head': 'nchw'}
    want = _predict(plain, data)
    torch.testing.assert_close(out[0].seg_logits.data, want[0].seg_logits.data, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[0].pred_sem_seg.data, want[0].pred_sem_seg.data)
    lines = [r.getMessage() for r in records if 'timing the memory layout' in r.getMessage()]
    assert len(lines) == 1 and 'of UPerHead (eval, fwd) for the new input size bucket ' in lines[0]
    assert lines[0].endswith(': channels_last; kept in '
                             f'{tuner.cache_path} for every size in the bucket '
                             '(REPARAM_MM_LARGE_DW=fixed times nothing).')
    measured = list(tuner.measured)
    _predict(model, data)  # chosen already: not timed again
    assert tuner.measured == measured
    sig, = _head_choices(tuner)
    assert sig.startswith('layout|UPerHead:')
    assert sig.endswith(':eval|cpu|float32|autocast off|1x16x16-19x16-19|fwd')


def test_where_nchw_is_faster_the_weights_stay_nchw(tuner):
    tuner.times = {'channels_last': 1.0, 'nchw': 0.1}
    model, data = _fused(SEG, 64)
    tune_head_layouts(model)
    _predict(model, data)
    assert _layouts(model)['decode_head'] == 'nchw'
    assert list(_head_choices(tuner).values()) == ['nchw']


def test_a_segmentor_s_neck_is_timed_before_its_decode_head_not_around_it(tuner):
    """The decode head's hook sits on the neck; the neck's timing runs must not start the head's."""
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    neck = dict(type='MultiLevelNeck', in_channels=[16, 32, 64, 128], out_channels=32,
                scales=[1, 1, 1, 1])
    model, data = _fused(SEG, 64, options={'model.neck': neck,
                                           'model.decode_head.in_channels': [32] * 4})
    assert sorted(tune_head_layouts(model)) == ['auxiliary_head', 'decode_head', 'neck']
    _predict(model, data)
    assert [sig.split(':')[0] for sig in _head_choices(tuner)] == ['layout|MultiLevelNeck',
                                                                   'layout|UPerHead']
    assert _layouts(model) == {'decode_head': 'channels_last', 'neck': 'channels_last',
                               'auxiliary_head': 'nchw'}


def test_a_copy_of_a_tuned_model_tunes_its_own_head(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(SEG, 64)
    tune_head_layouts(model)
    twin = copy.deepcopy(model)  # FusedEvalHook's fused copy, EMA models
    _predict(twin, data)
    assert _layouts(twin)['decode_head'] == 'channels_last'
    assert _layouts(model)['decode_head'] == 'nchw'  # the original was not touched


def test_a_model_under_test_time_augmentation_tunes_the_segmentor_inside(tuner):
    """mmengine's TTA wrapper keeps the segmentor as .module: under --tta nothing was hooked,
    while the log said the neck and heads ran in the layouts timed for evaluation."""
    from mmseg.models import SegTTAModel
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(SEG, 64)
    wrapped = SegTTAModel(module=model)
    assert [name for name, _, _ in head_modules(wrapped)] == [name for name, _, _ in head_modules(model)]
    assert tune_head_layouts(wrapped) == ['decode_head', 'auxiliary_head']
    _predict(model, data)
    assert _layouts(model)['decode_head'] == 'channels_last'


def test_the_detector_s_neck_and_heads_hand_back_nchw_for_mmcv_s_ops(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(DET, 128)
    plain = copy.deepcopy(model)
    assert sorted(tune_head_layouts(model)) == ['neck', 'roi_head.bbox_head', 'rpn_head']
    out = _predict(model, data)
    assert _layouts(model) == dict.fromkeys(['neck', 'rpn_head', 'roi_head.bbox_head'], 'channels_last')
    # FPN's outputs go to RoIAlign, which reads NCHW memory: they come back NCHW
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
    assert all(f.is_contiguous() for f in feats)
    want = _predict(plain, data)
    for got, ref in zip(out, want):
        torch.testing.assert_close(got.pred_instances.bboxes, ref.pred_instances.bboxes,
                                   rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got.pred_instances.scores, ref.pred_instances.scores,
                                   rtol=1e-4, atol=1e-5)


def test_a_roi_head_times_one_layout_for_box_counts_in_one_bucket(tuner):
    """The RoI head's leading dimension is the number of boxes the RPN kept, new with nearly
    every test batch: counts within one size bucket share one timing (a detector's evaluation
    timed the head again for 16 of its 32 batches)."""
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, _ = _fused(DET, 128)
    head = model.roi_head.bbox_head
    assert 'roi_head.bbox_head' in tune_head_layouts(model)
    channels = model.roi_head.bbox_roi_extractor.out_channels
    lo, hi = large_kernel.size_bucket(300)
    with torch.no_grad():
        for n in (lo, 300, hi):
            head(torch.randn(n, channels, 7, 7))
    timed = [sig for sig in _head_choices(tuner) if 'Shared4Conv1FCBBoxHead' in sig]
    assert len(timed) == 1 and f'|{lo}-{hi}x{channels}x7x7|' in timed[0], timed
    with torch.no_grad():  # the next bucket is timed apart
        head(torch.randn(hi + 1, channels, 7, 7))
    assert len([s for s in _head_choices(tuner) if 'Shared4Conv1FCBBoxHead' in s]) == 2


def _training(config, size, batch=2):
    cfg, model = _built(config)
    model.train()
    data = model.data_preprocessor(synthetic_batch(cfg, size, size, batch=batch, train=True), True)
    return model, data


def _loss_and_grads(model, data):
    """One training forward and backward from a fixed RNG state: the losses and the gradients."""
    torch.manual_seed(1)  # the heads' dropout
    for p in model.parameters():
        p.grad = None
    loss, values = model.parse_losses(model(data['inputs'], copy.deepcopy(data['data_samples']),
                                            mode='loss'))
    loss.backward()
    return ({k: torch.as_tensor(v) for k, v in values.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize('config, size, heads', [
    (SEG, 64, ['auxiliary_head', 'decode_head']),
    (DET, 128, ['neck', 'roi_head.bbox_head', 'rpn_head'])])
def test_training_times_forward_and_backward_and_leaves_the_step_as_it_was(tuner, config, size, heads):
    """tools/train.py hooks the training model: at the first step each head is timed with its
    backward, under the training signature, and the step computes what the untuned model does:
    the same losses, gradients and BN statistics (the timing runs restore buffers and fork the
    RNG the heads' dropout draws from)."""
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _training(config, size)
    plain = copy.deepcopy(model)
    assert sorted(tune_head_layouts(model)) == heads
    with mmengine_log() as records:
        losses, grads = _loss_and_grads(model, data)
    assert _layouts(model) == dict.fromkeys(heads, 'channels_last')
    want_losses, want_grads = _loss_and_grads(plain, data)
    assert losses.keys() == want_losses.keys() and grads.keys() == want_grads.keys()
    for k in want_losses:
        torch.testing.assert_close(losses[k], want_losses[k], rtol=1e-4, atol=1e-5)
    # the two layouts' convs round differently, and backpropagation spreads it: compare the
    # gradients as one vector (a wrong dropout mask or BN statistic moves them by percents)
    got, want = (torch.cat([g[n].flatten() for n in sorted(want_grads)]) for g in (grads, want_grads))
    assert float((got - want).norm()) < 1e-3 * float(want.norm())
    for (n, b), (_, want) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(b, want, rtol=1e-4, atol=1e-5, msg=n)
    sigs = _head_choices(tuner)
    assert len(sigs) == len(heads) and all(':train|' in s and s.endswith('|fwd+bwd') for s in sigs)
    lines = [r.getMessage() for r in records if 'timing the memory layout' in r.getMessage()]
    assert len(lines) == len(heads) and all('(train, fwd+bwd)' in line for line in lines)
    measured = list(tuner.measured)
    _loss_and_grads(model, data)  # chosen already: not timed again
    assert tuner.measured == measured


def test_distributed_training_proposes_on_copies_and_trains_in_the_agreed_layout(tuner, monkeypatch):
    """Under DDP (here: one process that counts as distributed) the heads are timed only after
    allow_agreed_layouts: the first step times copies and runs in the weights' layout, with the
    untuned model's losses and gradients; agree_head_layouts then sets the proposals (rank 0's,
    this process's here), and later training steps time nothing, not even a new size."""
    from reparam_mm.head_layout import agree_head_layouts, allow_agreed_layouts
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    monkeypatch.setattr(large_kernel, '_distributed', lambda: True)
    model, data = _training(SEG, 64)
    plain = copy.deepcopy(model)
    tune_head_layouts(model)
    _loss_and_grads(copy.deepcopy(model), data)
    assert not _head_choices(tuner)  # distributed, not allowed: nothing timed
    assert allow_agreed_layouts(model) == 2
    losses, grads = _loss_and_grads(model, data)
    nchw = {'decode_head': 'nchw', 'auxiliary_head': 'nchw'}
    assert _layouts(model) == nchw  # the step ran in the weights' layout
    assert len(_head_choices(tuner)) == 2
    want_losses, want_grads = _loss_and_grads(plain, data)
    for k in want_losses:
        torch.testing.assert_close(losses[k], want_losses[k], rtol=0, atol=0)
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=0, atol=0, msg=n)
    for (n, b), (_, want) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(b, want, rtol=0, atol=0, msg=n)
    assert agree_head_layouts(model) == {'decode_head': 'channels_last',
                                         'auxiliary_head': 'channels_last'}
    assert _layouts(model) == {'decode_head': 'channels_last', 'auxiliary_head': 'channels_last'}
    tuner.times = {'channels_last': 1.0, 'nchw': 0.1}  # a new timing would choose NCHW
    bigger = model.data_preprocessor(synthetic_batch(load_config(str(SEG)), 128, 128, batch=2,
                                                     train=True), True)
    _loss_and_grads(model, bigger)
    assert len(_head_choices(tuner)) == 2
    assert _layouts(model) == {'decode_head': 'channels_last', 'auxiliary_head': 'channels_last'}


def test_a_distributed_runs_evaluated_copy_times_its_own_layouts(tuner, monkeypatch):
    """Under DDP the trained weights are evaluated as they are; a model no DDP trains (the fused
    copy FusedEvalHook validates, a model under test) times and sets its layouts on each rank."""
    from reparam_mm.head_layout import allow_per_rank_layouts
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    monkeypatch.setattr(large_kernel, '_distributed', lambda: True)
    model, data = _fused(SEG, 64)
    plain = copy.deepcopy(model)
    tune_head_layouts(model)
    _predict(model, data)
    assert not _head_choices(tuner) and _layouts(model)['decode_head'] == 'nchw'
    assert allow_per_rank_layouts(model) == 2
    out = _predict(model, data)
    assert _layouts(model) == {'decode_head': 'channels_last', 'auxiliary_head': 'nchw'}
    sig, = _head_choices(tuner)
    assert ':eval|' in sig
    assert torch.equal(out[0].pred_sem_seg.data, _predict(plain, data)[0].pred_sem_seg.data)


def test_nothing_is_timed_in_a_mixed_state_or_in_fixed_mode(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(SEG, 64, batch=2)  # 2: training-mode BN after the 1x1 pooling
    tune_head_layouts(model)
    model(data['inputs'], copy.deepcopy(data['data_samples']), mode='tensor')  # eval, gradients on
    model.train()
    with torch.no_grad():
        model(data['inputs'], copy.deepcopy(data['data_samples']), mode='tensor')
    model.eval()
    with large_kernel.dispatch_mode('fixed'):
        _predict(model, data)
    assert _layouts(model) == {'decode_head': 'nchw', 'auxiliary_head': 'nchw'}
    assert not _head_choices(tuner)


def test_a_layout_change_inside_an_autocast_region_is_not_undone_by_its_cache():
    """Autocast caches a parameter's cast per parameter: within one region a conv would go on
    computing with the former layout's copy (the tuner times both layouts in one region)."""
    from reparam_mm.head_layout import set_module_layout
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert conv(x).is_contiguous()  # and its bf16 weight cached
        set_module_layout(conv, 'channels_last')
        out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert module_layout(conv) == 'channels_last'


def test_a_doconv_layer_composes_its_kernel_in_the_layout_set_with_the_same_values():
    """DO-Conv composes its kernel at every training step, so its layout is a setting, not its
    weights': set to channels_last, it convolves (forward and backward) in it."""
    from reparam_mm.head_layout import set_module_layout
    from reparam_mm.layers import DOConv2d
    torch.manual_seed(0)
    conv = DOConv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.D.normal_(std=0.1)
    x = torch.randn(2, 8, 12, 12)
    want = conv(x)
    want_grads = torch.autograd.grad(want.square().sum(), (conv.W, conv.D))
    assert want.is_contiguous() and module_layout(conv) == 'nchw'
    set_module_layout(conv, 'channels_last')
    assert module_layout(conv) == 'channels_last'
    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(torch.autograd.grad(out.square().sum(), (conv.W, conv.D)), want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    set_module_layout(conv, 'nchw')
    assert conv(x).is_contiguous()


def test_a_module_holding_both_layouts_is_converted_whole():
    """A fused copy of a head trained channels_last holds both layouts (its DO-Conv layers'
    fused kernels come out NCHW): setting the layout converts every kernel, not the first."""
    from reparam_mm.head_layout import set_module_layout
    head = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 8, 3))
    head[0].to(memory_format=torch.channels_last)
    assert module_layout(head) == 'channels_last' and head[1].weight.is_contiguous()
    set_module_layout(head, 'channels_last')
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous()
               for c in head)
    set_module_layout(head, 'nchw')
    assert all(c.weight.is_contiguous() for c in head)


class _PooledBN(torch.nn.Module):
    """UPerHead's pool-scale-1 branch in small: a SyncBN after 1x1 pooling, which BN refuses
    in training on one image (one value per channel) and SyncBN across ranks does not."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.bn = torch.nn.SyncBatchNorm(8)

    def forward(self, x):
        return self.bn(self.pool(self.conv(x)))

    def in_layout(self, x, channels_last):
        return self(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def test_one_image_per_gpu_leaves_a_module_untimed_not_the_step_failed(tuner, monkeypatch):
    """In a distributed training step the layouts are timed on a copy with BN for SyncBN; with
    one image per GPU the copy's BN after 1x1 pooling fails where the step's SyncBN would not.
    The module then proposes nothing and keeps its layout, said once in the log."""
    from reparam_mm.head_layout import _LayoutChoice
    monkeypatch.setattr(large_kernel, '_distributed', lambda: True)
    monkeypatch.setattr(large_kernel, '_COPY_FAILURES', set())
    module, x = _PooledBN().train(), torch.randn(1, 8, 16, 16)
    choice = _LayoutChoice(module)
    choice.agreement = 'proposing'
    with mmengine_log() as records:
        choice.choose(x, lambda m: m(x))
        assert choice.proposal is None and module_layout(module) == 'nchw'
        # the backbone's timing on a copy falls back to the fixed rule the same way
        picked = large_kernel.backbone_layout(module, x, module.in_layout)
        assert picked == large_kernel.backbone_channels_last(x)
    said = [r.getMessage() for r in records if 'is not timed in this distributed run' in r.getMessage()]
    assert len(said) == 1 and said[0].startswith('reparam_mm: the memory layout of _PooledBN ')
    assert 'Expected more than 1 value per channel' in said[0]
    # outside a distributed step the module's own failure is the call's error, as before
    monkeypatch.setattr(large_kernel, '_distributed', lambda: False)
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        _LayoutChoice(module).choose(x, lambda m: m(x))
