# The shapes data's COCO layout with its masks (visible masks as RLE): box and
# mask AP. The same images, splits and sizes as shapes_coco_detection.py; the
# pipelines also load the masks.
_base_ = './shapes_coco_detection.py'
dataset_type = 'CocoDataset'
data_root = 'data/shapes/'
metainfo = dict(classes=('circle', 'triangle', 'square', 'pentagon', 'hexagon', 'star', 'cross'))
image_scale = (256, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
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
        pipeline=pipeline)


train_dataloader = dict(dataset=dict(datasets=[_split('train'), _split('val')]))
val_dataloader = dict(dataset=_split('test', test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(metric=['bbox', 'segm'])
test_evaluator = val_evaluator
