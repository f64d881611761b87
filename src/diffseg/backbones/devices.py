"""Where the model runs and in what precision."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" picks CUDA, then Apple's MPS, then the CPU."""
    if str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"`device` must be auto, cpu, cuda, cuda:N or mps but is {device!r}.") from error
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
