"""protoclr: Siamese Prototypical Contrastive Learning (SPCL) with fused kernels."""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
