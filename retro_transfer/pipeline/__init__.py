"""The end-to-end pipeline: shapes data -> teacher -> four distilled students -> evaluation -> transfer -> report.

``tools/pipeline.py --preset {smoke,default} --out DIR`` runs it; each stage
is skipped when its output is up to date (see :mod:`.runner`).
"""

# The two presets differ only in size. smoke: what the tests run (minutes on a
# 2-core CPU). default: what `make demo` runs (under 20 minutes there).
PRESETS = {
    "smoke": dict(
        seed=0, num_images=48, image_side=64, crop=48, workers=0,
        teacher_arch="resnet18", teacher_steps=6, distill_steps=6, batch_size=16, queue_size=32,
        knn_k=20, knn_points=3, probe_epochs=20, probe_lr=1.0,
        det_iters=6, det_batch=4, det_lr=0.01, seg_iters=6, seg_batch=4,
    ),
    "default": dict(
        seed=0, num_images=300, image_side=96, crop=48, workers=1,
        teacher_arch="resnet18", teacher_steps=100, distill_steps=60, batch_size=32, queue_size=256,
        knn_k=20, knn_points=10, probe_epochs=60, probe_lr=1.0,
        det_iters=100, det_batch=4, det_lr=0.01, seg_iters=80, seg_batch=4,
    ),
}
