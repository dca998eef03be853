"""The set-up produced a working environment with the real heavy dependencies."""

import subprocess
import sys

import torch


def test_core_imports_in_a_fresh_interpreter():
    # A fresh interpreter, in this order, proves the venv needs no import-order tricks.
    code = "import detectron2, mmseg.models, retro_transfer, distill; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_detectron2_is_the_patched_wheel_without_a_stray_tools_package():
    import detectron2
    import importlib.util

    assert detectron2.__file__
    spec = importlib.util.find_spec("tools")
    # `tools` may resolve to this project's folder (when run from the repo root), never to site-packages.
    assert spec is None or "site-packages" not in (spec.origin or str(spec.submodule_search_locations))


def test_mmcv_ops_stand_in_matches_reference_focal_loss():
    import mmcv.ops
    from torchvision.ops import sigmoid_focal_loss as reference

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 3, 1, 4, 2, 4])  # 4 == num_classes: background
    one_hot = torch.nn.functional.one_hot(target, 5)[:, :4].float()
    ours = mmcv.ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none")
    torch.testing.assert_close(ours, reference(logits, one_hot, alpha=0.25, gamma=2.0, reduction="none"))
    mean = mmcv.ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "mean")
    torch.testing.assert_close(mean, ours.sum() / 6)  # mmcv's "mean" divides by the batch only
