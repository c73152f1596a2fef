"""Autograd for the fused op families, registered once for every backend that provides `<op>_fwd` and
`<op>_bwd` as torch ops (the C++ `protoclr::*` ops and the Triton `protoclr_triton::*` ops alike).

The backward of each family is itself a registered op, so `torch.compile` traces through it without a
graph break. Only O(N·D) inputs and the O(N) log-sum-exp are saved; the backward recomputes similarities.
"""

from __future__ import annotations

import torch


def register_contrastive(fwd: str, bwd) -> None:
    """fwd: qualified name of `contrastive_fwd`; bwd: the `contrastive_bwd` op (callable)."""

    def setup_context(ctx, inputs, output):
        z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode = inputs
        lse, _ = output
        ctx.save_for_backward(z, zc, inst, instc, proto, protoc, lse)
        ctx.scalars = (row_offset, tau, fn_mode)

    def backward(ctx, grad_lse, grad_stats):
        z, zc, inst, instc, proto, protoc, lse = ctx.saved_tensors
        dz, dzc = bwd(
            grad_lse.contiguous(), grad_stats.contiguous(), z, zc, inst, instc, proto, protoc, lse, *ctx.scalars
        )
        return dz, dzc, None, None, None, None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def register_siamese(fwd: str, bwd) -> None:
    """fwd: qualified name of `siamese_fwd`; bwd: the `siamese_bwd` op (callable)."""

    def setup_context(ctx, inputs, output):
        h, hc, inst, instc, proto, protoc, weight, bias, row_offset = inputs
        ctx.save_for_backward(h, hc, inst, instc, proto, protoc, weight, bias)
        ctx.row_offset = row_offset

    def backward(ctx, grad_loss, grad_count):
        h, hc, inst, instc, proto, protoc, weight, bias = ctx.saved_tensors
        dh, dhc, dw, db = bwd(grad_loss.contiguous(), h, hc, inst, instc, proto, protoc, weight, bias, ctx.row_offset)
        return dh, dhc, None, None, None, None, dw, db, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
