# UperNet + UniRepLKNet-S (ImageNet-1K pretrained), ADE20K 512x512. The
# authors' recipe (upernet_unireplknet_s_512_160k_ade20k.py): as for T
# (8 GPUs x 2 images, 160k iterations, AdamW lr 1e-4, warm-up 1500 + poly,
# whole-image test) with drop_path 0.3, checkpointing (with_cp) and
# layer-wise lr decay 0.9 over 12 layers.
# Reported (authors, single scale): 50.5 mIoU, 86M parameters.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/unireplknet_s_in1k_224_acc83.91.pth
_base_ = ['./upernet_unireplknet-t-in1k-pre_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'work_dirs/pretrained/unireplknet_s_in1k_224_acc83.91.pth'
model = dict(
    backbone=dict(
        arch='S',
        drop_path_rate=0.3,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.9, num_layers=12))
