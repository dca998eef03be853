"""Teacher families: each official layout loads as it is, and its embedding is that family's embedding exactly.

Every file here is built from the published key names and shapes of its
release (facebookresearch/moco, moco-v3, swav and dino; Separius/SimCLRv2-Pytorch
and Spijkervet/SimCLR; lucidrains/byol-pytorch), with random values, and
never with the loader's code. The expected embedding is computed in this file
from those tensors with plain torch.nn.functional calls, reading them by the
file's own names: a loader that mixed up two tensors, dropped a BatchNorm,
used the wrong activation or took the momentum encoder instead of the online
one gives another number. Head widths are shrunk where the released code
takes them as arguments (MoCo v3's and BYOL's 4096, DINO's 2048 hidden).
"""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from distill import config as distill_config
from distill.config import load_config
from distill.common import DISTILL_FORMAT
from distill.engine import Trainer, build_method
from retro_transfer.safe_io import CheckpointError, safe_load
from retro_transfer.teacher_loading import load_teacher
from retro_transfer.teacher_families import FAMILIES

BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
R50_BLOCKS = (3, 4, 6, 3)
R18_BLOCKS = (2, 2, 2, 2)
IMAGES = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- published layouts, built here


def bn(name: str, width: int) -> dict:
    return {f"{name}.{p}": (width,) if p != "num_batches_tracked" else () for p in BN_PARAMS}


def resnet_shapes(blocks=R50_BLOCKS, width: int = 1, bottleneck: bool = True) -> dict:
    """torchvision's ResNet names and shapes (He et al., 2016, Table 1), every channel count times ``width``."""
    shapes = {"conv1.weight": (64 * width, 3, 7, 7), **bn("bn1", 64 * width)}
    inplanes = 64 * width
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        planes *= width
        out = 4 * planes if bottleneck else planes
        for block in range(count):
            p = f"layer{stage}.{block}."
            if bottleneck:
                shapes.update({p + "conv1.weight": (planes, inplanes, 1, 1), **bn(p + "bn1", planes),
                               p + "conv2.weight": (planes, planes, 3, 3), **bn(p + "bn2", planes),
                               p + "conv3.weight": (out, planes, 1, 1), **bn(p + "bn3", out)})
            else:
                shapes.update({p + "conv1.weight": (planes, inplanes, 3, 3), **bn(p + "bn1", planes),
                               p + "conv2.weight": (planes, planes, 3, 3), **bn(p + "bn2", planes)})
            if block == 0 and (stage > 1 or inplanes != out):
                shapes.update({p + "downsample.0.weight": (out, inplanes, 1, 1), **bn(p + "downsample.1", out)})
            inplanes = out
    return shapes


def simclr_v2_shapes(blocks=R50_BLOCKS) -> dict:
    """Separius/SimCLRv2-Pytorch resnet.py, sk0, width 1: ``net.0`` the stem, ``net.1..4`` the stages."""
    shapes = {"net.0.0.weight": (64, 3, 7, 7), **bn("net.0.1.0", 64)}
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for block in range(count):
            p = f"net.{stage}.blocks.{block}."
            if block == 0:
                shapes.update({p + "projection.shortcut.weight": (4 * planes, inplanes, 1, 1), **bn(p + "projection.bn.0", 4 * planes)})
            shapes.update({p + "net.0.weight": (planes, inplanes, 1, 1), **bn(p + "net.1.0", planes),
                           p + "net.2.weight": (planes, planes, 3, 3), **bn(p + "net.3.0", planes),
                           p + "net.4.weight": (4 * planes, planes, 1, 1), **bn(p + "net.5.0", 4 * planes)})
            inplanes = 4 * planes
    return shapes


def linear(name: str, out: int, inp: int, bias: bool = True) -> dict:
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def randomise(shapes: dict, seed: int) -> dict:
    """Values that keep a deep network's activations finite: fan-in scaled weights, BN near identity."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(1000)
        elif name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            out[name] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 1:  # biases and running means
            out[name] = torch.randn(shape, generator=gen) * 0.1
        else:
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return out


def stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """Same shape, other values, next to no bytes on disk: for groups the loader must ignore."""
    return torch.full((), -1.0).to(tensor.dtype).expand(tensor.shape)


def under(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


# --------------------------------------------------------------------------- the embeddings, computed here


def bn_f(x, t, name):
    return F.batch_norm(x, t[f"{name}.running_mean"], t[f"{name}.running_var"], t.get(f"{name}.weight"),
                        t.get(f"{name}.bias"), training=False, eps=1e-5)


def resnet_features(t: dict, x: torch.Tensor, blocks=R50_BLOCKS, bottleneck: bool = True) -> torch.Tensor:
    """torchvision's ResNet forward (stride in the 3x3 convolution) on tensors named as torchvision names them."""
    x = F.max_pool2d(F.relu(bn_f(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), t, "bn1")), 3, 2, 1)
    for stage, count in enumerate(blocks, start=1):
        for block in range(count):
            p, stride = f"layer{stage}.{block}.", 2 if stage > 1 and block == 0 else 1
            if bottleneck:
                y = F.relu(bn_f(F.conv2d(x, t[p + "conv1.weight"]), t, p + "bn1"))
                y = F.relu(bn_f(F.conv2d(y, t[p + "conv2.weight"], stride=stride, padding=1), t, p + "bn2"))
                y = bn_f(F.conv2d(y, t[p + "conv3.weight"]), t, p + "bn3")
            else:
                y = F.relu(bn_f(F.conv2d(x, t[p + "conv1.weight"], stride=stride, padding=1), t, p + "bn1"))
                y = bn_f(F.conv2d(y, t[p + "conv2.weight"], padding=1), t, p + "bn2")
            if p + "downsample.0.weight" in t:
                x = bn_f(F.conv2d(x, t[p + "downsample.0.weight"], stride=stride), t, p + "downsample.1")
            x = F.relu(x + y)
    return x.mean(dim=(2, 3))


def simclr_v2_features(t: dict, x: torch.Tensor, blocks=R50_BLOCKS) -> torch.Tensor:
    """Separius/SimCLRv2-Pytorch's ResNet.forward on its own names: stem, then relu(projection(x) + net(x)) per block."""
    x = F.max_pool2d(F.relu(bn_f(F.conv2d(x, t["net.0.0.weight"], stride=2, padding=3), t, "net.0.1.0")), 3, 2, 1)
    for stage, count in enumerate(blocks, start=1):
        for block in range(count):
            p, stride = f"net.{stage}.blocks.{block}.", 2 if stage > 1 and block == 0 else 1
            y = F.relu(bn_f(F.conv2d(x, t[p + "net.0.weight"]), t, p + "net.1.0"))
            y = F.relu(bn_f(F.conv2d(y, t[p + "net.2.weight"], stride=stride, padding=1), t, p + "net.3.0"))
            y = bn_f(F.conv2d(y, t[p + "net.4.weight"]), t, p + "net.5.0")
            if block == 0:
                x = bn_f(F.conv2d(x, t[p + "projection.shortcut.weight"], stride=stride), t, p + "projection.bn.0")
            x = F.relu(x + y)
    return x.mean(dim=(2, 3))


def mlp(t: dict, x: torch.Tensor, layers, act=F.relu) -> torch.Tensor:
    """``layers``: ("linear" | "bn" | "act", name) in order, read from ``t``."""
    for kind, name in layers:
        if kind == "linear":
            x = F.linear(x, t[f"{name}.weight"], t.get(f"{name}.bias"))
        elif kind == "bn":
            x = bn_f(x, t, name)
        else:
            x = act(x)
    return x


# --------------------------------------------------------------------------- one official-layout file per family


@pytest.fixture(scope="module")
def r50():
    return randomise(resnet_shapes(), seed=1)


class Case:
    """A family's file: its dict, the expected embedding of IMAGES, and what the report must say."""

    def __init__(self, family, ckpt, embedding, arch="resnet50", ignored=None, other_entries=(), head_has=()):
        self.family, self.ckpt, self.embedding, self.arch = family, ckpt, embedding, arch
        self.ignored, self.other_entries, self.head_has = ignored or {}, list(other_entries), head_has


def moco_v2(r50):
    head = randomise({**linear("0", 2048, 2048), **linear("2", 128, 2048)}, seed=2)
    query = {**r50, **under("fc.", head)}
    state = {**under("module.encoder_q.", query), **under("module.encoder_k.", {k: stand_in(v) for k, v in query.items()})}
    state.update({"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    ckpt = {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    embedding = mlp(head, resnet_features(r50, IMAGES), [("linear", "0"), ("act", ""), ("linear", "2")])
    return Case("moco_v2", ckpt, embedding, ignored={"encoder_k": len(query), "queue": 1, "queue_ptr": 1},
                other_entries=["epoch", "arch", "optimizer"], head_has=("module.encoder_q.fc.*", "Linear 2048->2048, ReLU"))


def moco_v3(r50):
    """moco/builder.py: fc = _build_mlp(2, 2048, mlp_dim, dim) with last BN affine=False; predictor alike."""
    hidden, dim = 96, 48
    fc = randomise({**linear("0", hidden, 2048, bias=False), **bn("1", hidden), **linear("3", dim, hidden, bias=False),
                    **{k: v for k, v in bn("4", dim).items() if "running" in k or "num_batches" in k}}, seed=3)
    predictor = randomise({**linear("0", hidden, dim, bias=False), **bn("1", hidden), **linear("3", dim, hidden, bias=False),
                           **bn("4", dim)}, seed=4)
    base = {**r50, **under("fc.", fc)}
    state = {**under("module.base_encoder.", base),
             **under("module.momentum_encoder.", {k: stand_in(v) for k, v in base.items()}),
             **under("module.predictor.", predictor)}
    ckpt = {"epoch": 1000, "arch": "resnet50", "state_dict": state, "optimizer": {}, "scaler": {"scale": 65536.0}}
    embedding = mlp(fc, resnet_features(r50, IMAGES), [("linear", "0"), ("bn", "1"), ("act", ""), ("linear", "3"), ("bn", "4")])
    return Case("moco_v3", ckpt, embedding, ignored={"momentum_encoder": len(base), "predictor": len(predictor)},
                other_entries=["epoch", "arch", "optimizer", "scaler"], head_has=("Linear 2048->96 (no bias)", "BN (no affine)"))


def swav(r50, width=1, backbone=None):
    """src/resnet50.py: projection_head Linear-BN-ReLU-Linear(., 128), prototypes Linear(128, 3000, no bias); flat, module.-prefixed."""
    features, hidden = 2048 * width, 80
    head = randomise({**linear("0", hidden, features), **bn("1", hidden), **linear("3", 128, hidden)}, seed=5)
    ckpt = {**under("module.", backbone or r50), **under("module.projection_head.", head),
            "module.prototypes.weight": torch.randn(300, 128)}
    embedding = mlp(head, resnet_features(backbone or r50, IMAGES), [("linear", "0"), ("bn", "1"), ("act", ""), ("linear", "3")])
    arch = "resnet50" if width == 1 else f"resnet50w{width}"
    return Case("swav", ckpt, embedding, arch=arch, ignored={"prototypes": 1}, head_has=(f"Linear {features}->{hidden}",))


def dino(r50, wrapper="", use_bn=True):
    """main_dino.py full checkpoint; DINOHead(2048, out_dim, use_bn): mlp of 3 Linears, GELU, [BN], then last_layer."""
    hidden, bottleneck, out = 64, 32, 600
    if use_bn:
        layers = {**linear("0", hidden, 2048), **bn("1", hidden), **linear("3", hidden, hidden), **bn("4", hidden),
                  **linear("6", bottleneck, hidden)}
        order = [("linear", "0"), ("bn", "1"), ("act", ""), ("linear", "3"), ("bn", "4"), ("act", ""), ("linear", "6")]
    else:
        layers = {**linear("0", hidden, 2048), **linear("2", hidden, hidden), **linear("4", bottleneck, hidden)}
        order = [("linear", "0"), ("act", ""), ("linear", "2"), ("act", ""), ("linear", "4")]
    head = randomise(layers, seed=6)
    last = {"last_layer.weight_g": torch.ones(out, 1), "last_layer.weight_v": torch.randn(out, bottleneck)}
    teacher = {**under("backbone.", r50), **under("head.mlp.", head), **under("head.", last)}
    student = {k: stand_in(v) for k, v in teacher.items()}
    args = argparse.Namespace(arch="resnet50", out_dim=out, norm_last_layer=True, use_bn_in_head=use_bn,
                              global_crops_scale=(0.14, 1.0), optimizer="lars", data_path="/path/to/imagenet/train/")
    ckpt = {"student": under("module.", student), "teacher": under(wrapper, teacher), "optimizer": {"state": {}, "param_groups": []},
            "epoch": 800, "args": args, "dino_loss": {"center": torch.zeros(1, out)}}
    embedding = F.normalize(mlp(head, resnet_features(r50, IMAGES), order, act=F.gelu), dim=1)
    return Case("dino", ckpt, embedding, ignored={"head.last_layer": 2},
                other_entries=["student", "optimizer", "epoch", "args", "dino_loss"], head_has=("GELU", "L2-normalised"))


def simclr_v2():
    """convert.py's {'resnet': model.state_dict(), 'head': head.state_dict()}; ContrastiveHead(2048): 3 x Linear(no bias)-BN."""
    resnet = randomise({**simclr_v2_shapes(), **linear("fc", 1000, 2048)}, seed=8)
    head = randomise({**linear("layers.0", 2048, 2048, bias=False), **bn("layers.1", 2048),
                      **linear("layers.3", 2048, 2048, bias=False), **bn("layers.4", 2048),
                      **linear("layers.6", 128, 2048, bias=False), **bn("layers.7", 128)}, seed=9)
    order = [("linear", "layers.0"), ("bn", "layers.1"), ("act", ""), ("linear", "layers.3"), ("bn", "layers.4"),
             ("act", ""), ("linear", "layers.6"), ("bn", "layers.7")]
    embedding = mlp(head, simclr_v2_features(resnet, IMAGES), order)
    return Case("simclr", {"resnet": resnet, "head": head}, embedding, ignored={"resnet.fc": 2},
                head_has=("head.layers.*", "Linear 2048->128 (no bias), BN"))


def simclr_v1(r50):
    """Spijkervet/SimCLR: SimCLR(encoder with fc = Identity, projection_dim 64, n_features 2048).state_dict()."""
    head = randomise({**linear("0", 2048, 2048, bias=False), **linear("2", 64, 2048, bias=False)}, seed=10)
    embedding = mlp(head, resnet_features(r50, IMAGES), [("linear", "0"), ("act", ""), ("linear", "2")])
    return Case("simclr", {**under("encoder.", r50), **under("projector.", head)}, embedding, head_has=("projector.*",))


def byol(r50, old_mlp=False):
    """byol-pytorch's BYOL(resnet50, hidden_layer='avgpool').state_dict(): net kept twice, projector, target, predictor."""
    hidden, dim = 72, 40
    net = {**r50, **randomise(linear("fc", 1000, 2048), seed=11)}
    projector = randomise({**linear("0", hidden, 2048), **bn("1", hidden), **linear("3", dim, hidden)}, seed=12)
    predictor = randomise({**linear("0", hidden, dim), **bn("1", hidden), **linear("3", dim, hidden)}, seed=13)
    mlp_prefix = "net." if old_mlp else ""  # class MLP(nn.Module) with self.net, before byol-pytorch 0.6
    online = {**under("net.", net), **under("projector." + mlp_prefix, projector)}
    ckpt = {**under("net.", net), **under("online_encoder.", online),
            **under("target_encoder.", {k: stand_in(v) for k, v in online.items()}),
            **under("online_predictor." + mlp_prefix, predictor)}
    embedding = mlp(projector, resnet_features(r50, IMAGES), [("linear", "0"), ("bn", "1"), ("act", ""), ("linear", "3")])
    return Case("byol", ckpt, embedding, ignored={"net": len(net), "online_encoder.net.fc": 2, "target_encoder": len(online),
                                                  "online_predictor": len(predictor)}, head_has=(f"Linear 2048->{hidden}",))


def byol_simplicial(r50, simplices=4):
    """byol-pytorch 0.9.1's BYOL(resnet50, hidden_layer='avgpool') with its default use_simplicial_embeddings=True.

    Its NetWrapper builds the projector as Sequential(Sequential(Linear(2048, L*8), BatchNorm1d), SEM, MLP(L*8, hidden, dim)),
    SEM being a softmax over groups of 8 features at temperature 0.1 (no tensors); the predictor is a plain MLP.
    """
    hidden, dim, sem = 72, 40, simplices * 8
    net = {**r50, **randomise(linear("fc", 1000, 2048), seed=11)}
    projector = randomise({**linear("0.0", sem, 2048), **bn("0.1", sem), **linear("2.0", hidden, sem), **bn("2.1", hidden),
                           **linear("2.3", dim, hidden)}, seed=17)
    predictor = randomise({**linear("0", hidden, dim), **bn("1", hidden), **linear("3", dim, hidden)}, seed=13)
    online = {**under("net.", net), **under("projector.", projector)}
    ckpt = {**under("net.", net), **under("online_encoder.", online),
            **under("target_encoder.", {k: stand_in(v) for k, v in online.items()}), **under("online_predictor.", predictor)}
    x = mlp(projector, resnet_features(r50, IMAGES), [("linear", "0.0"), ("bn", "0.1")])
    x = torch.softmax(x.reshape(len(x), simplices, 8) / 0.1, dim=-1).reshape(len(x), sem)
    embedding = mlp(projector, x, [("linear", "2.0"), ("bn", "2.1"), ("act", ""), ("linear", "2.3")])
    return Case("byol", ckpt, embedding, ignored={"net": len(net), "online_encoder.net.fc": 2, "target_encoder": len(online),
                                                  "online_predictor": len(predictor)},
                head_has=(f"Linear 2048->{sem}, BN, simplicial embedding ({simplices} simplices of 8, temperature 0.1), "
                          f"Linear {sem}->{hidden}, BN, ReLU, Linear {hidden}->{dim}",))


CASES = {
    "moco_v2": moco_v2,
    "moco_v3": moco_v3,
    "swav": swav,
    "dino": dino,
    "dino-ddp-teacher": lambda r50: dino(r50, wrapper="module."),
    "dino-without-bn": lambda r50: dino(r50, use_bn=False),
    "simclr-v2-converted": lambda r50: simclr_v2(),
    "simclr-v1-pytorch": simclr_v1,
    "byol": byol,
    "byol-before-0.6": lambda r50: byol(r50, old_mlp=True),
    "byol-0.9-simplicial-embeddings": byol_simplicial,
}


def report_groups(report) -> dict:
    """Ignored groups by name, without the family's reason in parentheses."""
    return {name.split(" (")[0]: count for name, count in report.ignored.items()}


# --------------------------------------------------------------------------- tests


def test_the_layouts_built_here_are_torchvisions():
    """The name/shape tables of this file against torchvision's own ResNets, where torchvision has them."""
    for arch, blocks, bottleneck in (("resnet18", R18_BLOCKS, False), ("resnet50", R50_BLOCKS, True)):
        with torch.device("meta"):
            state = getattr(torchvision.models, arch)(weights=None).state_dict()
        expected = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}
        assert resnet_shapes(blocks, bottleneck=bottleneck) == expected
    net = torchvision.models.resnet50().eval()
    with torch.no_grad():
        features = torch.nn.Sequential(*list(net.children())[:-1])(IMAGES).flatten(1)
    torch.testing.assert_close(resnet_features(net.state_dict(), IMAGES), features)


def test_every_family_has_a_case():
    assert {case.split("-")[0] for case in CASES} == set(FAMILIES) == set(distill_config.TEACHER_FAMILIES)


@pytest.mark.parametrize("name", list(CASES))
def test_official_layout_loads_and_embeds_exactly(name, r50, tmp_path):
    case = CASES[name](r50)
    path = tmp_path / f"{name}.pth"
    torch.save(case.ckpt, path)
    teacher, report = load_teacher(path, require_head=True)

    assert (report.format, report.arch, report.has_head) == (case.family, case.arch, True)
    assert report.missing == [] and report.unexpected == []
    assert report_groups(report) == case.ignored
    assert report.other_entries == case.other_entries
    for text in case.head_has:
        assert text in report.head, report.head
    assert case.family in report.summary() and not teacher.training
    with torch.no_grad():
        embedding = teacher(IMAGES)
    assert (teacher.head.in_dim, teacher.head.out_dim) == (teacher.out_channels, case.embedding.shape[1])
    torch.testing.assert_close(embedding, case.embedding, rtol=1e-4, atol=1e-5)


def test_a_simplicial_embedding_head_survives_a_distillation_checkpoint(r50, tmp_path):
    """The teacher as this project's checkpoints store it (``teacher.*`` under ``model``) embeds as the byol-pytorch file does."""
    case = byol_simplicial(r50)
    torch.save(case.ckpt, tmp_path / "byol.pt")
    teacher, _ = load_teacher(tmp_path / "byol.pt", require_head=True)
    saved = {"format": DISTILL_FORMAT,
             "model": {f"teacher.{k}": v for k, v in teacher.state_dict().items()}, "teacher_arch": "resnet50"}
    torch.save(saved, tmp_path / "distilled.pth")
    again, report = load_teacher(tmp_path / "distilled.pth", require_head=True)
    assert report.format == "retro_transfer_teacher" and "simplicial embedding" in report.head
    with torch.no_grad():
        torch.testing.assert_close(again(IMAGES), case.embedding, rtol=1e-4, atol=1e-5)


def test_swav_resnet50_w2(tmp_path):
    """SwAV's RN50-w2 (swav_RN50w2_400ep_pretrain.pth.tar): every width doubled, 4096 features, arch from the keys."""
    backbone = randomise(resnet_shapes(width=2), seed=14)
    case = swav(None, width=2, backbone=backbone)
    torch.save(case.ckpt, tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar")
    teacher, report = load_teacher(tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar", require_head=True)
    assert (report.arch, teacher.out_channels, teacher.head.in_dim) == ("resnet50w2", 4096, 4096)
    with torch.no_grad():
        torch.testing.assert_close(teacher(IMAGES), case.embedding, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="holds a resnet50w2 but the config asks for resnet50"):
        load_teacher(tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar", arch="resnet50")


def test_unknown_layout_is_refused_in_one_line(tmp_path):
    vit = {"model": {"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, "epoch": 3}
    torch.save(vit, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError) as err:
        load_teacher(tmp_path / "vit.pth")
    message = str(err.value)
    assert "\n" not in message and "not a teacher checkpoint" in message
    assert "'model'" in message and "blocks.0.attn.qkv.weight" in message and "'epoch'" in message
    for family in FAMILIES:
        assert f"{family}: " in message


def test_simclr_selective_kernel_models_are_refused(tmp_path):
    resnet = {"net.0.0.weight": torch.zeros(32, 3, 3, 3), "net.1.blocks.0.net.2.mixing_conv.0.weight": torch.zeros(1)}
    torch.save({"resnet": resnet, "head": {"layers.0.weight": torch.zeros(2, 2)}}, tmp_path / "r50_1x_sk1.pth")
    with pytest.raises(CheckpointError, match=r"r50_1x_sk1.pth: this SimCLR v2 model uses selective kernels .* _sk0"):
        load_teacher(tmp_path / "r50_1x_sk1.pth")


# --------------------------------------------------------------------------- teacher.family


@pytest.fixture(scope="module")
def two_teachers(r50, tmp_path_factory):
    """A file that matches two families: a MoCo v3 'state_dict' next to a DINO 'teacher' entry."""
    v3, dino_case = moco_v3(r50), dino(r50)
    path = tmp_path_factory.mktemp("ambiguous") / "two_teachers.pth"
    torch.save({"state_dict": v3.ckpt["state_dict"], "teacher": dino_case.ckpt["teacher"]}, path)
    return path, {"moco_v3": v3.embedding, "dino": dino_case.embedding}


def test_an_ambiguous_file_needs_teacher_family(two_teachers):
    path, embeddings = two_teachers
    with pytest.raises(CheckpointError, match=r"matches the layouts of several teacher families \(dino, moco_v3\); set teacher.family"):
        load_teacher(path)
    for family, expected in embeddings.items():
        teacher, report = load_teacher(path, family=family)
        assert report.format == family
        with torch.no_grad():
            torch.testing.assert_close(teacher(IMAGES), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"teacher.family=swav was asked for, but the file is not in that layout"):
        load_teacher(path, family="swav")


def test_teacher_family_reaches_the_engine(two_teachers, shapes_root, tmp_path):
    path, embeddings = two_teachers
    overrides = [f"teacher.checkpoint={path}", f"data.train_dir={shapes_root / 'unlabeled'}", "student.arch=resnet18",
                 "loss.queue_size=16", "train.batch_size=8"]
    with pytest.raises(CheckpointError, match="several teacher families"):
        build_method(load_config("configs/distill/shapes_seed_effb0.yaml", overrides))
    method = build_method(load_config("configs/distill/shapes_seed_effb0.yaml", [*overrides, "teacher.family=dino"]))
    with torch.no_grad():
        torch.testing.assert_close(method.teacher(IMAGES), embeddings["dino"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- distillation from a DINO teacher


@pytest.fixture(scope="module")
def dino_r18(tmp_path_factory):
    """DINO's full-checkpoint layout on a ResNet-18 (512 features), so that a distillation run stays small."""
    r18 = randomise(resnet_shapes(R18_BLOCKS, bottleneck=False), seed=15)
    head = randomise({**linear("0", 64, 512), **bn("1", 64), **linear("3", 64, 64), **bn("4", 64), **linear("6", 32, 64)}, seed=16)
    teacher = {**under("backbone.", r18), **under("head.mlp.", head),
               "head.last_layer.weight_g": torch.ones(100, 1), "head.last_layer.weight_v": torch.randn(100, 32)}
    path = tmp_path_factory.mktemp("dino") / "dino_resnet18_full_checkpoint.pth"
    torch.save({"teacher": teacher, "student": {}, "epoch": 1, "args": argparse.Namespace(arch="resnet18")}, path)
    order = [("linear", "0"), ("bn", "1"), ("act", ""), ("linear", "3"), ("bn", "4"), ("act", ""), ("linear", "6")]
    return path, F.normalize(mlp(head, resnet_features(r18, IMAGES, R18_BLOCKS, bottleneck=False), order, act=F.gelu), dim=1)


@pytest.mark.parametrize("method", ["retro", "disco", "seed"])
def test_distillation_from_a_dino_teacher(method, dino_r18, shapes_root, tmp_path):
    path, expected = dino_r18
    cfg = load_config(f"configs/distill/shapes_{method}_effb0.yaml", [
        f"teacher.checkpoint={path}", "teacher.arch=resnet18", f"data.train_dir={shapes_root / 'unlabeled'}",
        "data.image_size=32", "data.num_workers=0", "train.batch_size=8", "train.max_steps=2", "train.precision=fp32",
        "train.warmup_steps=0", "loss.queue_size=16", "log.tensorboard=false", "checkpoint.keep=0", f"output_dir={tmp_path}",
    ])
    final = Trainer(cfg).fit()

    assert safe_load(final)["step"] == 2
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged and all(math.isfinite(record["loss"]) for record in logged)
    # The teacher stayed frozen, and this project's checkpoint gives back DINO's embedding (GELU, L2-normalised).
    teacher, report = load_teacher(final, require_head=True)
    assert report.format == "retro_transfer_teacher"
    with torch.no_grad():
        torch.testing.assert_close(teacher(IMAGES), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, layer", [
    ("moco_v2", "module.encoder_q.fc.2"),  # issue 23: it loaded as a 2048->2048 head, with no warning
    ("moco_v2", "module.encoder_q.fc.0"),
    ("moco_v3", "module.base_encoder.fc.3"),
    ("byol", "online_encoder.projector.1"),
])
def test_a_head_missing_a_layer_is_refused_naming_it(name, layer, r50, tmp_path):
    """What is left of the head would build a shorter head that loads cleanly: refused, naming the layer."""
    case = CASES[name](r50)
    state = case.ckpt.get("state_dict", case.ckpt)
    for key in [k for k in state if k.startswith(layer + ".")]:
        del state[key]
    torch.save(case.ckpt, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError) as err:
        load_teacher(tmp_path / "damaged.pth")
    message = str(err.value)
    assert "\n" not in message and f"the {name} projection head has no {layer} " in message, message
