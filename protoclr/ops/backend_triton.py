"""`triton` backend: the Triton kernels of `kernels/` (installed as `protoclr.kernels`) as `protoclr_triton::*` ops.

Usable on CUDA tensors, and on CPU tensors when `TRITON_INTERPRET=1` was set before the kernels were
imported (tests). The schemas are those of csrc/ops.cpp. On a GPU each op is a `torch.library.triton_op`
whose body launches its kernels through `wrap_triton`, so `torch.compile` sees (and Inductor can schedule) the
kernels themselves; the fake implementation is the body itself run on fake tensors. Under the CPU interpreter
`wrap_triton` cannot trace interpreted kernels, so the same bodies register as opaque
`torch.library.custom_op`s with explicit fakes. Autograd is registered once, through `autograd`, exactly as
for the C++ ops.

The contrastive ops run the symmetric kernels (`kernels/contrastive_sym.py`, one upper-triangle pass) when
PROTOCLR_TRITON_SYMMETRIC=1 and zc is z itself, else the general row/column kernels (`kernels/contrastive.py`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import autograd
from .checks import check_fn_mode

try:
    from protoclr.kernels import assign as _assign
    from protoclr.kernels import contrastive as _contrastive
    from protoclr.kernels import contrastive_sym as _contrastive_sym
    from protoclr.kernels import siamese as _siamese
    from protoclr.kernels.utils import INTERPRET

    _IMPORT_ERROR = None
except ImportError as e:
    _IMPORT_ERROR = e

NAMESPACE = "protoclr_triton"
OPS = ("assign", "contrastive_fwd", "contrastive_bwd", "siamese_fwd", "siamese_bwd")


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


def _mask(fn_mode: str) -> bool:
    """The kernels' MASK flag (Den(i) = A(i) \\ F(i)); "none" and "attract" share the kernels (SPEC 1.1)."""
    check_fn_mode("contrastive", fn_mode)
    return fn_mode == "mask"


def _contrastive_impl(z, zc, inst, instc, proto, protoc, row_offset: int):
    symmetric = _contrastive_sym.selected(z, zc, inst, instc, proto, protoc, row_offset)
    return _contrastive_sym if symmetric else _contrastive


if _IMPORT_ERROR is None:

    def _register(name: str, fake):
        qualname = f"{NAMESPACE}::{name}"

        def deco(fn):
            if INTERPRET:
                op = torch.library.custom_op(qualname, fn, mutates_args=())
                op.register_fake(fake)
            else:
                op = torch.library.triton_op(qualname, fn, mutates_args=())
            return op

        return deco

    def _assign_fake(x, prototypes, bias):
        torch._check(x.dim() == 2 and prototypes.dim() == 2 and x.size(1) == prototypes.size(1))
        return _assign.alloc_assign(x)

    @_register("assign", _assign_fake)
    def _assign_op(x: Tensor, prototypes: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        return _assign.assign(x, prototypes, bias)

    def _contrastive_fwd_fake(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode):
        torch._check(z.dim() == 2 and zc.dim() == 2 and z.size(1) == zc.size(1))
        return _contrastive.alloc_fwd(z)

    @_register("contrastive_fwd", _contrastive_fwd_fake)
    def _contrastive_fwd_op(
        z: Tensor, zc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor, protoc: Tensor, row_offset: int,
        tau: float, fn_mode: str,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        impl = _contrastive_impl(z, zc, inst, instc, proto, protoc, row_offset)
        return impl.contrastive_fwd(z, zc, inst, instc, proto, protoc, row_offset, tau, _mask(fn_mode))

    def _contrastive_bwd_fake(grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset, tau, fn_mode):
        return _contrastive.alloc_bwd(z, zc)

    @_register("contrastive_bwd", _contrastive_bwd_fake)
    def _contrastive_bwd_op(
        grad_lse: Tensor, grad_stats: Tensor, z: Tensor, zc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor,
        protoc: Tensor, lse: Tensor, row_offset: int, tau: float, fn_mode: str,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        impl = _contrastive_impl(z, zc, inst, instc, proto, protoc, row_offset)
        return impl.contrastive_bwd(
            grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset, tau, _mask(fn_mode)
        )

    def _siamese_fwd_fake(h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
        torch._check(h.dim() == 2 and hc.dim() == 2 and h.size(1) == hc.size(1))
        return _siamese.alloc_fwd(h)

    @_register("siamese_fwd", _siamese_fwd_fake)
    def _siamese_fwd_op(
        h: Tensor, hc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor, protoc: Tensor, weight: Tensor,
        bias: Tensor, row_offset: int,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        return _siamese.siamese_fwd(h, hc, inst, instc, proto, protoc, weight, bias, row_offset)

    def _siamese_bwd_fake(grad_loss, h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
        return _siamese.alloc_bwd(h, hc, weight, bias)

    @_register("siamese_bwd", _siamese_bwd_fake)
    def _siamese_bwd_op(
        grad_loss: Tensor, h: Tensor, hc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor, protoc: Tensor,
        weight: Tensor, bias: Tensor, row_offset: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        return _siamese.siamese_bwd(grad_loss, h, hc, inst, instc, proto, protoc, weight, bias, row_offset)

    _ns = getattr(torch.ops, NAMESPACE)
    autograd.register_contrastive(f"{NAMESPACE}::contrastive_fwd", _ns.contrastive_bwd.default)
    autograd.register_siamese(f"{NAMESPACE}::siamese_fwd", _ns.siamese_bwd.default)


def assign(x, prototypes, bias):
    return torch.ops.protoclr_triton.assign.default(x, prototypes, bias)


def contrastive(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode):
    return torch.ops.protoclr_triton.contrastive_fwd.default(
        z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode
    )


def siamese(h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
    return torch.ops.protoclr_triton.siamese_fwd.default(h, hc, inst, instc, proto, protoc, weight, bias, row_offset)


def torch_ops() -> dict:
    """The registered `protoclr_triton::*` ops by family name (for `torch.library.opcheck` in tests)."""
    ns = getattr(torch.ops, NAMESPACE)
    return {name: getattr(ns, name).default for name in OPS}
