# Mask R-CNN FPN 1x on COCO 2017, on the distilled ResNet-18 (resnet18).
#   python tools/convert_to_openmmlab.py STUDENT.pth student_openmmlab.pth
#   python tools/train_det.py coco_mask_rcnn_1x_r18 --cfg-options model.backbone.init_cfg.checkpoint=student_openmmlab.pth
_base_ = [
    './_base_/models/mask_rcnn_student_fpn.py', './_base_/datasets/coco_instance.py',
    './_base_/schedules/schedule_1x.py', './_base_/default_runtime.py'
]
model = dict(
    backbone=dict(arch='resnet18'),
    neck=dict(in_channels=[64, 128, 256, 512]),  # the student's channels at strides 4, 8, 16, 32
    roi_head=dict(
        bbox_head=dict(num_classes=80),
        mask_head=dict(num_classes=80)))
