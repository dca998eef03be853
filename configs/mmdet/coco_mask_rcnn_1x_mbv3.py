# Mask R-CNN FPN 1x on COCO 2017, on the distilled MobileNetV3-Large (mobilenetv3_large_100).
#   python tools/convert_to_openmmlab.py STUDENT.pth student_openmmlab.pth
#   python tools/train_det.py coco_mask_rcnn_1x_mbv3 --cfg-options model.backbone.init_cfg.checkpoint=student_openmmlab.pth
_base_ = [
    './_base_/models/mask_rcnn_student_fpn.py', './_base_/datasets/coco_instance.py',
    './_base_/schedules/schedule_1x.py', './_base_/default_runtime.py'
]
model = dict(
    backbone=dict(arch='mobilenetv3_large_100'),
    neck=dict(in_channels=[24, 40, 112, 960]),  # the student's channels at strides 4, 8, 16, 32
    roi_head=dict(
        bbox_head=dict(num_classes=80),
        mask_head=dict(num_classes=80)))
