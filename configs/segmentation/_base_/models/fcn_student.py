# FCN (Long et al., 2015) on a student, as MMSeg's FCN-D8: the last two stages
# dilated (output stride 8), two 3x3 convs, an auxiliary FCN head on level 3.
# Each config sets backbone.arch and both heads' in_channels and num_classes.
# Heads and backbone use SyncBN: on one device MMEngine reverts it to BN, and
# StudentBackbone converts its own BatchNorms (with timm's converter, which
# keeps the fused activations) only when several processes train.
norm_cfg = dict(type='SyncBN', requires_grad=True)
# torchvision's ImageNet statistics, which the distillation stage normalises with (RGB).
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='StudentBackbone',
        arch=None,  # each config names its student (a timm model)
        out_indices=(1, 2, 3, 4),  # timm feature levels at strides 4, 8, 16, 32
        output_stride=8,
        norm_cfg=norm_cfg,
        norm_eval=False,
        frozen_stages=-1,
        # The converted student, from tools/convert_to_mmseg.py: set it with
        # --cfg-options model.backbone.init_cfg.checkpoint=STUDENT_MMSEG.pth
        # (or model.backbone.init_cfg=None to train from random weights).
        init_cfg=dict(type='Pretrained', checkpoint=None)),
    decode_head=dict(
        type='FCNHead',
        in_channels=None,
        in_index=3,
        channels=256,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=None,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=None,
        in_index=2,
        channels=128,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=None,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4, avg_non_ignore=True)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
