# UperNet + RepLKNet-31L (ImageNet-22K pretrained), ADE20K 640x640, slide
# test. As the authors: 64 GPUs x 1 image, 80k iterations (same number of
# images as 40k x 128), warm-up 800 iterations, drop_path 0.3.
# Reported (authors, single scale): 52.4 mIoU.
# Set the ImageNet-22K weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-31L_ImageNet-22K.pth
_base_ = ['./upernet_replknet-31b-in22k-pre_64xb2-40k_ade20k-640x640.py']
checkpoint_file = 'work_dirs/pretrained/RepLKNet-31L_ImageNet-22K.pth'
model = dict(
    backbone=dict(
        arch='31L',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768))
train_dataloader = dict(batch_size=1)

max_iters = 80000
warmup_iters = 800
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters)
]
train_cfg = dict(max_iters=max_iters, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
