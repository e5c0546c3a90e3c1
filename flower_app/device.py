"""Where a process trains and evaluates: run-config `device`, resolved on the machine itself.

`auto` is resolved where the work happens: a node's `auto` is its own hardware (a SuperNode
with a GPU trains on it, one without trains on its CPU), the ServerApp's `auto` is the
server's. An explicit `cuda` or `cuda:N` that this machine cannot use is refused with one line
(`DeviceError`, a `ConfigError`), never replaced by the CPU: a run that asked for a GPU and
silently trained on the CPU would report times and results for a machine it did not use.

Whatever the device, the DP noise and the Poisson batches are drawn on the CPU by the keyed
ChaCha20 streams (`flower_app.rng`) and only then moved to the device
(`flower_app.keyed_opacus`): torch.cuda's generator never draws privacy randomness.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from flower_app.config import ConfigError
from flower_app.data import BatchTensorDataset

# What `cuda_index` reports for a CPU: the reply's metric holds ints, not names.
CPU_INDEX = -1


class DeviceError(ConfigError):
    """The device asked for cannot be used here: one line saying what is wrong and valid."""


def _cuda_help() -> str:
    """What this machine offers: how many CUDA devices, or why there are none."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        # Ray's share for a simulated node given no GPU (client-resources-num-gpus=0)
        return "no GPU is visible to this process (CUDA_VISIBLE_DEVICES is empty)"
    if count == 0:
        return "torch sees no CUDA device on this machine"
    return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"


def resolve_device(name: str) -> torch.device:
    """`device`'s value as a torch device of this machine, checked; `auto`: CUDA when present.

    Raises `DeviceError` (one line) for a CUDA device this machine does not have. A CUDA
    device computes in full float32 (`full_float32`).
    """
    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        raise DeviceError(f"device={name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    index = 0 if device.index is None else device.index
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise DeviceError(
            f"device={name!r} is not available: {_cuda_help()}; use device=auto (CUDA when "
            "present) or device=cpu"
        )
    full_float32()
    return torch.device("cuda", index)


def full_float32() -> None:
    """No TF32 on CUDA (cuDNN allows it for convolutions by default): float32 as on the CPU.

    TF32 keeps 10 mantissa bits: the fast path's clipped sum would differ from Opacus's by
    far more than the 1e-5 its check allows, and per-example norms would be rounded.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def cuda_index(device: torch.device | str) -> int:
    """The CUDA index a process ran on, `CPU_INDEX` for the CPU (what a node reports)."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_INDEX
    return 0 if device.index is None else device.index


def device_name(index: int) -> str:
    """The device `cuda_index` reported, by name ('cpu', 'cuda:0')."""
    return "cpu" if index == CPU_INDEX else f"cuda:{index}"


def check_on(model: nn.Module, device: torch.device) -> None:
    """Raise unless every parameter and buffer of `model` is on `device` (no silent mix)."""
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    stray = [name for name, t in tensors.items() if t.device != device]
    if stray:
        raise RuntimeError(
            f"{len(stray)} tensor(s) of the model are not on {device} (first: {stray[0]} on "
            f"{tensors[stray[0]].device}): not computing on a device the run did not ask for"
        )


def model_device(model: nn.Module) -> torch.device:
    """The one device every parameter of `model` is on (a model split across devices fails)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise RuntimeError(
            f"the model's parameters are on {sorted(map(str, devices))}: expected one device"
        )
    return devices.pop()


def data_on(device: torch.device, data: BatchTensorDataset) -> BatchTensorDataset:
    """`data` with its tensors on `device` (itself when they are already there)."""
    if all(t.device == device for t in data.tensors):
        return data
    return BatchTensorDataset(*(t.to(device) for t in data.tensors))
