# Plain-conv baseline of the DO-Conv comparison on a backbone that was not
# written for DO-Conv: mmseg's own
# mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py
# (Cityscapes, 4 GPUs x 2 images, 80k iterations; mmseg reports 75.2 mIoU)
# plus this project's FusedEvalHook. The ImageNet MobileNetV2 weights are read
# from a local file, never downloaded (mmseg's mmcls://mobilenet_v2 is the file
# mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth, a classifier checkpoint
# whose backbone keys start with 'backbone.'). Set it (edit checkpoint_file, or
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/that.pth)
_base_ = [
    'mmseg::mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py',
    '../_base_/reparam_mm.py'
]
checkpoint_file = 'work_dirs/pretrained/mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file, prefix='backbone.')))
