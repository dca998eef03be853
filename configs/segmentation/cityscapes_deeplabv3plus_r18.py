# DeepLabV3+ on the distilled ResNet-18 (resnet18): Cityscapes, 80k iterations, 4x2 images.
_base_ = [
    './_base_/models/deeplabv3plus_student.py', './_base_/datasets/cityscapes.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_80k.py'
]
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='resnet18'),  # feature channels [64, 128, 256, 512] at strides 4..32
    decode_head=dict(in_channels=512, c1_in_channels=64, num_classes=19),
    auxiliary_head=dict(in_channels=256, num_classes=19))
