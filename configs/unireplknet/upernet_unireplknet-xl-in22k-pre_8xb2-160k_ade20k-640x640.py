# UperNet + UniRepLKNet-XL (ImageNet-22K pretrained, fine-tuned on 1K at 384),
# ADE20K 640x640. The authors report this model (55.2 mIoU single scale,
# 425M parameters) but publish no config for it: this is their L recipe
# unchanged (8 GPUs x 2 images, 160k iterations, AdamW lr 1e-4, layer-wise
# lr decay 0.85 over 12 layers, drop_path 0.4, with_cp, whole-image test at
# (2560, 640)), our assumption, with XL's widths and checkpoint.
# Set the weights (edit checkpoint_file, or on the command line
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/FILE)
# with FILE = unireplknet_xl_in22k_to_in1k_384_acc87.96.pth (the authors' release).
_base_ = ['./upernet_unireplknet-l-in22k-pre_8xb2-160k_ade20k-640x640.py']
checkpoint_file = 'work_dirs/pretrained/unireplknet_xl_in22k_to_in1k_384_acc87.96.pth'
model = dict(
    backbone=dict(
        arch='XL',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))
