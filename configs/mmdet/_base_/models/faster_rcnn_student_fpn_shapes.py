# Faster R-CNN FPN sized for the shapes data on a CPU (as the project's
# Detectron2 shapes configs): 128-channel FPN, anchors of 16..256 px on
# P2..P6 for 128 px images, fewer proposals and sampled RoIs, a 256-wide box head.
_base_ = './faster_rcnn_student_fpn.py'
fpn_channels = 128
model = dict(
    neck=dict(out_channels=fpn_channels),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        anchor_generator=dict(scales=[4])),  # anchor side = 4 x stride: 16, 32, 64, 128, 256 px
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=256)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=500, max_per_img=250),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=250, max_per_img=100)))
