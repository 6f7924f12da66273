# UperNet + UniRepLKNet-L (ImageNet-22K pretrained, fine-tuned on 1K at 384),
# ADE20K 640x640. The authors' recipe (upernet_unireplknet_l_in22k_640_160k_
# ade20k.py): as for B with drop_path 0.4 and layer-wise lr decay 0.85.
# Reported (authors, single scale): 54.5 mIoU, 254M parameters.
# Set the weights (edit checkpoint_file, or on the command line
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/FILE)
# with FILE = unireplknet_l_in22k_to_in1k_384_acc87.88.pth (the authors' release).
_base_ = ['./upernet_unireplknet-b-in22k-pre_8xb2-160k_ade20k-640x640.py']
checkpoint_file = 'work_dirs/pretrained/unireplknet_l_in22k_to_in1k_384_acc87.88.pth'
model = dict(
    backbone=dict(
        arch='L',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768))
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.85))
