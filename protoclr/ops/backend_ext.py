"""`cpu` and `cuda` backends: the C++ ops of `protoclr._C` (csrc/cpu/*.cpp, csrc/cuda/*.cu).

Both backends call the same `torch.ops.protoclr.*` ops; the tensors' device picks the kernel. This module
adds what the C++ side does not: fake (meta) implementations for `torch.compile`/`opcheck`, and autograd.
"""

from __future__ import annotations

import torch

from . import autograd
from .checks import stat_dtype

try:
    from protoclr import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

    _IMPORT_ERROR = None
except ImportError as e:  # not built
    _IMPORT_ERROR = e

_OPS = ("assign", "contrastive_fwd", "contrastive_bwd", "siamese_fwd", "siamese_bwd")
BUILD_HINT = "build it with `make install` (or `pip install -e . --no-build-isolation`)"


def available(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"protoclr._C is not built ({_IMPORT_ERROR}); {BUILD_HINT}"
    key = {"cuda": "CUDA", "cpu": "CPU", "meta": "Meta"}.get(device.type)  # Meta: the fake implementations below
    if key is None:
        return f"protoclr._C has no kernels for {device.type} tensors"
    missing = [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"protoclr::{op}", key)]
    if missing and key == "CUDA":
        return "protoclr._C was built without CUDA kernels; rebuild with PROTOCLR_CUDA=1 on a CUDA machine"
    if missing:
        return f"protoclr._C has no {key} kernel for {', '.join(missing)}"
    return None


if _IMPORT_ERROR is None:
    _ops = torch.ops.protoclr

    @torch.library.register_fake("protoclr::assign")
    def _assign_fake(x, prototypes, bias):
        torch._check(x.dim() == 2 and prototypes.dim() == 2 and x.size(1) == prototypes.size(1))
        return x.new_empty(x.size(0), dtype=torch.int64), x.new_empty(x.size(0), dtype=stat_dtype(x.dtype))

    @torch.library.register_fake("protoclr::contrastive_fwd")
    def _contrastive_fwd_fake(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode):
        torch._check(z.dim() == 2 and zc.dim() == 2 and z.size(1) == zc.size(1))
        acc = stat_dtype(z.dtype)
        return z.new_empty(z.size(0), dtype=acc), z.new_empty(z.size(0), 5, dtype=acc)

    @torch.library.register_fake("protoclr::contrastive_bwd")
    def _contrastive_bwd_fake(grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset, tau, fn_mode):
        return torch.empty_like(z), torch.empty_like(zc)

    @torch.library.register_fake("protoclr::siamese_fwd")
    def _siamese_fwd_fake(h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
        torch._check(h.dim() == 2 and hc.dim() == 2 and h.size(1) == hc.size(1))
        acc = stat_dtype(h.dtype)
        return h.new_empty(h.size(0), 2, dtype=acc), h.new_empty(h.size(0), 2, dtype=acc)

    @torch.library.register_fake("protoclr::siamese_bwd")
    def _siamese_bwd_fake(grad_loss, h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
        return torch.empty_like(h), torch.empty_like(hc), torch.empty_like(weight), torch.empty_like(bias)

    autograd.register_contrastive("protoclr::contrastive_fwd", _ops.contrastive_bwd.default)
    autograd.register_siamese("protoclr::siamese_fwd", _ops.siamese_bwd.default)


def assign(x, prototypes, bias):
    return torch.ops.protoclr.assign.default(x, prototypes, bias)


def contrastive(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode):
    return torch.ops.protoclr.contrastive_fwd.default(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode)


def siamese(h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
    return torch.ops.protoclr.siamese_fwd.default(h, hc, inst, instc, proto, protoc, weight, bias, row_offset)


def torch_ops() -> dict:
    """The registered ops behind this backend, by family name (for `torch.library.opcheck` in tests)."""
    ns = torch.ops.protoclr
    return {name: getattr(ns, name).default for name in _OPS}
