# Faster R-CNN FPN on the generated shapes data (COCO layout), a few minutes on a CPU, on the distilled ResNet-34 (resnet34).
#   python tools/convert_to_openmmlab.py STUDENT.pth student_openmmlab.pth
#   python tools/train_det.py shapes_faster_rcnn_r34 --cfg-options model.backbone.init_cfg.checkpoint=student_openmmlab.pth
_base_ = [
    './_base_/models/faster_rcnn_student_fpn_shapes.py', './_base_/datasets/shapes_coco_detection.py',
    './_base_/schedules/schedule_shapes.py', './_base_/default_runtime_iters.py'
]
model = dict(
    backbone=dict(arch='resnet34'),
    neck=dict(in_channels=[64, 128, 256, 512]),  # the student's channels at strides 4, 8, 16, 32
    roi_head=dict(
        bbox_head=dict(num_classes=7)))
