"""The mean (momentum) encoder: an exponential moving average of the student."""

import copy

import torch
import torch.nn as nn


def make_mean_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to be updated only by :func:`ema_update`."""
    mean = copy.deepcopy(module)
    for p in mean.parameters():
        p.requires_grad_(False)
    return mean


@torch.no_grad()
def ema_update(mean: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_mean <- m * theta_mean + (1 - m) * theta_online (MoCo, eq. 2).

    Only parameters are averaged; BN running statistics of the mean encoder
    are its own, gathered on the key views, as in MoCo.
    """
    mean_params = list(mean.parameters())
    online_params = [p.detach() for p in online.parameters()]
    # One pass over the weights: mean + (1 - m) * (online - mean).
    torch._foreach_lerp_(mean_params, online_params, 1.0 - momentum)
