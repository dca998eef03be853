# Pascal VOC detection as MMDetection trains it: VOC2007 + VOC2012 trainval
# (16,551 images, repeated 3 times per epoch), tested on VOC2007 test with the
# VOC2007 11-point AP at IoU 0.5. Expects data_root/VOC2007 and data_root/VOC2012
# in the devkit layout (Annotations/, JPEGImages/, ImageSets/Main/).
dataset_type = 'VOCDataset'
data_root = 'data/VOCdevkit/'
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(1000, 600), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1000, 600), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),  # after Resize: boxes stay in image pixels
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def _voc_trainval(year):
    return dict(
        type=dataset_type,
        data_root=data_root,
        ann_file=f'VOC{year}/ImageSets/Main/trainval.txt',
        data_prefix=dict(sub_data_root=f'VOC{year}/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32, bbox_min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args)


train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type='RepeatDataset',
        times=3,
        # Each VOCDataset names its year in metainfo['dataset_type']; ConcatDataset must ignore that key.
        dataset=dict(type='ConcatDataset', ignore_keys=['dataset_type'],
                     datasets=[_voc_trainval(2007), _voc_trainval(2012)])))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='VOC2007/ImageSets/Main/test.txt',
        data_prefix=dict(sub_data_root='VOC2007/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type='VOCMetric', metric='mAP', eval_mode='11points')
test_evaluator = val_evaluator
