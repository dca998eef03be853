# Runtime shared by every segmentation config: MMSeg's defaults plus the project's registrations.
default_scope = 'mmseg'
# Registers StudentBackbone, ShapesVOCDataset and VOCAugDataset, installs the
# mmcv.ops stand-in and lets weights_only loading read Runner checkpoints.
custom_imports = dict(imports=['retro_transfer.mmseg'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
tta_model = dict(type='SegTTAModel')
