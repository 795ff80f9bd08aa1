"""The divergences by their formulas, written once for the tests of
kdloss.numpy and kdloss.torch, independently of the library: one form over
a KL function, so the NumPy rows and the torch tensors (autograd) share it.

p is the teacher's distribution, q the student's, over the last dimension.
"""

import numpy as np


def np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(p, q):
    """KL(p||q) over the last dimension, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def torch_kl(p, q):
    """KL(p||q) over the last dimension, 0 log 0 = 0 (and a zero gradient
    there)."""
    import torch

    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def divergence(p, q, div, alpha, beta, kl, weights=None):
    """The divergence `div` of (p, q); alpha: SKL/SRKL skew, beta: JSD
    weight, weights: AKL's (head, tail) weights (constants)."""
    if div == "fkl":
        return kl(p, q)
    if div == "rkl":
        return kl(q, p)
    if div == "fkl_rkl":
        return kl(p, q) + kl(q, p)
    if div == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if div == "tvd":
        return 0.5 * abs(p - q).sum(-1)
    if div == "skl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if div == "srkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if div == "akl":
        wh, wt = weights
        return wh * kl(p, q) + wt * kl(q, p)
    raise AssertionError(div)


def torch_akl_weights(p, q, head):
    """AKL's weights of rows (p, q) with the boolean head mask: the shares of
    |p - q| in the head and the tail (1/2 each when p = q), no gradient."""
    import torch

    with torch.no_grad():
        gap = (p - q).abs()
        gh, gt = (gap * head).sum(-1), (gap * ~head).sum(-1)
        tot = gh + gt
        half = torch.full_like(tot, 0.5)
        return torch.where(tot > 0, gh / tot, half), torch.where(tot > 0, gt / tot, half)


def reduce(rows, kept, reduction, scale):
    """Per-row losses times scale, reduced: none, sum, or mean over the
    `kept` rows (0 when none is kept)."""
    rows = rows * scale
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / kept if kept else rows.sum() * 0


def torch_reduce(loss, labels, ignore_index, reduction, scale):
    """reduce() of per-row torch losses, the rows labelled ignore_index set
    to 0 and left out of the mean."""
    import torch

    kept = loss.shape[0]
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        kept = int(keep.sum())
    return reduce(loss, kept, reduction, scale)
