"""Projection heads: the MoCo v2 head of students, and teachers' heads rebuilt from their checkpoints.

A teacher's head is whatever its self-supervised method trained (METHOD.md,
"The teacher"): MoCo v2's Linear-ReLU-Linear, MoCo v3's and SimCLR's MLPs with
BatchNorm, DINO's GELU MLP with an L2-normalised bottleneck. Retro reuses it as
it is, so it is rebuilt layer by layer from the checkpoint's own tensors rather
than from a template.
"""

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPHead(nn.Sequential):
    """A head as a plain sequence of layers; ``in_dim``, ``hidden_dim`` and ``out_dim`` come from its Linears.

    A plain ``nn.Sequential`` on purpose: its parameters are named ``0.*``,
    ``1.*``, ... exactly as in the released ``nn.Sequential`` heads (MoCo v2's
    ``fc.0``/``fc.2``, SwAV's ``projection_head.0``..``3``), so a released
    head loads into it without renaming.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("a projection head needs at least one Linear layer")
        self.in_dim, self.out_dim = linears[0].in_features, linears[-1].out_features
        self.hidden_dim: Optional[int] = linears[0].out_features if len(linears) > 1 else None

    @classmethod
    def from_state(
        cls,
        state: Dict[str, torch.Tensor],
        activation: Callable[[], nn.Module],
        bias: Optional[bool],
        last_bn_affine: Optional[bool] = True,
    ) -> "MLPHead":
        """The head whose ``<index>.<param>`` tensors are ``state``, with ``activation`` at every free index.

        Widths are read from the shapes. ``bias`` and ``last_bn_affine`` state
        what the family's code builds (MoCo v3's Linears have no bias and its
        last BatchNorm no affine), so a tensor missing from a damaged file is
        reported as missing instead of silently changing the head; ``None``
        takes each layer as the file has it (only for this project's own files).
        """
        params = _layers_by_index(state)
        last = max(params)
        layers: List[nn.Module] = []
        for index in range(last + 1):
            if index not in params:
                layers.append(activation())
                continue
            layer = params[index]
            if "running_mean" in layer:
                affine = ("weight" in layer) if last_bn_affine is None or index != last else last_bn_affine
                layers.append(nn.BatchNorm1d(layer["running_mean"].shape[0], affine=affine))
            elif "weight" in layer and layer["weight"].ndim == 2:
                out_dim, in_dim = layer["weight"].shape
                layers.append(nn.Linear(in_dim, out_dim, bias=("bias" in layer) if bias is None else bias))
            else:
                raise ValueError(
                    f"projection head layer {index} is neither a Linear (2-d weight) nor a BatchNorm (running_mean); "
                    f"it holds {', '.join(sorted(layer))}"
                )
        _check_chain(layers)
        return cls(*layers)

    def describe(self) -> str:
        """The layers in one line, e.g. ``Linear 2048->4096 (no bias), BN, ReLU, Linear 4096->256 (no bias), BN (no affine)``."""
        return ", ".join(_describe_layer(m) for m in self)


class NormalizedMLPHead(nn.Module):
    """DINO's head up to its bottleneck: ``mlp``, then L2 normalisation (Caron et al., 2021, section 3.1).

    DINO's weight-normalised last layer maps the bottleneck to the K
    prototypes' scores; it is not part of the embedding and is left out. The
    parameters sit under ``mlp.`` as in DINO's own ``DINOHead``, which is also
    how this head is told apart from the ReLU heads in a saved teacher.
    """

    def __init__(self, mlp: MLPHead) -> None:
        super().__init__()
        self.mlp = mlp
        self.in_dim, self.hidden_dim, self.out_dim = mlp.in_dim, mlp.hidden_dim, mlp.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)

    def describe(self) -> str:
        return f"{self.mlp.describe()}, L2-normalised"


class SimplicialEmbedding(nn.Module):
    """Simplicial embeddings (Lavoie et al., 2022): features cut into groups of ``simplex``, a softmax over each.

    The softmax runs at ``temperature``. Neither number is stored in a state
    dict, so a head loaded from a file takes byol-pytorch's defaults (simplices
    of 8, temperature 0.1); the number of simplices follows from the widths.
    """

    def __init__(self, simplex: int = 8, temperature: float = 0.1) -> None:
        super().__init__()
        self.simplex, self.temperature = simplex, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unflatten(1, (-1, self.simplex)) / self.temperature).softmax(dim=-1).flatten(1)


class SimplicialMLPHead(nn.Sequential):
    """byol-pytorch's projector with simplicial embeddings, on by default from its 0.9 releases.

    ``Sequential(Sequential(Linear(C, L*V), BN), SEM, MLP)``: an embedder, the
    simplicial embedding and the usual MLP (Linear - BN - ReLU - Linear), so
    its parameters are named ``0.0.*``, ``0.1.*``, ``2.0.*`` ... exactly as in
    the file. Still an MLP head for Retro: it takes the pooled features and
    gives the embedding.
    """

    def __init__(self, embedder: MLPHead, mlp: MLPHead, sem: Optional[SimplicialEmbedding] = None) -> None:
        sem = sem or SimplicialEmbedding()
        if embedder.out_dim % sem.simplex or mlp.in_dim != embedder.out_dim:
            raise ValueError(
                f"a simplicial-embedding projector maps its input to L x {sem.simplex} features that its MLP takes; "
                f"this one's embedder gives {embedder.out_dim} and its MLP takes {mlp.in_dim}"
            )
        super().__init__(embedder, sem, mlp)
        self.in_dim, self.hidden_dim, self.out_dim = embedder.in_dim, mlp.hidden_dim, mlp.out_dim

    @staticmethod
    def holds(state: Dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` is laid out as this head (``0.0.weight``: a module inside a numbered module)."""
        return any(len(parts) > 2 and parts[0].isdigit() and parts[1].isdigit() for parts in (k.split(".") for k in state))

    @classmethod
    def from_state(
        cls, state: Dict[str, torch.Tensor], activation: Callable[[], nn.Module], bias: Optional[bool],
        last_bn_affine: Optional[bool] = True,
    ) -> "SimplicialMLPHead":
        """The head whose ``0.*`` tensors are the embedder and ``2.*`` the MLP; see :meth:`MLPHead.from_state`."""
        parts: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            index, _, rest = key.partition(".")
            parts.setdefault(index, {})[rest] = value
        if set(parts) != {"0", "2"}:
            raise ValueError(
                "a projector with simplicial embeddings holds modules 0 (Linear, BN) and 2 (the MLP), "
                f"this one {', '.join(sorted(parts))}"
            )
        return cls(MLPHead.from_state(parts["0"], activation, bias, last_bn_affine),
                   MLPHead.from_state(parts["2"], activation, bias, last_bn_affine))

    def describe(self) -> str:
        embedder, sem, mlp = self
        simplices = embedder.out_dim // sem.simplex
        return (f"{embedder.describe()}, simplicial embedding ({simplices} simplices of {sem.simplex}, "
                f"temperature {sem.temperature:g}), {mlp.describe()}")


class ProjectionHead(MLPHead):
    """The MoCo v2 head (Chen et al., 2020, "Improved baselines", section 3): Linear(in, hidden) - ReLU - Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def _layers_by_index(state: Dict[str, torch.Tensor]) -> Dict[int, Dict[str, torch.Tensor]]:
    """``{"0.weight": w, "1.running_mean": m}`` -> ``{0: {"weight": w}, 1: {"running_mean": m}}``."""
    if not state:
        raise ValueError("the projection head has no tensors")
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name or "." in name:
            raise ValueError(
                f"projection head key {key!r} is not '<layer index>.<parameter>' (the names of a released nn.Sequential head)"
            )
        layers.setdefault(int(index), {})[name] = value
    return layers


def _check_chain(layers: List[nn.Module]) -> None:
    """The first layer is a Linear, each layer takes the previous Linear's width, activations stand alone.

    Two free indices in a row would mean two parameter-free modules (say
    ReLU then Dropout) that no tensor describes, so such a head is refused.
    """
    width = None
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            if width is not None and layer.in_features != width:
                raise ValueError(
                    f"projection head layer {index} takes {layer.in_features} features but the layer before gives {width}"
                )
            width = layer.out_features
        elif isinstance(layer, nn.BatchNorm1d):
            if width is None or layer.num_features != width:
                raise ValueError(f"projection head layer {index} normalises {layer.num_features} features, not {width}")
        elif width is None:
            raise ValueError("a projection head starts with a Linear layer; this one has no tensors at index 0")
        elif not isinstance(layers[index - 1], (nn.Linear, nn.BatchNorm1d)):
            raise ValueError(f"projection head layers {index - 1} and {index} both hold no tensors; cannot tell what they are")


def _describe_layer(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}->{layer.out_features}" + ("" if layer.bias is not None else " (no bias)")
    if isinstance(layer, nn.BatchNorm1d):
        return "BN" + ("" if layer.affine else " (no affine)")
    return type(layer).__name__
