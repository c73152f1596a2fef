"""Test set-up: Triton's CPU interpreter when there is no GPU, seeding, the `backend` fixture and its per-backend
cases (`backend_cases`)."""

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


def _marks(name: str) -> list:
    return [pytest.mark.gpu] if backend_device(name) == "cuda" else []


def _backend_params():
    return [pytest.param(name, marks=_marks(name), id=name) for name in ops.BACKENDS if name != "reference"]


def backend_cases(cases: dict[str, list], default: list, case_id) -> list:
    """(backend, case) parameters for a test whose sizes differ per backend (each crossing its own tiles), through
    the `backend` fixture: `@pytest.mark.parametrize("backend,case", backend_cases(...), indirect=["backend"])`.
    Backends missing from `cases` get `default`; `case_id(case)` names a case in the test id."""
    return [
        pytest.param(name, case, marks=_marks(name), id=f"{name}-{case_id(case)}")
        for name in ops.BACKENDS
        if name != "reference"
        for case in cases.get(name, default)
    ]


@pytest.fixture(params=_backend_params())
def backend(request):
    """Every non-reference backend, on its device; GPU-only ones are marked `gpu` and skipped without CUDA."""
    name = request.param
    dev = backend_device(name)
    if dev == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return name, torch.device(dev)
