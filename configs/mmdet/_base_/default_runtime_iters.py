# The runtime for iteration-based schedules (the shapes configs): logs and
# checkpoints counted in iterations rather than epochs.
_base_ = './default_runtime.py'
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=300, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
