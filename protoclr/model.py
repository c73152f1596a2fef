"""The SPCL network (SPEC §1-2): a torchvision ResNet backbone, the projector, the siamese head and the prototype
classifier, plus BatchNorm synchronisation across ranks.

    views ─ backbone ─ h (N, C) ─┬─ projector ─ normalize (fp32) ─ z (N, Dz)   L_con
                                 ├─ head: d_ij = w·|h_i - h_j| + b               L_sia (the loss op reads w, b)
                                 └─ classifier ─ logits (N, K)                   L_proto (re-drawn per clustering)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tvr

from . import dist

__all__ = ["SPCLModel", "build_model", "build_backbone", "convert_sync_batchnorm", "DistBatchNorm"]

_BLOCKS = {
    "resnet18": (tvr.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tvr.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tvr.Bottleneck, [3, 4, 6, 3]),
}


class ResNet(tvr.ResNet):
    """torchvision's ResNet with a base `width` (64 = torchvision's, same parameter names) and an optional CIFAR
    stem (3x3 conv, stride 1, no max-pool: keeps 32-px inputs at full resolution through the first stage).
    `fc` is the identity: forward returns the pooled feature h (B, C), C = 8·width·expansion."""

    def __init__(self, block, layers: list[int], width: int = 64, cifar_stem: bool = False) -> None:
        object.__setattr__(self, "_width", width)  # read by _make_layer during super().__init__
        super().__init__(block, layers)
        if width != 64:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feat_dim = 8 * width * block.expansion
        self.fc = nn.Identity()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage: its input is the stem's `width` channels
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = False) -> ResNet:
    """ResNet-18/34/50 (torchvision blocks) returning pooled features; see `ResNet`."""
    if arch not in _BLOCKS:
        raise ValueError(f"build_backbone: arch must be one of {sorted(_BLOCKS)}, got {arch!r}")
    if width < 1:
        raise ValueError(f"build_backbone: width must be >= 1, got {width}")
    block, layers = _BLOCKS[arch]
    return ResNet(block, layers, width, cifar_stem)


class SPCLModel(nn.Module):
    """Backbone + projector Linear(C,H)-BN-ReLU-Linear(H,Dz)-BN + siamese head Linear(C,1) + classifier Linear(C,K).

    Args:
        backbone: maps images (B, 3, H, W) to h (B, C); `feat_dim` = C.
        feat_dim: C. proj_hidden: H (0 = C). proj_dim: Dz. num_prototypes: K (classifier outputs).
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int, proj_dim: int, num_prototypes: int):
        super().__init__()
        hidden = proj_hidden or feat_dim
        self.backbone = backbone
        # The Linear layers feed a BatchNorm, whose shift makes a Linear bias redundant.
        self.projector = nn.Sequential(
            nn.Linear(feat_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim, bias=False),
            nn.BatchNorm1d(proj_dim),
        )
        self.head = nn.Linear(feat_dim, 1)  # siamese: d_ij = head.weight · |h_i - h_j| + head.bias (SPEC 1.2)
        self.classifier = nn.Linear(feat_dim, num_prototypes)
        self.feat_dim = feat_dim

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """views: V tensors (B, 3, H_v, W_v), same-size ones consecutive (large views, then small crops).

        Returns:
            h (V·B, C) pooled features in view order (rows v·B..(v+1)·B-1 are view v), autocast dtype;
            z (V·B, Dz) L2-normalised projections in float32 (float64 for a float64 model);
            logits (V·B, K) of the prototype classifier.
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        # One backbone call per resolution (DINO's multi-crop grouping): BN sees every view of that size at once.
        hs, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            hs.append(self.backbone(torch.cat(views[start:end]) if end - start > 1 else views[start]))
            start = end
        h = torch.cat(hs) if len(hs) > 1 else hs[0]
        p = self.projector(h)
        z = F.normalize(p.float() if p.dtype in (torch.float16, torch.bfloat16) else p, dim=1)
        logits = self.classifier(h)
        return h, z, logits

    @torch.no_grad()
    def reset_classifier(self, init: str = "random", seed: int = 0) -> None:
        """Fresh prototype classifier after a re-clustering (SPEC 1.3).

        Args:
            init: "random" = nn.Linear's default init, drawn from a CPU generator seeded with `seed` (the same on
                every rank and after a resume; the global RNG is untouched). "zero" = all zeros: CE starts at ln K,
                the backbone gets no gradient through the classifier at first, and the first step (plain: LARS does
                not rescale |W| = 0) sets row k ∝ Σ_{i: proto_i=k} h_i - (1/K) Σ_i h_i over the batch, so the term
                is active within a few steps instead of after many LARS steps.
            seed: generator seed for "random".
        """
        if init == "zero":
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
            return
        if init != "random":
            raise ValueError(f"reset_classifier: init must be 'random' or 'zero', got {init!r}")
        g = torch.Generator().manual_seed(seed)
        w = torch.empty(self.classifier.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=5**0.5, generator=g)  # nn.Linear's default
        bound = 1 / self.feat_dim**0.5
        b = torch.empty(self.classifier.bias.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)
        self.classifier.weight.copy_(w)
        self.classifier.bias.copy_(b)


def build_model(cfg) -> SPCLModel:
    """SPCLModel from a Config (`cfg.model`, `cfg.cluster.k`, `cfg.aug.image_size`)."""
    m = cfg.model
    cifar = m.stem == "cifar" or (m.stem == "auto" and cfg.aug.image_size <= 64)
    backbone = build_backbone(m.arch, m.width, cifar)
    return SPCLModel(backbone, backbone.feat_dim, m.proj_hidden, m.proj_dim, cfg.cluster.k)


# ------------------------------------------------------------------------------------------ BatchNorm sync


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device and process-group
    backend (torch's SyncBatchNorm is GPU-only; this one serves gloo/CPU, e.g. the DDP equivalence test).

    Two differentiable all-reduces (sum, then centred sum of squares) give the exact global mean and biased
    variance; the backward of each all-reduce sums the gradients of every rank, so the result equals BatchNorm
    on the concatenated batch. Running statistics use the unbiased global variance, as BatchNorm does.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"DistBatchNorm: expected an input of at least 2 dims (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.size(1)] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = dist.all_reduce_sum(torch.tensor(float(x.numel() // x.size(1)), dtype=xf.dtype, device=x.device))
        mean = dist.all_reduce_sum_grad(xf.sum(dims)) / n
        xc = xf - mean.view(shape)
        var = dist.all_reduce_sum_grad((xc * xc).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` synchronised across ranks: torch's SyncBatchNorm on CUDA (NCCL-optimised),
    `DistBatchNorm` elsewhere. Parameters and buffers are kept (same names, so checkpoints are unaffected)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistBatchNorm):
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.to(device=module.weight.device if module.affine else None)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out
