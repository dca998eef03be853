"""The end-to-end pipeline: shapes data -> teacher -> four distilled students -> evaluation -> transfer -> report.

``tools/pipeline.py --preset {smoke,quick,default} --out DIR`` runs it; each stage
is skipped when its output is up to date (see :mod:`.runner`).
"""

# Three presets, differing in size only. smoke: what the tests run (minutes on a
# 2-core CPU). quick: a first look (target: 8 minutes there). default: what
# `make demo` runs (target: 30 minutes there). num_images sets every split: the
# classification validation split has num_images / 4 images (200 in default,
# so that one image moves an accuracy by 0.5 points). workers=0: on two cores a
# loader process competes with the two compute threads and slows the step.
# teacher_*: the teacher's MoCo v2 run on seven classes needs a lower learning
# rate, a higher temperature and a short queue (see upstream._teacher_overrides).
PRESETS = {
    "smoke": dict(
        seed=0, num_images=48, image_side=64, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=6, distill_steps=6, batch_size=16, queue_size=32, ema_momentum=0.9,
        teacher_lr=0.06, teacher_temperature=0.5, teacher_queue=32,
        knn_k=20, knn_points=3, semisup_epochs=2,
        det_iters=6, det_batch=4, det_lr=0.01, seg_iters=6, seg_batch=4,
    ),
    "quick": dict(
        seed=0, num_images=400, image_side=64, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=120, distill_steps=30, batch_size=64, queue_size=256, ema_momentum=0.99,
        teacher_lr=0.06, teacher_temperature=0.5, teacher_queue=64,
        knn_k=20, knn_points=5, semisup_epochs=10,
        det_iters=40, det_batch=4, det_lr=0.01, seg_iters=40, seg_batch=4, mrcnn_iters=40,
    ),
    "default": dict(
        seed=0, num_images=800, image_side=96, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=400, distill_steps=80, batch_size=64, queue_size=512, ema_momentum=0.99,
        teacher_lr=0.06, teacher_temperature=0.5, teacher_queue=64,
        knn_k=20, knn_points=10, semisup_epochs=20,
        det_iters=100, det_batch=4, det_lr=0.01, seg_iters=80, seg_batch=4, mrcnn_iters=60,
    ),
}
