# Faster R-CNN FPN on Pascal VOC 07+12 (MMDetection's VOC schedule), on the distilled ResNet-34 (resnet34).
#   python tools/convert_to_openmmlab.py STUDENT.pth student_openmmlab.pth
#   python tools/train_det.py voc_faster_rcnn_r34 --cfg-options model.backbone.init_cfg.checkpoint=student_openmmlab.pth
_base_ = [
    './_base_/models/faster_rcnn_student_fpn.py', './_base_/datasets/voc0712.py',
    './_base_/schedules/schedule_voc.py', './_base_/default_runtime.py'
]
model = dict(
    backbone=dict(arch='resnet34'),
    neck=dict(in_channels=[64, 128, 256, 512]),  # the student's channels at strides 4, 8, 16, 32
    roi_head=dict(
        bbox_head=dict(num_classes=20)))
