# Plain-conv baseline for the DO-Conv *head* variants: the Faster R-CNN
# baseline beside it with a conv RoI box head (4 shared 3x3 convs + 1 FC,
# mmdet's Shared4Conv1FCBBoxHead) instead of 2 FCs, so that "DO-Conv in the
# head" has 3x3 convs to act on, and its comparison has the same head.
_base_ = ['./faster-rcnn_r50_fpn_1x_coco.py']
model = dict(
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))
