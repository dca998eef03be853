"""The SupCon teacher recipe: its loss on hand-worked numbers, its queue of labels, and the tool that writes a teacher."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.losses import info_nce, same_label, supcon_loss
from distill.methods import SupCon
from retro_transfer.checkpoints import load_teacher, safe_load
from retro_transfer.models import build_student

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)


def _log_softmax(values):
    top = math.log(sum(math.exp(v) for v in values))
    return [v - top for v in values]


# -- the loss, on numbers worked out by hand ------------------------------------------------


def test_supcon_loss_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    # Anchor 0: logits [1.2, 0, -2] / (tau 0.5 already applied below), positives keys 0 and 2.
    # Anchor 1 has no positive and is left out of the mean.
    positives = torch.tensor([[True, False, True], [False, False, False]])
    log_p = _log_softmax([0.6 / 0.5, 0.0 / 0.5, -1.0 / 0.5])
    expected = -(log_p[0] + log_p[2]) / 2
    assert supcon_loss(q, keys, positives, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_supcon_loss_without_any_positive_is_zero_and_differentiable():
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = supcon_loss(q, torch.tensor([[0.0, 1.0]]), torch.tensor([[False]]), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and q.grad is not None and not q.grad.any()


def test_supcon_with_only_the_own_key_positive_is_moco_infonce():
    """One positive per anchor (its own key) and the queue as the rest: SupCon reduces to MoCo's InfoNCE.

    Bound: the two compute the same log-softmax along different paths (a
    concatenated matrix product against two products), so they differ by float32
    rounding of logits of size <= 1/tau = 5: a few 1e-7 relative; 1e-5 allows for it.
    """
    g = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (4, 4, 6))
    own_key_only = torch.zeros(1, 7, dtype=torch.bool)
    own_key_only[0, 0] = True
    for i in range(4):  # InfoNCE scores anchor i against k_i and the queue only: so does SupCon here
        candidates = torch.cat([k[i : i + 1], queue])
        torch.testing.assert_close(
            supcon_loss(q[i : i + 1], candidates, own_key_only, 0.2), info_nce(q[i : i + 1], k[i : i + 1], queue, 0.2), rtol=1e-5, atol=1e-6
        )


def test_same_label_never_matches_an_unfilled_queue_slot():
    labels = torch.tensor([0, 2])
    key_labels = torch.tensor([0, 2, -1, 2, 1])
    assert same_label(labels, key_labels).tolist() == [
        [True, False, False, False, False],
        [False, True, False, True, False],
    ]


# -- the method: MoCo v2's step with the SupCon loss, and a queue of labels -----------------------


def _views(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def test_supcon_step_equals_its_formula_and_queues_the_labels():
    """The loss of a step is supcon_loss over [this batch's keys; the queue's filled slots], positives by label.

    Bound: the reference recomputes the same networks on the same inputs in another
    module copy (same operations, same shapes), so only the rtol 1e-5 of float32 noise is allowed.
    """
    torch.manual_seed(0)
    method = SupCon(build_student("resnet18"), head_hidden=32, queue_size=8, momentum=0.9, temperature=0.2, shuffle_bn=False).train()
    x1, x2 = _views()
    labels = torch.tensor([0, 1, 0, 2])
    reference = copy.deepcopy(method)
    out = method(x1, x2, labels)
    with torch.no_grad():
        q = F.normalize(reference.head(reference.student(x1).mean(dim=(2, 3))), dim=1)
        k = method.queue.negatives()[:4].clone()  # what the step enqueued: its keys
    # The queue held only its random start vectors, which are no image's keys: the batch's keys are the candidates.
    positives = same_label(labels, labels)
    assert positives.sum(dim=1).tolist() == [2, 1, 2, 1]  # its own key, and the other 0 for the two 0s
    torch.testing.assert_close(out["loss"].detach(), supcon_loss(q, k, positives, 0.2), rtol=1e-5, atol=1e-6)
    assert method.queue_labels.tolist() == [0, 1, 0, 2, -1, -1, -1, -1]

    x1, x2 = _views(seed=1)
    labels2 = torch.tensor([3, 3, 1, 0])
    reference = copy.deepcopy(method)
    out = method(x1, x2, labels2)
    with torch.no_grad():
        q = F.normalize(reference.head(reference.student(x1).mean(dim=(2, 3))), dim=1)
        k2 = method.queue.negatives()[4:].clone()
    # Now the first step's four labelled keys are candidates too; the unfilled slots still are not.
    positives = same_label(labels2, torch.cat([labels2, labels]))
    assert positives.sum(dim=1).tolist() == [2, 2, 2, 3]
    torch.testing.assert_close(out["loss"].detach(), supcon_loss(q, torch.cat([k2, k]), positives, 0.2), rtol=1e-5, atol=1e-6)
    assert method.queue_labels.tolist() == [0, 1, 0, 2, 3, 3, 1, 0]  # FIFO, beside its keys


# -- the recipe through the tool -----------------------------------------------------------------


def _pretrain(config: str, *overrides: str, tool: str = "pretrain_teacher.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), "--config", config, *overrides],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _toy(train_dir: Path, out: Path, *extra: str) -> list:
    return [f"data.train_dir={train_dir}", "data.image_size=32", "data.num_workers=0", "train.batch_size=8",
            "train.precision=fp32", "loss.queue_size=16", "log.tensorboard=false", "checkpoint.keep=0",
            f"output_dir={out}", *extra]


@pytest.mark.exact
def test_supcon_recipe_writes_a_loadable_teacher_that_says_it_saw_labels(shapes_root, tmp_path):
    """2 SupCon steps on the labelled split; the exported file loads as a MoCo v2 teacher with the trained head.

    Exact on any CPU: the compared tensors are copies read from two files, with no arithmetic between them.
    """
    out = tmp_path / "teacher"
    proc = _pretrain("configs/teacher/shapes_supcon_r18.yaml",
                     *_toy(shapes_root / "classification" / "train", out, "train.max_steps=2", "checkpoint.every=2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "supcon trains on labels: 7 classes" in proc.stdout
    exported = out / "checkpoint_last.pth.tar"
    teacher, report = load_teacher(exported, require_head=True)
    assert report.format == "moco_v2" and report.has_head and teacher.arch == "resnet18"
    assert safe_load(exported)["recipe"] == "supcon"
    run = safe_load(out / "checkpoint_last.pth")
    assert run["method"] == "supcon" and run["step"] == 2
    assert (run["model"]["queue_labels"] >= 0).sum() == 16  # two batches of 8 labelled keys
    trained_head = {k[len("head."):]: v for k, v in run["model"].items() if k.startswith("head.")}
    assert set(trained_head) == set(teacher.head.state_dict())
    assert all(torch.equal(teacher.head.state_dict()[k], v) for k, v in trained_head.items())


def test_supcon_refuses_images_without_class_folders(shapes_root, tmp_path):
    proc = _pretrain("configs/teacher/shapes_supcon_r18.yaml", *_toy(shapes_root / "unlabeled", tmp_path / "t", "train.max_steps=2"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "class folders" in lines[0] and "classification/train" in lines[0]
    assert not (tmp_path / "t").exists()


def test_distill_tool_refuses_the_labelled_recipe(shapes_root, tmp_path):
    proc = _pretrain("configs/teacher/shapes_supcon_r18.yaml",
                     *_toy(shapes_root / "classification" / "train", tmp_path / "s", "train.max_steps=2"), tool="distill.py")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "pretrain_teacher.py" in lines[0]
