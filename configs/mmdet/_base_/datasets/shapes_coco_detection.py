# The generated shapes data (tools/make_shapes.py --out data/shapes) in its COCO
# layout: annotations/instances_{train,val,test}.json over VOC2007/JPEGImages,
# 128 px images, 7 classes. Trained on train + val, tested on test, with COCO's
# box AP (bbox_mAP_50 is the VOC-style AP50). Small enough to train on a CPU.
dataset_type = 'CocoDataset'
data_root = 'data/shapes/'
metainfo = dict(classes=('circle', 'triangle', 'square', 'pentagon', 'hexagon', 'star', 'cross'))
image_scale = (256, 128)  # (long side, short side): the images stay at their 128 px
with_mask = False
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def _split(name, test_mode=False, pipeline=train_pipeline):
    return dict(
        type=dataset_type,
        metainfo=metainfo,
        data_root=data_root,
        ann_file=f'annotations/instances_{name}.json',
        data_prefix=dict(img='VOC2007/JPEGImages/'),
        filter_cfg=None if test_mode else dict(filter_empty_gt=True, min_size=4),
        test_mode=test_mode,
        pipeline=pipeline,
        backend_args=backend_args)


train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ConcatDataset', datasets=[_split('train'), _split('val')]))
val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=_split('test', test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
# tools/train_det.py --data-root DIR moves ann_file along with the datasets.
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_test.json',
    metric=['bbox'],
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
