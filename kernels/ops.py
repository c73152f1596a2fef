"""The Triton kernels as `protoclr_triton::*` torch ops, with the schemas of csrc/ops.cpp.

On a GPU each op is a `torch.library.triton_op` whose body launches its kernels through `wrap_triton`, so
`torch.compile` sees (and Inductor can schedule) the kernels themselves; the fake implementation is the
body itself run on fake tensors. Under the CPU interpreter (`TRITON_INTERPRET=1`) `wrap_triton` cannot trace
interpreted kernels, so the same bodies register as opaque `torch.library.custom_op`s with explicit fakes.
Autograd is registered once, through `protoclr.ops.autograd`, exactly as for the C++ ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protoclr.ops import autograd

from . import assign as _assign
from . import contrastive as _contrastive
from . import contrastive_sym as _contrastive_sym
from . import siamese as _siamese
from .utils import INTERPRET

NAMESPACE = "protoclr_triton"
OPS = ("assign", "contrastive_fwd", "contrastive_bwd", "siamese_fwd", "siamese_bwd")


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
def assign(x: Tensor, prototypes: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return _assign.assign(x, prototypes, bias)


def _contrastive_fwd_fake(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode):
    torch._check(z.dim() == 2 and zc.dim() == 2 and z.size(1) == zc.size(1))
    return _contrastive.alloc_fwd(z)


@_register("contrastive_fwd", _contrastive_fwd_fake)
def contrastive_fwd(
    z: Tensor, zc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor, protoc: Tensor, row_offset: int, tau: float,
    fn_mode: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    impl = (
        _contrastive_sym if _contrastive_sym.selected(z, zc, inst, instc, proto, protoc, row_offset) else _contrastive
    )
    return impl.contrastive_fwd(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode)


def _contrastive_bwd_fake(grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset, tau, fn_mode):
    return _contrastive.alloc_bwd(z, zc)


@_register("contrastive_bwd", _contrastive_bwd_fake)
def contrastive_bwd(
    grad_lse: Tensor, grad_stats: Tensor, z: Tensor, zc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor,
    protoc: Tensor, lse: Tensor, row_offset: int, tau: float, fn_mode: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    impl = (
        _contrastive_sym if _contrastive_sym.selected(z, zc, inst, instc, proto, protoc, row_offset) else _contrastive
    )
    return impl.contrastive_bwd(grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset, tau, fn_mode)


def _siamese_fwd_fake(h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
    torch._check(h.dim() == 2 and hc.dim() == 2 and h.size(1) == hc.size(1))
    return _siamese.alloc_fwd(h)


@_register("siamese_fwd", _siamese_fwd_fake)
def siamese_fwd(
    h: Tensor, hc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor, protoc: Tensor, weight: Tensor, bias: Tensor,
    row_offset: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _siamese.siamese_fwd(h, hc, inst, instc, proto, protoc, weight, bias, row_offset)


def _siamese_bwd_fake(grad_loss, h, hc, inst, instc, proto, protoc, weight, bias, row_offset):
    return _siamese.alloc_bwd(h, hc, weight, bias)


@_register("siamese_bwd", _siamese_bwd_fake)
def siamese_bwd(
    grad_loss: Tensor, h: Tensor, hc: Tensor, inst: Tensor, instc: Tensor, proto: Tensor, protoc: Tensor,
    weight: Tensor, bias: Tensor, row_offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _siamese.siamese_bwd(grad_loss, h, hc, inst, instc, proto, protoc, weight, bias, row_offset)


_ns = getattr(torch.ops, NAMESPACE)
autograd.register_contrastive(f"{NAMESPACE}::contrastive_fwd", _ns.contrastive_bwd.default)
autograd.register_siamese(f"{NAMESPACE}::siamese_fwd", _ns.siamese_bwd.default)


def torch_ops() -> dict:
    """The registered ops by family name (for `torch.library.opcheck`)."""
    return {name: getattr(_ns, name).default for name in OPS}
