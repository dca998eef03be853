"""Pipeline stages up to the distilled students: data, teacher, distillation, linear probe and k-NN.

Each stage runs in this process through the same library calls the command
line tools make (start-up of a fresh Python with torch costs several seconds
on a small machine, and the smoke preset has a budget of minutes), and
records the equivalent command for the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import torch

from distill.config import load_config
from distill.engine import Trainer
from distill.teacher_export import to_moco_v2_release
from distill.checkpoint import load_encoder
from retro_transfer.safe_io import safe_load, save_atomic
from retro_transfer.data.shapes import CLASSES, ShapesConfig, generate

from .runner import Context, Stage, save_json
from .settings import SettingsError

METHODS = ("moco_v2", "seed", "disco", "retro")
TEACHER_FILE = "checkpoint_last.pth.tar"


def data_dir(ctx: Context) -> Path:
    return ctx.folder("data") / "shapes"


def teacher_file(ctx: Context) -> Path:
    """The teacher the students learn from: the user's file (``--teacher``), else the one the teacher stage trains."""
    given = ctx.preset.get("teacher_path")
    return Path(given) if given else ctx.folder("teacher") / TEACHER_FILE


def student_file(ctx: Context, method: str) -> Path:
    return ctx.folder(f"distill_{method}") / "checkpoint_last.pth"


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


def _data(ctx: Context, folder: Path) -> Dict:
    p = ctx.preset
    cfg = ShapesConfig(num_images=p["num_images"], size=p["image_side"], seed=p["seed"])
    generate(data_dir(ctx), cfg)
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


def _teacher(ctx: Context, folder: Path) -> Dict:
    recipe = ctx.preset["teacher_recipe"]
    cfg = load_config(TEACHER_CONFIGS[recipe], _teacher_overrides(ctx, folder))
    final = Trainer(cfg).fit()
    save_atomic(to_moco_v2_release(safe_load(final)), folder / TEACHER_FILE)
    final.unlink()  # the exported file is the teacher; the engine checkpoint would double the disk use
    return {"arch": ctx.preset["teacher_arch"], "recipe": recipe, "steps": cfg.train.max_steps, **_last_terms(folder)}


def _teacher_command(ctx: Context, folder: Path) -> str:
    return _cli("pretrain_teacher.py", TEACHER_CONFIGS[ctx.preset["teacher_recipe"]], _teacher_overrides(ctx, folder))


def _given_teacher(ctx: Context, folder: Path) -> Dict:
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


def _teacher_cache(ctx: Context, folder: Path) -> Dict:
    from distill.cache_builder import build_cache

    return build_cache(load_config(_distill_config(CACHE_CONFIG_METHOD), _cache_overrides(ctx)), folder)


def _teacher_cache_command(ctx: Context, folder: Path) -> str:
    return f"{_cli('cache_teacher.py', _distill_config(CACHE_CONFIG_METHOD), _cache_overrides(ctx))} --out {folder}"


def _distill(method: str):
    def run(ctx: Context, folder: Path) -> Dict:
        cfg = load_config(_distill_config(method), _distill_overrides(ctx, folder, method))
        Trainer(cfg).fit()
        return {"method": method, "student": cfg.student.arch, "steps": cfg.train.max_steps, **method_settings(cfg),
                **_last_terms(folder)}

    return run


def method_settings(cfg) -> Dict:
    """The settings the report states beside a method's losses: the consistency weight, Retro's mean student."""
    settings = {"mse_weight": cfg.loss.mse_weight} if cfg.method in ("disco", "retro") else {}
    if cfg.method == "retro":
        settings["adapter_ema"] = cfg.adapter.ema
    return settings


# -- evaluation -----------------------------------------------------------------------------


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
    train_feats, train_labels = extract_features(encoder, make_loader(train, 64, shuffle=False))
    val_feats, val_labels = extract_features(encoder, make_loader(val, 64, shuffle=False))
    k = min(k, len(train))
    knn_scores = knn_classify(train_feats, train_labels, val_feats, len(train.classes), k=k)
    knn = topk_accuracy(knn_scores, val_labels)
    probe = linear_probe(train_feats, train_labels, val_feats, val_labels, len(train.classes), seed=seed)
    per_image = {"linear": probe["val_correct"], "knn": (knn_scores.argmax(dim=1) == val_labels).int().tolist()}
    return {"knn_top1": knn["top1"], "knn_k": k, "linear_top1": probe["top1"], "linear_top5": probe["top5"],
            "linear_weight_decay": probe["weight_decay"], "num_val": len(val), "per_image": per_image}


def _evaluate_encoder(ctx: Context, encoder, dim: int, which: str) -> Dict:
    p = ctx.preset
    result = evaluate_frozen(encoder, data_dir(ctx) / "classification", p["crop"], p["knn_k"], p["seed"])
    return {"features": which, "dim": dim, **result}


def _evaluate(ctx: Context, checkpoint: Path, which: str) -> Dict:
    encoder, info = load_encoder(checkpoint, which)
    return _evaluate_encoder(ctx, encoder, info["dim"], which)


def random_encoder(arch: str, seed: int):
    """A randomly initialised timm backbone (pooled features, eval mode): the floor a pretrained one must beat."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=0).eval().requires_grad_(False)


def _random_archs(ctx: Context) -> List[str]:
    return [ctx.preset["teacher_arch"], STUDENT_ARCH]


PER_IMAGE = "per_image.json"


def _eval_stage(model: str, checkpoint_of, which_list):
    def run(ctx: Context, folder: Path) -> Dict:
        results = {which: _evaluate(ctx, checkpoint_of(ctx), which) for which in which_list}
        # Per-image correctness (for the report's intervals) beside the record, not in it.
        save_json({which: r.pop("per_image") for which, r in results.items()}, folder / PER_IMAGE)
        return results

    return run


def _eval_random(ctx: Context, folder: Path) -> Dict:
    """The same evaluation of randomly initialised teacher and student networks, keyed by architecture."""
    results = {}
    for arch in _random_archs(ctx):
        encoder = random_encoder(arch, ctx.preset["seed"])
        results[arch] = _evaluate_encoder(ctx, encoder, encoder.num_features, "backbone")
    save_json({arch: r.pop("per_image") for arch, r in results.items()}, folder / PER_IMAGE)
    return results


def _eval_random_command(ctx: Context, folder: Path) -> str:
    p = ctx.preset
    return (f"python bench/random_init_probe.py --data {data_dir(ctx) / 'classification'} --archs {' '.join(_random_archs(ctx))} "
            f"--image-size {p['crop']} --seeds {p['seed']} --k {p['knn_k']} "
            f"--out {folder / 'result.json'}")


def _eval_command(checkpoint_of, which_list):
    def command(ctx: Context, folder: Path) -> str:
        p, ckpt, data = ctx.preset, checkpoint_of(ctx), data_dir(ctx) / "classification"
        parts = []
        for which in which_list:
            parts.append(
                f"python tools/linear_eval.py {ckpt} --data {data} --features {which} "
                f"--batch-size 64 --image-size {p['crop']} --seed {p['seed']}"
            )
            parts.append(f"python tools/knn_eval.py {ckpt} --data {data} --features {which} --k {p['knn_k']} --image-size {p['crop']}")
        return " && ".join(parts)

    return command


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


def _semisup_stage(checkpoint_of):
    """The network fine-tuned whole on 10% of the classification labels (SEED's and DisCo's semi-supervised protocol)."""

    def run(ctx: Context, folder: Path) -> Dict:
        from distill.semisup import finetune_semisup

        p = ctx.preset
        result = finetune_semisup(
            checkpoint_of(ctx), data_dir(ctx) / "classification", label_fraction=0.1, labels_out=folder / "labels_10pct.txt",
            epochs=p["semisup_epochs"], image_size=p["crop"], workers=p["workers"], seed=p["seed"], **SEMISUP_RECIPE,
        )
        save_json({"backbone": {"semisup": result["val_correct"]}}, folder / PER_IMAGE)
        return {"label_fraction": 0.1, "labelled": result["labelled"]["count"], "epochs": p["semisup_epochs"],
                "top1": result["top1"], "top5": result["top5"], "head_probe": result["head_probe"],
                **{k: v for k, v in SEMISUP_RECIPE.items()}}

    return run


def _semisup_command(checkpoint_of):
    def command(ctx: Context, folder: Path) -> str:
        p, r = ctx.preset, SEMISUP_RECIPE
        return (f"python tools/semisup_eval.py {checkpoint_of(ctx)} --data {data_dir(ctx) / 'classification'} "
                f"--label-fraction 0.1 --epochs {p['semisup_epochs']} --batch-size {r['batch_size']} "
                f"--lr-backbone {r['lr_backbone']} --lr-classifier {r['lr_classifier']} --schedule {r['schedule']} "
                f"--head-init {r['head_init']} --bn {r['bn']} --optimizer {r['optimizer_name']} --image-size {p['crop']} "
                f"--workers {p['workers']} --seed {p['seed']} --out {folder / 'result.json'}")

    return command


def _cli(tool: str, config: str, overrides: List[str]) -> str:
    return " ".join([f"python tools/{tool}", "--config", config, *overrides])


def _teacher_stage(p: Dict) -> Stage:
    if p["teacher_recipe"] == "user":
        return Stage("teacher", _given_teacher, lambda ctx, f: f"(given with --teacher) {p['teacher_path']}",
                     title=f"the user's {p['teacher_arch']} teacher, {p['teacher_path']}")
    if p["teacher_recipe"] not in TEACHER_CONFIGS:
        raise SettingsError(f"teacher_recipe {p['teacher_recipe']!r}: choose one of {', '.join(TEACHER_CONFIGS)}")
    words = {"supcon": "SupCon (with labels)", "moco_v2": "MoCo v2 (self-supervised)"}[p["teacher_recipe"]]
    return Stage("teacher", _teacher, _teacher_command, deps=("data",), title=f"{words} pretraining of a {p['teacher_arch']} teacher")


def upstream_stages(preset: Dict) -> List[Stage]:
    """Stages from data to evaluated students, in order."""
    p = preset
    stages = [
        Stage("data", _data,
              lambda ctx, f: f"python tools/make_shapes.py --out {data_dir(ctx)} --num-images {p['num_images']} --size {p['image_side']} --seed {p['seed']}",
              title="generate the shapes data set"),
        _teacher_stage(p),
    ]
    stages.append(Stage(TEACHER_CACHE, _teacher_cache, _teacher_cache_command, deps=("data", "teacher"),
                        title="the teacher's embeddings of every view, once for seed, disco and retro"))
    for method in METHODS:
        deps = ("data",) if method == "moco_v2" else ("data", "teacher", TEACHER_CACHE)
        stages.append(
            Stage(f"distill_{method}", _distill(method),
                  lambda ctx, f, m=method: _cli("distill.py", _distill_config(m), _distill_overrides(ctx, f, m)),
                  deps=deps, title=f"distil EfficientNet-B0 with {method}")
        )
    stages.append(Stage("eval_random", _eval_random, _eval_random_command, deps=("data",),
                        title="linear probe and k-NN: randomly initialised teacher and student networks"))
    stages.append(Stage("eval_teacher", _eval_stage("teacher", teacher_file, ["backbone"]),
                        _eval_command(teacher_file, ["backbone"]), deps=("data", "teacher"), title="linear probe and k-NN: teacher"))
    if p.get("semisup_epochs"):
        stages.append(Stage("semisup_teacher", _semisup_stage(teacher_file), _semisup_command(teacher_file),
                            deps=("data", "teacher"), title="fine-tuning on 10% of the labels: teacher"))
    for method in METHODS:
        which = ["backbone", "adapter"] if method == "retro" else ["backbone"]
        checkpoint = lambda ctx, m=method: student_file(ctx, m)  # noqa: E731
        stages.append(
            Stage(f"eval_{method}", _eval_stage(method, checkpoint, which), _eval_command(checkpoint, which),
                  deps=("data", f"distill_{method}"), title=f"linear probe and k-NN: {method} student")
        )
        if p.get("semisup_epochs"):
            stages.append(
                Stage(f"semisup_{method}", _semisup_stage(checkpoint), _semisup_command(checkpoint),
                      deps=("data", f"distill_{method}"), title=f"fine-tuning on 10% of the labels: {method} student")
            )
    return stages
