# DeepLabV3+ on the distilled MobileNetV3-Large (mobilenetv3_large_100): the generated shapes data, a few minutes on a CPU.
_base_ = [
    './_base_/models/deeplabv3plus_student.py', './_base_/datasets/shapes_voc.py',
    './_base_/default_runtime.py', './_base_/schedules/schedule_shapes.py'
]
crop_size = (128, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='mobilenetv3_large_100'),  # feature channels [24, 40, 112, 960] at strides 4..32
    decode_head=dict(in_channels=960, c1_in_channels=24, num_classes=8),
    auxiliary_head=dict(in_channels=112, num_classes=8))
