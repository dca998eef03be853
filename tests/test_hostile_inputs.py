"""Hostile and unlucky inputs, second pass (issue 23, points 1, 2, 3, 13, 15 and the smaller items).

Each test runs the real tool (in this process through its ``main``, or as a
process where the case is about processes: locks, signals) and checks the one
line it prints and that nothing was run, mixed, lost or left half-written.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tool_helpers import ROOT, fresh_detectron2_logging, load_tool, one_thread  # noqa: F401

SEG_CONFIGS = ROOT / "configs" / "segmentation"


def run_main(tool, argv, capsys):
    """``(exit code, stdout, stderr)`` of a tool's ``main``; errors exit through ``fail``."""
    try:
        code = tool.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def the_error_line(err: str) -> str:
    """The one ``error:`` line, where importing Detectron2 in this process first logs torch's own warnings."""
    errors = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ----------------------------------------------------------------------------- 1: a YAML config runs code


@pytest.mark.parametrize("tool_name", ["train_seg", "test_seg"])
@pytest.mark.parametrize("where", ["config", "base"])
def test_a_python_tag_in_a_yaml_segmentation_config_is_refused_not_run(tool_name, where, tmp_path, capsys):
    """The probe's case: ``work_dir: !!python/object/apply:os.system [...]`` in a YAML config (or its YAML base)."""
    marker = tmp_path / "ran"
    hostile = f"work_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    base = tmp_path / "base.yaml"
    if where == "base":
        base.write_text(f"_base_: {SEG_CONFIGS / 'shapes_fcn_r18.py'}\n{hostile}")
        config_text = "_base_: base.yaml\n"
    else:
        config_text = f"_base_: {SEG_CONFIGS / 'shapes_fcn_r18.py'}\n{hostile}"
    config = tmp_path / "seg.yaml"
    config.write_text(config_text)
    checkpoint = [tmp_path / "absent.pth"] if tool_name == "test_seg" else []  # refused before it is looked for
    argv = [config, *checkpoint, "--work-dir", tmp_path / "work"]
    code, _, err = run_main(load_tool(tool_name), argv, capsys)
    line = one_line(err)
    assert code == 2 and not marker.exists(), line
    named = base if where == "base" else config
    assert f"{named}, line 2" in line and "python/object/apply:os.system" in line and "refused, not executed" in line, line


def test_yaml_and_json_configs_with_their_bases_are_read_as_data(tmp_path):
    """A legitimate YAML config inheriting a JSON one and a .py one reads as MMEngine would merge them."""
    from retro_transfer.openmmlab_config import read_config

    (tmp_path / "data.json").write_text(json.dumps({"probe": {"max_iters": 7}}))
    config = tmp_path / "seg.yml"
    config.write_text(f"_base_: ['{SEG_CONFIGS / 'shapes_fcn_r18.py'}', data.json]\nwork_dir: runs/x\n"
                      "model: {decode_head: {num_classes: 5}}\n")
    cfg = read_config(config)
    assert cfg.work_dir == "runs/x" and cfg.probe.max_iters == 7
    assert cfg.model.decode_head.num_classes == 5 and cfg.model.backbone.arch == "resnet18"


def test_a_base_cycle_and_a_missing_base_are_one_line(tmp_path):
    from retro_transfer.openmmlab_config import ConfigFileError, read_config

    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigFileError, match="cycle"):
        read_config(tmp_path / "a.yaml")
    (tmp_path / "c.json").write_text('{"_base_": "nowhere.yaml"}')
    with pytest.raises(ConfigFileError, match="_base_ nowhere.yaml not found"):
        read_config(tmp_path / "c.json")


def test_seg_tools_say_a_python_config_is_code(capsys):
    for name in ("train_seg", "test_seg"):
        with pytest.raises(SystemExit):
            load_tool(name).main(["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "a .py config is Python code and is run as such" in help_text, help_text


# ----------------------------------------------------------------------------- 2: two runs on one folder

HOLD = """
import sys, time
from retro_transfer.utils.run_lock import lock_run_folder
lock_run_folder(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """``holder(folder)``: another process that holds the run lock on ``folder`` until the test ends."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                                env={**env, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def refused_for(proc: subprocess.Popen, err: str) -> str:
    line = one_line(err)
    assert f"is in use by another run (PID {proc.pid} on host" in line, line
    return line


def distill_argv(shapes_root, out, *extra):
    return ["--config", "shapes_moco_v2_effb0.yaml", f"data.train_dir={shapes_root / 'unlabeled'}", "data.image_size=32",
            "data.num_workers=0", "train.batch_size=8", "train.precision=fp32", "loss.queue_size=16",
            "log.tensorboard=false", "checkpoint.keep=0", "student.arch=resnet18", f"output_dir={out}", *extra]


def test_every_run_tool_refuses_a_folder_another_process_holds(holder, shapes_root, tmp_path, capsys):
    """distill (new and resume=auto), pretrain_teacher, cache_teacher, train_seg, train_det, train_net, pipeline."""
    out = tmp_path / "run"
    proc = holder(out)
    for resume in ([], ["resume=auto"]):
        code, _, err = run_main(load_tool("distill"), distill_argv(shapes_root, out, *resume), capsys)
        assert code == 2 and "output_dir" in refused_for(proc, err)
    teacher = ["--config", "shapes_moco_v2_r50.yaml", f"data.train_dir={shapes_root / 'unlabeled'}", f"output_dir={out}"]
    code, _, err = run_main(load_tool("pretrain_teacher"), teacher, capsys)
    assert code == 2 and refused_for(proc, err)
    code, _, err = run_main(load_tool("cache_teacher"), distill_argv(shapes_root, tmp_path / "x") + ["--out", out], capsys)
    assert code == 2 and "--out" in refused_for(proc, err)
    code, _, err = run_main(load_tool("train_seg"), ["shapes_fcn_r18", "--work-dir", out], capsys)
    assert code == 2 and "work dir" in refused_for(proc, err)
    code, _, err = run_main(load_tool("train_det"), ["shapes_faster_rcnn_r18", "--work-dir", out], capsys)
    assert code == 2 and "work dir" in refused_for(proc, err)
    code, _, err = run_main(load_tool("pipeline"), ["--preset", "smoke", "--out", out], capsys)
    assert code == 2 and refused_for(proc, err)
    train_net = load_tool("train_net")
    try:
        train_net.cli(["--config", "voc_frcnn_r18", "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", ""])
    except SystemExit as e:
        assert e.code == 2
    assert "OUTPUT_DIR" in refused_for(proc, capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # nothing written by the refused runs


def test_a_killed_holder_leaves_no_stale_lock_and_a_refused_start_leaves_no_folder(holder, shapes_root, tmp_path, capsys):
    from retro_transfer.utils.run_lock import lock_run_folder

    out = tmp_path / "run"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / ".run.lock").exists()  # the file stays; the lock went with the process
    with lock_run_folder(out, "output_dir"):
        with lock_run_folder(out, "output_dir"):  # re-entrant within one process (a tool holding it runs a Trainer)
            pass
        assert (out / ".run.lock").exists()
    assert out.is_dir() and not (out / ".run.lock").exists()  # a folder it did not create stays
    # a refused start removes the folder it made: here a training folder with no images
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(load_tool("distill"), distill_argv(shapes_root, tmp_path / "new", f"data.train_dir={empty}"),
                            capsys)
    assert code == 2 and not (tmp_path / "new").exists(), err


def test_other_ranks_of_a_distributed_job_do_not_take_the_lock(holder, tmp_path, monkeypatch):
    """Under torchrun every rank writes into one folder; rank 0's lock keeps other jobs out."""
    from retro_transfer.utils.run_lock import RunFolderError, lock_run_folder

    out = tmp_path / "run"
    holder(out)
    monkeypatch.setenv("RANK", "1")
    lock_run_folder(out).release()  # no refusal: the holder stands for this job's rank 0
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunFolderError, match="in use by another run"):
        lock_run_folder(out)


def test_a_second_distillation_on_a_running_folder_is_refused_and_the_run_goes_on(shapes_root, tmp_path):
    """The probe's case: resume=auto while a run is going on in the folder (before: both ran, steps repeated).

    The first run is stopped by the test once the others were refused; its log must hold each step once.
    """
    out = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "RANK"}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    tool = [sys.executable, str(ROOT / "tools" / "distill.py")]
    first = subprocess.Popen(tool + distill_argv(shapes_root, out, "train.max_steps=100000", "log.every=1", "seed=0"),
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        # (a new run with another seed is the in-process case above: one more process costs its imports)
        second = subprocess.run(tool + distill_argv(shapes_root, out, "train.max_steps=100000", "resume=auto"),
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and refused_for(first, second.stderr)
        assert first.poll() is None, first.communicate()
    finally:
        first.kill()
        first.wait()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if line.endswith("}")]
    assert steps == list(range(1, len(steps) + 1))
    assert "seed: 0" in (out / "config.yaml").read_text()


# ----------------------------------------------------------------------------- 3 and 13: exports


@pytest.fixture(scope="module")
def student_file(distilled, tmp_path_factory):
    """A copy of a distilled ResNet-18 checkpoint: tests that could destroy it must not touch the session's."""
    copy = tmp_path_factory.mktemp("student") / "student.pth"
    copy.write_bytes(distilled("resnet18").read_bytes())
    return copy


@pytest.mark.parametrize("fmt", ["timm", "onnx"])
def test_export_refuses_to_write_over_its_input_even_with_force(fmt, student_file, tmp_path, capsys):
    before = student_file.read_bytes()
    symlink, hardlink = tmp_path / "link.pth", tmp_path / "hard.pth"
    symlink.symlink_to(student_file)
    os.link(student_file, hardlink)
    for out in (student_file, symlink, hardlink):
        for force in ([], ["--force"]):
            code, _, err = run_main(load_tool("export"), [student_file, "--format", fmt, out, "--image-size", 32, *force],
                                    capsys)
            line = one_line(err)
            assert code == 2 and f"the output {out} is the input file" in line, line
    assert student_file.read_bytes() == before


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
def test_export_on_a_full_disk_or_read_only_folder_is_one_line_and_leaves_nothing(errno_name, student_file, tmp_path,
                                                                                   capsys, monkeypatch):
    """The OS's refusal is simulated where torch.save writes (after some bytes, as a filling disk does)."""
    import errno

    import torch

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"some": torch.zeros(1000)}, f)  # a partial file on disk
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "out" / "r18.pth"
    out.parent.mkdir()
    out.write_text("previous export")
    code, _, err = run_main(load_tool("export"), [student_file, "--format", "timm", out, "--force", "--image-size", 32],
                            capsys)
    line = one_line(err)
    assert code == 2 and str(out) in line and os.strerror(getattr(errno, errno_name)) in line, line
    assert [p.name for p in out.parent.iterdir()] == ["r18.pth"] and out.read_text() == "previous export"


# ----------------------------------------------------------------------------- semisup --out, label lists


def test_semisup_eval_does_not_overwrite_a_result_without_force(student_file, shapes_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    for taken in (out, tmp_path / "r.labels.txt"):
        taken.write_text("an earlier result")
        argv = [student_file, "--data", shapes_root / "classification", "--epochs", 1, "--batch-size", 8,
                "--image-size", 32, "--workers", 0, "--device", "cpu", "--out", out]
        code, _, err = run_main(load_tool("semisup_eval"), argv, capsys)
        line = one_line(err)
        assert code == 2 and f"{taken} exists; pass --force" in line, line
        assert taken.read_text() == "an earlier result"
        taken.unlink()


def test_a_symlinked_label_list_is_named_not_quoted(tmp_path):
    from distill.semisup import DataError, read_label_list

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret-line\nanother-secret\n")
    link = tmp_path / "labels.txt"
    link.symlink_to(secret)
    with pytest.raises(DataError) as caught:
        read_label_list(link, ["circle/a.jpg"])
    message = str(caught.value)
    assert "secret-line" not in message and "another-secret" not in message, message
    assert f"{link} (a link to {secret})" in message and "line 1; line 2" in message, message


def test_test_seg_names_a_detectron2_pkl_and_the_tool_it_is_for(student_file, tmp_path, capsys):
    pkl = tmp_path / "student_d2.pkl"
    code, _, err = run_main(load_tool("convert_to_d2"), [student_file, pkl], capsys)
    assert code == 0, err
    with warnings.catch_warnings(record=True) as warned:  # a warning would print above the one line
        warnings.simplefilter("always")
        code, _, err = run_main(load_tool("test_seg"), ["shapes_fcn_r18", pkl, "--work-dir", tmp_path / "work"], capsys)
    assert not [w for w in warned if "pickle" in str(w.message)], [str(w.message) for w in warned]
    line = one_line(err)
    assert code == 2 and f"{pkl} is a Detectron2 weights file" in line and "tools/train_net.py" in line, line
    assert "contains code" not in line


# ----------------------------------------------------------------------------- 13: a full disk in train_net and train_seg


class _FillingDisk:
    """A file whose writes fail with ENOSPC after 64 KiB, as a disk that fills up mid-checkpoint does."""

    def __init__(self, f) -> None:
        self.f, self.left = f, 1 << 16

    def write(self, data):
        if len(data) > self.left:
            self.f.write(data[: self.left])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def disk_fills_up_on(monkeypatch):
    """``disk_fills_up_on(word)``: writes into files whose name holds ``word`` fail midway with ENOSPC.

    Both ways a tool can open a file for writing are covered (``open`` and
    ``os.fdopen`` of an ``os.open`` descriptor), so the simulation does not
    depend on how the code under test writes.
    """
    import builtins

    real_open, real_fdopen = builtins.open, os.fdopen

    def arm(word: str) -> None:
        def is_target(name) -> bool:
            if isinstance(name, int):
                name = os.readlink(f"/proc/self/fd/{name}")
            return word in os.path.basename(str(name))

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _FillingDisk(f) if set(mode) & set("wa") and is_target(file) else f

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            return _FillingDisk(f) if set(mode) & set("wa") and is_target(fd) else f

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "fdopen", fdopen)

    return arm


def test_train_net_on_a_full_disk_is_one_line_and_leaves_no_truncated_model_final(shapes_root, tmp_path, capsys,
                                                                                    disk_fills_up_on):
    out = tmp_path / "out"
    argv = ["--config", "shapes_frcnn_r18", "MODEL.WEIGHTS", "", "DATASETS.SHAPES_ROOT", str(shapes_root),
            "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    disk_fills_up_on("model_final")
    with pytest.raises(SystemExit) as exit_:
        load_tool("train_net").cli(argv)
    line = the_error_line(capsys.readouterr().err)
    assert exit_.value.code == 2 and "no space left to write" in line and str(out / "model_final.pth") in line, line
    assert not (out / "model_final.pth").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_train_seg_on_a_full_disk_is_one_line_and_leaves_no_truncated_checkpoint(shapes_root, tmp_path, capsys,
                                                                                  disk_fills_up_on):
    work = tmp_path / "work"
    options = ["model.backbone.init_cfg=None", f"train_dataloader.dataset.data_root={shapes_root / 'VOC2007'}",
               "train_dataloader.num_workers=0", "train_dataloader.batch_size=2", "train_cfg.max_iters=2",
               "train_cfg.val_interval=100", "param_scheduler.0.end=2", "default_hooks.checkpoint.interval=2",
               "val_cfg=None", "val_dataloader=None", "val_evaluator=None"]
    disk_fills_up_on("iter_2")
    code, _, err = run_main(load_tool("train_seg"), ["shapes_fcn_r18", "--work-dir", work, "--cfg-options", *options],
                            capsys)
    line = one_line(err)
    assert code == 2 and "no space left to write" in line and str(work / "iter_2.pth") in line, line
    assert not (work / "iter_2.pth").exists()
    assert not [p.name for p in work.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 15: Ctrl-C


def test_ctrl_c_during_a_distillation_is_one_line_naming_the_checkpoint_and_how_to_resume(shapes_root, tmp_path):
    """SIGINT lands while the run trains and saves every step; nothing is lost and no traceback is printed."""
    out = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "RANK"}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONFAULTHANDLER": "1"}  # fmt: skip
    argv = distill_argv(shapes_root, out, "train.max_steps=100000", "checkpoint.every=1")
    # A shell without job control starts `cmd &` with SIGINT ignored, and a Python started so never raises
    # KeyboardInterrupt: pytest run in the background would pass that on and the run would train on. Give the
    # run the default disposition, as a terminal's foreground job has.
    run = subprocess.Popen([sys.executable, str(ROOT / "tools" / "distill.py"), *argv], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint_last.pth").is_file():
            assert time.monotonic() < deadline and run.poll() is None, run.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # a few more steps and saves
        run.send_signal(signal.SIGINT)
        try:
            _, err = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGABRT)  # faulthandler prints every thread's Python stack before it dies
            _, err = run.communicate(timeout=60)
            pytest.fail(f"the run did not stop within 120 s of Ctrl-C; where it was:\n{err[-6000:]}")
    finally:
        run.kill()
    line = one_line(err.split("\r")[-1])  # the progress bar, when shown, redraws with carriage returns
    assert run.returncode == 130 and "interrupted: stopped at step" in line, err[-2000:]
    assert f"the last checkpoint is {out / 'checkpoint_last.pth'}" in line and "resume=auto" in line, line
    from retro_transfer.safe_io import safe_load

    assert safe_load(out / "checkpoint_last.pth")["step"] >= 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_tab_indented_json_config_reads_and_broken_json_is_one_line(tmp_path):
    from retro_transfer.openmmlab_config import ConfigFileError, read_config

    (tmp_path / "tabs.json").write_text('{\n\t"probe": {\n\t\t"n": 3\n\t}\n}\n')
    assert read_config(tmp_path / "tabs.json").probe.n == 3
    (tmp_path / "broken.json").write_text('{"probe": \n')
    with pytest.raises(ConfigFileError, match=r"broken.json, line 2 is not valid JSON"):
        read_config(tmp_path / "broken.json")
