# Cascade Mask R-CNN FPN + UniRepLKNet-S (ImageNet-1K pretrained), COCO, the
# authors' 3x recipe (AILab-CVC/UniRepLKNet, detection/configs/coco/
# casc_mask_rcnn_unireplknet_s_in1k_fpn_3x_coco.py, mmdet 2.28), ported to
# mmdet 3.x:
# - box heads: 4 shared convs + 1 FC with SyncBN, GIoU loss (weight 10) on
#   decoded boxes, the three cascade stages' usual target stds;
# - training: random flip, then either multi-scale resize (short side
#   480-800, long side <= 1333) or resize / absolute crop (384-600) / resize
#   (the DETR augmentation); 8 GPUs x 2 images; 36 epochs, lr x0.1 at
#   epochs 27 and 33, linear warm-up 500 iterations from 0.001;
# - AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 except on 1-D
#   parameters and biases, their layer-wise lr decay 0.8 over 12 layers;
#   drop_path 0.5, SyncBN, checkpointing (with_cp).
# Their config leaves the backbone checkpoint to the user; the ImageNet-1K
# file of their release is named below.
# Reported (authors): 53.0 box AP / 45.9 mask AP, 113M parameters.
# Set the ImageNet weights (edit checkpoint_file, or on the command line)
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/unireplknet_s_in1k_224_acc83.91.pth
# The heads, augmentation and 3x schedule equal RepLKNet-31B's recipe, so this config inherits it
# and changes the backbone, the batch and the optimizer.
_base_ = ['../replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_16xb1-ms-crop-3x_coco.py']
checkpoint_file = 'work_dirs/pretrained/unireplknet_s_in1k_224_acc83.91.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='UniRepLKNet',
        arch='S',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.5,
        with_cp=True,
        small_kernel_merged=False,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))
train_dataloader = dict(batch_size=2)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='UniRepLKNetLayerDecayOptimizerConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.8, decay_type='layer_wise', num_layers=12))
default_hooks = dict(
    checkpoint=dict(interval=1, max_keep_ckpts=5, save_best='auto'))
