"""The C++ extension is built and registers its ops (a missing protoclr._C fails here, never skips)."""

import torch

from protoclr.ops import backend_ext


def test_extension_loads():
    assert backend_ext._IMPORT_ERROR is None, f"protoclr._C failed to import: {backend_ext._IMPORT_ERROR}"


def test_cpu_kernels_registered():
    for op in ("assign", "contrastive_fwd", "contrastive_bwd", "siamese_fwd", "siamese_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"protoclr::{op}", "CPU"), op
    assert backend_ext.available(torch.device("cpu")) is None


def test_auto_picks_cpu_backend_for_cpu_tensors():
    from protoclr import ops

    assert ops.resolve("auto", torch.device("cpu")) is backend_ext
