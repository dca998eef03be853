# FCN on the distilled MobileNetV3-Large (mobilenetv3_large_100): Pascal VOC 2012 (+ SBD when present), 20k iterations, 4x4 images.
_base_ = [
    './_base_/models/fcn_student.py', './_base_/datasets/voc12aug.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_20k.py'
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='mobilenetv3_large_100'),  # feature channels [24, 40, 112, 960] at strides 4..32
    decode_head=dict(in_channels=960, num_classes=21),
    auxiliary_head=dict(in_channels=112, num_classes=21))
