# UperNet + RepLKNet-31B (ImageNet-1K pretrained), ADE20K 512x512.
# The authors' recipe: 64 GPUs x 2 images, 40k iterations, drop_path 0.5.
# Reported (authors, single scale): 49.9 mIoU.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/RepLKNet-31B_ImageNet-1K_224.pth
# (the file name of the authors' release; nothing is downloaded).
_base_ = [
    '../_base_/models/upernet_replknet-31b.py',
    'mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/replknet_adamw-poly-40k.py', '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/RepLKNet-31B_ImageNet-1K_224.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
train_dataloader = dict(batch_size=2)
