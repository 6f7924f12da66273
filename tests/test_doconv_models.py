"""DO-Conv switched on per place in real mmseg / mmdet models: backbone stages, neck, heads."""
import copy

import pytest
import torch
import torch.nn as nn

import reparam_mm  # noqa: F401  (registers DOConv, DOResNet(V1c), ConvCfgRPNHead)
from reparam_mm import DOConv2d

DOCONV = dict(type='DOConv')


def build(scope, cfg):
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope, init_default_scope

    init_default_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
        model = registry.build(ConfigDict(copy.deepcopy(cfg)))
    model.init_weights()
    return model


def doconv_names(module):
    return sorted(n for n, m in module.named_modules() if isinstance(m, DOConv2d))


def k_gt1_conv_names(module, prefix):
    """Names of every conv (plain or DO) with a k>1 kernel under ``prefix``."""
    return sorted(n for n, m in module.named_modules()
                  if n.startswith(prefix) and isinstance(m, (nn.Conv2d, DOConv2d))
                  and m.kernel_size[0] * m.kernel_size[1] > 1)


def expected_r18_stage_convs(stages):
    """BasicBlock: conv1 and conv2 are 3x3 in each of the 2 blocks of every stage."""
    return sorted(f'backbone.layer{s}.{b}.conv{c}' for s in stages for b in (0, 1) for c in (1, 2))


def backbone_cfg(kind, doconv):
    base = dict(depth=18, num_stages=4, out_indices=(0, 1, 2, 3), norm_cfg=dict(type='BN'),
                init_cfg=None)
    if kind == 'mmseg':
        base.update(type='DOResNetV1c' if doconv else 'ResNetV1c', dilations=(1, 1, 1, 1),
                    strides=(1, 2, 2, 2), stem_channels=32)
    else:
        base.update(type='DOResNet' if doconv else 'ResNet', frozen_stages=-1)
    if doconv:
        base.update(stage_with_doconv=(False, True, True, True), doconv_cfg=DOCONV)
    return base


def upernet_cfg(in_backbone, in_head):
    conv_cfg = DOCONV if in_head else None
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(64, 64)),
        backbone=backbone_cfg('mmseg', in_backbone),
        decode_head=dict(type='UPerHead', in_channels=[64, 128, 256, 512], in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=32, dropout_ratio=0.1, num_classes=4,
                         norm_cfg=dict(type='BN'), align_corners=False, conv_cfg=conv_cfg,
                         loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=256, in_index=2, channels=16, num_convs=1,
                            concat_input=True, dropout_ratio=0.1, num_classes=4,
                            norm_cfg=dict(type='BN'), align_corners=False, conv_cfg=conv_cfg,
                            loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


def faster_rcnn_cfg(in_backbone, in_head):
    conv_cfg = DOCONV if in_head else None
    return dict(
        type='FasterRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=backbone_cfg('mmdet', in_backbone),
        neck=dict(type='FPN', in_channels=[64, 128, 256, 512], out_channels=32, num_outs=5,
                  conv_cfg=conv_cfg),
        rpn_head=dict(
            type='ConvCfgRPNHead', in_channels=32, feat_channels=32, conv_cfg=conv_cfg,
            anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                            target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        roi_head=dict(
            type='StandardRoIHead',
            bbox_roi_extractor=dict(type='SingleRoIExtractor', out_channels=32,
                                    roi_layer=dict(type='RoIAlign', output_size=7,
                                                   sampling_ratio=0),
                                    featmap_strides=[4, 8, 16, 32]),
            bbox_head=dict(
                type='Shared4Conv1FCBBoxHead', in_channels=32, conv_out_channels=32,
                fc_out_channels=64, roi_feat_size=7, num_classes=3, conv_cfg=conv_cfg,
                norm_cfg=dict(type='BN'),
                bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type='L1Loss', loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3,
                                   min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type='RandomSampler', num=64, pos_fraction=0.5,
                                  neg_pos_ub=-1, add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5,
                                    min_pos_iou=0.5, match_low_quality=False, ignore_iof_thr=-1),
                      sampler=dict(type='RandomSampler', num=32, pos_fraction=0.25,
                                   neg_pos_ub=-1, add_gt_as_proposals=True),
                      pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7),
                     min_bbox_size=0),
            rcnn=dict(score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5), max_per_img=20)))


def seg_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64),
                                        pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, 64, 64), generator=g))
        samples.append(s)
    inputs = [torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)
              for _ in range(2)]
    return dict(inputs=inputs, data_samples=samples)


def loss_step(model, batch):
    """One training forward + backward; returns the summed loss.

    BN scales are randomised first: ResNet's zero_init_residual zeroes each block's last BN,
    which (rightly) gives every conv of the block a zero gradient on the first step.
    """
    random_bn_stats(model)
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    total.backward()
    return total


def assert_doconv_trained(model):
    with_d = [m for m in model.modules() if isinstance(m, DOConv2d) and m.D is not None]
    assert with_d, 'no DO-Conv with a D to train'
    for m in with_d:
        assert m.W.grad is not None and m.D.grad is not None
    assert any(m.D.grad.abs().sum() > 0 for m in with_d)


# UPerHead with conv_cfg: 4 PPM + bottleneck + 3 lateral + 3 FPN + fpn_bottleneck ConvModules;
# FCNHead (num_convs=1, concat_input): convs.0 + conv_cat. conv_seg stays plain.
UPER_HEAD_DOCONV = 12 + 2
UPER_CASES = {'backbone': (True, False, 12), 'head': (False, True, UPER_HEAD_DOCONV),
              'both': (True, True, 12 + UPER_HEAD_DOCONV)}


@pytest.mark.parametrize('case', list(UPER_CASES))
def test_upernet_doconv_placement_forward_and_loss(case):
    in_backbone, in_head, count = UPER_CASES[case]
    model = build('mmseg', upernet_cfg(in_backbone, in_head))
    names = doconv_names(model)
    assert len(names) == count
    backbone_do = [n for n in names if n.startswith('backbone.')]
    if in_backbone:  # exactly the 3x3s of the residual blocks of stages 2-4: no stem, no stage 1
        assert backbone_do == expected_r18_stage_convs((2, 3, 4))
        assert not any(isinstance(m, DOConv2d) for m in model.backbone.stem.modules())
    else:
        assert backbone_do == []
    head_do = [n for n in names if not n.startswith('backbone.')]
    if in_head:  # every conv of both heads but the 1x1 classifiers
        heads = ('decode_head.', 'auxiliary_head.')
        plain = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and
                 n.startswith(heads)]
        assert plain == ['decode_head.conv_seg', 'auxiliary_head.conv_seg']
        assert k_gt1_conv_names(model, 'decode_head.') == sorted(
            n for n in head_do if n.startswith('decode_head.') and
            model.get_submodule(n).D is not None)
    else:
        assert head_do == []
    total = loss_step(model, seg_batch())
    assert torch.isfinite(total)
    assert_doconv_trained(model)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), mode='tensor')
    assert out.shape == (1, 4, 16, 16)


# FPN (4 lateral 1x1 + 4 output 3x3) + ConvCfgRPNHead rpn_conv + Shared4Conv1FC's 4 shared convs
FRCNN_HEAD_DOCONV = 8 + 1 + 4
FRCNN_CASES = {'backbone': (True, False, 12), 'head': (False, True, FRCNN_HEAD_DOCONV),
               'both': (True, True, 12 + FRCNN_HEAD_DOCONV)}


@pytest.mark.parametrize('case', list(FRCNN_CASES))
def test_faster_rcnn_doconv_placement_forward_and_loss(case):
    from mmdet.testing import demo_mm_inputs

    in_backbone, in_head, count = FRCNN_CASES[case]
    torch.manual_seed(0)
    model = build('mmdet', faster_rcnn_cfg(in_backbone, in_head))
    names = doconv_names(model)
    assert len(names) == count
    backbone_do = [n for n in names if n.startswith('backbone.')]
    assert backbone_do == (expected_r18_stage_convs((2, 3, 4)) if in_backbone else [])
    assert isinstance(model.backbone.conv1, nn.Conv2d)  # the 7x7 stem stays plain
    expected_head = sorted([f'neck.lateral_convs.{i}.conv' for i in range(4)] +
                           [f'neck.fpn_convs.{i}.conv' for i in range(4)] +
                           ['rpn_head.rpn_conv'] +
                           [f'roi_head.bbox_head.shared_convs.{i}.conv' for i in range(4)])
    assert [n for n in names if not n.startswith('backbone.')] == (expected_head if in_head else [])
    batch = demo_mm_inputs(batch_size=2, image_shapes=(3, 64, 64), num_items=[3, 2],
                           num_classes=3)
    total = loss_step(model, batch)
    assert torch.isfinite(total)
    assert_doconv_trained(model)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        results = model(**data, mode='predict')
    assert len(results) == 2 and results[0].pred_instances.bboxes.shape[-1] == 4


def test_conv_rpn_head_is_rpn_head_without_conv_cfg():
    from mmdet.models.dense_heads import RPNHead
    from reparam_mm.models import ConvCfgRPNHead

    kw = dict(in_channels=8, feat_channels=8,
              anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[1.0],
                                    strides=[4]))
    build('mmdet', dict(type='ConvCfgRPNHead', **kw))  # registered, builds under mmdet scope
    torch.manual_seed(0)
    plain = RPNHead(**kw)
    ours = ConvCfgRPNHead(**kw)
    assert type(ours.rpn_conv) is nn.Conv2d
    ours.load_state_dict(plain.state_dict())  # strict: identical keys and shapes
    x = [torch.randn(1, 8, 8, 8)]
    for a, b in zip(ours(x), plain(x)):
        torch.testing.assert_close(a, b)
    deep = ConvCfgRPNHead(num_convs=2, conv_cfg=dict(type='DOConv', D_mul=12), **kw)
    assert [type(m.conv) for m in deep.rpn_conv] == [DOConv2d, DOConv2d]
    assert deep.rpn_conv[0].conv.D_mul == 12
    # a plain RPN checkpoint loads into the DO-Conv RPN, missing only D
    do = ConvCfgRPNHead(conv_cfg=DOCONV, **kw)
    result = do.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ['rpn_conv.D'] and result.unexpected_keys == []
    for a, b in zip(do(x), plain(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fcn_mask_head_takes_doconv():
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead

    head = FCNMaskHead(num_convs=2, in_channels=8, conv_out_channels=8, num_classes=3,
                       conv_cfg=DOCONV)
    assert [type(c.conv) for c in head.convs] == [DOConv2d, DOConv2d]
    assert head(torch.randn(2, 8, 14, 14)).shape == (2, 3, 28, 28)


def random_bn_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_plain_resnet50_checkpoint_loads_into_doconv_resnet50(tmp_path):
    """Must show: only D keys missing, outputs match to 1e-5 (mmdet ResNet-50, stages 2-4)."""
    from mmdet.models.backbones import ResNet

    torch.manual_seed(0)
    plain = random_bn_stats(ResNet(depth=50))
    plain.eval()  # (OpenMMLab ResNets' train() returns None)
    ckpt = tmp_path / 'resnet50_plain.pth'
    torch.save({'state_dict': plain.state_dict()}, ckpt)

    do = build('mmdet', dict(type='DOResNet', depth=50,
                             stage_with_doconv=(False, True, True, True),
                             init_cfg=dict(type='Pretrained', checkpoint=str(ckpt))))
    do.eval()
    d_keys = sorted(f'{n}.D' for n in doconv_names(do))
    assert len(d_keys) == 4 + 6 + 3  # one 3x3 per Bottleneck in stages 2-4
    result = copy.deepcopy(do).load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == d_keys and result.unexpected_keys == []

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(do(x), plain(x)):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    # and the DO-Conv network still fuses back to the plain one
    from reparam_mm.fuse import fuse
    fused = fuse(copy.deepcopy(do))
    assert doconv_names(fused) == []
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x)):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_resnetv1c_checkpoint_loads_into_doresnetv1c():
    from mmseg.models.backbones import ResNetV1c

    kw = dict(depth=18, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True)
    torch.manual_seed(0)
    plain = random_bn_stats(ResNetV1c(**kw))
    do = build('mmseg', dict(type='DOResNetV1c', stage_with_doconv=(True, False, True, True),
                             **kw))
    plain.eval()
    do.eval()
    assert doconv_names(do) == sorted(n[len('backbone.'):] for n in
                                      expected_r18_stage_convs((1, 3, 4)))
    assert not any(isinstance(m, DOConv2d) for m in do.stem.modules())
    # geometry copied from the conv each replaces (contract_dilation halves block 0's)
    assert [(c.dilation, c.padding) for c in (do.layer4[0].conv1, do.layer4[1].conv1)] == \
        [((2, 2), (2, 2)), ((4, 4), (4, 4))]
    result = do.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.endswith('.D') for k in result.missing_keys) and not result.unexpected_keys
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(do(x), plain(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_stages_freeze_doconv_parameters():
    model = build('mmdet', dict(type='DOResNet', depth=18, frozen_stages=2,
                                doconv_cfg=dict(type='DOConv', D_mul=18)))
    assert model.layer2[0].conv1.D_mul == 18
    assert not any(p.requires_grad for p in model.layer2.parameters())
    assert all(p.requires_grad for p in model.layer3.parameters())


def test_registration_does_not_shadow_openmmlab_resnets():
    from mmdet.models.backbones import ResNet as DetResNet
    from mmdet.registry import MODELS as DET
    from mmseg.models.backbones import ResNet as SegResNet
    from mmseg.models.backbones import ResNetV1c
    from mmseg.registry import MODELS as SEG

    assert DET.get('ResNet') is DetResNet and SEG.get('ResNet') is SegResNet
    assert SEG.get('ResNetV1c') is ResNetV1c
    assert DET.get('DOResNet').__mro__[2] is DetResNet
    assert SEG.get('DOResNetV1c').__mro__[2] is ResNetV1c


@pytest.mark.parametrize('kwargs,match', [
    (dict(stage_with_doconv=(True, True)), r'must hold one bool per stage \(4\)'),
    (dict(stage_with_doconv=(0, 1, 1, 1)), 'must hold one bool per stage'),
    (dict(doconv_cfg='DOConv'), "must be a dict with a 'type'"),
    (dict(dcn=dict(type='DCN', deform_groups=1), stage_with_dcn=(False, False, True, True)),
     'cannot use both DCN and DO-Conv'),
    (dict(conv_cfg=dict(type='ConvWS')), r"'layer2\.0\.conv1' is a ConvWS2d"),
    (dict(doconv_cfg=dict(type='DOConv', D_mul=3)), r'D_mul=3 is invalid for a 3x3 kernel'),
    (dict(doconv_cfg=dict(type='DOConvv')), r"doconv_cfg type 'DOConvv' is not a registered conv"),
    (dict(stage_with_doconv=True), r'stage_with_doconv=True must hold one bool per stage'),
])
def test_bad_backbone_arguments_name_the_problem(kwargs, match):
    from reparam_mm.scope import ConfigError  # a ValueError the tools print as one line
    with pytest.raises(ConfigError, match=match):
        build('mmdet', dict(type='DOResNet', depth=18, **kwargs))
