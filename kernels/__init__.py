"""Triton kernels of protoclr, installed as `protoclr.kernels` (one file per fused op)."""
