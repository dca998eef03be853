# DeepLabV3+ on the distilled EfficientNet-B0 (efficientnet_b0): Pascal VOC 2012 (+ SBD when present), 20k iterations, 4x4 images.
_base_ = [
    './_base_/models/deeplabv3plus_student.py', './_base_/datasets/voc12aug.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_20k.py'
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='efficientnet_b0'),  # feature channels [24, 40, 112, 320] at strides 4..32
    decode_head=dict(in_channels=320, c1_in_channels=24, num_classes=21),
    auxiliary_head=dict(in_channels=112, num_classes=21))
