"""Pipeline stages up to the distilled students: data, teacher, distillation, linear probe and k-NN.

Each stage is a command of the repository's tools (a :class:`ToolCall`),
which the report prints and the stage runs in this process (start-up of a
fresh Python with torch costs several seconds on a small machine, and the
smoke preset has a budget of minutes): through the tool's ``main`` where the
tool does the whole job, else through the tool's own parser and the library
call its ``main`` makes, for what the tool does not keep (per-image results).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from distill.config import load_config
from retro_transfer.data.shapes import CLASSES, ShapesConfig

from .runner import Context, Stage, ToolCall, read_json, save_json
from .settings import SettingsError

METHODS = ("moco_v2", "seed", "disco", "retro")
TEACHER_FILE = "checkpoint_last.pth.tar"
ENGINE_CHECKPOINT = "checkpoint_last.pth"  # the distillation engine's last checkpoint in a run folder


def data_dir(ctx: Context) -> Path:
    return ctx.folder("data") / "shapes"


def teacher_file(ctx: Context) -> Path:
    """The teacher the students learn from: the user's file (``--teacher``), else the one the teacher stage trains."""
    given = ctx.preset.get("teacher_path")
    return Path(given) if given else ctx.folder("teacher") / TEACHER_FILE


def student_file(ctx: Context, method: str) -> Path:
    return ctx.folder(f"distill_{method}") / ENGINE_CHECKPOINT


def read_log(folder: Path) -> List[Dict]:
    """The JSON-lines training log a run wrote."""
    path = folder / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _last_terms(folder: Path) -> Dict:
    log = read_log(folder)
    if not log:
        return {}
    last = log[-1]
    return {k: v for k, v in last.items() if k not in ("lr",) and isinstance(v, (int, float)) and math.isfinite(v)}


# -- data -----------------------------------------------------------------------------------


def _data_call(ctx: Context, folder: Path) -> ToolCall:
    p = ctx.preset
    return ToolCall("tools/make_shapes.py", ["--out", data_dir(ctx), "--num-images", p["num_images"],
                                             "--size", p["image_side"], "--seed", p["seed"]])


def _data(ctx: Context, folder: Path, call: ToolCall) -> Dict:
    args = call.parse()
    call.main(folder)
    cfg = ShapesConfig(num_images=args.num_images, size=args.size, seed=args.seed)
    return {"classes": len(CLASSES), "voc_images": cfg.num_images, "image_side": cfg.size, "classification_train": cfg.num_classification_train,
            "classification_val": cfg.num_classification_val, "unlabeled": cfg.num_unlabeled}


# -- teacher and students -------------------------------------------------------------------


def _overrides(ctx: Context, folder: Path, steps: int) -> List[str]:
    p = ctx.preset
    return [
        f"output_dir={folder}",
        f"data.train_dir={data_dir(ctx) / 'unlabeled'}",
        f"data.image_size={p['crop']}",
        f"data.num_workers={p['workers']}",
        f"train.batch_size={p['batch_size']}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        f"loss.queue_size={p['queue_size']}",
        # A momentum suited to the run's length: at 0.999 the key encoder of a few hundred
        # steps would still be mostly its initialisation (0.999^300 = 0.74).
        f"loss.momentum={p['ema_momentum']}",
        f"checkpoint.every={steps}",
        "checkpoint.keep=0",
        f"log.every={max(1, steps // 50)}",
        "log.tensorboard=false",
        f"seed={p['seed']}",
        # The online k-NN monitor on the classification split: the accuracy curves of the report.
        f"eval.knn_data={data_dir(ctx) / 'classification'}",
        f"eval.every={max(1, steps // p['knn_points'])}",
        f"eval.knn_k={p['knn_k']}",
    ]


# The demo's teacher recipes (``teacher_recipe`` in the presets, ``--teacher-recipe`` on the command line).
TEACHER_CONFIGS = {"supcon": "configs/teacher/shapes_supcon_r18.yaml", "moco_v2": "configs/teacher/shapes_moco_v2_r50.yaml"}
#: The teacher's provenance in plain words, for the first line of the report.
PROVENANCE = {
    "supcon": ("The teacher was trained **with labels** (supervised contrastive learning, SupCon, on the labelled "
               "classification split): a stand-in for the large self-supervised teacher a user brings. "
               "The students never see a label; only the evaluation below uses them."),
    "moco_v2": ("The teacher was trained self-supervised (MoCo v2 on the unlabeled images), as the students are "
                "distilled: no network sees a label before the evaluation below."),
    "user": "The teacher is the user's checkpoint {path} ({family} layout, {arch}). The students never see a label; only the evaluation below uses them.",
}


def _teacher_overrides(ctx: Context, folder: Path) -> List[str]:
    """The teacher's run: the shared settings, then its recipe's.

    moco_v2: with seven classes one negative in seven is the query's own class,
    and at MoCo v2's temperature (0.2) pushing those away erases the class; a
    higher temperature and a short queue weaken that pressure, and a lower
    learning rate keeps the loss from climbing back to chance (probes in
    BENCHMARKS.md). supcon: the labelled split, where every same-class key of
    the batch and the queue is a positive, so a long queue helps.
    """
    p = ctx.preset
    if p["teacher_recipe"] == "supcon":
        shared = [o for o in _overrides(ctx, folder, p["supcon_steps"]) if not o.startswith("data.train_dir=")]
        return shared + [
            f"student.arch={p['teacher_arch']}",
            f"data.train_dir={data_dir(ctx) / 'classification' / 'train'}",
            f"train.lr={p['supcon_lr']}",
            f"loss.temperature={p['supcon_temperature']}",
            f"loss.momentum={p['supcon_momentum']}",
        ]
    return _overrides(ctx, folder, p["teacher_steps"]) + [
        f"student.arch={p['teacher_arch']}",
        f"train.lr={p['teacher_lr']}",
        f"loss.temperature={p['teacher_temperature']}",
        f"loss.queue_size={p['teacher_queue']}",
    ]


def _teacher_call(ctx: Context, folder: Path) -> ToolCall:
    return _config_call("tools/pretrain_teacher.py", TEACHER_CONFIGS[ctx.preset["teacher_recipe"]], _teacher_overrides(ctx, folder),
                        note="the stage then deletes the engine's checkpoint_last.pth, which the teacher file repeats")


def _teacher(ctx: Context, folder: Path, call: ToolCall) -> Dict:
    args = call.parse()
    cfg = load_config(args.config, args.overrides)
    call.main(folder)
    (Path(cfg.output_dir) / ENGINE_CHECKPOINT).unlink()  # the exported teacher holds it all; keep the disk small
    return {"arch": cfg.student.arch, "recipe": ctx.preset["teacher_recipe"], "steps": cfg.train.max_steps,
            **_last_terms(folder)}


def _given_teacher(ctx: Context, folder: Path, calls: str) -> Dict:
    """``--teacher PATH``: nothing to train; the stage records what the file is (checked when the run started)."""
    return {**describe_teacher(Path(ctx.preset["teacher_path"])), "recipe": "user"}


def describe_teacher(path: Path) -> Dict:
    """A user's teacher file, loaded once with its head: arch and layout, or a one-line refusal with the fix.

    The demo builds the teacher's random-init floor with timm, so the teacher
    must be one of the torchvision ResNets both know (not a widened ResNet).
    """
    from retro_transfer.safe_io import CheckpointError
    from retro_transfer.teacher_loading import load_teacher

    teacher, report = load_teacher(path, require_head=True)
    if teacher.arch not in DEMO_TEACHER_ARCHS:
        raise CheckpointError(
            f"--teacher {path}: a {teacher.arch} teacher, which the demo cannot use (its presets build the random-init "
            f"floor of {', '.join(DEMO_TEACHER_ARCHS)} only); distil from it with tools/distill.py teacher.checkpoint={path}"
        )
    return {"arch": teacher.arch, "family": report.format, "path": str(path)}


#: Teacher architectures the demo can use: a random-init floor needs the same network from timm.
DEMO_TEACHER_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def use_teacher(settings: Dict, path: str) -> Dict:
    """The settings of a run on the user's teacher file: its path and architecture replace the recipe's."""
    path = Path(path).absolute()
    return {**settings, "teacher_path": str(path), "teacher_arch": describe_teacher(path)["arch"], "teacher_recipe": "user"}


STUDENT_ARCH = "efficientnet_b0"  # the student of every configs/distill/shapes_<method>_effb0.yaml


def _distill_config(method: str) -> str:
    return f"configs/distill/shapes_{method}_effb0.yaml"


def _distill_overrides(ctx: Context, folder: Path, method: str) -> List[str]:
    extra = [f"teacher.checkpoint={teacher_file(ctx)}", f"teacher.arch={ctx.preset['teacher_arch']}"]
    if method in CACHED_METHODS:
        extra.append(f"teacher.cache={ctx.folder(TEACHER_CACHE)}")
    return _overrides(ctx, folder, ctx.preset["distill_steps"]) + (extra if method != "moco_v2" else [])


# -- the teacher-embedding cache: the teacher runs once for the three methods that distil from it ------

TEACHER_CACHE = "teacher_cache"
CACHED_METHODS = ("seed", "disco", "retro")
# Retro's config has two views an image, which serve SEED (it reads the first) as well.
CACHE_CONFIG_METHOD = "retro"


def _cache_overrides(ctx: Context) -> List[str]:
    """The distillation stages' own settings (so the cache matches them), without a run folder or the cache itself."""
    kept = _overrides(ctx, ctx.folder(TEACHER_CACHE), ctx.preset["distill_steps"])
    return [o for o in kept if not o.startswith("output_dir=")] + [
        f"teacher.checkpoint={teacher_file(ctx)}", f"teacher.arch={ctx.preset['teacher_arch']}"
    ]


def _teacher_cache_call(ctx: Context, folder: Path) -> ToolCall:
    return _config_call("tools/cache_teacher.py", _distill_config(CACHE_CONFIG_METHOD), _cache_overrides(ctx), "--out", folder)


def _teacher_cache(ctx: Context, folder: Path, call: ToolCall) -> Dict:
    """The tool's work without its closing sentence: the stage records the builder's summary."""
    from distill.cache_builder import build_cache

    args = call.parse()
    return build_cache(load_config(args.config, args.overrides), args.out, args.dtype, args.steps_per_shard)


def _distill_call(method: str):
    return lambda ctx, folder: _config_call("tools/distill.py", _distill_config(method), _distill_overrides(ctx, folder, method))


def _distill(ctx: Context, folder: Path, call: ToolCall) -> Dict:
    args = call.parse()
    cfg = load_config(args.config, args.overrides)
    call.main(folder)
    return {"method": cfg.method, "student": cfg.student.arch, "steps": cfg.train.max_steps, **method_settings(cfg),
            **_last_terms(folder)}


def method_settings(cfg) -> Dict:
    """The settings the report states beside a method's losses: the consistency weight, Retro's mean student."""
    settings = {"mse_weight": cfg.loss.mse_weight} if cfg.method in ("disco", "retro") else {}
    if cfg.method == "retro":
        settings["adapter_ema"] = cfg.adapter.ema
    return settings


# -- evaluation -----------------------------------------------------------------------------

EVAL_BATCH = 64


def evaluate_frozen(encoder, root: Path, image_size: int, k: int, seed: int) -> Dict:
    """k-NN and the standardised linear probe of a frozen encoder, both on centre-crop features computed once.

    The probe (:func:`distill.evaluation.linear_probe`) standardises features and
    chooses its L2 strength on held-out training images, so its numbers compare
    across backbones whatever their feature scale; the choice is recorded.
    """
    from distill.evaluation import eval_transform, extract_features, image_folder, knn_classify, linear_probe, make_loader, topk_accuracy

    transform = eval_transform(image_size)
    train = image_folder(root, "train", transform)
    val = image_folder(root, "val", transform)
    train_feats, train_labels = extract_features(encoder, make_loader(train, EVAL_BATCH, shuffle=False))
    val_feats, val_labels = extract_features(encoder, make_loader(val, EVAL_BATCH, shuffle=False))
    k = min(k, len(train))
    knn_scores = knn_classify(train_feats, train_labels, val_feats, len(train.classes), k=k)
    knn = topk_accuracy(knn_scores, val_labels)
    probe = linear_probe(train_feats, train_labels, val_feats, val_labels, len(train.classes), seed=seed)
    per_image = {"linear": probe["val_correct"], "knn": (knn_scores.argmax(dim=1) == val_labels).int().tolist()}
    return {"knn_top1": knn["top1"], "knn_k": k, "linear_top1": probe["top1"], "linear_top5": probe["top5"],
            "linear_weight_decay": probe["weight_decay"], "num_val": len(val), "per_image": per_image}


def random_encoder(arch: str, seed: int):
    """A randomly initialised timm backbone (pooled features, eval mode): the floor a pretrained one must beat."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=0).eval().requires_grad_(False)


def _random_archs(ctx: Context) -> List[str]:
    return [ctx.preset["teacher_arch"], STUDENT_ARCH]


PER_IMAGE = "per_image.json"


def _eval_calls(checkpoint_of, which_list):
    """tools/linear_eval.py and tools/knn_eval.py on each of ``which_list``'s features (backbone, adapter)."""

    def calls(ctx: Context, folder: Path) -> Tuple[ToolCall, ...]:
        p = ctx.preset
        common = [checkpoint_of(ctx), "--data", data_dir(ctx) / "classification", "--batch-size", EVAL_BATCH,
                  "--image-size", p["crop"], "--workers", p["workers"]]
        out = []
        for which in which_list:
            out.append(ToolCall("tools/linear_eval.py", [*common, "--features", which, "--seed", p["seed"],
                                                         "--out", folder / f"linear_{which}.json"]))
            out.append(ToolCall("tools/knn_eval.py", [*common, "--features", which, "--k", p["knn_k"],
                                                      "--out", folder / f"knn_{which}.json"]))
        return tuple(out)

    return calls


def _evaluate(ctx: Context, folder: Path, calls: Tuple[ToolCall, ...]) -> Dict:
    """Run each tool, then gather what they wrote: per features, both protocols' numbers; per image, beside them."""
    results, per_image = {}, {}
    for linear_call, knn_call in zip(calls[::2], calls[1::2]):
        linear, knn = (_run_for_json(call, folder) for call in (linear_call, knn_call))
        which = linear["args"]["features"]
        results[which] = {"features": which, "dim": linear["info"]["dim"], "knn_top1": knn["metrics"]["top1"],
                          "knn_k": knn["knn"]["k"], "linear_top1": linear["metrics"]["top1"],
                          "linear_top5": linear["metrics"]["top5"], "linear_weight_decay": linear["probe"]["weight_decay"],
                          "num_val": linear["probe"]["num_val"]}
        per_image[which] = {"linear": linear["probe"]["val_correct"], "knn": knn["knn"]["val_correct"]}
    # Per-image correctness (for the report's intervals) beside the record, not in it.
    save_json(per_image, folder / PER_IMAGE)
    return results


def _run_for_json(call: ToolCall, folder: Path) -> Dict:
    """Run a tool that writes its results to ``--out`` and read them back."""
    call.main(folder)
    return read_json(call.parse().out)


def _eval_random_call(ctx: Context, folder: Path) -> ToolCall:
    p = ctx.preset
    return ToolCall("bench/random_init_probe.py", ["--data", data_dir(ctx) / "classification", "--archs", *_random_archs(ctx),
                                                   "--image-size", p["crop"], "--seeds", p["seed"], "--k", p["knn_k"],
                                                   "--out", folder / "result.json"])


def _eval_random(ctx: Context, folder: Path, call: ToolCall) -> Dict:
    """The same evaluation of randomly initialised teacher and student networks, keyed by architecture."""
    rows = _run_for_json(call, folder)["rows"]
    results = {row["arch"]: {"features": "backbone", **{k: v for k, v in row.items() if k not in ("arch", "seed")}}
               for row in rows}
    save_json({arch: r.pop("per_image") for arch, r in results.items()}, folder / PER_IMAGE)
    return results


# The 10%-label fine-tune, sized for a few dozen labelled images of 48 px on a CPU:
# the head starts from the standardised probe fitted on the labelled images (so the
# classifier's learning rate acts on standardised features, whatever the backbone's
# scale), BatchNorm keeps its running statistics (a batch of 16 estimates them badly),
# and AdamW with small learning rates refines the probe rather than erasing it. SGD
# diverged: the standardisation divides the gradient reaching the backbone by the
# features' spread (the quick preset's ResNet-18 teacher at a backbone lr of 0.01, its
# SEED student even at 1e-4), and Adam's step does not grow with the gradient.
SEMISUP_RECIPE = dict(batch_size=16, lr_backbone=1e-4, lr_classifier=1e-3, schedule="cosine", head_init="probe", bn="frozen",
                      optimizer_name="adamw")


def _semisup_call(checkpoint_of):
    """tools/semisup_eval.py: the network fine-tuned whole on 10% of the labels (SEED's and DisCo's semi-supervised protocol)."""

    def call(ctx: Context, folder: Path) -> ToolCall:
        p, r = ctx.preset, SEMISUP_RECIPE
        return ToolCall("tools/semisup_eval.py", [
            checkpoint_of(ctx), "--data", data_dir(ctx) / "classification", "--label-fraction", 0.1,
            "--epochs", p["semisup_epochs"], "--batch-size", r["batch_size"], "--lr-backbone", r["lr_backbone"],
            "--lr-classifier", r["lr_classifier"], "--schedule", r["schedule"], "--head-init", r["head_init"],
            "--bn", r["bn"], "--optimizer", r["optimizer_name"], "--image-size", p["crop"], "--workers", p["workers"],
            "--seed", p["seed"], "--out", folder / "result.json"])

    return call


def _semisup(ctx: Context, folder: Path, call: ToolCall) -> Dict:
    """The tool's fine-tune; each validation image's correctness goes beside the record."""
    result = _run_for_json(call, folder)
    finetune, labelled = result["finetune"], result["labelled"]
    save_json({"backbone": {"semisup": finetune["val_correct"]}}, folder / PER_IMAGE)
    recipe = {key: finetune[key] for key in ("batch_size", "lr_backbone", "lr_classifier", "schedule", "head_init", "bn")}
    return {"label_fraction": labelled["requested_fraction"], "labelled": labelled["count"], "epochs": finetune["epochs"],
            "top1": result["metrics"]["top1"], "top5": result["metrics"]["top5"], "head_probe": finetune["head_probe"],
            "optimizer_name": finetune["optimizer"], **recipe}


def _config_call(script: str, config: str, overrides: List[str], *options, note: str = "") -> ToolCall:
    """A tool that takes ``--config``, ``key=value`` overrides and ``options`` (distill, pretrain_teacher, cache_teacher)."""
    return ToolCall(script, ["--config", config, *overrides, *options], note)


def _teacher_stage(p: Dict) -> Stage:
    if p["teacher_recipe"] == "user":
        return Stage("teacher", lambda ctx, f: f"(given with --teacher) {p['teacher_path']}", _given_teacher,
                     title=f"the user's {p['teacher_arch']} teacher, {p['teacher_path']}")
    if p["teacher_recipe"] not in TEACHER_CONFIGS:
        raise SettingsError(f"teacher_recipe {p['teacher_recipe']!r}: choose one of {', '.join(TEACHER_CONFIGS)}")
    words = {"supcon": "SupCon (with labels)", "moco_v2": "MoCo v2 (self-supervised)"}[p["teacher_recipe"]]
    return Stage("teacher", _teacher_call, _teacher, deps=("data",), title=f"{words} pretraining of a {p['teacher_arch']} teacher")


def upstream_stages(preset: Dict) -> List[Stage]:
    """Stages from data to evaluated students, in order."""
    p = preset
    stages = [Stage("data", _data_call, _data, title="generate the shapes data set"), _teacher_stage(p)]
    stages.append(Stage(TEACHER_CACHE, _teacher_cache_call, _teacher_cache, deps=("data", "teacher"),
                        title="the teacher's embeddings of every view, once for seed, disco and retro"))
    for method in METHODS:
        deps = ("data",) if method == "moco_v2" else ("data", "teacher", TEACHER_CACHE)
        stages.append(Stage(f"distill_{method}", _distill_call(method), _distill, deps=deps,
                            title=f"distil EfficientNet-B0 with {method}"))
    stages.append(Stage("eval_random", _eval_random_call, _eval_random, deps=("data",),
                        title="linear probe and k-NN: randomly initialised teacher and student networks"))
    stages.append(Stage("eval_teacher", _eval_calls(teacher_file, ["backbone"]), _evaluate, deps=("data", "teacher"),
                        title="linear probe and k-NN: teacher"))
    if p.get("semisup_epochs"):
        stages.append(Stage("semisup_teacher", _semisup_call(teacher_file), _semisup, deps=("data", "teacher"),
                            title="fine-tuning on 10% of the labels: teacher"))
    for method in METHODS:
        which = ["backbone", "adapter"] if method == "retro" else ["backbone"]
        checkpoint = lambda ctx, m=method: student_file(ctx, m)  # noqa: E731
        stages.append(Stage(f"eval_{method}", _eval_calls(checkpoint, which), _evaluate,
                            deps=("data", f"distill_{method}"), title=f"linear probe and k-NN: {method} student"))
        if p.get("semisup_epochs"):
            stages.append(Stage(f"semisup_{method}", _semisup_call(checkpoint), _semisup,
                                deps=("data", f"distill_{method}"), title=f"fine-tuning on 10% of the labels: {method} student"))
    return stages
