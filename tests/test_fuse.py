"""reparam_mm.fuse on toy re-parameterisable modules: order, idempotence, refusals, report."""
import copy
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam_mm  # noqa: F401
from reparam_mm.fuse import CONV_BN, count_params, fuse, fuse_with_report


class ToyDOConv(nn.Module):
    """Over-parameterised conv: the effective kernel is ``weight + delta``.

    Like DO-Conv, ``.weight`` alone is NOT the kernel the layer applies, so a
    parent that reads it before this layer is fused fuses a wrong kernel.
    """

    def __init__(self, cin, cout, k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.delta = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def kernel(self):
        return self.weight + self.delta

    def forward(self, x):
        return F.conv2d(x, self.kernel(), self.bias, padding=self.weight.shape[-1] // 2)

    def to_fused(self):
        k = self.weight.shape[-1]
        conv = nn.Conv2d(self.weight.shape[1], self.weight.shape[0], k, padding=k // 2)
        conv.to(self.weight)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            conv.bias.copy_(self.bias)
        return conv


class ToyRepBlock(nn.Module):
    """Large conv+BN branch plus a small-kernel child, fused in place (like RepLKNet)."""

    def __init__(self, ch, small):
        super().__init__()
        self.lk = nn.Sequential(nn.Conv2d(ch, ch, 5, padding=2, bias=False), nn.BatchNorm2d(ch))
        self.small = small
        self.fused_conv = None

    def forward(self, x):
        if self.fused_conv is not None:
            return self.fused_conv(x)
        return self.lk(x) + self.small(x)

    def to_fused(self):
        if self.fused_conv is not None:
            return self
        if self.training:
            raise RuntimeError('ToyRepBlock must be fused in eval mode')
        conv, bn = self.lk
        std = (bn.running_var + bn.eps).sqrt()
        k = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * bn.weight / std
        pad = (5 - self.small.weight.shape[-1]) // 2
        k = k + F.pad(self.small.weight, [pad] * 4)  # reads the child's .weight
        b = b + self.small.bias
        fused_conv = nn.Conv2d(conv.in_channels, conv.out_channels, 5, padding=2).to(conv.weight)
        with torch.no_grad():
            fused_conv.weight.copy_(k)
            fused_conv.bias.copy_(b)
        del self.lk, self.small
        self.fused_conv = fused_conv
        return self


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _nested(ch=4):
    torch.manual_seed(0)
    model = nn.Sequential(ToyDOConv(3, ch, 3), nn.ReLU(), ToyRepBlock(ch, ToyDOConv(ch, ch, 3)),
                          nn.Conv2d(ch, ch, 1))
    return _randomize_bn(model).eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _parent_first(module):
    """timm-style walk: a module is fused before its children."""
    for name, child in list(module.named_children()):
        if callable(getattr(child, 'to_fused', None)):
            child = child.to_fused()
            setattr(module, name, child)
        _parent_first(child)
    return module


def test_post_order_fuses_child_before_parent_reads_it():
    model = _nested()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    fused, report = fuse_with_report(copy.deepcopy(model))
    assert _rel(fused(x), ref) < 1e-5
    assert not any(isinstance(m, ToyDOConv) for m in fused.modules())
    assert fused[2].fused_conv is not None and not hasattr(fused[2], 'small')
    assert report.fused == {'ToyDOConv': 2, 'ToyRepBlock': 1}
    # the same fuse walked parent-first reads the unfused child's .weight: a wrong kernel
    wrong = _parent_first(copy.deepcopy(model))
    assert _rel(wrong(x), ref) > 1e-2


def test_report_counts_parameters_and_is_kept():
    model = _nested()
    before = sum(p.numel() for p in model.parameters())
    out = fuse(model)
    assert out is model
    report = fuse.last_report
    assert report.params_before == before
    assert report.params_after == count_params(model) < before
    # 2 ToyDOConv of 3*4*9 / 4*4*9 weights become plain convs; the block's 5x5 conv+BN+small conv
    # become one 5x5 conv with bias
    expected = before - (3 * 4 * 9 + 4 * 4 * 9) - (4 * 4 * 9 + 4 + 4 + 4) + 4
    assert report.params_after == expected
    assert 'ToyDOConv: 2' in str(report) and f'{before:,}' in str(report)


def test_fusing_twice_is_a_no_op():
    model = fuse(_nested())
    x = torch.randn(1, 3, 12, 12)
    y = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again, report = fuse_with_report(model)
    assert again is model and report.fused == {} and report.params_before == report.params_after
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), y)


def test_bare_fusable_root_is_replaced():
    layer = ToyDOConv(3, 5, 3).eval()
    x = torch.randn(1, 3, 8, 8)
    conv = fuse(layer)
    assert type(conv) is nn.Conv2d
    assert torch.allclose(conv(x), layer(x), atol=1e-6)


def test_training_mode_is_refused_before_anything_changes():
    model = _nested().train()
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match=r'training mode .*model\.eval\(\)'):
        fuse(model)
    assert list(model.state_dict()) == keys  # nothing was half-fused
    assert any(isinstance(m, ToyDOConv) for m in model.modules())


def test_fuse_bn_folds_conv_bn_pairs_and_keeps_dtype():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)))
    model = _randomize_bn(model).double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    ref = model(x)
    fused, report = fuse_with_report(model, fuse_bn=True)
    assert report.fused == {CONV_BN: 2}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    assert _rel(fused(x), ref) < 1e-12
    assert report.params_after == report.params_before - 2 * 12 + 6  # BN affine gone, one new bias


def test_fuse_bn_in_training_mode_is_refused_and_default_leaves_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match='training mode'):
        fuse(model, fuse_bn=True)
    fused = fuse(model)  # nothing fusable without fuse_bn: training mode is harmless
    assert isinstance(fused[1], nn.BatchNorm2d) and fuse.last_report.fused == {}


class _NormFirst(nn.Module):
    """mmcv ConvModule with order=('norm', 'conv', 'act'): conv registered first, runs second."""

    def __init__(self):
        super().__init__()
        self.order = ('norm', 'conv', 'act')
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_fuse_bn_skips_norm_before_conv():
    model = _randomize_bn(_NormFirst()).eval()
    x = torch.randn(1, 4, 6, 6)
    ref = model(x)
    fuse(model, fuse_bn=True)
    assert fuse.last_report.fused == {} and isinstance(model.bn, nn.BatchNorm2d)
    assert torch.equal(model(x), ref)


class _NotPairs(nn.Module):
    """Conv children registered right before a BN that does not normalise their output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(8)  # normalises [x, conv(x)]: channels differ
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn_free = nn.BatchNorm2d(8, track_running_stats=False)  # batch statistics only

    def forward(self, x):
        y = self.bn_up(self.up(self.bn_cat(torch.cat([x, self.conv(x)], 1))))
        return self.bn_free(self.conv2(y))


def test_fuse_bn_leaves_what_is_not_a_conv_bn_pair():
    model = _randomize_bn(_NotPairs()).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ref = model(x)
    fuse(model, fuse_bn=True)
    assert fuse.last_report.fused == {}
    assert [n for n, m in model.named_children() if isinstance(m, nn.BatchNorm2d)] == \
        ['bn_cat', 'bn_up', 'bn_free']
    assert torch.equal(model(x), ref)


def test_bad_to_fused_return_is_a_clear_error():
    class Bad(nn.Module):
        def to_fused(self):
            return None

    with pytest.raises(TypeError, match='returned NoneType'):
        fuse(nn.Sequential(Bad()).eval())


def test_non_module_is_refused():
    with pytest.raises(TypeError, match='expects an nn.Module'):
        fuse({'state_dict': {}})


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group():
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize('backbone', ['RepLKNet', 'UniRepLKNet'])
def test_backbones_with_mmcvs_sync_bn_copy_and_fuse(process_group, backbone):
    """``norm_cfg=dict(type='MMSyncBN')`` on GPUs: mmcv's SyncBatchNorm keeps its process group,
    which deepcopy could not copy (the fused validation copy, the test's reference, the layout
    timing's copy all failed), and it is no torch ``_BatchNorm``, which the branch merges
    refused. A copy now shares the group, and the merges fold its eval statistics."""
    import torch.distributed as dist
    from mmcv.ops import SyncBatchNorm

    from reparam_mm import RepLKNet, UniRepLKNet
    from reparam_mm.layers.large_kernel import collective_free_copy
    torch.manual_seed(0)
    model = dict(RepLKNet=RepLKNet, UniRepLKNet=UniRepLKNet)[backbone](
        arch='tiny', norm_cfg=dict(type='MMSyncBN', requires_grad=True))
    norms = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert norms and norms[0].group is not None
    with torch.no_grad():
        for m in norms:  # statistics and affine terms the fusion must fold
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
    model.eval()
    twin = copy.deepcopy(model)
    twin_norms = [m for m in twin.modules() if isinstance(m, SyncBatchNorm)]
    assert twin_norms[0].group is norms[0].group is dist.group.WORLD
    assert twin_norms[0].running_var is not norms[0].running_var  # the tensors are copies
    assert collective_free_copy(model) is not None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fused = fuse(twin)
        out = fused(x)
    assert count_params(fused) < count_params(model)  # the branches were merged
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('wrapper', ['torch', 'mmengine'])
def test_fuses_inside_ddp_wrappers(process_group, wrapper):
    from mmengine.model import MMDistributedDataParallel
    cls = nn.parallel.DistributedDataParallel if wrapper == 'torch' else MMDistributedDataParallel
    model = _nested()
    x = torch.randn(1, 3, 12, 12)
    ref = model(x)
    wrapped = cls(model)
    out = fuse(wrapped.eval())
    assert out is wrapped
    assert not any(isinstance(m, ToyDOConv) for m in wrapped.module.modules())
    assert fuse.last_report.fused == {'ToyDOConv': 2, 'ToyRepBlock': 1}
    with torch.no_grad():
        assert _rel(wrapped.module(x), ref) < 1e-5


# -- integration: real segmentors and detectors with DO-Conv / RepLKNet -----------------------------
NORM = dict(type='BN', requires_grad=True)
DO = dict(type='DOConv')
MEAN_STD = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True)


def _backbone(kind, scope):
    """(backbone cfg, out channels): DO-ResNet-18 (DO-Conv in every stage) or RepLKNet 'tiny'."""
    if kind == 'replknet':  # DO-Conv small kernels inside the large-kernel blocks: the nested case
        return dict(type='RepLKNet', arch='tiny', stage_with_doconv=(True,) * 4, norm_cfg=NORM), \
            [16, 32, 64, 128]
    resnet = 'DOResNetV1c' if scope == 'mmseg' else 'DOResNet'
    return dict(type=resnet, depth=18, stage_with_doconv=(True,) * 4, norm_cfg=NORM), [64, 128, 256, 512]


def seg_model_cfg(backbone='doconv', num_classes=4):
    """UperNet + FCN auxiliary head, DO-Conv in backbone and both heads."""
    bb, ch = _backbone(backbone, 'mmseg')
    loss = dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', pad_val=0, seg_pad_val=255, size=(64, 64),
                               **MEAN_STD),
        backbone=bb,
        decode_head=dict(type='UPerHead', in_channels=ch, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=32, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=NORM,
                         conv_cfg=DO, align_corners=False, loss_decode=loss),
        auxiliary_head=dict(type='FCNHead', in_channels=ch[2], in_index=2, channels=16, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=NORM,
                            conv_cfg=DO, align_corners=False, loss_decode=dict(loss, loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


def _bbox_head(num_classes, stds, agnostic):
    return dict(type='ConvFCBBoxHead', num_shared_convs=2, num_shared_fcs=1, in_channels=32,
                conv_out_channels=32, fc_out_channels=64, roi_feat_size=7, num_classes=num_classes,
                conv_cfg=DO, norm_cfg=NORM, reg_class_agnostic=agnostic,
                bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4, target_stds=stds),
                loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type='L1Loss', loss_weight=1.0))


def _det_train_cfg(detector):
    def assigner(iou):
        return dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou if iou > 0.5 else 0.3,
                    min_pos_iou=iou if iou > 0.5 else 0.3, match_low_quality=iou <= 0.5, ignore_iof_thr=-1)

    def rcnn(iou):
        return dict(assigner=dict(assigner(iou), match_low_quality=False, neg_iou_thr=iou, min_pos_iou=iou),
                    sampler=dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1,
                                 add_gt_as_proposals=True), pos_weight=-1, debug=False)
    return dict(
        rpn=dict(assigner=assigner(0.7), allowed_border=-1, pos_weight=-1, debug=False,
                 sampler=dict(type='RandomSampler', num=64, pos_fraction=0.5, neg_pos_ub=-1,
                              add_gt_as_proposals=False)),
        rpn_proposal=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=rcnn(0.5) if detector == 'faster' else [rcnn(0.5), rcnn(0.6), rcnn(0.7)])


def det_model_cfg(detector='faster', backbone='doconv', num_classes=2):
    """Faster / Cascade R-CNN, DO-Conv in backbone, FPN, RPN head and the shared-conv bbox heads."""
    bb, ch = _backbone(backbone, 'mmdet')
    extractor = dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                     out_channels=32, featmap_strides=[4, 8, 16, 32])
    if detector == 'faster':
        roi_head = dict(type='StandardRoIHead', bbox_roi_extractor=extractor,
                        bbox_head=_bbox_head(num_classes, [0.1, 0.1, 0.2, 0.2], False))
    else:
        roi_head = dict(type='CascadeRoIHead', num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
                        bbox_roi_extractor=extractor,
                        bbox_head=[_bbox_head(num_classes, [s, s, 2 * s, 2 * s], True) for s in (0.1, 0.05, 0.033)])
    return dict(
        type='FasterRCNN' if detector == 'faster' else 'CascadeRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor', pad_size_divisor=32, **MEAN_STD),
        backbone=bb,
        neck=dict(type='FPN', in_channels=ch, out_channels=32, num_outs=5, conv_cfg=DO),
        rpn_head=dict(type='ConvCfgRPNHead', in_channels=32, feat_channels=32, conv_cfg=DO,
                      anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=[4, 8, 16, 32, 64]),
                      bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4, target_stds=[1.0] * 4),
                      loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        roi_head=roi_head,
        train_cfg=_det_train_cfg(detector),
        test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
                      rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=20)))


def perturb(model, seed=0):
    """Random BN statistics and non-zero DO-Conv D, so no fusion is trivially exact."""
    from reparam_mm.layers.doconv import DOConv2d
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.copy_(torch.randn(m.D.shape, generator=g) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def build(model_cfg, scope):
    import reparam_mm.backbones  # noqa: F401
    import reparam_mm.models  # noqa: F401
    from mmengine.config import Config
    from reparam_mm.apis import build_model
    return build_model(Config(dict(model=model_cfg, default_scope=scope)))


def _unfused_parts(model):
    from reparam_mm.backbones.replknet import ReparamLargeKernelConv
    from reparam_mm.layers.doconv import DOConv2d
    return [n for n, m in model.named_modules()
            if isinstance(m, DOConv2d) or (isinstance(m, ReparamLargeKernelConv) and not m.is_fused)]


def test_models_are_compared_in_full_fp32_not_tf32():
    """On a GPU cuDNN runs fp32 convolutions in TF32 by default (about 1e-3 relative), which
    would bury a fused model's own difference (FusedEvalHook's tolerance: 1e-4): the comparison
    turns TF32 off for both models' forwards, and back on after."""
    from reparam_mm.outputs import compare_models, rpn_proposals

    class Probe(nn.Module):
        data_preprocessor = staticmethod(lambda data, training: data)

        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, inputs, mode):
            self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return inputs * 2

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # a GPU's
    try:
        a, b = Probe(), Probe()
        assert compare_models(a, b, {'inputs': torch.ones(1, 3, 4, 4)})['max_rel'] == 0
        assert a.seen == b.seen == [(False, False)]
        assert rpn_proposals(a, {'inputs': torch.ones(1, 3, 4, 4)}) is None
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


CASES = [('mmseg', 'upernet', 'doconv'), ('mmseg', 'upernet', 'replknet'),
         ('mmdet', 'faster', 'doconv'), ('mmdet', 'faster', 'replknet'),
         ('mmdet', 'cascade', 'doconv'), ('mmdet', 'cascade', 'replknet')]


def test_two_stage_detectors_are_compared_on_the_references_proposals():
    """A change of RPN scores the size of rounding moves proposals across nms and the top-k cut:
    compared on their own proposals, two such detectors differ in how many boxes they score at
    all. compare_models runs both RoI heads on the reference's proposals and sees the change's
    own size; the features and the RPN's raw outputs are compared too."""
    from mmengine.config import Config

    from reparam_mm.apis import build_model
    from reparam_mm.batches import synthetic_batch
    from reparam_mm.outputs import compare_models, compare_outputs, rpn_proposals, tensor_outputs
    from test_amp import COCO128
    cfg = Config.fromfile(str(COCO128))
    torch.manual_seed(0)
    a = build_model(cfg).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        w = b.rpn_head.rpn_conv.W
        w.add_(torch.randn_like(w) * w.abs().max() * 1e-3)
    batch = synthetic_batch(cfg, 128, 160, batch=1)
    proposals = rpn_proposals(a, copy.deepcopy(batch))
    assert len(proposals) == 1 and proposals[0].bboxes.shape[1] == 4
    own = compare_outputs(*(tensor_outputs(m, copy.deepcopy(batch)) for m in (a, b)))
    assert own['same_structure'] is False
    shared = compare_models(a, b, copy.deepcopy(batch))
    assert shared['same_structure'] and 1e-4 < shared['max_rel'] < 5e-2
    feats, rpn_outs, (cls_score, bbox_pred) = tensor_outputs(a, copy.deepcopy(batch), proposals)
    assert len(feats) == 5 and cls_score.shape[0] == len(proposals[0])  # one row per proposal
    assert compare_models(a, copy.deepcopy(a), copy.deepcopy(batch))['max_rel'] == 0
    assert rpn_proposals(nn.Conv2d(3, 3, 1), {'inputs': torch.zeros(1, 3, 8, 8)}) is None


@pytest.mark.parametrize('scope,arch,backbone', CASES, ids=['-'.join(c[1:]) for c in CASES])
def test_fuse_real_models(scope, arch, backbone):
    from mmengine.config import Config
    from reparam_mm.batches import synthetic_batch
    from reparam_mm.outputs import compare_outputs, tensor_outputs
    cfg = seg_model_cfg(backbone) if scope == 'mmseg' else det_model_cfg(arch, backbone)
    torch.manual_seed(0)
    model = perturb(build(cfg, scope)).eval()
    assert _unfused_parts(model)
    batch = synthetic_batch(Config(dict(default_scope=scope)), 64, 64)
    ref = tensor_outputs(model, copy.deepcopy(batch))

    fused, report = fuse_with_report(copy.deepcopy(model))
    assert _unfused_parts(fused) == []
    assert report.fused.get('DOConv2d', 0) > 0 and report.params_after < report.params_before
    if backbone == 'replknet':
        assert report.fused['ReparamLargeKernelConv'] == 5  # 'tiny': 1 + 1 + 2 + 1 blocks
    check = compare_outputs(ref, tensor_outputs(fused, copy.deepcopy(batch)))
    assert check['same_structure'] and check['max_rel'] < 1e-5, check

    state = {k: v.clone() for k, v in fused.state_dict().items()}
    _, again = fuse_with_report(fused)
    assert again.fused == {} and state.keys() == fused.state_dict().keys()
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in state.items())

    with pytest.raises(RuntimeError, match='training mode'):
        fuse(model.train())
    assert _unfused_parts(model)  # refused before anything changed
