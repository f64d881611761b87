"""Where the model runs and in what precision, and how much memory it has."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" picks CUDA, then Apple's MPS, then the CPU."""
    if str(device) != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"`device` must be auto, cpu, cuda, cuda:N or mps but is {device!r}.") from error
        _check_available(chosen)
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_available(device: torch.device) -> None:
    """Refuse a device this PyTorch cannot use, before any model loads (torch's own error comes at the first tensor
    moved there, as an AssertionError)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"`device` is {str(device)!r} but this PyTorch sees no CUDA GPU (a CPU-only build, or no driver); "
                "use `--device auto` or `--device cpu`."
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"`device` is {str(device)!r} but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}."
            )
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(
            f"`device` is {str(device)!r} but Apple's MPS is not available here; use `--device auto` or `--device cpu`."
        )


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto" is float16 on a GPU and float32 on the CPU; names like "bfloat16" are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be 'auto' or one of {sorted(DTYPES)} but is {dtype!r}.")
    return DTYPES[dtype]


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a frozen module to `device` and `dtype` (casting only when needed: diffusers warns on every cast)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory `device` has in all: a CUDA GPU's own; on the CPU (and MPS, which shares it) the machine's RAM,
    or a container's cgroup limit where lower. None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            total = min(total, int(Path(limit).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return total
