# FCN on the distilled MobileNetV3-Large (mobilenetv3_large_100): Cityscapes, 80k iterations, 4x2 images.
_base_ = [
    './_base_/models/fcn_student.py', './_base_/datasets/cityscapes.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_80k.py'
]
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='mobilenetv3_large_100'),  # feature channels [24, 40, 112, 960] at strides 4..32
    decode_head=dict(in_channels=960, num_classes=19),
    auxiliary_head=dict(in_channels=112, num_classes=19))
