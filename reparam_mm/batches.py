"""Synthetic batches in the form a dataloader yields them, for a model built from a config
without its dataset: checks (tools/fuse.py), benchmarks and tests."""
import torch

from .scope import init_scope

__all__ = ['synthetic_batch']


def synthetic_batch(cfg, height, width, batch=1, train=False, seed=0):
    """``dict(inputs=[uint8 CHW], data_samples=[...])`` for ``cfg``'s scope (mmseg or mmdet);
    with ``train`` the samples carry random ground truth (segmentation map, or boxes and
    labels, plus box-filled instance masks for a mask head) for ``train_step``. Feed it to ``model.data_preprocessor`` like a real batch."""
    g = torch.Generator().manual_seed(seed)
    scope = init_scope(cfg)
    inputs = [torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
              for _ in range(batch)]
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), scale_factor=(1.0, 1.0), flip=False)
    samples = []
    for _ in range(batch):
        if scope == 'mmseg':
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            sample = SegDataSample(metainfo=meta)
            if train:
                classes = _num_classes(cfg.model.decode_head, cfg)
                sample.gt_sem_seg = PixelData(data=torch.randint(
                    0, classes, (1, height, width), generator=g, dtype=torch.long))
        else:
            from mmdet.structures import DetDataSample
            from mmengine.structures import InstanceData
            sample = DetDataSample(metainfo=meta)
            if train:
                sample.gt_instances = _random_boxes(cfg, height, width, g)
                sample.ignored_instances = InstanceData(
                    bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _num_classes(head, cfg):
    heads = head if isinstance(head, (list, tuple)) else [head]
    n = heads[0].get('num_classes')
    if not isinstance(n, int):
        raise ValueError(f'{cfg.filename}: cannot read num_classes from the head config to draw '
                         'synthetic labels; set num_classes in the config.')
    return n


def _random_boxes(cfg, height, width, g, count=8):
    from mmengine.structures import InstanceData
    roi = cfg.model.get('roi_head') or {}
    head = roi.get('bbox_head') if roi else cfg.model.get('bbox_head')
    classes = _num_classes(head, cfg)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = (0.1 + 0.2 * torch.rand(count, 2, generator=g)) * torch.tensor([width, height])
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width - 1., height - 1.]))], dim=1)
    instances = InstanceData(bboxes=boxes,
                             labels=torch.randint(0, classes, (count, ), generator=g))
    if roi.get('mask_head') is not None:  # instance masks: each box filled
        import numpy as np
        from mmdet.structures.mask import BitmapMasks
        masks = np.zeros((count, height, width), np.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
            m[y1:y2 + 1, x1:x2 + 1] = 1
        instances.masks = BitmapMasks(masks, height, width)
    return instances
