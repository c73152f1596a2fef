"""Test set-up: Triton's CPU interpreter when there is no GPU, seeding, and the `backend` fixture."""

import os
import random

# Must be set before any Triton kernel is decorated (i.e. before protoclr.kernels is imported).
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from protoclr import ops  # noqa: E402

HAS_CUDA = _HAS_CUDA


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def backend_device(name: str) -> str:
    """Device on which a backend is tested: the GPU backends on CUDA, triton on the CPU interpreter if no GPU."""
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if HAS_CUDA else "cpu"
    return "cpu"


def _backend_params():
    params = []
    for name in ops.BACKENDS:
        if name == "reference":
            continue
        marks = [pytest.mark.gpu] if backend_device(name) == "cuda" else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """Every non-reference backend, on its device; GPU-only ones are marked `gpu` and skipped without CUDA."""
    name = request.param
    dev = backend_device(name)
    if dev == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return name, torch.device(dev)
