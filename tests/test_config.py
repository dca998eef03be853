"""The distillation config: YAML inheritance, key=value overrides, and one clear error per bad value."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_adapter_widths,
    dump_yaml,
    load_config,
    load_yaml,
    override,
    valid_keys,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "distill"
REPO = CONFIGS.parents[1]
ABSTRACT = {"base.yaml", "shapes_base.yaml"}  # they leave `method` to their children
SHAPES = CONFIGS / "shapes_retro_effb0.yaml"


def _load(*overrides, path=SHAPES, check_paths=False):
    return load_config(path, list(overrides), check_paths=check_paths)


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# --------------------------------------------------------------------------- the shipped YAML files


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    overrides = ["method=moco_v2"] if name in ABSTRACT else []
    cfg = load_config(CONFIGS / name, overrides, check_paths=False)
    assert Config.from_dict(cfg.to_dict()) == cfg
    if name not in ABSTRACT:
        stem = name.removesuffix(".yaml")
        assert cfg.method == next(m for m in ("moco_v2", "seed", "disco", "retro") if stem.removeprefix("shapes_").startswith(m))
        assert cfg.output_dir.endswith(stem), "each config writes to its own folder"


@pytest.mark.parametrize("name", sorted(ABSTRACT))
def test_abstract_bases_need_a_method(name):
    with pytest.raises(ConfigError, match=r"missing required key 'method'.*method=<one of moco_v2, seed, disco, retro, supcon>"):
        load_config(CONFIGS / name, [], check_paths=False)


def test_shipped_values_follow_the_method_notes():
    base = _load("method=moco_v2", path=CONFIGS / "base.yaml")
    assert (base.train.lr, base.train.batch_size, base.train.max_steps) == (0.03, 256, 200 * 5005)
    assert (base.loss.queue_size, base.loss.temperature, base.loss.momentum) == (65536, 0.2, 0.999)
    assert _load(path=CONFIGS / "retro_mbv3_r50.yaml").train.grad_clip == 5.0
    assert _load(path=CONFIGS / "retro_effb0_r50.yaml").train.grad_clip is None
    assert _load(path=CONFIGS / "disco_effb0_r50.yaml").student.head_hidden == 2048
    seed = _load(path=CONFIGS / "seed_mbv3_r152.yaml")
    assert (seed.teacher.arch, seed.student.arch, seed.loss.teacher_temperature) == ("resnet152", "mobilenetv3_large_100", 0.01)
    shapes = _load()
    assert shapes.data.train_dir == "data/shapes/unlabeled" and shapes.data.image_size == 64
    assert shapes.loss.queue_size % shapes.train.batch_size == 0


CONSISTENCY_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.removeprefix("shapes_").startswith(("disco", "retro")))


@pytest.mark.parametrize("name", CONSISTENCY_CONFIGS)
def test_consistency_weight_and_mean_student_of_the_shipped_configs(name):
    """ImageNet recipes: the released weight (MSELoss sum over 32 images a GPU = 32 x the per-image mean);
    the shapes demo: weight 1, as it was measured. Retro averages its adapter in both."""
    cfg = _load(path=CONFIGS / name)
    assert cfg.loss.mse_weight == (1.0 if name.startswith("shapes_") else 32.0)
    assert cfg.adapter.ema is True


@pytest.mark.parametrize("text, message", [
    ("loss.consistency_weight=2", "loss.consistency_weight was renamed loss.mse_weight"),
    ("loss.mse_reduction=sum", "loss.mse_reduction was removed: the consistency MSE is always the per-image mean; "
                               "the released code's per-GPU sum over 32 images is loss.mse_weight=32"),
])
def test_retired_loss_keys_name_their_replacement(text, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(text)
    assert message in str(err.value) and "\n" not in str(err.value)
    key, value = text.split("=")
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=f"{key} was "):
        load_config(_write(tmp_path / "old.yaml", {"_base_": str(SHAPES), section: {name: value}}), [])


# --------------------------------------------------------------------------- inheritance


def test_child_overrides_base_and_inherits_the_rest(tmp_path):
    _write(tmp_path / "base.yaml", {"method": "moco_v2", "data": {"train_dir": "d"}, "train": {"max_steps": 10, "lr": 0.1}})
    _write(tmp_path / "child.yaml", {"_base_": "base.yaml", "train": {"lr": 0.5}})
    _write(tmp_path / "grandchild.yaml", {"_base_": "child.yaml", "method": "seed", "teacher": {"checkpoint": "t.pth"}})
    child = load_config(tmp_path / "child.yaml", check_paths=False)
    assert child.train.lr == 0.5 and child.train.max_steps == 10 and child.method == "moco_v2"
    assert child.train.batch_size == 256, "keys no file sets keep their defaults"
    grandchild = load_config(tmp_path / "grandchild.yaml", check_paths=False)
    assert (grandchild.method, grandchild.train.lr, grandchild.train.max_steps) == ("seed", 0.5, 10)


def test_list_of_bases_merges_in_order(tmp_path):
    _write(tmp_path / "a.yaml", {"method": "moco_v2", "train": {"max_steps": 1, "lr": 0.1}})
    _write(tmp_path / "b.yaml", {"train": {"lr": 0.2, "batch_size": 64}, "loss": {"queue_size": 128}})
    _write(tmp_path / "c.yaml", {"_base_": ["a.yaml", "b.yaml"], "data": {"train_dir": "d"}})
    cfg = load_config(tmp_path / "c.yaml", check_paths=False)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.batch_size, cfg.loss.queue_size) == (1, 0.2, 64, 128)


def test_base_path_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "base.yaml", {"method": "moco_v2", "data": {"train_dir": "d"}, "train": {"max_steps": 3}})
    _write(tmp_path / "sub" / "run.yaml", {"_base_": "base.yaml"})
    monkeypatch.chdir(tmp_path)
    assert load_config("sub/run.yaml", check_paths=False).train.max_steps == 3


def test_inheritance_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="inheritance cycle.*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_yaml(tmp_path / "a.yaml")


def test_missing_base_and_bad_yaml_are_errors(tmp_path):
    _write(tmp_path / "a.yaml", {"_base_": "nope.yaml"})
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_yaml(tmp_path / "a.yaml")
    _write(tmp_path / "bad.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_yaml(tmp_path / "bad.yaml")
    _write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")


# --------------------------------------------------------------------------- overrides


def test_overrides_of_each_kind():
    cfg = _load(
        "train.max_steps=100",
        "teacher.checkpoint=/x/y.pth",
        "data.train_dir=/data/imagenet/train",
        "output_dir=runs/elsewhere",
        "train.batch_size=32",
        "data.image_size=64",
        "resume=auto",
        "train.grad_clip=null",
        "log.tensorboard=false",
    )
    assert cfg.train.max_steps == 100 and cfg.teacher.checkpoint == "/x/y.pth"
    assert cfg.data.train_dir == "/data/imagenet/train" and cfg.output_dir == "runs/elsewhere"
    assert cfg.train.batch_size == 32 and cfg.data.image_size == 64 and cfg.resume == "auto"
    assert cfg.train.grad_clip is None and cfg.log.tensorboard is False


def test_exponent_without_dot_becomes_float():
    cfg = _load("train.lr=1e-4", "train.weight_decay=5e-5")
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.weight_decay, float)


def test_numbers_are_coerced_to_the_field_type():
    cfg = _load("train.lr=1", "train.max_steps=1e3", "output_dir=2024", "resume=null")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float), "ints are accepted for float fields"
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.output_dir == "2024" and cfg.resume is None


def test_later_override_wins_and_sections_take_mappings():
    cfg = _load("train.max_steps=5", "train.max_steps=7", "train={lr: 0.5, warmup_steps: 2}")
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.batch_size) == (7, 0.5, 2, 32)


@pytest.mark.parametrize("text, message", [
    ("train.max_steps", "must look like key=value"),
    ("--train.max_steps=3", "without leading dashes"),
])
def test_malformed_override(text, message):
    with pytest.raises(ConfigError, match=message):
        _load(text)


def test_override_of_a_restored_config():
    cfg = _load()
    again = override(cfg, ["train.max_steps=3"])
    assert again.train.max_steps == 3 and again.train.lr == cfg.train.lr and cfg.train.max_steps == 200


# --------------------------------------------------------------------------- unknown keys, types, choices, ranges


@pytest.mark.parametrize("text, typo, suggestion", [
    ("train.max_step=100", "train.max_step", "train.max_steps"),
    ("max_steps=100", "max_steps", "train.max_steps"),
    ("trian.lr=0.1", "trian.lr", "train.lr"),
    ("loss.tempreature=0.1", "loss.tempreature", "loss.temperature"),
])
def test_unknown_override_key_suggests_the_nearest(text, typo, suggestion):
    with pytest.raises(ConfigError) as err:
        _load(text)
    assert f"unknown key '{typo}'; did you mean '{suggestion}'?" in str(err.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = _write(tmp_path / "run.yaml", {"_base_": str(SHAPES), "train": {"batchsize": 8}})
    with pytest.raises(ConfigError) as err:
        load_config(path, check_paths=False)
    assert "unknown key 'train.batchsize'; did you mean 'train.batch_size'?" in str(err.value)
    assert "run.yaml" in str(err.value)


def test_unknown_key_in_from_dict():
    d = _load().to_dict()
    d["data"]["image_sise"] = 64
    with pytest.raises(ConfigError, match="unknown key 'data.image_sise'; did you mean 'data.image_size'"):
        Config.from_dict(d)


@pytest.mark.parametrize("text, message", [
    ("train.batch_size=abc", "train.batch_size must be an integer, got 'abc'"),
    ("train.batch_size=true", "train.batch_size must be an integer, got True"),
    ("train.max_steps=2.5", "train.max_steps must be an integer, got 2.5"),
    ("train.lr=fast", "train.lr must be a finite number, got 'fast'"),
    ("train.lr=.nan", "train.lr must be a finite number"),
    ("log.tensorboard=maybe", "log.tensorboard must be true or false, got 'maybe'"),
    ("train.batch_size=[1, 2]", "train.batch_size must be an integer"),
    ("output_dir=null", "output_dir must be a string, got null"),
    ("train=5", "'train' is a section"),
])
def test_wrong_type(text, message):
    with pytest.raises(ConfigError) as err:
        _load(text)
    assert message in str(err.value)


@pytest.mark.parametrize("key, bad, accepted", [
    ("method", "mocov2", "moco_v2, seed, disco, retro, supcon"),
    ("train.precision", "fp8", "fp32, bf16, fp16, auto"),
    ("train.schedule", "step", "cosine, constant"),
    ("adapter.kind", "mlp", "auto, inverted_residual, bottleneck"),
    ("teacher.arch", "resnet200", "resnet18, resnet34, resnet50, resnet101, resnet152, resnet50w2, resnet50w4, resnet50w5, resnet101w2, resnet152w2"),
    ("teacher.family", "mocov3", "auto, byol, dino, moco_v2, moco_v3, simclr, swav"),
])
def test_bad_choice(key, bad, accepted):
    with pytest.raises(ConfigError) as err:
        _load(f"{key}={bad}")
    assert f"{key} must be one of {accepted}; got '{bad}'" in str(err.value)


def test_student_arch_must_be_a_timm_model():
    assert _load("student.arch=resnet18").student.arch == "resnet18"
    with pytest.raises(ConfigError, match=r"student.arch 'EfficientNet-B0' is not a timm model name; did you mean 'efficientnet_b0'"):
        _load("student.arch=EfficientNet-B0")
    with pytest.raises(ConfigError, match=r"did you mean 'mobilenetv3_large_100'"):
        _load("student.arch=mobilenetv3_large")


@pytest.mark.parametrize("text, message", [
    ("train.batch_size=0", "train.batch_size must be > 0, got 0"),
    ("train.max_steps=-1", "train.max_steps must be > 0, got -1"),
    ("data.image_size=16", "data.image_size must be >= 32"),
    ("data.image_size=100000", "data.image_size must be >= 32 and <= 1024"),  # issue 23: a batch cannot be allocated
    ("loss.momentum=1", "loss.momentum must be >= 0 and < 1, got 1.0"),
    ("train.momentum=-0.1", "train.momentum must be >= 0 and < 1"),
    ("loss.temperature=0", "loss.temperature must be > 0, got 0.0"),
    ("loss.teacher_temperature=-1e-4", "loss.teacher_temperature must be > 0"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.grad_clip=0", "train.grad_clip must be > 0"),
    ("data.crop_min_scale=1.5", "data.crop_min_scale must be > 0 and <= 1"),
])
def test_out_of_range(text, message):
    with pytest.raises(ConfigError) as err:
        _load(text)
    assert message in str(err.value)


def test_queue_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ConfigError) as err:
        _load("loss.queue_size=100")
    message = str(err.value)
    assert "loss.queue_size (100) must be a multiple of the global batch size train.batch_size (32)" in message
    assert "MoCo" in message and "loss.queue_size=128" in message
    with pytest.raises(ConfigError, match="multiple"):
        _load("loss.queue_size=16")  # smaller than the batch


def test_teacher_methods_need_a_checkpoint_but_moco_v2_does_not():
    with pytest.raises(ConfigError, match="teacher.checkpoint is required for method 'retro'"):
        _load("teacher.checkpoint=null")
    assert _load("method=moco_v2", "teacher.checkpoint=null").teacher.checkpoint is None


# --------------------------------------------------------------------------- paths


def _paths_cfg(train_dir, *extra):
    return _load(f"data.train_dir={train_dir}", "method=moco_v2", *extra, check_paths=True)


def test_missing_data_dir_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        _paths_cfg(tmp_path / "nope")
    message = str(err.value)
    assert f"data.train_dir '{tmp_path / 'nope'}' does not exist" in message
    assert "python tools/make_shapes.py --out data/shapes" in message and "data/shapes/unlabeled" in message


@pytest.mark.parametrize("layout", ["empty", "no_images", "too_deep", "a_file"])
def test_data_dir_without_images(tmp_path, layout):
    root = tmp_path / "train"
    root.mkdir()
    if layout == "no_images":
        _touch(root / "readme.txt")
        _touch(root / "cls" / "labels.csv")
    elif layout == "too_deep":
        _touch(root / "a" / "b" / "x.jpg")
    elif layout == "a_file":
        root.rmdir()
        _touch(root)
    with pytest.raises(ConfigError) as err:
        _paths_cfg(root)
    expected = "is not a directory" if layout == "a_file" else "contains no images"
    assert expected in str(err.value) and "make_shapes.py" in str(err.value)


@pytest.mark.parametrize("image", ["img.jpg", "IMG.JPEG", "x.png", "n01440764/a.JPEG", "cls/b.webp", "cls/c.bmp"])
def test_flat_and_class_subfolder_layouts_are_accepted(tmp_path, image):
    _touch(tmp_path / "train" / image)
    assert _paths_cfg(tmp_path / "train").data.train_dir == str(tmp_path / "train")


def test_generated_shapes_folder_is_accepted(shapes_root):
    assert _paths_cfg(shapes_root / "unlabeled").method == "moco_v2"
    assert _paths_cfg(shapes_root / "classification" / "train").method == "moco_v2"


def test_teacher_checkpoint_must_exist_for_teacher_methods(tmp_path):
    _touch(tmp_path / "train" / "a.png")
    data = f"data.train_dir={tmp_path / 'train'}"
    with pytest.raises(ConfigError, match=r"teacher.checkpoint '.*missing.pth' does not exist; method retro"):
        _load(data, f"teacher.checkpoint={tmp_path / 'missing.pth'}", check_paths=True)
    ckpt = _touch(tmp_path / "teacher.pth")
    assert _load(data, f"teacher.checkpoint={ckpt}", check_paths=True).teacher.checkpoint == str(ckpt)
    moco = _load(data, "method=moco_v2", f"teacher.checkpoint={tmp_path / 'missing.pth'}", check_paths=True)
    assert moco.method == "moco_v2", "moco_v2 ignores a teacher checkpoint"


def test_resume_path_must_exist_unless_auto(tmp_path):
    _touch(tmp_path / "train" / "a.png")
    data = f"data.train_dir={tmp_path / 'train'}"
    assert _load(data, "method=moco_v2", "resume=auto", check_paths=True).resume == "auto"
    with pytest.raises(ConfigError, match="resume '.*gone.pth' does not exist; use resume=auto"):
        _load(data, "method=moco_v2", f"resume={tmp_path / 'gone.pth'}", check_paths=True)


# --------------------------------------------------------------------------- round trips and helpers


def test_to_dict_from_dict_round_trip():
    cfg = _load("train.lr=1e-4", "resume=auto", "train.grad_clip=2", "student.head_hidden=512")
    d = cfg.to_dict()
    assert set(d) == {"method", "output_dir", "seed", "resume", "overwrite", "student", "teacher", "adapter", "loss", "data", "train", "eval", "log", "checkpoint"}
    assert Config.from_dict(d) == cfg
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_dump_yaml_reloads_equal(tmp_path):
    cfg = _load("train.weight_decay=1e-5")
    path = dump_yaml(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path, check_paths=False) == cfg


def test_partial_dict_takes_defaults_and_configs_are_frozen():
    cfg = Config.from_dict({"method": "moco_v2", "data": {"train_dir": "d"}, "train": {"max_steps": 5}})
    assert cfg.train.batch_size == 256 and cfg.loss.queue_size == 65536
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 10
    with pytest.raises(ConfigError, match="train.batch_size must be > 0"):
        dataclasses.replace(cfg.train, batch_size=0)


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="missing required key 'train.max_steps'"):
        Config.from_dict({"method": "moco_v2", "data": {"train_dir": "d"}})
    with pytest.raises(ConfigError, match="missing required key 'data.train_dir'"):
        Config.from_dict({"method": "moco_v2", "train": {"max_steps": 1}})


def test_lr_is_scaled_from_batch_256():
    assert _load("train.lr=0.03", "train.batch_size=512", "loss.queue_size=1024").train.scaled_lr == pytest.approx(0.06)


def test_adapter_width_check():
    check_adapter_widths(1280, 2048, 2048)
    with pytest.raises(ConfigError, match=r"to 1024, but the teacher's projection head takes 2048.*teacher.arch"):
        check_adapter_widths(1280, 2048, 1024)
    with pytest.raises(ConfigError, match="positive channel count"):
        check_adapter_widths(0, 2048, 2048)


def test_valid_keys_and_apply_overrides_on_raw_dicts():
    assert "train.max_steps" in valid_keys() and "train" not in valid_keys()
    assert apply_overrides({"train": None}, ["train.lr=0.1"]) == {"train": {"lr": 0.1}}


def test_the_config_reader_imports_no_torch():
    """Importing the config reader and the constants it shares with the networks' code (distill.common), and
    reading a config file with its bases, import no torch; only checking a student's name imports timm (and torch).

    In a fresh interpreter, so that no other test's imports count.
    """
    script = (
        "import sys\n"
        "from distill.config import load_yaml\n"
        "import distill.common\n"
        "raw = load_yaml('configs/distill/shapes_retro_effb0.yaml')\n"
        "assert raw['method'] == 'retro', raw\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'timm', 'numpy'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_teacher_families_are_the_family_modules():
    """distill.common lists the family modules without importing them; the loader imports the same ones."""
    from distill.common import TEACHER_FAMILIES
    from retro_transfer.teacher_families import FAMILIES

    modules = sorted(p.stem for p in (REPO / "retro_transfer" / "teacher_families").glob("[!_]*.py"))
    assert list(TEACHER_FAMILIES) == modules == sorted(FAMILIES)
