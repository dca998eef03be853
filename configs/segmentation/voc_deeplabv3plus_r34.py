# DeepLabV3+ on the distilled ResNet-34 (resnet34): Pascal VOC 2012 (+ SBD when present), 20k iterations, 4x4 images.
_base_ = [
    './_base_/models/deeplabv3plus_student.py', './_base_/datasets/voc12aug.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_20k.py'
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='resnet34'),  # feature channels [64, 128, 256, 512] at strides 4..32
    decode_head=dict(in_channels=512, c1_in_channels=64, num_classes=21),
    auxiliary_head=dict(in_channels=256, num_classes=21))
