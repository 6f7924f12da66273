# UperNet + RepLKNet-31B (ImageNet-1K pretrained), PASCAL VOC 2012 + SBD
# augmented set, 512x512. The authors report no VOC result, so this is our
# recipe: mmseg's UperNet VOC12aug schedule (4 GPUs x 4 images, 40k
# iterations) with the RepLKNet AdamW / poly recipe, the learning rate
# lowered to 1e-4 for the 8x smaller batch (mmseg's ConvNeXt UperNet value
# at batch 16), warm-up 1500 iterations, drop_path 0.5.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-31B_ImageNet-1K_224.pth
_base_ = [
    '../_base_/models/upernet_replknet-31b.py',
    'mmseg::_base_/datasets/pascal_voc12_aug.py',
    'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/replknet_adamw-poly-40k.py', '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/RepLKNet-31B_ImageNet-1K_224.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(num_classes=21),
    auxiliary_head=dict(num_classes=21))
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=1e-4))

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
        end={{_base_.max_iters}})
]
