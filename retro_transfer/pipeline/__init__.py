"""The end-to-end pipeline: shapes data -> teacher -> four distilled students -> evaluation -> transfer -> report.

``tools/pipeline.py --preset {smoke,quick,default,full} --out DIR`` runs it; each stage
is skipped when its output is up to date (see :mod:`.runner`).
"""

# Four presets. smoke: what the tests run (minutes on a 2-core CPU). quick: a
# first look (target: 8 minutes there). default: what `make demo` runs (target:
# 30 minutes there). full: default, and the comparisons that do not fit in it
# (the MoCo-v2-initialised transfers, Mask R-CNN, MMDetection's Faster R-CNN
# from Retro and random init, see .mmdet_stages). num_images sets every split: the
# classification validation split has num_images / 4 images (200 in default,
# so that one image moves an accuracy by 0.5 points). workers=0: on two cores a
# loader process competes with the two compute threads and slows the step.
# teacher_recipe: supcon (a label-trained stand-in for a large self-supervised
# teacher, supcon_* its settings: the key encoder is the online network itself,
# momentum 0, as in SupCon, and 38 epochs of the labelled split leave the
# collapsed start the head begins in; BENCHMARKS.md, issue 21) or moco_v2
# (self-supervised, teacher_* its settings: seven classes need a lower learning
# rate, a higher temperature and a short queue; see upstream._teacher_overrides).
# smoke runs supcon too, so that the tests cover it. tools/pipeline.py --teacher
# PATH uses the user's file instead.
TEACHER_DEFAULTS = dict(teacher_recipe="supcon", teacher_path="", supcon_lr=0.24, supcon_temperature=0.2, supcon_momentum=0.0)
PRESETS = {
    "smoke": dict(
        seed=0, num_images=48, image_side=64, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=6, distill_steps=6, batch_size=16, queue_size=32, ema_momentum=0.9,
        teacher_lr=0.06, teacher_temperature=0.5, teacher_queue=32,
        knn_k=20, knn_points=3, semisup_epochs=2,
        det_iters=6, det_batch=4, det_lr=0.01, seg_iters=6, seg_batch=4,
        supcon_steps=6, transfer_from="retro,moco_v2", **TEACHER_DEFAULTS,
    ),
    "quick": dict(
        seed=0, num_images=400, image_side=64, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=120, distill_steps=30, batch_size=64, queue_size=256, ema_momentum=0.99,
        teacher_lr=0.06, teacher_temperature=0.5, teacher_queue=64,
        knn_k=20, knn_points=5, semisup_epochs=10,
        det_iters=60, det_batch=4, det_lr=0.01, seg_iters=80, seg_batch=4, mrcnn_iters=0,
        supcon_steps=240, transfer_from="retro", **TEACHER_DEFAULTS,
    ),
    "default": dict(
        seed=0, num_images=800, image_side=96, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=400, distill_steps=80, batch_size=64, queue_size=512, ema_momentum=0.99,
        teacher_lr=0.06, teacher_temperature=0.5, teacher_queue=64,
        knn_k=20, knn_points=10, semisup_epochs=20,
        det_iters=150, det_batch=4, det_lr=0.01, seg_iters=160, seg_batch=4, mrcnn_iters=0,
        supcon_steps=480, transfer_from="retro", **TEACHER_DEFAULTS,
    ),
}
# Everything default runs, and the comparisons that do not fit its 30 minutes.
PRESETS["full"] = dict(PRESETS["default"], transfer_from="retro,moco_v2", mrcnn_iters=60, mmdet_iters=100)
