# Faster R-CNN FPN on Pascal VOC 07+12 (MMDetection's VOC schedule), on the distilled MobileNetV3-Large (mobilenetv3_large_100).
#   python tools/convert_to_openmmlab.py STUDENT.pth student_openmmlab.pth
#   python tools/train_det.py voc_faster_rcnn_mbv3 --cfg-options model.backbone.init_cfg.checkpoint=student_openmmlab.pth
_base_ = [
    './_base_/models/faster_rcnn_student_fpn.py', './_base_/datasets/voc0712.py',
    './_base_/schedules/schedule_voc.py', './_base_/default_runtime.py'
]
model = dict(
    backbone=dict(arch='mobilenetv3_large_100'),
    neck=dict(in_channels=[24, 40, 112, 960]),  # the student's channels at strides 4, 8, 16, 32
    roi_head=dict(
        bbox_head=dict(num_classes=20)))
