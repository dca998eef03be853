# Mask R-CNN FPN on the generated shapes data (COCO layout, masks), a few minutes on a CPU, on the distilled MobileNetV3-Large (mobilenetv3_large_100).
#   python tools/convert_to_openmmlab.py STUDENT.pth student_openmmlab.pth
#   python tools/train_det.py shapes_mask_rcnn_mbv3 --cfg-options model.backbone.init_cfg.checkpoint=student_openmmlab.pth
_base_ = [
    './_base_/models/mask_rcnn_student_fpn_shapes.py', './_base_/datasets/shapes_coco_instance.py',
    './_base_/schedules/schedule_shapes.py', './_base_/default_runtime_iters.py'
]
model = dict(
    backbone=dict(arch='mobilenetv3_large_100'),
    neck=dict(in_channels=[24, 40, 112, 960]),  # the student's channels at strides 4, 8, 16, 32
    roi_head=dict(
        bbox_head=dict(num_classes=7),
        mask_head=dict(num_classes=7)))
