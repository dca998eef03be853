"""Where a tool's run goes: refuse a GPU setting on a machine without one, warn when a GPU-sized run meets a CPU.

Shared by the detection, segmentation and distillation tools, so that every
one of them says the same thing in one line, before minutes of start-up,
instead of ending in torch's ``Found no NVIDIA driver`` traceback.
torch is imported only when a check runs, so a tool's ``--help`` stays fast.
"""

from dataclasses import dataclass
from typing import Optional


class DeviceError(ValueError):
    """A run asks for GPUs this machine does not have; the message says what to change."""


def cuda_device_count() -> int:
    """CUDA devices torch can use here (0 without a driver, where ``device_count`` alone may still be > 0)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, setting: str, cpu_setting: str) -> None:
    """Raise DeviceError when ``device`` (a torch device string) names CUDA and there is no CUDA device.

    ``setting`` is how the user wrote the device (``MODEL.DEVICE cuda``) and
    ``cpu_setting`` how they ask for the CPU instead (``MODEL.DEVICE cpu``).
    """
    if str(device).startswith("cuda") and cuda_device_count() == 0:
        raise DeviceError(f"{setting} asks for a GPU, but torch finds no CUDA device on this machine; "
                          f"add {cpu_setting} to run on the CPU")


def check_gpu_count(wanted: int, setting: str) -> None:
    """Raise DeviceError when a run wants ``wanted`` GPUs (one per process) and this machine has fewer."""
    have = cuda_device_count()
    if wanted > have:
        raise DeviceError(f"{setting} asks for {wanted} GPUs, but torch finds {have} CUDA device(s) on this machine; "
                          "give at most that many, or run in one process on the CPU")


@dataclass(frozen=True)
class Workload:
    """A training run's size: its steps, images per step and image side, which set its cost on a CPU."""

    steps: int
    batch: int
    side: int

    def pixels(self) -> int:
        """Pixels seen over the run: the CPU time of a convolutional network grows with it."""
        return self.steps * self.batch * self.side**2

    def __str__(self) -> str:
        return f"{self.steps} iterations x {self.batch} images at {self.side} px"


GPU_SIZED = 10
"""A run is GPU-sized when it sees this many times the pixels of the project's CPU-sized shapes configs."""


def cpu_warning(run: Workload, cpu_sized: Workload, advice: str) -> Optional[str]:
    """The one-line warning for ``run`` on a CPU, or None when it is within ``GPU_SIZED`` times ``cpu_sized``.

    ``cpu_sized`` is the workload of the CPU-sized config of the same kind,
    which takes minutes on a CPU; ``advice`` says how to shrink the run.
    """
    ratio = run.pixels() / max(cpu_sized.pixels(), 1)
    if ratio < GPU_SIZED:
        return None
    return (f"warning: this run is sized for GPUs and runs on the CPU: {run}, {ratio:,.0f} times the pixels of the "
            f"CPU-sized shapes configs ({cpu_sized}, minutes on a CPU), so expect hours to days; {advice}")
