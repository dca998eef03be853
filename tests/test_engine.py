"""The training engine end to end, through the command-line tools, at toy scale on the CPU.

Every run is a real ``tools/distill.py`` (or ``tools/pretrain_teacher.py``)
process: 32-px crops of the session's 24 shapes images, global batch 8, a
queue of 16, a few steps, ``data.num_workers=0`` and ``OMP_NUM_THREADS=1``
(one thread gives the same float reduction order in every process, which the
exact-equality checks rely on, and keeps a loaded 2-core machine usable).

The teacher is a seeded, untrained torchvision ResNet-18 with a MoCo v2 head,
written in the official MoCo v2 layout: the engine cannot tell it from a
pretrained one, and building it takes a second instead of a pretraining run.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from retro_transfer.safe_io import safe_load
from retro_transfer.teacher_loading import load_teacher

REPO = Path(__file__).resolve().parents[1]
DISTILL = REPO / "tools" / "distill.py"
PRETRAIN = REPO / "tools" / "pretrain_teacher.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)  # a test run inside a distributed job must not join it

RUN_TIMEOUT = 300  # seconds; a run here takes 10-40 s, so only a hang gets near this


def toy(shapes_root: Path, out: Path, *extra: str) -> list:
    """Overrides of a toy run; ``extra`` come last and win."""
    return [
        f"data.train_dir={shapes_root / 'unlabeled'}",
        "data.image_size=32",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.precision=fp32",
        "loss.queue_size=16",
        "log.tensorboard=false",
        "checkpoint.keep=0",  # checkpoint_last.pth only: ~100 MB a file here
        f"output_dir={out}",
        *extra,
    ]


class Run:
    """A tool started in the background (output to files, so no pipe can fill up), in its own session.

    Runs that do not depend on each other are started together: most of a toy
    run is importing torch and timm, and the machine has more than one core.
    """

    def __init__(self, args, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=out, stderr=err, start_new_session=True)
        self.result = None

    def wait(self, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
        if self.result is None:
            try:
                self.proc.wait(timeout)
            finally:
                self.stop()
            self.result = subprocess.CompletedProcess(
                self.proc.args, self.proc.returncode, self.stdout_path.read_text(), self.stderr_path.read_text()
            )
        return self.result

    def stop(self) -> None:
        """SIGKILL this run's process group (torchrun's workers too) unless it has ended and been reaped.

        Until the leader is reaped its id cannot be reused, so the signal can only reach this run.
        """
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def distill_args(config: str, overrides) -> list:
    return [sys.executable, str(DISTILL), "--config", f"configs/distill/{config}", *overrides]


def run_all(runs) -> list:
    """Wait for every run (started already); on any failure stop the rest."""
    try:
        return [run.wait() for run in runs]
    finally:
        for run in runs:
            run.stop()


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def is_finite_tree(obj) -> bool:
    """Every floating tensor and float in a nested checkpoint structure is finite."""
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(is_finite_tree(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(is_finite_tree(v) for v in obj)
    return True


def assert_identical(a, b, where: str = "") -> None:
    """Nested checkpoint structures are equal; tensors bit for bit (``torch.equal``, same dtype)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- resume

RETRO_STEPS = 6


def retro_overrides(shapes_root, teacher_ckpt, out, *extra):
    return toy(
        shapes_root,
        out,
        "student.arch=efficientnet_b0",
        "teacher.arch=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        f"train.max_steps={RETRO_STEPS}",
        "checkpoint.every=2",
        "log.every=2",
        # Split BN draws a permutation from the global RNG every step, so the
        # bit-exact comparison also checks that a resume restores that RNG.
        "train.bn_splits=2",
        *extra,
    )


class Uninterrupted:
    """Run A: Retro (EfficientNet-B0 <- ResNet-18) start to end in one go, with TensorBoard on.

    Started when first asked for and awaited by ``output()``, so that it runs
    while the kill-and-resume test drives run B.
    """

    def __init__(self, shapes_root, teacher_ckpt, out: Path) -> None:
        self.out = out
        overrides = retro_overrides(shapes_root, teacher_ckpt, out / "run", "log.tensorboard=true")
        self.run = Run(distill_args("shapes_retro_effb0.yaml", overrides), out / "logs")

    def output(self) -> Path:
        check_ok(self.run.wait())
        return self.out / "run"


@pytest.fixture(scope="module")
def retro_uninterrupted(shapes_root, teacher_ckpt, tmp_path_factory):
    run = Uninterrupted(shapes_root, teacher_ckpt, tmp_path_factory.mktemp("retro_a"))
    yield run
    run.run.stop()


@pytest.mark.exact
def test_kill_and_resume_equals_uninterrupted_run(shapes_root, teacher_ckpt, retro_uninterrupted, tmp_path):
    """SIGKILL mid-run, ``resume=auto``: the final checkpoint equals the uninterrupted run's bit for bit.

    Student, mean student, adapter, the frozen teacher, the queue and its
    pointer, BN statistics, SGD momentum buffers, the schedule and the RNG
    state are all compared with ``torch.equal``: exact, no tolerance. Exact on
    any CPU by construction: the augmentation of each sample is seeded by
    (seed, epoch, index), the sampler restarts at the checkpoint's step, and
    the resumed run does the same float operations on the same shapes in the
    same order as the uninterrupted one (both with one thread, in processes
    of the same machine), from a state restored bit for bit.
    """
    out = tmp_path / "b"
    overrides = retro_overrides(shapes_root, teacher_ckpt, out)
    first = Run(distill_args("shapes_retro_effb0.yaml", overrides), tmp_path / "b_first")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        # checkpoint_last.pth appears (atomically renamed into place) after step 2 of 6.
        while not (out / "checkpoint_last.pth").exists() and first.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        finished_first = first.proc.poll()
        first.proc.send_signal(signal.SIGKILL)  # a no-op if it already ended (then the assert below fails)
    finally:
        killed = first.wait()
    assert finished_first is None, f"run B ended (exit {finished_first}) before it could be killed:\n{killed.stderr}"
    assert killed.returncode == -signal.SIGKILL
    killed_at = safe_load(out / "checkpoint_last.pth")["step"]
    assert 2 <= killed_at < RETRO_STEPS, "the kill must land mid-run for the resume to mean anything"

    resumed = Run(distill_args("shapes_retro_effb0.yaml", [*overrides, "resume=auto"]), tmp_path / "b_resumed").wait()
    check_ok(resumed)
    assert f"at step {killed_at}" in resumed.stdout

    a = safe_load(retro_uninterrupted.output() / "checkpoint_last.pth")
    b = safe_load(out / "checkpoint_last.pth")
    assert a["step"] == b["step"] == RETRO_STEPS
    assert any(k.startswith("adapter.") for k in a["model"]) and any(k.startswith("student_ema.") for k in a["model"])
    assert "queue.embeddings" in a["model"] and a["optimizer"]["state"], "nothing to compare"
    for part in ("model", "optimizer", "scheduler", "scaler", "rng"):
        assert_identical(a[part], b[part], part)


def test_jsonl_log_and_tensorboard(retro_uninterrupted):
    """One JSON record per ``log.every`` steps, finite loss terms and throughput; TensorBoard events."""
    retro_uninterrupted = retro_uninterrupted.output()
    records = [json.loads(line) for line in (retro_uninterrupted / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, RETRO_STEPS + 1, 2))
    for record in records:
        assert {"loss", "infonce", "mse1", "mse2", "img_per_s", "lr"} <= set(record)
        assert all(math.isfinite(v) for v in record.values())
        assert record["img_per_s"] > 0
    assert math.isclose(records[0]["loss"], records[0]["infonce"] + records[0]["mse1"] + records[0]["mse2"], rel_tol=1e-4)

    events = list((retro_uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert [s.step for s in scalars] == [r["step"] for r in records]
    for scalar, record in zip(scalars, records):
        assert math.isclose(scalar.value, record["loss"], rel_tol=1e-5)


# ----------------------------------------------------------------------------- distributed

# torchrun runs this: tools/distill.py itself, with Trainer.fit wrapped to also
# save every rank's state (the engine saves only on rank 0).
PER_RANK_DUMP = """
import runpy, sys, torch
from distill import engine

_fit = engine.Trainer.fit

def fit(self):
    final = _fit(self)
    torch.save({"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(), "world": self.world},
               self.out / f"rank{self.rank}.pth")
    return final

engine.Trainer.fit = fit
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def expected_seed_queue(shapes_root: Path, teacher_ckpt: Path, steps: int = 2, batch: int = 8) -> torch.Tensor:
    """n(H_T(T(x))) of the first ``steps`` global batches, in order: a SEED queue after those steps."""
    from distill.data import MultiViewImages, StepBatchSampler, list_images, moco_v2_augmentation

    files = list_images(shapes_root / "unlabeled")
    data = MultiViewImages(files, moco_v2_augmentation(32, 0.2), views=1, seed=0)
    teacher, _ = load_teacher(teacher_ckpt, arch="resnet18", require_head=True)
    keys = []
    with torch.no_grad():
        for indices in StepBatchSampler(len(files), batch, 0, 1, seed=0, start_step=0, max_steps=steps):
            x = torch.stack([data[key][0] for key in indices])
            keys.append(torch.nn.functional.normalize(teacher(x), dim=1))
    return torch.cat(keys)


def is_bn_running_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.exact
def test_two_processes_match_one_process(shapes_root, teacher_ckpt, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo) against one process, same global batch of 8, SEED.

    Exact equality of the trained student does not hold, for any method: each
    process normalises with BN statistics of its own 4 samples, where one
    process uses all 8 (and MoCo v2/DisCo/Retro add shuffling BN on top), so the
    gradients differ. What must hold:

    * SEED enqueues teacher embeddings, and the teacher runs in eval mode
      (running BN statistics), so each embedding depends on its sample only.
      After 2 steps the 16-entry queue holds both global batches; the 2-process
      queue equals the 1-process queue row for row, which checks the sampler's
      split, the per-sample seeded augmentation and the all-gather order.
      Tolerance: atol 1e-5 on unit vectors. The same per-sample maths runs on
      batches of 4 instead of 8, and oneDNN may block convolutions and matmuls
      differently by batch size (float32 rounding, ~1e-7 relative per op);
      an ordering or split error moves entries by ~0.1.
    * DDP keeps the replicas identical: both ranks end with bit-identical
      parameters (student, head), SGD momentum buffers and queue, as every rank
      applies the same all-reduced gradients. The student's BN running
      statistics are NOT compared: they are buffers, gathered by each rank on
      its own half of the batch and not broadcast (``broadcast_buffers=False``);
      only rank 0's are saved, as MoCo's DDP (which broadcasts rank 0's) would
      end up with.

    Exact on any CPU where it is exact: each rank applies the same all-reduced gradient to the same
    weights, the same operations on the same shapes.
    """
    overrides = [
        "student.arch=resnet18",
        "teacher.arch=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        "train.max_steps=2",
        "checkpoint.every=2",
        "log.every=1",
    ]
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    dump = tmp_path / "per_rank_dump.py"
    dump.write_text(PER_RANK_DUMP)
    two_args = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(dump), str(DISTILL),
                "--config", "configs/distill/shapes_seed_effb0.yaml", *toy(shapes_root, two_out, *overrides)]
    one_args = distill_args("shapes_seed_effb0.yaml", toy(shapes_root, one_out, *overrides))
    for result in run_all([Run(two_args, tmp_path / "logs_two"), Run(one_args, tmp_path / "logs_one")]):
        check_ok(result)

    ckpt_one, ckpt_two = safe_load(one_out / "checkpoint_last.pth"), safe_load(two_out / "checkpoint_last.pth")
    assert ckpt_one["step"] == ckpt_two["step"] == 2
    q1, q2 = ckpt_one["model"]["queue.embeddings"], ckpt_two["model"]["queue.embeddings"]
    assert int(ckpt_two["model"]["queue.ptr"]) == 0  # 2 steps x 8 keys wrapped around the 16 entries
    torch.testing.assert_close(q2, q1, atol=1e-5, rtol=0)
    # Not trivially equal (an untouched initial queue would be too): both are the teacher's
    # embeddings of the two global batches, recomputed here from the data pipeline's parts.
    torch.testing.assert_close(q1, expected_seed_queue(shapes_root, teacher_ckpt), atol=1e-5, rtol=0)

    for out in (one_out, two_out):
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in records)

    rank0, rank1 = safe_load(two_out / "rank0.pth"), safe_load(two_out / "rank1.pth")
    assert rank0["world"] == rank1["world"] == 2
    replicated = {k: v for k, v in rank0["model"].items() if not is_bn_running_stat(k)}
    assert any(k.startswith("student.") for k in replicated) and "queue.embeddings" in replicated
    for key, value in replicated.items():
        assert_identical(value, rank1["model"][key], f"model.{key}")
    assert_identical(rank0["optimizer"], rank1["optimizer"], "optimizer")
    # Rank 0 is what was saved.
    assert_identical(ckpt_two["model"], rank0["model"], "checkpoint vs rank 0")


# ----------------------------------------------------------------------------- failures

# An absurd weight decay diverges deterministically within 2-3 steps, whatever
# the data: the update w -= lr * wd * w multiplies each weight by about
# -lr * wd (lr 0.0075 here). A huge learning rate does not: BN makes the
# network scale-invariant and the loss stays finite.
DIVERGING = {
    # ~1e7x per step: steps 1 and 2 leave a finite state, the loss of step 3 is NaN.
    "nan_loss": "1e9",
    # ~1e9x per step: after step 2 BN running variances are inf while the loss is still
    # finite; the engine must refuse to save that state over the good checkpoint of step 1.
    "non_finite_state": "1e11",
}


def test_non_finite_run_stops_with_the_last_good_checkpoint(shapes_root, tmp_path):
    """A diverging run exits 1 and names the step and the last good checkpoint, which loads and is finite."""
    runs = {}
    for case, weight_decay in DIVERGING.items():
        overrides = toy(
            shapes_root,
            tmp_path / case,
            "student.arch=resnet18",
            "train.max_steps=8",
            "train.warmup_steps=0",
            "train.schedule=constant",
            f"train.weight_decay={weight_decay}",
            "checkpoint.every=1",
            "checkpoint.keep=8",
            "log.every=1",
        )
        runs[case] = Run(distill_args("shapes_moco_v2_effb0.yaml", overrides), tmp_path / f"logs_{case}")
    for (case, weight_decay), proc in zip(DIVERGING.items(), run_all(list(runs.values()))):
        out = tmp_path / case
        assert proc.returncode == 1, f"{case}: exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0], proc.stderr
        message = lines[0]
        if case == "non_finite_state":
            assert "state is not finite" in message, message
        failed_step = int(re.search(r"at step (\d+)", message).group(1))
        good = re.search(r"the last good checkpoint is (\S+?\.pth)", message)
        assert good, message
        assert Path(good.group(1)) == out / "checkpoint_last.pth"
        ckpt = safe_load(good.group(1))
        assert 1 <= ckpt["step"] <= failed_step < 8, (case, ckpt["step"], failed_step)
        assert is_finite_tree(ckpt["model"]) and is_finite_tree(ckpt["optimizer"]), case
        # Nothing was written past the good checkpoint: the numbered ones hold earlier steps.
        steps = sorted(int(p.stem.split("_")[1]) for p in out.glob("checkpoint_[0-9]*.pth"))
        assert all(step < ckpt["step"] for step in steps), (case, steps)


def test_config_errors_are_one_line_with_exit_2(shapes_root, teacher_ckpt, tmp_path):
    """Unknown key, missing data folder, and a Retro teacher without a projection head."""
    headless = tmp_path / "resnet18_supervised.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), headless)  # fc is the 1000-way classifier
    teacher = ["teacher.arch=resnet18", f"teacher.checkpoint={teacher_ckpt}", "train.max_steps=1"]
    cases = {
        "unknown_key": (toy(shapes_root, tmp_path / "a", *teacher, "train.lrr=0.1"), ["did you mean", "train.lr"]),
        "no_data": (
            toy(shapes_root, tmp_path / "b", *teacher, f"data.train_dir={tmp_path / 'no_such_dir'}"),
            ["data.train_dir", "make_shapes"],
        ),
        "headless_teacher": (
            toy(shapes_root, tmp_path / "c", "teacher.arch=resnet18", f"teacher.checkpoint={headless}", "train.max_steps=1"),
            ["projection head"],
        ),
    }
    runs = [Run(distill_args("shapes_retro_effb0.yaml", overrides), tmp_path / f"logs_{case}") for case, (overrides, _) in cases.items()]
    for (case, (_, expected)), proc in zip(cases.items(), run_all(runs)):
        assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        for word in expected:
            assert word in lines[0], (case, lines[0])
    assert not (tmp_path / "c" / "checkpoint_last.pth").exists()


# ----------------------------------------------------------------------------- teacher pretraining


@pytest.mark.exact
def test_pretrain_teacher_writes_a_loadable_moco_v2_teacher(shapes_root, tmp_path):
    """2 MoCo v2 steps on a ResNet-18; the exported file loads as a MoCo v2 teacher whose head is the trained one.

    Exact on any CPU: the compared tensors are copies read from a file or state dict, with no
    arithmetic between them.
    """
    out = tmp_path / "teacher"
    args = [sys.executable, str(PRETRAIN), "--config", "configs/teacher/shapes_moco_v2_r50.yaml",
            *toy(shapes_root, out, "student.arch=resnet18", "train.max_steps=2", "checkpoint.every=2")]
    check_ok(Run(args, tmp_path / "logs").wait())
    exported = out / "checkpoint_last.pth.tar"
    teacher, report = load_teacher(exported, require_head=True)
    assert report.format == "moco_v2" and report.has_head and teacher.arch == "resnet18"
    run = safe_load(out / "checkpoint_last.pth")
    assert run["step"] == 2
    trained_head = {k[len("head."):]: v for k, v in run["model"].items() if k.startswith("head.")}
    assert trained_head and set(trained_head) == set(teacher.head.state_dict())
    assert teacher.head.hidden_dim == 2048  # the config's MoCo v2 head width, read back from the file
    assert_identical(teacher.head.state_dict(), trained_head, "head")
    trained_body = {k[len("student.body."):]: v for k, v in run["model"].items() if k.startswith("student.body.")}
    loaded_body = teacher.backbone.state_dict()
    assert_identical({k: loaded_body[k] for k in trained_body}, trained_body, "backbone")
