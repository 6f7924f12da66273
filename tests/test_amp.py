"""Mixed precision on CPU (reparam_mm.amp): bf16 autocast training through CPUAmpOptimWrapper,
mmcv's ops under CPU autocast, and a detector tested with tools/test.py --amp."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.ops import nms, roi_align

import reparam_mm  # noqa: F401
from reparam_mm.amp import (AmpTestLoop, CPUAmpOptimWrapper, cast_mmcv_ops_to_fp32,
                            predictions_to_fp32)

ROOT = Path(__file__).resolve().parent.parent
COCO128 = ROOT / 'configs/demo/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-400i_coco128-person-320.py'


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_step_runs_under_bf16_autocast_and_updates_fp32_weights_as_autocast_by_hand():
    torch.manual_seed(0)
    model, x, y = TinyNet(), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    reference = TinyNet()
    reference.load_state_dict(model.state_dict())
    wrapper, opt = CPUAmpOptimWrapper(optimizer=_sgd(model)), _sgd(reference)
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for _ in range(2):
        with wrapper.optim_context(model):
            loss = F.cross_entropy(model(x), y)
        wrapper.update_params(loss)
        with torch.autocast('cpu', dtype=torch.bfloat16):  # the same step, written out
            ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        opt.step()
        opt.zero_grad()
    assert seen == [torch.bfloat16, torch.bfloat16]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32, name
        assert torch.equal(p, q), name
    assert not torch.equal(model.conv.weight, TinyNet().conv.weight)


def test_wrapper_refuses_fp16_and_a_model_off_the_cpu():
    with pytest.raises(ValueError, match=r"bf16 autocast only, not torch.float16; .*dtype='bfloat16'"):
        CPUAmpOptimWrapper(dtype='float16', optimizer=_sgd(TinyNet()))
    model = TinyNet().to('meta')
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"the model is on \['meta'\]; on a GPU use "
                       r"optim_wrapper.type='AmpOptimWrapper'"):
        with wrapper.optim_context(model):
            pass


@pytest.mark.parametrize('native', [True, False])
def test_bf16_autocast_on_a_cpu_without_native_bf16_is_warned_once(monkeypatch, native):
    """An AVX2-only CPU computes bf16 in software: --amp there gets one warning saying to drop it."""
    import reparam_mm.amp as amp
    from conftest import mmengine_log
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: native)
    with mmengine_log() as records:
        CPUAmpOptimWrapper(optimizer=_sgd(TinyNet()))
    said = [r.getMessage() for r in records if 'no native bf16' in r.getMessage()]
    assert said == ([] if native else [said[0]])
    if not native:
        assert said[0].startswith('CPUAmpOptimWrapper (bf16 autocast training): this CPU has no '
                                  'native bf16') and said[0].endswith('drop --amp on this machine.')


def test_a_loss_scalers_checkpoint_resumes_and_its_optimizer_state_is_loaded():
    torch.manual_seed(0)
    model, x = TinyNet(), torch.randn(2, 3, 8, 8)
    trained = CPUAmpOptimWrapper(optimizer=_sgd(model), loss_scale='dynamic')  # an Amp config's key
    with trained.optim_context(model):
        loss = model(x).square().mean()
    trained.update_params(loss)
    state = trained.state_dict()
    assert 'loss_scaler' not in state
    fresh = CPUAmpOptimWrapper(optimizer=_sgd(model))
    fresh.load_state_dict({**state, 'loss_scaler': {'scale': 65536.0, '_growth_tracker': 3}})
    for p in model.parameters():
        assert torch.equal(fresh.optimizer.state[p]['momentum_buffer'],
                           trained.optimizer.state[p]['momentum_buffer'])


def test_mmcv_ops_compute_in_fp32_under_cpu_autocast_and_answer_in_the_inputs_dtype():
    cast_mmcv_ops_to_fp32()
    assert cast_mmcv_ops_to_fp32() == []  # once only
    torch.manual_seed(0)
    xy = torch.rand(40, 2) * 200
    boxes = torch.cat([xy, xy + 20 + torch.rand(40, 2) * 60], 1).bfloat16()
    scores = torch.rand(40).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dets, keep = nms(boxes, scores, 0.5)
    ref_dets, ref_keep = nms(boxes.float(), scores.float(), 0.5)
    assert torch.equal(keep, ref_keep) and dets.dtype == torch.bfloat16
    assert torch.equal(dets.float(), ref_dets)

    feats = torch.randn(1, 4, 16, 16).bfloat16().requires_grad_()
    rois = torch.tensor([[0, 1.5, 2.0, 9.0, 12.5], [0, 4.0, 0.0, 15.0, 7.0]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = roi_align(feats, rois, (3, 3), 1.0, 2)
    assert out.dtype == torch.bfloat16  # as mmcv's fp16 GPU op answers: the buffers mmdet fills
    ref_feats = feats.detach().float().requires_grad_()
    ref = roi_align(ref_feats, rois, (3, 3), 1.0, 2)
    assert torch.equal(out, ref.bfloat16())
    grad = torch.randn(out.shape)
    out.backward(grad.bfloat16())
    ref.backward(grad.bfloat16().float())
    assert feats.grad.dtype == torch.bfloat16 and torch.equal(feats.grad, ref_feats.grad.bfloat16())
    # outside autocast the op is mmcv's own: fp32 in, fp32 out; bf16 is still refused
    assert roi_align(feats.detach().float(), rois, (3, 3), 1.0, 2).dtype == torch.float32
    with pytest.raises(RuntimeError, match='BFloat16'):
        roi_align(feats.detach(), rois, (3, 3), 1.0, 2)


def test_predictions_to_fp32_reaches_nested_fields_and_keeps_integers():
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    sample = DetDataSample(pred_instances=InstanceData(
        bboxes=torch.rand(3, 4).bfloat16(), scores=torch.rand(3).half(), labels=torch.arange(3)))
    predictions_to_fp32([sample, {'not': 'a data element'}])
    pred = sample.pred_instances
    assert pred.bboxes.dtype == pred.scores.dtype == torch.float32
    assert pred.labels.dtype == torch.int64


def test_a_detector_trains_a_step_under_bf16_through_mmcvs_roi_ops():
    """nms in the RPN, RoIAlign forward and backward in the RoI head: under CPU autocast they
    compute in fp32, the gradients reach the backbone, every weight stays fp32."""
    from mmengine.config import Config

    from reparam_mm.apis import build_model
    from reparam_mm.batches import synthetic_batch
    cfg = Config.fromfile(str(COCO128))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    model.roi_head.bbox_head.shared_fcs[0].register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    log = model.train_step(synthetic_batch(cfg, 128, 160, batch=2, train=True), wrapper)
    assert seen == [torch.bfloat16] and all(torch.isfinite(v) for v in log.values())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith('backbone.') for n in moved)  # through RoIAlign's backward too
    assert any(n.startswith('roi_head.') for n in moved) and any(n.startswith('rpn_head.') for n in moved)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _random_detector_checkpoint(tmp_path):
    from mmengine.config import Config

    from reparam_mm.apis import build_model
    torch.manual_seed(0)
    model = build_model(Config.fromfile(str(COCO128)))
    path = tmp_path / 'random.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path)


@pytest.mark.timeout(300)
def test_tools_test_amp_evaluates_a_detector_on_coco128(shared_data, tmp_path, capsys, monkeypatch):
    import reparam_mm.amp as amp_module
    from conftest import load_tool
    answered, real = [], amp_module.predictions_to_fp32

    def spy(samples):
        answered.extend((s.pred_instances.bboxes.dtype, len(s.pred_instances)) for s in samples)
        return real(samples)

    monkeypatch.setattr(amp_module, 'predictions_to_fp32', spy)
    ckpt = _random_detector_checkpoint(tmp_path)
    options = ['--cfg-options', f"test_dataloader.dataset.data_root={shared_data / 'coco128'}",
               f"test_evaluator.ann_file={shared_data / 'coco128/annotations/instances_train2017.json'}",
               # 2 images at half the demo's scale: bf16 convs run in software on an AVX2-only CPU
               'test_dataloader.dataset.indices=2', 'test_dataloader.dataset.pipeline.1.scale=(256,160)',
               'test_dataloader.num_workers=0',
               'test_dataloader.persistent_workers=False']
    test = load_tool('test')
    amp = test.main([str(COCO128), ckpt, '--amp', '--work-dir', str(tmp_path / 'wa')] + options)
    out = capsys.readouterr().out
    # 2 images answered in bf16, with boxes (random weights still pass nms), evaluated by COCO
    assert len(answered) == 2 and {dtype for dtype, _ in answered} == {torch.bfloat16}
    assert sum(n for _, n in answered) > 0
    assert re.search(r'under bf16 autocast: mean rel diff [0-9.e+-]+ \(max [0-9.e+-]+\), within', out)
    assert 'Average Precision' in out
    answered.clear()
    fp32 = test.main([str(COCO128), ckpt, '--work-dir', str(tmp_path / 'wf')] + options)
    assert {dtype for dtype, _ in answered} == set()  # the fp32 test runs mmengine's TestLoop
    assert set(amp) == set(fp32) and 'coco/bbox_mAP' in amp


def test_amp_test_loop_needs_a_test_loop():
    from reparam_mm.apis import _amp_test_loop
    assert _amp_test_loop(None) == dict(type='AmpTestLoop', fp16=True)
    assert _amp_test_loop(dict(type='TestLoop', fp16=False)) == dict(type='AmpTestLoop', fp16=True)
    with pytest.raises(ValueError, match=r"test_cfg is a MyLoop: drop --amp, or set fp16=True"):
        _amp_test_loop(dict(type='MyLoop'))
    assert issubclass(AmpTestLoop, __import__('mmengine').runner.TestLoop)
