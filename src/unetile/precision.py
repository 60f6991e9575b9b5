"""Reduced-precision prediction: bfloat16 where the hardware computes it natively.

fp32 is the paper's, and the default of the Python functions; the command
line's default ``auto`` takes bf16 where the hardware has it. ``bf16`` runs the convolutions under
``torch.autocast`` in bfloat16 (8 bits of mantissa; the soft-max and
everything after it stay in float32). It pays only where the processor has
bf16 arithmetic: a CUDA GPU that ``torch.cuda.is_bf16_supported()`` accepts,
an x86 CPU with AVX-512 BF16 or AMX, an ARM CPU with its BF16 extension.
Elsewhere oneDNN emulates bf16 with fp32 instructions plus conversions,
slower than fp32, so it is refused with a message saying what the processor
lacks.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")
CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86, then ARM names


def cpu_features() -> dict:
    """The CPU's instruction-set features as torch detects them (``torch.cpu.get_capabilities``)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    return dict(get()) if get is not None else {}


def bf16_unsupported_reason(device: torch.device) -> str | None:
    """None when ``device`` computes bfloat16 natively, else one sentence saying what it lacks."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return None
        name = torch.cuda.get_device_name(device)
        return f"the GPU {name} has no bf16 arithmetic (it needs compute capability 8.0 or newer)"
    if device.type == "cpu":
        features = cpu_features()
        if any(features.get(name) for name in CPU_BF16_FEATURES):
            return None
        vector = [name for name in ("avx512_f", "avx2", "neon") if features.get(name)]
        has = f" (it has {', '.join(vector)})" if vector else ""
        return (
            f"this CPU lacks AVX-512 BF16 and AMX{has}, so bf16 would be emulated and slower "
            "than fp32"
        )
    return f"bf16 prediction is not supported on {device.type}"


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if ``device`` runs it natively; ValueError saying what is missing and
    what to do otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        reason = bf16_unsupported_reason(device)
        if reason is not None:
            raise ValueError(f"precision bf16: {reason}; use fp32 (the default)")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 where ``device`` computes it natively, else fp32; other values as
    :func:`check_precision` accepts them."""
    if precision == "auto":
        return "bf16" if bf16_unsupported_reason(device) is None else "fp32"
    return check_precision(precision, device)


def autocast(precision: str, device: torch.device):
    """The context in which the network runs at ``precision`` (fp32: nothing changes)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
