# FCN on the distilled ResNet-34 (resnet34): the generated shapes data, a few minutes on a CPU.
_base_ = [
    './_base_/models/fcn_student.py', './_base_/datasets/shapes_voc.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_shapes.py'
]
crop_size = (128, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='resnet34'),  # feature channels [64, 128, 256, 512] at strides 4..32
    decode_head=dict(in_channels=512, num_classes=8),
    auxiliary_head=dict(in_channels=256, num_classes=8))
