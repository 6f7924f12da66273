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


def _fused(config, size, batch=1, options=None):
    cfg = load_config(str(config))
    cfg.merge_from_dict(options or {})
    init_scope(cfg)
    torch.manual_seed(0)
    model = fuse(build_model(cfg).eval())
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
    assert tune_head_layouts(model) == ['decode_head']
    assert tune_head_layouts(model) == []  # hooked once
    with mmengine_log() as records:
        out = _predict(model, data)
    assert _layouts(model) == {'decode_head': 'channels_last'}
    assert _layouts(plain) == {'decode_head': 'nchw'}
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
    assert _layouts(model) == {'decode_head': 'nchw'}
    assert list(_head_choices(tuner).values()) == ['nchw']


def test_a_segmentor_s_neck_is_timed_before_its_decode_head_not_around_it(tuner):
    """The decode head's hook sits on the neck; the neck's timing runs must not start the head's."""
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    neck = dict(type='MultiLevelNeck', in_channels=[16, 32, 64, 128], out_channels=32,
                scales=[1, 1, 1, 1])
    model, data = _fused(SEG, 64, options={'model.neck': neck,
                                           'model.decode_head.in_channels': [32] * 4})
    assert sorted(tune_head_layouts(model)) == ['decode_head', 'neck']
    _predict(model, data)
    assert [sig.split(':')[0] for sig in _head_choices(tuner)] == ['layout|MultiLevelNeck',
                                                                   'layout|UPerHead']
    assert _layouts(model) == {'decode_head': 'channels_last', 'neck': 'channels_last'}


def test_a_copy_of_a_tuned_model_tunes_its_own_head(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(SEG, 64)
    tune_head_layouts(model)
    twin = copy.deepcopy(model)  # FusedEvalHook's fused copy, EMA models
    _predict(twin, data)
    assert _layouts(twin) == {'decode_head': 'channels_last'}
    assert _layouts(model) == {'decode_head': 'nchw'}  # the original was not touched


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


def test_nothing_is_timed_in_training_with_gradients_or_in_fixed_mode(tuner):
    tuner.times = {'channels_last': 0.1, 'nchw': 1.0}
    model, data = _fused(SEG, 64, batch=2)  # 2: training-mode BN after the 1x1 pooling
    tune_head_layouts(model)
    model(data['inputs'], copy.deepcopy(data['data_samples']), mode='tensor')  # gradients on
    model.train()
    with torch.no_grad():
        model(data['inputs'], copy.deepcopy(data['data_samples']), mode='tensor')
    model.eval()
    with large_kernel.dispatch_mode('fixed'):
        _predict(model, data)
    assert _layouts(model) == {'decode_head': 'nchw'}
    assert not _head_choices(tuner)  # (the backbone's layout was timed in training)


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
