"""Shared steps of the downstream tests: a tiny backbone inside mmseg's UperNet or mmdet's R-CNNs,
one training step through the heads' losses, prediction, and (UperNet) fusing.

The RepLKNet and UniRepLKNet suites call these with their backbone; only what each backbone
must show after the step (which parameter moved) is theirs.
"""
import copy
import importlib
import os.path as osp

import torch

from reparam_mm.fuse import fuse

TINY_DIMS = [16, 32, 64, 128]  # the tiny archs' stage widths


def package_model_cfg(package, rel):
    """The ``model`` of a config shipped inside mmseg / mmdet (``.mim/configs/_base_/models``)."""
    from mmengine.config import Config
    root = osp.dirname(importlib.import_module(package).__file__)
    return Config.fromfile(osp.join(root, '.mim', 'configs', '_base_', 'models', rel)).model


def seg_batch(num_classes, size=64, n=2, seed=0):
    """``n`` random uint8 images with random label maps, as mmseg's data loader gives them."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    data = dict(inputs=[], data_samples=[])
    for _ in range(n):
        data['inputs'].append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                                            generator=g))
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, size, size),
                                                         generator=g))
        data['data_samples'].append(sample)
    return data


def train_once(model, data, moves, gets_grad=()):
    """One SGD step on the model's loss; ``moves(model)`` must change and every parameter that
    ``gets_grad(model)`` lists must receive a non-zero gradient. Returns the logged losses."""
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    batch = model.data_preprocessor(copy.deepcopy(data), True)
    loss, log_vars = model.parse_losses(model(**batch, mode='loss'))
    assert torch.isfinite(loss) and loss > 0
    before = moves(model).detach().clone()
    optim.zero_grad()
    loss.backward()
    for p in gets_grad(model) if gets_grad else ():
        assert p.grad is not None and p.grad.abs().max() > 0
    optim.step()
    assert not torch.equal(before, moves(model))  # the backbone trained through the heads' loss
    return log_vars


def upernet_train_predict_fuse(backbone, moves, gets_grad=()):
    """UperNet (mmseg's upernet_r50 with narrow heads) on ``backbone``: a training step, then
    prediction, and the same logits after :func:`reparam_mm.fuse`."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = package_model_cfg('mmseg', 'upernet_r50.py')
    bn = dict(type='BN', requires_grad=True)
    cfg.pretrained = None
    cfg.data_preprocessor.size = (64, 64)
    cfg.backbone = backbone
    cfg.decode_head.update(in_channels=TINY_DIMS, channels=32, num_classes=4, norm_cfg=bn)
    cfg.auxiliary_head.update(in_channels=TINY_DIMS[2], channels=16, num_classes=4, norm_cfg=bn)
    data = seg_batch(num_classes=4)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = SEG_MODELS.build(cfg)
        model.init_weights()
        log_vars = train_once(model, data, moves, gets_grad)
        assert {'decode.loss_ce', 'aux.loss_ce'} <= set(log_vars)
        model.eval()
        with torch.no_grad():
            batch = model.data_preprocessor(copy.deepcopy(data), False)
            preds = model(**batch, mode='predict')
            logits = model(batch['inputs'], mode='tensor')
            fuse(model)  # the deploy path: the same segmentation logits after fusing
            fused_logits = model(batch['inputs'], mode='tensor')
    assert [p.pred_sem_seg.data.shape for p in preds] == [(1, 64, 64)] * 2
    assert ((fused_logits - logits).abs().max() / logits.abs().max()).item() < 1e-5


def rcnn_train_predict(base, backbone, moves, gets_grad=()):
    """An mmdet R-CNN (``base`` of mmdet's ``_base_/models``, masks if it has a mask head) with
    32-channel heads on ``backbone``: a training step, then prediction on 2 images, 3 classes.
    Returns the logged losses."""
    from mmengine.registry import DefaultScope
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = package_model_cfg('mmdet', base)
    cfg.backbone = backbone
    cfg.neck.update(in_channels=TINY_DIMS, out_channels=32)
    cfg.rpn_head.update(in_channels=32, feat_channels=32)
    roi = cfg.roi_head
    roi.bbox_roi_extractor.out_channels = 32
    for head in roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]:
        head.update(in_channels=32, fc_out_channels=64, num_classes=3)
    with_mask = 'mask_head' in roi
    if with_mask:
        roi.mask_roi_extractor.out_channels = 32
        roi.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=3)
    data = demo_mm_inputs(2, [(3, 64, 64)] * 2, num_items=[2, 3], num_classes=3,
                          with_mask=with_mask)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = DET_MODELS.build(cfg)
        model.init_weights()
        log_vars = train_once(model, data, moves, gets_grad)
        assert {'loss_rpn_cls', 'loss_rpn_bbox'} <= set(log_vars)
        model.eval()
        with torch.no_grad():
            preds = model(**model.data_preprocessor(copy.deepcopy(data), False), mode='predict')
    assert len(preds) == 2
    for p in preds:
        assert p.pred_instances.bboxes.shape[1] == 4
        assert len(p.pred_instances.scores) == len(p.pred_instances.labels)
        if with_mask:
            assert len(p.pred_instances.masks) == len(p.pred_instances.scores)
    return log_vars
