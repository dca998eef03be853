"""The MoCo v2 projection head (Chen et al., 2020, "Improved baselines", section 3)."""

import torch.nn as nn


class ProjectionHead(nn.Sequential):
    """Linear(in, hidden) - ReLU - Linear(hidden, out).

    A plain ``nn.Sequential`` on purpose: its parameters are named ``0.*`` and
    ``2.*``, exactly as MoCo v2's ``fc.0`` / ``fc.2``, so a released head loads
    into it without renaming.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
