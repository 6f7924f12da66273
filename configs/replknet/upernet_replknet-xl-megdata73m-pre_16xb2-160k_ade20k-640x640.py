# UperNet + RepLKNet-XL (MegData-73M pretrained), ADE20K 640x640, slide
# test. XL has no small re-param kernels and normalises its intermediate
# features; its pretraining used mean = std = 127.5 (timm's "inception"
# mean/std), so the data preprocessor must too. As the authors: 16 GPUs x 2
# images, 160k iterations, warm-up 1500, drop_path 0.5. Their published
# config sets its training pipeline to the test pipeline (no annotations: it
# cannot train as written); ours trains with their 31B / 31L 640 pipeline.
# Validation and checkpoints every 16k iterations (mmseg's 160k schedule),
# where theirs use 2k.
# Reported (authors, single scale): 55.2 mIoU.
# Set the MegData-73M weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-XL_MegData73M_pretrain.pth
_base_ = ['./upernet_replknet-31b-in22k-pre_64xb2-40k_ade20k-640x640.py']
checkpoint_file = 'work_dirs/pretrained/RepLKNet-XL_MegData73M_pretrain.pth'
data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='XL',
        drop_path_rate=0.5,
        norm_intermediate_features=True,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))
train_dataloader = dict(batch_size=2)

max_iters = 160000
warmup_iters = 1500
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
train_cfg = dict(max_iters=max_iters, val_interval=16000)
default_hooks = dict(checkpoint=dict(interval=16000))
