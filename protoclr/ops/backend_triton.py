"""`triton` backend: the Triton kernels of `kernels/` (installed as `protoclr.kernels`).

Usable on CUDA tensors, and on CPU tensors when `TRITON_INTERPRET=1` was set before the kernels were
imported (tests). The kernels register as `protoclr_triton::*` ops via `torch.library.triton_op`.
"""

from __future__ import annotations

import os

import torch

try:
    from protoclr.kernels import ops as _kops

    _IMPORT_ERROR = None
except ImportError as e:
    _IMPORT_ERROR = e


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"Triton kernels unavailable ({_IMPORT_ERROR}); install triton (comes with torch on Linux)"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    if device.type == "meta":  # a triton_op's fake implementation is its body, which launches kernels
        return "the triton backend launches kernels; meta tensors work with backend 'cpu', 'cuda' or 'reference'"
    return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def assign(x, prototypes, bias):
    return _kops.assign(x, prototypes, bias)


def contrastive(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode):
    return _kops.contrastive_fwd(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode)


def siamese(h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
    return _kops.siamese_fwd(h, hc, inst, instc, proto, protoc, weight, bias, row_offset)


def torch_ops() -> dict:
    """The registered `protoclr_triton::*` ops by family name (for `torch.library.opcheck` in tests)."""
    return _kops.torch_ops()
