"""The detection tool as a new user meets it: a VOC recipe on the shapes data, a machine without a GPU, a quiet start.

Issue 26. The tools run as subprocesses where what is checked is what a
user sees (the lines on the console, the exit code), in-process elsewhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from retro_transfer.d2 import load_config
from retro_transfer.d2.data import SHAPES_COCO_PREFIX, SHAPES_PREFIX
from retro_transfer.d2.train import cpu_workload_warning
from tool_helpers import fresh_detectron2_logging, load_tool, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "tools" / "train_net.py"
TRAIN_SEG = ROOT / "tools" / "train_seg.py"


def run_tool(args, **env) -> subprocess.CompletedProcess:
    """A tool in a child process, one thread, with ``env`` added to this process's environment."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def error_of(call, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


def forget_shapes() -> None:
    """Unregister the shapes data sets, so a test sees only what its own calls registered."""
    for name in DatasetCatalog.list():
        if name.startswith((SHAPES_PREFIX, SHAPES_COCO_PREFIX)):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# ----------------------------------------------------------------------------- 1: a recipe on the shapes data


@pytest.mark.parametrize("config, train, test", [
    ("voc_frcnn_effb0", ("shapes_voc_trainval",), ("shapes_voc_test",)),
    ("coco_mrcnn_r18_1x", ("shapes_coco_train", "shapes_coco_val"), ("shapes_coco_test",)),
])
def test_shapes_flag_points_a_recipe_at_the_shapes_data(shapes_root, tmp_path, config, train, test):
    """--shapes DIR: the shapes data sets, its 7 classes and 64 px images; the recipe's model and schedule stay."""
    train_net = load_tool("train_net")
    args = train_net.build_parser().parse_args(["--config", config, "--shapes", str(shapes_root), "MODEL.WEIGHTS", "",
                                          "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out")])
    forget_shapes()
    cfg = train_net.setup(args)
    recipe = load_config(args.config_file, register=False)
    assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)) == (train, test)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 7
    assert (tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MIN_SIZE_TEST) == ((64,), 64)
    assert cfg.SOLVER.MAX_ITER == recipe.SOLVER.MAX_ITER and cfg.MODEL.BACKBONE.NAME == recipe.MODEL.BACKBONE.NAME
    assert cfg.INPUT.MASK_FORMAT == ("bitmask" if recipe.MODEL.MASK_ON else recipe.INPUT.MASK_FORMAT)
    images = [record["file_name"] for record in DatasetCatalog.get(test[0])]
    assert images and all(Path(f).is_relative_to(shapes_root) for f in images)


def test_overrides_after_shapes_still_win(shapes_root):
    cfg = load_config(ROOT / "configs/detection/voc_frcnn_effb0.yaml", ["INPUT.MIN_SIZE_TEST", "100"],
                      shapes_root=shapes_root)
    assert cfg.INPUT.MIN_SIZE_TEST == 100 and cfg.DATASETS.TEST == ("shapes_voc_test",)


def test_missing_voc_says_how_to_use_the_shapes_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    train_net = load_tool("train_net")
    args = train_net.build_parser().parse_args(["--config", "voc_frcnn_effb0", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                                          "OUTPUT_DIR", str(tmp_path / "out")])
    message = error_of(lambda: train_net.setup(args), capsys)
    assert "voc_2007" in message and "make_shapes.py --out DIR" in message and "--shapes DIR" in message, message


def test_an_option_after_the_overrides_is_named(capsys):
    """Everything after the first KEY is an override; a --shapes there would be a config key that does not exist."""
    train_net = load_tool("train_net")
    message = error_of(lambda: train_net.cli(["--config", "voc_frcnn_effb0", "MODEL.WEIGHTS", "", "--shapes", "x"]),
                       capsys)
    assert "--shapes came after the KEY VALUE overrides" in message, message


# ----------------------------------------------------------------------------- 2, 4: no GPU, a GPU-sized run


def test_no_gpu_is_one_line_naming_the_cpu_setting(shapes_root, tmp_path):
    """With no CUDA device visible, a cuda config and --num-gpus 2 each end in one line, before any training."""
    hidden = {"CUDA_VISIBLE_DEVICES": ""}  # no GPU for torch, on any machine
    base = [TRAIN_NET, "--config", "voc_frcnn_effb0"]
    cuda = one_line(run_tool([*base, "--shapes", shapes_root, "MODEL.WEIGHTS", "", "OUTPUT_DIR", tmp_path / "a"],
                             **hidden))
    assert "MODEL.DEVICE cuda asks for a GPU" in cuda and "add MODEL.DEVICE cpu" in cuda, cuda
    several = one_line(run_tool([*base, "--num-gpus", "2", "MODEL.WEIGHTS", "", "OUTPUT_DIR", tmp_path / "b"],
                                **hidden))
    assert "--num-gpus 2 asks for 2 GPUs" in several and "finds 0 CUDA device" in several, several
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_gpu_sized_config_on_the_cpu_is_warned_about_and_a_cpu_sized_one_is_not():
    """The VOC recipe is 24k iterations x 16 images at up to 800 px: 24000*16*800**2 / (300*4*128**2) = 12500x."""
    voc = load_config(ROOT / "configs/detection/voc_frcnn_effb0.yaml", ["MODEL.DEVICE", "cpu"], register=False)
    warning = cpu_workload_warning(voc)
    assert warning and "24000 iterations x 16 images at 800 px" in warning and "12,500 times" in warning, warning
    assert "SOLVER.MAX_ITER" in warning
    shapes = load_config(ROOT / "configs/detection/shapes_frcnn_effb0.yaml", register=False)
    assert cpu_workload_warning(shapes) is None
    voc.MODEL.DEVICE = "cuda"
    assert cpu_workload_warning(voc) is None, "on a GPU the recipe is what it is sized for"


def test_a_gpu_sized_segmentation_config_on_the_cpu_is_warned_about():
    """VOC DeepLabV3+ is 20k iterations x 4 images at 512 px, the shapes FCN 300 x 8 at 128 px.

    20000*4*512**2 / (300*8*128**2) = 533 times the pixels.
    """
    from retro_transfer.mmseg import launch

    voc = launch.load_config(ROOT / "configs/segmentation/voc_deeplabv3plus_effb0.py")
    warning = launch.cpu_workload_warning(voc, on_cpu=True)
    assert warning and "20000 iterations x 4 images at 512 px" in warning and "533 times" in warning, warning
    assert "train_cfg.max_iters" in warning
    shapes = launch.load_config(ROOT / "configs/segmentation/shapes_fcn_r18.py")
    assert launch.cpu_workload_warning(shapes, on_cpu=True) is None
    assert launch.cpu_workload_warning(voc, on_cpu=False) is None


# ----------------------------------------------------------------------------- 3: one's own Detectron2 script


def test_load_config_registers_the_shapes_data_of_its_config(shapes_root):
    """A script's load_config(...) alone makes the shapes data sets of DATASETS.SHAPES_ROOT readable."""
    forget_shapes()
    load_config(ROOT / "configs/detection/shapes_frcnn_r18.yaml", ["DATASETS.SHAPES_ROOT", str(shapes_root)])
    for name in ("shapes_voc_trainval", "shapes_coco_test"):
        records = DatasetCatalog.get(name)
        assert records and all(Path(r["file_name"]).is_relative_to(shapes_root) for r in records), name


# ----------------------------------------------------------------------------- 6: a quiet start


QUIET_LINES = 10
"""At most this many console lines before the first step's metrics (Detectron2's own start-up report is ~900)."""


def test_a_recipe_on_the_shapes_data_trains_with_a_quiet_start(shapes_root, tmp_path):
    """The VOC recipe trains 2 iterations on the shapes data; the console shows few lines before the first step.

    The start-up report is not lost: OUTPUT_DIR/log.txt holds it.
    """
    out = tmp_path / "out"
    small = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2",
             "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100"]
    proc = run_tool([TRAIN_NET, "--config", "voc_frcnn_effb0", "--shapes", shapes_root, *small])
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = (proc.stdout + proc.stderr).splitlines()
    first_step = next(i for i, line in enumerate(console) if " iter: " in line)
    assert first_step <= QUIET_LINES, "\n".join(console[:first_step])
    assert (out / "model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    assert "Environment info" in log and "Running with full config" in log


def test_train_seg_starts_quietly_and_its_log_keeps_the_report(shapes_root, tmp_path):
    """train_seg on the shapes data, 2 iterations: few console lines before the first; the log keeps the rest."""
    work = tmp_path / "work"
    options = ["train_cfg.max_iters=2", "model.backbone.init_cfg=None", "train_dataloader.num_workers=0",
               "val_dataloader.num_workers=0", "test_dataloader.num_workers=0"]
    proc = run_tool([TRAIN_SEG, "shapes_fcn_r18", "--data-root", shapes_root / "VOC2007", "--work-dir", work,
                     "--cfg-options", *options])
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = (proc.stdout + proc.stderr).splitlines()
    first_step = next(i for i, line in enumerate(console) if "Iter(train)" in line)
    assert first_step <= QUIET_LINES, "\n".join(console[:first_step])
    log = "".join(path.read_text() for path in work.rglob("*.log"))
    assert "System environment" in log and "Config:" in log


HELP_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("tool", ["train_net", "train_seg", "convert_to_d2"])
def test_help_answers_without_importing_torch(tool):
    proc = run_tool(["-c", HELP_PROBE, ROOT / "tools" / f"{tool}.py"])
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("torch imported: False"), proc.stdout[-500:]
