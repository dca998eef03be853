# MMDetection's Pascal VOC schedule: 4 epochs of the 3x-repeated VOC07+12
# trainval (about 12 VOC epochs) at batch 16 (8 GPUs x 2), SGD lr 0.01, divided
# by 10 after epoch 3; validated on VOC2007 test after every epoch.
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=4, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=4, by_epoch=True, milestones=[3], gamma=0.1),
]
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
# Scale the learning rate with --cfg-options auto_scale_lr.enable=True when the total batch is not 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
