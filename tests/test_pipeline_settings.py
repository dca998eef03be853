"""The pipeline's settings (--seed, --set, the folder's settings.json) and the report's random-init floors."""

import importlib.util
from pathlib import Path

import pytest

from retro_transfer.pipeline import PRESETS
from retro_transfer.pipeline.report import frozen_feature_evidence
from retro_transfer.pipeline.runner import save_json
from retro_transfer.pipeline.settings import SettingsError, claim_folder, describe, resolve_settings

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_tool():
    spec = importlib.util.spec_from_file_location("_tool_pipeline", ROOT / "tools" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_and_set_change_only_the_named_fields_with_the_preset_types():
    quick = PRESETS["quick"]
    settings = resolve_settings(quick, seed=3, sets=["distill_steps=12", "teacher_lr=0.1", "teacher_arch=resnet34"])
    assert settings["seed"] == 3 and settings["distill_steps"] == 12 and settings["teacher_lr"] == 0.1
    assert settings["teacher_arch"] == "resnet34" and isinstance(settings["distill_steps"], int)
    assert {k: v for k, v in settings.items() if k not in ("seed", "distill_steps", "teacher_lr", "teacher_arch")} == {
        k: v for k, v in quick.items() if k not in ("seed", "distill_steps", "teacher_lr", "teacher_arch")}
    assert describe("quick", settings, quick) == (
        "preset `quick`, seed 3, with distill_steps=12, teacher_arch=resnet34, teacher_lr=0.1")
    assert quick["seed"] == 0, "the preset itself must not change"


@pytest.mark.parametrize("item, message", [
    ("distill_steps", "write KEY=VALUE"),
    ("no_such_field=1", "no preset field 'no_such_field'; fields: "),
    ("distill_steps=1.5", "distill_steps takes int values"),
])
def test_bad_set_is_refused_in_one_line(item, message, capsys):
    with pytest.raises(SettingsError, match=message):
        resolve_settings(PRESETS["smoke"], sets=[item])
    with pytest.raises(SystemExit) as exit_:
        _pipeline_tool().main(["--preset", "smoke", "--out", "/nonexistent/never", "--set", item])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message.split(";")[0] in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_made_with_other_settings_is_refused_unless_everything_is_redone(tmp_path, capsys):
    smoke = PRESETS["smoke"]
    claim_folder(tmp_path, "smoke", resolve_settings(smoke))
    claim_folder(tmp_path, "smoke", resolve_settings(smoke))  # the same settings: fine
    with pytest.raises(SettingsError, match=r"other settings \(seed 0 -> 1\); give another --out, or add --force all"):
        claim_folder(tmp_path, "smoke", resolve_settings(smoke, seed=1))
    with pytest.raises(SystemExit) as exit_:  # refused before any stage runs
        _pipeline_tool().main(["--preset", "smoke", "--out", str(tmp_path), "--set", "knn_k=5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "knn_k 20 -> 5" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]
    claim_folder(tmp_path, "smoke", resolve_settings(smoke, seed=1), force_all=True)  # --force all: adopted
    claim_folder(tmp_path, "smoke", resolve_settings(smoke, seed=1))


def _records(student_arch="efficientnet_b0"):
    stage = lambda **metrics: {"metrics": metrics}  # noqa: E731
    return {"teacher": stage(arch="resnet18"), "distill_seed": stage(student=student_arch),
            "eval_random": stage(), "eval_teacher": stage(), "eval_seed": stage()}


def test_every_model_is_compared_with_its_own_architectures_random_init(tmp_path):
    """40 val images; the student is right on 30, its random EfficientNet-B0 on 10 of them, the random ResNet-18 on 30.

    A paired difference of +50 points on 40 images lies far outside the bootstrap's noise (its interval is about
    +/- 16 points); the teacher equals the random ResNet-18 image for image, so its difference is exactly 0.
    """
    right = lambda k: [1] * k + [0] * (40 - k)  # noqa: E731
    save_json({"resnet18": {"linear": right(30), "knn": right(30)},
               "efficientnet_b0": {"linear": right(10), "knn": right(10)}}, tmp_path / "eval_random" / "per_image.json")
    save_json({"backbone": {"linear": right(30), "knn": right(30)}}, tmp_path / "eval_teacher" / "per_image.json")
    save_json({"backbone": {"linear": right(30), "knn": right(20)}}, tmp_path / "eval_seed" / "per_image.json")
    evidence = frozen_feature_evidence(tmp_path, _records())
    seed = evidence[("seed", "backbone")]
    assert seed["vs_random"].value == pytest.approx(50.0) and seed["vs_random"].low > 0
    assert seed["vs_random_knn"].value == pytest.approx(25.0) and seed["vs_random_knn"].low > 0
    teacher = evidence[("teacher", "backbone")]
    assert teacher["vs_random"].value == 0.0 and teacher["vs_random"].low == 0.0 == teacher["vs_random"].high
    assert "vs_random" not in evidence[("random", "resnet18")]
    # A student of an architecture with no floor gets no comparison rather than another network's.
    assert "vs_random" not in frozen_feature_evidence(tmp_path, _records("mobilenetv3_large_100"))[("seed", "backbone")]
