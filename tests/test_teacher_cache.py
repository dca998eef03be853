"""The teacher-embedding cache: exact lookup, a cached run against an uncached one, refusals, a resumed build.

Toy scale, in this process: 32-px crops of the session's 24 shapes images,
global batch 8 (3 steps an epoch, so 4 steps cross an epoch), a ResNet-18
teacher with a MoCo v2 head, a ResNet-18 student, fp32 on the CPU.

Tolerances. A float16 value is its float32 value rounded to 11 significant
bits: within 2^-11 of it, relatively. A run renormalises the stored vector,
which at most doubles that, so each element of a cached embedding is within
2^-10 (relative) of the teacher's (plus 1e-6 absolute for the float32 noise of
the teacher run on another batch composition). Between a cached and an
uncached run, that rounding is the only difference: the cached run equals, bit
for bit, an uncached run whose embeddings are rounded the same way (when that
run computes them on the batches the builder used: see
``test_a_cached_run_is_the_uncached_run_up_to_float16_rounding``), and its
first-step losses stay within LOSS_TOLERANCE of the plain uncached run's: the
rounding can move each MSE term by at most 4 * 2^-10 = 4e-3, and a loss holds
up to two. Later steps drift further as training amplifies the change (Retro,
step 4: 1.2e-2 on the plain shapes images), and the student's distance from
the uncached one stays within 5% of how far training moved it (measured after
4 steps: 1.2% for Retro; weights and BN statistics, L2 over all tensors).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest
import torch

import distill.cache_builder as cache_builder
import distill.methods.base as methods_base
from distill.cache_builder import build_cache
from distill.config import ConfigError, load_config
from distill.data import MultiViewImages, StepBatchSampler, list_images, moco_v2_augmentation
from distill.engine import Trainer
from distill.methods import METHODS
from distill.teacher_cache import TeacherCache, decode, encode, read_manifest, shard_name, shard_record
from retro_transfer.safe_io import CheckpointError, safe_load
from retro_transfer.teacher_loading import load_teacher

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
FP16_AFTER_RENORM = 2.0**-10
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)


def overrides(shapes_root, teacher_ckpt, out, *extra):
    return [
        f"data.train_dir={shapes_root / 'unlabeled'}", "data.image_size=32", "data.num_workers=0", "student.arch=resnet18",
        "teacher.arch=resnet18", f"teacher.checkpoint={teacher_ckpt}", "train.batch_size=8", "train.precision=fp32",
        f"train.max_steps={STEPS}", "train.bn_splits=2", "loss.queue_size=16", "log.tensorboard=false", "log.every=1",
        "checkpoint.keep=0", f"output_dir={out}", *extra,
    ]  # fmt: skip


def config(shapes_root, teacher_ckpt, out, method="retro", *extra):
    return load_config(REPO / f"configs/distill/shapes_{method}_effb0.yaml", overrides(shapes_root, teacher_ckpt, out, *extra))


class Recorded:
    """Wraps an ``embed_views``-like function and keeps each call's input batch (the views concatenated, as the teacher sees them)."""

    def __init__(self, embed) -> None:
        self.embed, self.batches = embed, []

    def __call__(self, teacher, *views):
        self.batches.append(torch.cat(views).detach().clone())
        return self.embed(teacher, *views)


class Built(NamedTuple):
    out: Path
    batches: List[torch.Tensor]  # the batches the builder ran the teacher on, in order


def build_recorded(cfg, out: Path, **kwargs) -> Built:
    recorder = Recorded(cache_builder.embed_views)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_builder, "embed_views", recorder)
        build_cache(cfg, out, **kwargs)
    return Built(out, recorder.batches)


@pytest.fixture(scope="module")
def built(shapes_root, teacher_ckpt, tmp_path_factory):
    """float16 caches, 3 steps a shard (a full shard and a partial one), by the views a run reads:
    two an image (the retro config; disco reads the same) and one (the seed config)."""
    root = tmp_path_factory.mktemp("cache")
    return {
        views: build_recorded(config(shapes_root, teacher_ckpt, root / "unused", method), root / method, steps_per_shard=3)
        for views, method in ((2, "retro"), (1, "seed"))
    }


@pytest.fixture(scope="module")
def cache(built):
    """The two-view cache of the retro config."""
    return built[2].out


def teacher_reference(shapes_root, teacher_ckpt, step, rank=0, world=1):
    """n(H_T(T(x))) of both views of process ``rank``'s images at ``step``, recomputed from the data pipeline's parts."""
    files = list_images(shapes_root / "unlabeled")
    data = MultiViewImages(files, moco_v2_augmentation(32, 0.2), views=2, seed=0)
    (keys,) = StepBatchSampler(len(files), 8, rank, world, seed=0, start_step=step, max_steps=step + 1)
    views = [torch.stack([data[key][v] for key in keys]) for v in range(2)]
    teacher, _ = load_teacher(teacher_ckpt, arch="resnet18", require_head=True)
    return methods_base.embed_views(teacher.eval(), *views)


# -- what the cache holds ---------------------------------------------------------------------


def test_the_cache_holds_the_teachers_embedding_of_each_view_of_each_step(shapes_root, teacher_ckpt, cache):
    """Every step, each process's share (1 and 2 processes), both views: the teacher's embedding within float16 rounding."""
    manifest = read_manifest(cache)
    assert manifest["storage"]["num_shards"] == 2 and sorted(p.name for p in cache.glob("shard_*")) == [shard_name(0), shard_name(1)]
    stored = safe_load(cache / shard_name(0))["embeddings"]
    assert stored.dtype == torch.float16 and stored.shape == (3, 8, 2, 128)
    reader = TeacherCache(cache, manifest, views=2)
    for step in range(STEPS):
        for world in (1, 2):
            for rank in range(world):
                cached = reader.embeddings(step, rank, world, torch.device("cpu"))
                expected = teacher_reference(shapes_root, teacher_ckpt, step, rank, world)
                for view in range(2):
                    torch.testing.assert_close(cached[view], expected[view], rtol=FP16_AFTER_RENORM, atol=1e-6)
    # Each view is the teacher's embedding of that view, not of the other one.
    first = teacher_reference(shapes_root, teacher_ckpt, 0)
    assert (reader.embeddings(0, 0, 1, torch.device("cpu"))[0] - first[1]).abs().max() > 1e-2


def test_int8_keeps_each_value_within_one_step_of_its_row_scale(shapes_root, teacher_ckpt, tmp_path):
    out = tmp_path / "int8"
    build_cache(config(shapes_root, teacher_ckpt, tmp_path / "unused", "retro", "train.max_steps=1"), out, dtype="int8")
    shard = safe_load(out / shard_name(0))
    assert shard["embeddings"].dtype == torch.int8 and shard["scale"].shape == (1, 8, 2)
    cached = TeacherCache(out, read_manifest(out), views=2).embeddings(0, 0, 1, torch.device("cpu"))
    for view, expected in enumerate(teacher_reference(shapes_root, teacher_ckpt, 0)):
        # Rounding moves a value by at most scale / 2 = max|t| / 254; with the renormalisation, by at most twice that.
        bound = expected.abs().amax(dim=1, keepdim=True) / 127
        assert ((cached[view] - expected).abs() <= bound + 1e-6).all()


# -- a cached run against an uncached one -------------------------------------------------------


TEACHER_EMBEDDINGS = methods_base.embed_views


def rounded_like_the_cache(teacher, *views):
    """The teacher's embeddings passed through the cache's float16 storage: what a cached run reads."""
    return tuple(decode(encode(t, "float16")["embeddings"]) for t in TEACHER_EMBEDDINGS(teacher, *views))


LOSS_TOLERANCE = 2 * 4 * 2**-10  # two MSE terms, each within 4 * 2^-10 (module docstring)


def losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("lr", "img_per_s")} for r in records]


def student(ckpt):
    return {k: v for k, v in ckpt["model"].items() if k.startswith("student.") and v.is_floating_point()}


def distance(a, b):
    return torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)).item()


@pytest.mark.exact
@pytest.mark.parametrize("method", ["seed", "disco", "retro"])
def test_a_cached_run_is_the_uncached_run_up_to_float16_rounding(method, shapes_root, teacher_ckpt, built, tmp_path, monkeypatch):
    """Split BN (2 sub-batches) on: the key encoder's shuffle draws from the same generator in both runs.

    Exact on any CPU by construction. The rounded reference runs the teacher on
    the very batches the cache builder ran it on (the same images, stacked the
    same way: one view of 8 for SEED, both views as one batch of 16 for DisCo
    and Retro), in the same process with the same weights: the same operations
    on the same shapes, so its float32 embeddings are the builder's bit for bit
    and round to the same float16 values. The test checks that construction
    first, batch by batch. Without it the equality rests on luck: a SEED run
    reading the two-view cache computes its teacher on 8 images where the
    builder computed 16; oneDNN may block the convolutions differently by batch
    size (it does with AVX-512), the float32 results then differ in the last
    bit, and a value that sits on a float16 rounding boundary rounds the other
    way (issue 19).
    """
    cache = built[METHODS[method].num_views]
    plain, cached, rounded = tmp_path / "plain", tmp_path / "cached", tmp_path / "rounded"
    trainer = Trainer(config(shapes_root, teacher_ckpt, plain, method))
    initial = {k: v.clone() for k, v in student({"model": trainer.method.state_dict()}).items()}
    trainer.fit()
    cached_trainer = Trainer(config(shapes_root, teacher_ckpt, cached, method, f"teacher.cache={cache.out}"))
    cached_trainer.method.teacher.backbone.forward = None  # a cached run that ran the teacher's backbone would fail
    cached_trainer.fit()
    reference = Recorded(rounded_like_the_cache)
    monkeypatch.setattr(methods_base, "embed_views", reference)
    Trainer(config(shapes_root, teacher_ckpt, rounded, method)).fit()
    monkeypatch.undo()

    # The construction: the reference ran the teacher on the builder's batches, same shapes, same values.
    assert [b.shape for b in reference.batches] == [b.shape for b in cache.batches], "another batch composition"
    for step, (ours, builders) in enumerate(zip(reference.batches, cache.batches)):
        assert torch.equal(ours, builders), f"step {step + 1}: the reference's teacher saw other images than the builder's"
    a, b, c = (safe_load(out / "checkpoint_last.pth") for out in (plain, cached, rounded))
    # Exact: the cache changes nothing but the rounding of the embeddings.
    assert losses(cached) == losses(rounded)
    for key, value in b["model"].items():
        assert torch.equal(value, c["model"][key]), key
    # Within the rounding: step by step, and the student.
    assert [r["step"] for r in losses(plain)] == [r["step"] for r in losses(cached)] == list(range(1, STEPS + 1))
    # At step 1 both runs start from the same weights, so the rounding bound applies as it is; later
    # steps add how training amplifies a small change, a property of the run and not of the cache
    # (which the bit-for-bit comparison with the rounded run above pins at every step).
    plain_first, cached_first = losses(plain)[0], losses(cached)[0]
    for term, value in plain_first.items():
        assert abs(value - cached_first[term]) <= LOSS_TOLERANCE, (term, value, cached_first[term])
    moved = distance(student(a), initial)
    assert moved > 0
    # Amplified like the later losses: measured 1.2% for Retro after 4 steps on the plain shapes images.
    assert distance(student(a), student(b)) <= 0.05 * moved


@pytest.mark.exact
def test_a_resumed_cached_run_reads_the_steps_after_its_checkpoint(shapes_root, teacher_ckpt, cache, tmp_path):
    """Stopped after step 2 (its checkpoint) and resumed: the same final state, bit for bit, as the run in one go.

    Exact on any CPU: both runs read the same stored embeddings and do the same
    operations on the same shapes in the same order from the same state.
    """
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = (f"teacher.cache={cache}", "checkpoint.every=2", "checkpoint.keep=2")
    Trainer(config(shapes_root, teacher_ckpt, whole, "retro", *extra)).fit()
    Trainer(config(shapes_root, teacher_ckpt, resumed, "retro", *extra, f"resume={whole / 'checkpoint_0000002.pth'}")).fit()
    a, b = safe_load(whole / "checkpoint_last.pth"), safe_load(resumed / "checkpoint_last.pth")
    assert a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        (["seed=1"], "seed differs (cache: 0, this run: 1)"),
        (["data.image_size=48"], "image_size differs (cache: 32, this run: 48)"),
        (["data.crop_min_scale=0.5"], "crop_min_scale differs"),
        (["train.batch_size=4"], "batch_size differs (cache: 8, this run: 4)"),
        (["train.max_steps=5"], "max_steps: the cache holds 4 and this run needs 5"),
    ],
)  # fmt: skip
def test_a_cache_of_another_run_is_refused_naming_the_first_field_that_differs(change, field, shapes_root, teacher_ckpt, cache, tmp_path):
    cfg = config(shapes_root, teacher_ckpt, tmp_path / "run", "disco", f"teacher.cache={cache}", *change)
    with pytest.raises(ConfigError, match="was built for another run: " + re.escape(field)):
        Trainer(cfg)


def test_another_teacher_or_other_data_or_one_view_is_refused(shapes_root, teacher_ckpt, built, tmp_path):
    cache = built[2].out
    other_teacher = tmp_path / "other.pth.tar"
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["state_dict"]["module.encoder_q.fc.2.bias"] += 1.0
    torch.save(ckpt, other_teacher)
    cfg = config(shapes_root, other_teacher, tmp_path / "a", "retro", f"teacher.cache={cache}")
    with pytest.raises(ConfigError, match="teacher_sha256 differs"):
        Trainer(cfg)

    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for path in list_images(shapes_root / "unlabeled")[1:]:
        (fewer / path.name).write_bytes(path.read_bytes())
    cfg = config(shapes_root, teacher_ckpt, tmp_path / "b", "retro", f"teacher.cache={cache}", f"data.train_dir={fewer}")
    with pytest.raises(ConfigError, match="num_images differs \\(cache: 24, this run: 23\\)"):
        Trainer(cfg)

    one_view = built[1].out
    assert read_manifest(one_view)["run"]["views"] == 1
    with pytest.raises(ConfigError, match="views: the cache holds 1 and this run needs 2"):
        Trainer(config(shapes_root, teacher_ckpt, tmp_path / "c", "disco", f"teacher.cache={one_view}"))


def test_an_incomplete_cache_is_refused_naming_the_missing_shard(shapes_root, teacher_ckpt, cache, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in cache.iterdir():
        if path.name != shard_name(1):
            (partial / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ConfigError, match=f"is incomplete: 1 of the 2 shards this run reads are missing \\(first: {shard_name(1)}\\)"):
        Trainer(config(shapes_root, teacher_ckpt, tmp_path / "run", "retro", f"teacher.cache={partial}"))
    # A shorter run reads only the shard that is there.
    Trainer(config(shapes_root, teacher_ckpt, tmp_path / "short", "retro", f"teacher.cache={partial}", "train.max_steps=3"))


@pytest.mark.parametrize(
    "setting, message",
    [
        ("teacher.bn_train_mode=true", "cannot stand in for teacher.bn_train_mode=true: a teacher normalising with the statistics"),
        ("method=moco_v2", "method moco_v2 has no teacher; set teacher.cache=null"),
    ],
)  # fmt: skip
def test_a_batch_statistics_teacher_and_moco_v2_refuse_a_cache(setting, message, shapes_root, teacher_ckpt, cache, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config(shapes_root, teacher_ckpt, tmp_path, "retro", f"teacher.cache={cache}", setting)


def test_a_cache_path_that_is_not_a_cache_is_refused(shapes_root, teacher_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="teacher.cache is empty"):
        config(shapes_root, teacher_ckpt, tmp_path, "retro", "teacher.cache=''")
    with pytest.raises(ConfigError, match="is not a folder; build it with"):
        config(shapes_root, teacher_ckpt, tmp_path, "retro", f"teacher.cache={tmp_path / 'absent'}")
    with pytest.raises(ConfigError, match="has no manifest.json, so it is not a teacher cache"):
        config(shapes_root, teacher_ckpt, tmp_path, "retro", f"teacher.cache={tmp_path}")


def test_the_builder_refuses_a_batch_statistics_teacher_and_another_runs_folder(shapes_root, teacher_ckpt, cache, tmp_path):
    with pytest.raises(ConfigError, match="teacher.bn_train_mode=true normalises with the statistics of each batch"):
        build_cache(config(shapes_root, teacher_ckpt, tmp_path, "retro", "teacher.bn_train_mode=true"), tmp_path / "c")
    with pytest.raises(ConfigError, match="holds a teacher cache of another run or layout: seed differs"):
        build_cache(config(shapes_root, teacher_ckpt, tmp_path, "retro", "seed=3"), cache, steps_per_shard=3)
    with pytest.raises(ConfigError, match="holds a teacher cache of another run or layout: dtype differs"):
        build_cache(config(shapes_root, teacher_ckpt, tmp_path, "retro"), cache, dtype="int8", steps_per_shard=3)


def test_the_tools_refuse_in_one_line(shapes_root, teacher_ckpt, cache, tmp_path):
    """tools/cache_teacher.py with a moco_v2 config and tools/distill.py with a cache of another run: exit 2, one line."""
    base = overrides(shapes_root, teacher_ckpt, tmp_path / "run")
    build = subprocess.Popen(
        [sys.executable, "tools/cache_teacher.py", "--config", "shapes_moco_v2_effb0", *base, "--out", str(tmp_path / "c")],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "tools/distill.py", "--config", "shapes_seed_effb0", *base, "seed=5", f"teacher.cache={cache}"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    expected = {build: "method moco_v2 has no teacher, so there is nothing to cache", run: "seed differs (cache: 0, this run: 5)"}
    for proc, message in expected.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


# -- building ----------------------------------------------------------------------------------


@pytest.mark.exact
def test_a_stopped_build_continues_at_the_missing_shards(shapes_root, teacher_ckpt, cache, tmp_path):
    """Shards 0 and 1 written, shard 2 cut short by a kill (its temporary left), shard 3 not begun: the rerun writes 2 and 3 only.

    Exact on any CPU: one step a shard, so every shard, in either build, is
    the teacher run on one global batch of the same images and shape.
    """
    cfg = config(shapes_root, teacher_ckpt, tmp_path / "unused")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    build_cache(cfg, whole, steps_per_shard=1)
    build_cache(cfg, stopped, steps_per_shard=1)
    for k in (2, 3):
        (stopped / shard_name(k)).unlink()
    (stopped / f".{shard_name(2)}.12345.0123abcd.tmp").write_bytes(b"partial")
    kept = {k: (stopped / shard_name(k)).stat() for k in (0, 1)}

    summary = build_cache(cfg, stopped, steps_per_shard=1)
    assert summary["computed_here"] == 2
    for k in (0, 1):
        now = (stopped / shard_name(k)).stat()
        assert (now.st_ino, now.st_mtime_ns) == (kept[k].st_ino, kept[k].st_mtime_ns), f"shard {k} was rewritten"
    assert sorted(p.name for p in stopped.iterdir()) == sorted(p.name for p in whole.iterdir())
    for k in range(4):
        assert torch.equal(safe_load(stopped / shard_name(k))["embeddings"], safe_load(whole / shard_name(k))["embeddings"]), k


def test_two_processes_write_the_same_cache_as_one(shapes_root, teacher_ckpt, cache, tmp_path):
    """``torchrun --nproc_per_node 2``: each process writes its own shards; together the cache of one process."""
    out = tmp_path / "two"
    args = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "tools/cache_teacher.py",
            "--config", "shapes_retro_effb0", *overrides(shapes_root, teacher_ckpt, tmp_path / "run"), "--out", str(out),
            "--steps-per-shard", "1"]  # fmt: skip
    result = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    computed = [int(n) for n in re.findall(r"this process computed (\d+) of them", result.stdout)]
    assert sorted(computed) == [2, 2], result.stdout  # shards 0, 2 and 1, 3
    assert read_manifest(out)["run"] == read_manifest(cache)["run"]
    one, two = TeacherCache(cache, read_manifest(cache), 2), TeacherCache(out, read_manifest(out), 2)
    for step in range(STEPS):
        for a, b in zip(one.embeddings(step, 0, 1, torch.device("cpu")), two.embeddings(step, 0, 1, torch.device("cpu"))):
            # One thread there, two here: float32 noise can flip a float16 rounding, by one step of 2^-11.
            torch.testing.assert_close(a, b, rtol=FP16_AFTER_RENORM, atol=1e-6)


# -- shard records (issue 23, point 4) ---------------------------------------------------------


@pytest.fixture(scope="module")
def one_step_shards(shapes_root, teacher_ckpt, tmp_path_factory):
    """Two 4-shard caches (one step a shard) of the retro config: seed 0 and seed 1, the same shapes."""
    root = tmp_path_factory.mktemp("one_step")
    for seed in (0, 1):
        build_cache(config(shapes_root, teacher_ckpt, root / "unused", "retro", f"seed={seed}"), root / f"seed{seed}",
                    steps_per_shard=1)
    return root


@pytest.mark.parametrize("replacement", ["neighbour", "zeros", "another_run"])
def test_a_shard_swapped_for_one_of_the_same_shape_is_refused_when_opened(replacement, one_step_shards, shapes_root,
                                                                          teacher_ckpt, tmp_path):
    """It used to train on the wrong targets and exit 0: each shard's SHA-256 is in the manifest and checked."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for path in (one_step_shards / "seed0").iterdir():
        (cache / path.name).write_bytes(path.read_bytes())
    assert sorted(read_manifest(cache)["shards"]) == [shard_name(k) for k in range(STEPS)]
    assert not list(cache.glob("shard_*.json")), "the builder's per-shard records are merged into the manifest"
    victim = cache / shard_name(1)
    if replacement == "neighbour":
        victim.write_bytes((cache / shard_name(2)).read_bytes())
    elif replacement == "zeros":
        torch.save({"embeddings": torch.zeros_like(safe_load(victim)["embeddings"])}, victim)
    else:
        victim.write_bytes((one_step_shards / "seed1" / shard_name(1)).read_bytes())
    reader = TeacherCache(cache, read_manifest(cache), views=2)
    reader.embeddings(0, 0, 1, torch.device("cpu"))  # shard 0 is untouched
    with pytest.raises(CheckpointError) as err:
        reader.embeddings(1, 0, 1, torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and f"{victim} (steps 1-1) is not the shard the cache's manifest records" in message
    assert f"delete it and run `python tools/cache_teacher.py --config CONFIG [the same key=value ...] --out {cache}`" in message
    if replacement == "zeros":  # through a run: refused at the step that opens the shard
        with pytest.raises(CheckpointError, match="is not the shard the cache's manifest records"):
            Trainer(config(shapes_root, teacher_ckpt, tmp_path / "run", "retro", f"teacher.cache={cache}")).fit()


def test_a_killed_build_continues_from_its_shard_records(one_step_shards, shapes_root, teacher_ckpt, tmp_path):
    """Killed after shard 2's file but before its record: the rerun keeps shards 0 and 1 and computes 2 and 3."""
    cfg = config(shapes_root, teacher_ckpt, tmp_path / "unused", "retro")
    out = tmp_path / "killed"
    recorded = []

    def killed_at_the_third(path, steps):
        if len(recorded) == 2:
            raise KeyboardInterrupt
        recorded.append(path.name)
        return shard_record(path, steps)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(cache_builder, "shard_record", killed_at_the_third)
        build_cache(cfg, out, steps_per_shard=1)
    assert "shards" not in read_manifest(out) and (out / shard_name(2)).is_file()
    with pytest.raises(ConfigError, match="is incomplete: 4 of the 4 shards"):  # nothing recorded in the manifest yet
        TeacherCache(out, read_manifest(out), views=2).check_complete(STEPS)

    assert build_cache(cfg, out, steps_per_shard=1)["computed_here"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (one_step_shards / "seed0").iterdir())
    whole = TeacherCache(one_step_shards / "seed0", read_manifest(one_step_shards / "seed0"), views=2)
    resumed = TeacherCache(out, read_manifest(out), views=2)
    resumed.check_complete(STEPS)
    for step in range(STEPS):  # each shard passes its SHA-256 check, and holds the whole build's embeddings
        for a, b in zip(resumed.embeddings(step, 0, 1, torch.device("cpu")), whole.embeddings(step, 0, 1, torch.device("cpu"))):
            torch.testing.assert_close(a, b, rtol=FP16_AFTER_RENORM, atol=1e-6)


def test_the_builder_names_a_jpeg_cut_short(shapes_root, teacher_ckpt, tmp_path):
    """tools/cache_teacher.py crashed with "image file is truncated" at the batch that held it (issue 23, point 10)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in list_images(shapes_root / "unlabeled"):
        (folder / path.name).write_bytes(path.read_bytes())
    cut = sorted(folder.glob("*.jpg"))[5]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    cfg = config(shapes_root, teacher_ckpt, tmp_path / "unused", "retro", f"data.train_dir={folder}")
    with pytest.raises(ConfigError, match=rf"1 of 24 files in data.train_dir are not readable images: {cut} .*truncated"):
        build_cache(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
