"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018, as in DINO's eval_knn.py).

Each test feature votes with its k most cosine-similar training features; neighbour j adds exp(s_j / T) to its
class. k = 20, T = 0.07 are DINO's defaults and SPEC's kNN monitor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_classify"]


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    t: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted kNN accuracy.

    Args:
        train_feats: (Ntr, D) features of the memory bank (any float dtype; L2-normalised here).
        train_labels: (Ntr,) int64 class ids.
        test_feats: (Nte, D) query features; test_labels: (Nte,) int64.
        k: neighbours (capped at Ntr). t: temperature of the vote weights exp(cos / t).
        num_classes: C; default max label + 1.
        chunk: queries per similarity block (memory: chunk × Ntr).

    Returns:
        {"top1": %, "top5": % (when C >= 5), "n_train": Ntr, "n_test": Nte, "k": k}.

    Raises:
        ValueError: shapes that do not match, or an empty bank or query set.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.size(1) != test_feats.size(1):
        raise ValueError(
            f"knn_classify: train_feats and test_feats must be (N, D) with one D, got "
            f"{tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.size(0),) or test_labels.shape != (test_feats.size(0),):
        raise ValueError("knn_classify: train_labels/test_labels must be (N,) like their features")
    if train_feats.size(0) == 0 or test_feats.size(0) == 0:
        raise ValueError("knn_classify: empty memory bank or query set")
    device = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float().to(device), dim=1)
    train_labels = train_labels.to(device)
    test_labels = test_labels.to(device)
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    k = min(k, bank.size(0))
    correct1 = correct5 = 0
    for s in range(0, queries.size(0), chunk):
        q = queries[s : s + chunk]
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(q.size(0), c, device=device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        pred = votes.argsort(dim=1, descending=True)
        y = test_labels[s : s + chunk, None]
        correct1 += int((pred[:, :1] == y).any(1).sum())
        correct5 += int((pred[:, : min(5, c)] == y).any(1).sum())
    n = queries.size(0)
    out = {"top1": 100.0 * correct1 / n, "n_train": bank.size(0), "n_test": n, "k": k}
    if c >= 5:
        out["top5"] = 100.0 * correct5 / n
    return out
