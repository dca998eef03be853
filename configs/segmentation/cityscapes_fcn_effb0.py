# FCN on the distilled EfficientNet-B0 (efficientnet_b0): Cityscapes, 80k iterations, 4x2 images.
_base_ = [
    './_base_/models/fcn_student.py', './_base_/datasets/cityscapes.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_80k.py'
]
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='efficientnet_b0'),  # feature channels [24, 40, 112, 320] at strides 4..32
    decode_head=dict(in_channels=320, num_classes=19),
    auxiliary_head=dict(in_channels=112, num_classes=19))
