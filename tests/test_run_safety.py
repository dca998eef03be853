"""Runs that must not be lost, mixed or crashed: issue 11, items 8-13, through the command-line tools.

Each case is a real ``tools/distill.py`` (or ``tools/pretrain_teacher.py``)
process at toy scale (MoCo v2 on a ResNet-18 student, 32-px crops of the
session's 24 shapes images, batch 8), as in test_engine.py. Refusals happen
before the networks are built, so those runs take the time of the imports.
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, load_config
from retro_transfer.safe_io import safe_load
from test_engine import PRETRAIN, Run, check_ok, distill_args, run_all, toy

CONFIG = "shapes_moco_v2_effb0.yaml"
R18 = "student.arch=resnet18"


def moco(shapes_root: Path, out: Path, *extra: str) -> list:
    return distill_args(CONFIG, toy(shapes_root, out, R18, *extra))


def one_line_error(proc, code: int = 2) -> str:
    """The single stderr line of a tool that refused its input."""
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its inode, size and modification time: any write changes it."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def log_steps(folder: Path) -> list:
    return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder; checkpoints are hard links (the engine replaces files, never edits them)."""
    link_checkpoints = lambda s, d: os.link(s, d) if s.endswith(".pth") else shutil.copy2(s, d)  # noqa: E731
    shutil.copytree(src, dst, copy_function=link_checkpoints)
    return dst


def cut_in_half(path: Path) -> None:
    """Truncate a (possibly hard-linked) file without touching the other links."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


FINISHED_STEPS = 4


@pytest.fixture(scope="module")
def finished_run(shapes_root, tmp_path_factory) -> Path:
    """A finished 4-step run: checkpoints at steps 2 (numbered) and 4 (last), a record per step, TensorBoard events."""
    base = tmp_path_factory.mktemp("finished")
    out = base / "run"
    extra = [f"train.max_steps={FINISHED_STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "log.every=1",
             "log.tensorboard=true"]
    check_ok(Run(moco(shapes_root, out, *extra), base / "logs").wait())
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_0000002.pth", "checkpoint_last.pth"]
    assert log_steps(out) == [1, 2, 3, 4]
    return out


# ----------------------------------------------------------------------------- 8: a used output_dir


def test_a_new_run_into_a_used_output_dir_is_refused_and_changes_nothing(shapes_root, finished_run, tmp_path):
    """Without resume or overwrite, neither tool touches a folder that holds a run."""
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    pretrain = [sys.executable, str(PRETRAIN), "--config", "configs/teacher/shapes_moco_v2_r50.yaml",
                *toy(shapes_root, out, R18, "train.max_steps=2")]
    runs = [Run(moco(shapes_root, out, "train.max_steps=2"), tmp_path / "logs_distill"),
            Run(pretrain, tmp_path / "logs_pretrain")]
    for proc in run_all(runs):
        message = one_line_error(proc)
        assert f"output_dir {out} already holds a run" in message, message
        assert "resume=auto" in message and "overwrite=true" in message, message
    assert snapshot(out) == before


def test_overwrite_replaces_the_previous_run_entirely(shapes_root, finished_run, tmp_path):
    """overwrite=true: the new run's files only; no checkpoint, record or event of the old run is left."""
    out = copy_run(finished_run, tmp_path / "run")
    proc = Run(moco(shapes_root, out, "overwrite=true", "train.max_steps=2", "checkpoint.every=2", "log.every=1"),
               tmp_path / "logs").wait()
    check_ok(proc)
    assert "overwrite=true: deleted the previous run's" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pth", "config.yaml", "log.jsonl"]
    assert log_steps(out) == [1, 2]
    assert safe_load(out / "checkpoint_last.pth")["step"] == 2
    assert "max_steps: 2" in (out / "config.yaml").read_text()


def test_overwrite_and_resume_together_are_refused(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match="set only one of them"):
        load_config(f"configs/distill/{CONFIG}", toy(shapes_root, tmp_path, "overwrite=true", "resume=auto",
                                                      "train.max_steps=1"))


# ----------------------------------------------------------------------------- 9: unreadable images


@pytest.fixture
def data_with_bad_files(shapes_root, tmp_path) -> tuple:
    """The 24 shapes images plus five files that are no whole images.

    Random bytes, an empty file, text; a JPEG cut in half (its header intact,
    so only decoding finds it) and a FIFO named like a JPEG (opening it waits
    for a writer forever): issue 23, points 8 and 10.
    """
    folder = shutil.copytree(shapes_root / "unlabeled", tmp_path / "images")
    bad = [folder / "000100_random.jpg", folder / "000101_empty.png", folder / "000102_text.webp",
           folder / "000103_cut.jpg", folder / "000104_fifo.jpg"]
    bad[0].write_bytes(random.Random(0).randbytes(4096))
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image\n")
    whole = next(folder.glob("*.jpg")).read_bytes()
    bad[3].write_bytes(whole[: len(whole) // 2])
    os.mkfifo(bad[4])
    return folder, bad


# A run that opened the FIFO would wait forever; these runs take seconds.
BAD_FILES_TIMEOUT = 240


def test_unreadable_images_are_refused_before_anything_is_written(shapes_root, data_with_bad_files, tmp_path):
    folder, bad = data_with_bad_files
    out = tmp_path / "run"
    proc = Run(moco(shapes_root, out, f"data.train_dir={folder}", "train.max_steps=3"), tmp_path / "logs")
    message = one_line_error(proc.wait(BAD_FILES_TIMEOUT))
    assert "5 of 29 files in data.train_dir are not readable images" in message, message
    assert all(str(path) in message for path in bad), message
    assert "data.skip_bad_images=true" in message
    assert not out.exists()


@pytest.mark.parametrize("in_memory_mb", [2048, 0], ids=["in_memory", "streaming"])
def test_skip_bad_images_trains_on_the_readable_ones_and_says_how_many(shapes_root, data_with_bad_files, tmp_path,
                                                                        in_memory_mb):
    """3 steps of 8 draw all 24 readable images: had a bad one been kept, its batch would crash (or hang)."""
    folder, bad = data_with_bad_files
    out = tmp_path / "run"
    # A queue of 56 is over 24 images x 2 views: a warning, not an error.
    overrides = [f"data.train_dir={folder}", "data.skip_bad_images=true", "train.max_steps=3", "checkpoint.every=3",
                 "loss.queue_size=56", f"data.in_memory_mb={in_memory_mb}"]
    proc = Run(moco(shapes_root, out, *overrides), tmp_path / "logs").wait(BAD_FILES_TIMEOUT)
    check_ok(proc)
    assert "skipped 5 unreadable image file(s) of 29" in proc.stdout, proc.stdout
    assert "warning: loss.queue_size 56 exceeds the data set's 24 images x 2 views = 48" in proc.stdout, proc.stdout
    assert safe_load(out / "checkpoint_last.pth")["step"] == 3


# ----------------------------------------------------------------------------- 10: a full disk

# Runs tools/distill.py on a disk that fills up: writes into the temporary file of the second
# checkpoint_last.pth fail with ENOSPC after 1 MB, as the OS reports a full disk.
DISK_FILLS_UP = """
import errno, os, runpy, sys

_open, _fdopen = os.open, os.fdopen
doomed, saves = set(), [0]


class DiskFillsUp:
    def __init__(self, f):
        self.f, self.left = f, 1 << 20

    def write(self, data):
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def tracking_open(path, flags, mode=0o777, **kwargs):
    fd = _open(path, flags, mode, **kwargs)
    if os.path.basename(path).startswith(".checkpoint_last.pth."):
        saves[0] += 1
        if saves[0] > 1:
            doomed.add(fd)
    return fd


def fdopen(fd, *args, **kwargs):
    f = _fdopen(fd, *args, **kwargs)
    return DiskFillsUp(f) if fd in doomed else f


os.open, os.fdopen = tracking_open, fdopen
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(shapes_root, tmp_path):
    out = tmp_path / "run"
    wrapper = tmp_path / "disk_fills_up.py"
    wrapper.write_text(DISK_FILLS_UP)
    args = [sys.executable, str(wrapper), *moco(shapes_root, out, "train.max_steps=3", "checkpoint.every=1")[1:]]
    message = one_line_error(Run(args, tmp_path / "logs").wait())
    assert "no space left to write" in message and str(out / "checkpoint_last.pth") in message, message
    assert "previous checkpoint_last.pth there (if any) is unchanged" in message, message
    assert safe_load(out / "checkpoint_last.pth")["step"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 10, 11: resuming


def test_resume_auto_names_the_newest_intact_checkpoint_and_resuming_from_it_is_clean(finished_run, shapes_root, tmp_path):
    """A truncated checkpoint_last.pth: resume=auto names checkpoint_2 and changes nothing.

    Resuming from it as told, the run also removes the empty temporary file a
    kill -9 during a save leaves, and the log and TensorBoard list steps 3 and
    4 once, not the old records and the replayed ones.
    """
    out = copy_run(finished_run, tmp_path / "run")
    cut_in_half(out / "checkpoint_last.pth")
    stale = out / ".checkpoint_last.pth.12345.0123abcd.tmp"
    stale.write_bytes(b"")
    before = snapshot(out)
    extra = [f"train.max_steps={FINISHED_STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "log.every=1",
             "log.tensorboard=true"]

    refused = Run(moco(shapes_root, out, *extra, "resume=auto"), tmp_path / "logs_auto").wait()
    message = one_line_error(refused)
    intact = out / "checkpoint_0000002.pth"
    assert f"{out / 'checkpoint_last.pth'} does not load" in message, message
    assert message.endswith(f"continue from it with resume={intact}"), message
    assert snapshot(out) == before

    resumed = Run(moco(shapes_root, out, *extra, f"resume={intact}"), tmp_path / "logs_resumed").wait()
    check_ok(resumed)
    assert "at step 2" in resumed.stdout
    assert not stale.exists()
    assert safe_load(out / "checkpoint_last.pth")["step"] == FINISHED_STEPS
    assert log_steps(out) == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_resume_drops_a_log_line_cut_short_by_a_kill(finished_run, shapes_root, tmp_path):
    """Killed while writing the record of step 3 after the checkpoint of step 2: resume=auto logs 3 and 4 once."""
    out = copy_run(finished_run, tmp_path / "run")
    (out / "checkpoint_last.pth").unlink()
    os.link(out / "checkpoint_0000002.pth", out / "checkpoint_last.pth")
    records = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join(records[:2]) + records[2][:10])
    extra = [f"train.max_steps={FINISHED_STEPS}", "checkpoint.every=2", "log.every=1", "resume=auto"]
    check_ok(Run(moco(shapes_root, out, *extra), tmp_path / "logs").wait())
    assert log_steps(out) == [1, 2, 3, 4]


def test_numbered_checkpoints_hold_earlier_steps_never_a_copy_of_the_last(shapes_root, tmp_path):
    """Saved at steps 1, 2, 3 with checkpoint.keep=1: the last holds step 3, the one numbered file step 2.

    Resumed to step 4, the state the run resumed from becomes checkpoint_3
    without a byte written: the same inode that was checkpoint_last.pth.
    """
    out = tmp_path / "run"
    extra = ["checkpoint.every=1", "checkpoint.keep=1", "log.every=1"]
    check_ok(Run(moco(shapes_root, out, "train.max_steps=3", *extra), tmp_path / "logs").wait())
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_0000002.pth", "checkpoint_last.pth"]
    assert safe_load(out / "checkpoint_0000002.pth")["step"] == 2
    assert safe_load(out / "checkpoint_last.pth")["step"] == 3
    last_inode = (out / "checkpoint_last.pth").stat().st_ino

    check_ok(Run(moco(shapes_root, out, "train.max_steps=4", "resume=auto", *extra), tmp_path / "logs_resumed").wait())
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_0000003.pth", "checkpoint_last.pth"]
    assert (out / "checkpoint_0000003.pth").stat().st_ino == last_inode
    assert safe_load(out / "checkpoint_0000003.pth")["step"] == 3
    assert safe_load(out / "checkpoint_last.pth")["step"] == 4


# ----------------------------------------------------------------------------- 12, 13: sizes


def test_a_queue_far_larger_than_the_data_set_is_refused_before_anything_is_written(shapes_root, tmp_path):
    """24 images x 2 views = 48 keys; a queue of 800 is over 16 x 48 = 768."""
    runs = [Run(moco(shapes_root, tmp_path / "refused", "loss.queue_size=800", "train.max_steps=1"), tmp_path / "logs_a"),
            Run(moco(shapes_root, tmp_path / "forced", "loss.queue_size=800", "loss.force_queue_size=true",
                     "train.max_steps=1"), tmp_path / "logs_b")]
    refused, forced = run_all(runs)
    message = one_line_error(refused)
    assert "loss.queue_size 800 exceeds the data set's 24 images x 2 views = 48 more than 16 times" in message, message
    assert "loss.force_queue_size=true" in message and "loss.queue_size=48" in message, message
    assert not (tmp_path / "refused").exists()
    check_ok(forced)
    assert "warning: loss.queue_size 800 exceeds" in forced.stdout
    assert safe_load(tmp_path / "forced" / "checkpoint_last.pth")["model"]["queue.embeddings"].shape[0] == 800


def test_a_batch_larger_than_the_data_set_is_refused_before_anything_is_written(shapes_root, tmp_path):
    out = tmp_path / "run"
    proc = Run(moco(shapes_root, out, "train.batch_size=32", "loss.queue_size=32", "train.max_steps=1"), tmp_path / "logs").wait()
    message = one_line_error(proc)
    assert "the data set has 24 images, fewer than one batch of 32" in message, message
    assert not out.exists()


def test_a_retro_run_without_the_averaged_adapter_resumes_only_as_it_was_written(shapes_root, teacher_ckpt, tmp_path):
    """Issue 24: checkpoints of ``adapter.ema=false`` (and of every Retro run before that key) hold no ``adapter_ema.*``.

    Resumed under today's default (``adapter.ema=true``) the run is refused in
    one line naming the setting that resumes it, and nothing is written; with
    that setting it continues. A default run's checkpoint gives the exporters
    and probes the online adapter, not its average.
    """
    def retro(out, *extra):
        return distill_args("shapes_retro_effb0.yaml", toy(shapes_root, out, R18, "teacher.arch=resnet18",
                                                           f"teacher.checkpoint={teacher_ckpt}", "checkpoint.every=2", *extra))

    old, new = tmp_path / "old", tmp_path / "new"
    for result in run_all([Run(retro(old, "adapter.ema=false", "train.max_steps=2"), tmp_path / "logs_old"),
                           Run(retro(new, "train.max_steps=2"), tmp_path / "logs_new")]):
        check_ok(result)
    assert not any(k.startswith("adapter_ema.") for k in safe_load(old / "checkpoint_last.pth")["model"])

    before = snapshot(old)
    refused = run_all([Run(retro(old, "resume=auto", "train.max_steps=3"), tmp_path / "logs_refused")])[0]
    line = one_line_error(refused)
    assert "was written with adapter.ema=false" in line and "resume it with adapter.ema=false" in line
    assert snapshot(old) == before
    resumed = run_all([Run(retro(old, "resume=auto", "train.max_steps=3", "adapter.ema=false"), tmp_path / "logs_resumed")])[0]
    check_ok(resumed)
    assert safe_load(old / "checkpoint_last.pth")["step"] == 3

    from distill.checkpoint import load_encoder

    model = safe_load(new / "checkpoint_last.pth")["model"]
    encoder, info = load_encoder(new / "checkpoint_last.pth", which="adapter")
    assert info["features"] == "adapter"
    loaded = encoder.adapter.state_dict()
    assert all(torch.equal(loaded[k], model["adapter." + k]) for k in loaded)
    assert not all(torch.equal(loaded[k], model["adapter_ema." + k]) for k in loaded if loaded[k].is_floating_point())
