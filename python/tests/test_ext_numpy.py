"""The extensions of kdloss_ext.h through kdloss.numpy (float64 references):
the sparse teacher against a NumPy closed form written here and against the
dense reference (k = V), the fused linear + loss against the dense reference
on logits materialised here, the vocabulary-parallel shard steps (ranks
simulated in one process) against the unsharded reference; bad arguments
raise the mapped exception and leave every output untouched.  Needs numpy
only; skipped when the loaded library has no kdloss_ext.h API."""

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import kdloss
import kdloss.numpy as kn
from kdloss import _lib
from textbook import divergence, np_kl, np_log_softmax, reduce


@pytest.fixture(autouse=True)
def _need_ext():
    if not _lib.ext_available():
        pytest.skip("the loaded libkdloss has no kdloss_ext.h API")


SMOOTH_RENORM = ["fkl", "jsd", "skl", "srkl"]
DIVS = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]
OPTS = dict(alpha=0.2, beta=0.3)


# ------------------------------------------------------------ the closed form
log_softmax = np_log_softmax


def sparse_cells(s, idx, lp, mode, tau):
    """(p, q) of one row: over all V tokens (renormalised) or the k support
    cells plus the bucket (tail)."""
    q = np.exp(log_softmax(s / tau))
    if mode == "renormalised":
        p = np.zeros_like(q)
        p[idx] = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
        return p, q
    pj = np.exp(lp)
    qj = q[idx]
    out = np.ones(q.size, dtype=bool)
    out[idx] = False
    return np.append(pj, max(1.0 - pj.sum(), 0.0)), np.append(qj, q[out].sum())


def tail_akl_weights(p, q, lp, idx, rule, mu, top_k):
    """AKL head among the support cells (teacher order: log-prob descending,
    ties by lower index), the bucket always tail."""
    k = idx.size
    order = sorted(range(k), key=lambda j: (-lp[j], idx[j]))
    head = np.zeros(k + 1, dtype=bool)
    c = 0.0
    for n, j in enumerate(order):
        if rule == "topk":
            take = n < top_k
        elif rule == "reference":
            take = n == 0 or c + p[j] <= mu
        else:
            take = c < mu
        if not take:
            break
        head[j] = True
        c += p[j]
    gap = np.abs(p - q)
    gh, gt = gap[head].sum(), gap[~head].sum()
    return (0.5, 0.5) if gh + gt == 0 else (gh / (gh + gt), gt / (gh + gt))


def sparse_textbook(S, I, LP, mode, div, tau=1.0, reduction="mean", labels=None, ignore_index=-100,
                    scale=1.0, weights=None, rule="reference", mu=0.5, top_k=1):
    rows, keep = [], []
    for i in range(S.shape[0]):
        if labels is not None and labels[i] == ignore_index:
            rows.append(0.0)
            keep.append(False)
            continue
        p, q = sparse_cells(S[i], I[i], LP[i], mode, tau)
        w = None
        if div == "akl":
            w = weights[i] if weights is not None else tail_akl_weights(p, q, LP[i], I[i], rule,
                                                                        mu, top_k)
        rows.append(divergence(p, q, div, OPTS["alpha"], OPTS["beta"], np_kl, w))
        keep.append(True)
    return reduce(np.array(rows), sum(keep), reduction, scale)


def fd(f, S, h=1e-6):
    g = np.zeros_like(S)
    for ix in np.ndindex(S.shape):
        sp, sm = S.copy(), S.copy()
        sp[ix] += h
        sm[ix] -= h
        g[ix] = (np.sum(f(sp)) - np.sum(f(sm))) / (2 * h)
    return g


def sparse_data(seed=0, n=4, v=11, k=4, tau=1.0):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n, v)) * 1.5
    T = rng.normal(size=(n, v)) * 1.5
    T[:, 2] += 3.0
    lpt = log_softmax(T / tau)
    I = np.argsort(-lpt, axis=1)[:, :k]
    for i in range(n):  # any order within the row
        rng.shuffle(I[i])
    LP = np.take_along_axis(lpt, I, axis=1)
    return S, T, np.ascontiguousarray(I), np.ascontiguousarray(LP)


# ------------------------------------------------------------ sparse teacher
@pytest.mark.parametrize("mode,div", [("renormalised", d) for d in SMOOTH_RENORM + ["tvd"]]
                         + [("tail", d) for d in DIVS])
def test_sparse_full_support_is_the_dense_loss(mode, div):
    S, T, _, _ = sparse_data(seed=1, v=9, k=9)
    tau = 1.7
    lpt = log_softmax(T / tau)
    I = np.tile(np.arange(9), (S.shape[0], 1))
    labels = np.array([0, -100, 2, 3])
    a, ga, st = kn.sparse_distill_loss(S, I, lpt, mode=mode, divergence=div, temperature=tau,
                                       labels=labels, **OPTS)
    b, gb, _ = kn.distill_loss(S, T, divergence=div, temperature=tau, labels=labels, **OPTS)
    assert a == pytest.approx(b, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-12 * np.abs(gb).max())
    assert st == {"valid_rows": 3, "invalid_rows": 0, "bad_index_rows": 0}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode,div", [("renormalised", d) for d in SMOOTH_RENORM + ["tvd"]]
                         + [("tail", d) for d in DIVS])
def test_sparse_closed_form(mode, div, reduction):
    S, _, I, LP = sparse_data(seed=2)
    tau, scale = 1.3, 2.0
    labels = np.array([5, 1, -100, 0])
    kw = dict(tau=tau, reduction=reduction, labels=labels, scale=scale)
    a, ga, _ = kn.sparse_distill_loss(S, I, LP, mode=mode, divergence=div, temperature=tau,
                                      labels=labels, reduction=reduction, scale=scale, **OPTS)
    want = sparse_textbook(S, I, LP, mode, div, **kw)
    np.testing.assert_allclose(a, want, rtol=1e-12, atol=1e-14)
    weights = None
    if div == "akl":  # the weights are constants of the gradient
        weights = [tail_akl_weights(*sparse_cells(S[i], I[i], LP[i], mode, tau), LP[i], I[i],
                                    "reference", 0.5, 1) for i in range(S.shape[0])]
    g = fd(lambda x: sparse_textbook(x, I, LP, mode, div, weights=weights, **kw), S)
    np.testing.assert_allclose(ga, g, rtol=0, atol=1e-7 * max(1.0, np.abs(g).max()))
    assert not ga[2].any()


@pytest.mark.parametrize("rule,mu,top_k", [("reference", 0.6, 1), ("mass", 0.5, 1), ("topk", 0.5, 3)])
def test_sparse_tail_akl_head_rules(rule, mu, top_k):
    S, _, I, LP = sparse_data(seed=3, k=5)
    a, _, _ = kn.sparse_distill_loss(S, I, LP, mode="tail_bucket", divergence="akl",
                                     head_rule=rule, mu=mu, top_k=top_k, reduction="none")
    want = sparse_textbook(S, I, LP, "tail", "akl", reduction="none", rule=rule, mu=mu, top_k=top_k)
    np.testing.assert_allclose(a, want, rtol=1e-12, atol=1e-14)


def test_sparse_leading_dims_strided_and_dtypes():
    S, _, I, LP = sparse_data(seed=4, n=6)
    a, ga, _ = kn.sparse_distill_loss(S.reshape(2, 3, -1), I.reshape(2, 3, -1),
                                      LP.reshape(2, 3, -1), reduction="none")
    b, gb, _ = kn.sparse_distill_loss(S, I, LP, reduction="none")
    assert a.shape == (2, 3) and ga.shape == (2, 3, 11)
    np.testing.assert_array_equal(a.reshape(-1), b)
    np.testing.assert_array_equal(ga.reshape(6, -1), gb)
    # rows of a wider buffer (ld > V, ld_indices > k): same numbers
    wide = np.full((6, 20), np.nan)
    wide[:, :11] = S
    iw = np.full((6, 7), -1, dtype=np.int64)
    iw[:, :4] = I
    lw = np.full((6, 7), np.nan)
    lw[:, :4] = LP
    c, gc, _ = kn.sparse_distill_loss(wide[:, :11], iw[:, :4], lw[:, :4], reduction="none")
    np.testing.assert_array_equal(c, b)
    np.testing.assert_array_equal(gc, gb)
    # float32 student, float16 log-probs: read exactly
    d, _, _ = kn.sparse_distill_loss(S.astype(np.float32), I, LP.astype(np.float16))
    e, _, _ = kn.sparse_distill_loss(S.astype(np.float32).astype(np.float64), I,
                                     LP.astype(np.float16).astype(np.float64))
    assert d == e


def test_sparse_invalid_rows_and_index_check():
    S, _, I, LP = sparse_data(seed=5)
    I = I.copy()
    I[1, 2] = I[1, 0]  # repeated index
    with pytest.raises(kdloss.InvalidRowsError, match="1 of 4 rows"):
        kn.sparse_distill_loss(S, I, LP)
    loss, grad, st = kn.sparse_distill_loss(S, I, LP, reduction="none", raise_on_invalid=False)
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2, 3]]).all() and not grad[1].any()
    assert st == {"valid_rows": 3, "invalid_rows": 1, "bad_index_rows": 1}
    with pytest.raises(kdloss.KdlossValueError, match="KDL_STATUS_BAD_PARAM") as e:
        kn.sparse_distill_loss(S, I, LP, check_indices=True)
    assert "row" in e.value.detail
    I[1, 2] = 11  # out of [0, V)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_PARAM"):
        kn.sparse_distill_loss(S, I, LP, check_indices=True)
    # a teacher log-prob > 0, and in tail mode a mass above 1
    _, _, I, LP = sparse_data(seed=5)
    LP2 = LP.copy()
    LP2[3, 0] = 0.5
    _, _, st = kn.sparse_distill_loss(S, I, LP2, mode="tail", raise_on_invalid=False)
    assert st["invalid_rows"] == 1 and st["bad_index_rows"] == 0
    # tail mode with k = V: no token off the support holds the rest, so a
    # teacher mass short of 1 (row 2: half of it) is an invalid row
    S4, T4 = S[:, :4], np.log(np.full((4, 4), 0.25))
    T4[2] = np.log(0.125)
    idx = np.tile(np.arange(4), (4, 1))
    loss, _, st = kn.sparse_distill_loss(S4, idx, T4, mode="tail", reduction="none",
                                         raise_on_invalid=False)
    assert st["invalid_rows"] == 1 and np.isnan(loss[2]) and np.isfinite(loss[[0, 1, 3]]).all()
    with pytest.raises(kdloss.InvalidRowsError, match="with k = V"):
        kn.sparse_distill_loss(S4, idx, T4, mode="tail")


def test_sparse_bad_arguments():
    S, _, I, LP = sparse_data(seed=6)
    with pytest.raises(kdloss.KdlossError, match="NOT_SUPPORTED") as e:
        kn.sparse_distill_loss(S, I, LP, mode="renormalised", divergence="rkl")
    assert not isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="unknown mode 'topk'"):
        kn.sparse_distill_loss(S, I, LP, mode="topk")
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TOP_K"):  # k > V
        kn.sparse_distill_loss(S[:, :3], I, LP)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TOP_K"):  # AKL head larger than k
        kn.sparse_distill_loss(S, I, LP, mode="tail", divergence="akl", head_rule="topk", top_k=5)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TEMPERATURE"):
        kn.sparse_distill_loss(S, I, LP, temperature=0.0)
    with pytest.raises(TypeError, match="int64"):
        kn.sparse_distill_loss(S, I.astype(np.int32), LP)
    with pytest.raises(ValueError, match="shape"):
        kn.sparse_distill_loss(S, I, LP[:, :3])
    with pytest.raises(ValueError, match="leading"):
        kn.sparse_distill_loss(S, I[:3], LP[:3])
    with pytest.raises(ValueError, match="contiguous in its last"):
        kn.sparse_distill_loss(S, np.asfortranarray(I), LP)


# ----------------------------------------------------------- fused linear
def fused_data(seed=0, n=5, d=4, v=9):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(v, d)), rng.normal(size=(n, v)) * 2


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("div", DIVS)
def test_fused_linear_is_the_dense_loss_of_h_wt(div, reduction):
    H, W, T = fused_data(seed=7)
    labels = np.array([1, -100, 0, 3, 2])
    kw = dict(divergence=div, temperature=1.4, labels=labels, reduction=reduction, scale=3.0, **OPTS)
    loss, gh, gw, st = kn.fused_linear_distill_loss(H, W, T, **kw)
    b, dl, _ = kn.distill_loss(H @ W.T, T, **kw)
    np.testing.assert_allclose(loss, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gh, dl @ W, rtol=0, atol=1e-12 * max(1, np.abs(gh).max()))
    np.testing.assert_allclose(gw, dl.T @ H, rtol=0, atol=1e-12 * max(1, np.abs(gw).max()))
    assert st == {"valid_rows": 4, "invalid_rows": 0}


@pytest.mark.parametrize("div", ["fkl", "akl", "jsd", "tvd"])
def test_fused_linear_bias_and_upstream_rows(div):
    """logits = H W^T + b, reduction none with the upstream gradient g per
    row: the losses and the gradients of sum_i g_i loss_i against the dense
    reference on the logits materialised here (dL weighted by g, then
    dL W, dL^T H and the column sums of dL)."""
    H, W, T = fused_data(seed=8)
    b = np.random.default_rng(3).normal(size=9)
    g = np.array([0.5, -1.25, 2.0, 0.0, 1.5])
    labels = np.array([1, 4, -100, 3, 2])
    kw = dict(divergence=div, temperature=1.3, labels=labels, reduction="none", **OPTS)
    loss, gh, gw, st = kn.fused_linear_distill_loss(H, W, T, bias=b, grad_output=g, **kw)
    ref, dl, _ = kn.distill_loss(H @ W.T + b, T, **kw)
    dl = dl * g[:, None]
    np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gh, dl @ W, rtol=0, atol=1e-12 * max(1, np.abs(gh).max()))
    np.testing.assert_allclose(gw, dl.T @ H, rtol=0, atol=1e-12 * max(1, np.abs(gw).max()))
    np.testing.assert_allclose(st["grad_bias"], dl.sum(0), rtol=0, atol=1e-12)
    # the mean with a bias: the fused call's own gradients
    loss, gh, gw, st = kn.fused_linear_distill_loss(H, W, T, bias=b, divergence=div)
    ref, dl, _ = kn.distill_loss(H @ W.T + b, T, divergence=div)
    assert loss == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(st["grad_bias"], dl.sum(0), rtol=0, atol=1e-12)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_PARAM"):  # grad_output with a mean
        kn.fused_linear_distill_loss(H, W, T, grad_output=g)
    with pytest.raises(ValueError, match="grad_output has shape"):
        kn.fused_linear_distill_loss(H, W, T, reduction="none", grad_output=g[:4])
    with pytest.raises(TypeError, match="weight's dtype"):
        kn.fused_linear_distill_loss(H, W, T, bias=b.astype(np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        kn.fused_linear_distill_loss(H, W, T, bias=b[:8])


def test_fused_linear_shapes_and_errors():
    H, W, T = fused_data(seed=8, n=6)
    a, gh, gw, _ = kn.fused_linear_distill_loss(H.reshape(2, 3, 4), W, T.reshape(2, 3, 9),
                                                reduction="none")
    assert a.shape == (2, 3) and gh.shape == (2, 3, 4) and gw.shape == (9, 4)
    loss, gh, gw, _ = kn.fused_linear_distill_loss(H, W, T, compute_grad=False)
    assert gh is None and gw is None and np.isfinite(loss)
    with pytest.raises(ValueError, match="hidden size"):
        kn.fused_linear_distill_loss(H, W[:, :3], T)
    with pytest.raises(ValueError, match="teacher has shape"):
        kn.fused_linear_distill_loss(H, W, T[:, :5])
    with pytest.raises(ValueError, match="weight must be"):
        kn.fused_linear_distill_loss(H, W[None], T)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_SIZE"):
        kn.fused_linear_distill_loss(H, W, T, chunk_rows=-1)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_BETA"):
        kn.fused_linear_distill_loss(H, W, T, divergence="jsd", beta=1.0)
    T2 = T.copy()
    T2[2, 1] = np.nan
    with pytest.raises(kdloss.InvalidRowsError, match="1 of 6 rows"):
        kn.fused_linear_distill_loss(H, W, T2)


# ------------------------------------------- the teacher as a linear layer
def teacher_layer(seed=0, n=5, dt=3, v=9):
    """H_t [n, d_t], W_t [v, d_t], b_t [v] (d_t != fused_data's d = 4)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dt)) * 1.5, rng.normal(size=(v, dt)), rng.normal(size=v)


@pytest.mark.parametrize("tbias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("div", DIVS)
def test_fused_teacher_linear_is_the_logits_path(div, reduction, tbias):
    """teacher_hidden @ teacher_weight.T (+ teacher_bias) formed by the
    library: the same loss and gradients as the teacher-logits path given
    those logits computed here in float64, and the loss of the NumPy
    textbook (test_numpy's) on both logits materialised here."""
    from test_numpy import textbook

    H, W, _ = fused_data(seed=21)
    Ht, Wt, bt = teacher_layer(seed=22)
    bt = bt if tbias else None
    b = np.random.default_rng(23).normal(size=9)
    T = Ht @ Wt.T + (bt if tbias else 0.0)
    labels = np.array([1, -100, 0, 3, 2])
    kw = dict(divergence=div, temperature=1.4, labels=labels, reduction=reduction, scale=3.0,
              **OPTS)
    loss, gh, gw, st = kn.fused_linear_distill_loss(H, W, bias=b, teacher_hidden=Ht,
                                                    teacher_weight=Wt, teacher_bias=bt, **kw)
    ref, rh, rw, rst = kn.fused_linear_distill_loss(H, W, T, bias=b, **kw)
    np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-14)
    for g, r in ((gh, rh), (gw, rw), (st.pop("grad_bias"), rst.pop("grad_bias"))):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12 * max(1, np.abs(r).max()))
    assert st == rst == {"valid_rows": 4, "invalid_rows": 0}
    book = textbook(H @ W.T + b, T, div, reduction=reduction, labels=labels, scale=3.0, T=1.4,
                    **OPTS)
    np.testing.assert_allclose(loss, book, rtol=1e-10, atol=1e-13)


def test_fused_teacher_linear_dtypes_layouts_and_upstream_rows():
    """float16 / float32 teacher layers (converted exactly by the
    reference: the logits of their float64 values), leading dims, a
    strided teacher_weight, reduction none with grad_output, no rows."""
    H, W, _ = fused_data(seed=24, n=6)
    Ht, Wt, bt = teacher_layer(seed=25, n=6)
    for dt in (np.float16, np.float32):
        h16, w16, b16 = Ht.astype(dt), Wt.astype(dt), bt.astype(dt)
        T = h16.astype(np.float64) @ w16.astype(np.float64).T + b16
        a = kn.fused_linear_distill_loss(H, W, teacher_hidden=h16, teacher_weight=w16,
                                         teacher_bias=b16, divergence="jsd")
        r = kn.fused_linear_distill_loss(H, W, T, divergence="jsd")
        assert a[0] == pytest.approx(r[0], rel=1e-12)
        np.testing.assert_allclose(a[2], r[2], rtol=0, atol=1e-12)
    wide = np.zeros((9, 7))
    wide[:, 2:5] = Wt  # rows 7 apart
    g = np.array([0.5, -1.0, 2.0, 0.0, 1.5, 0.25])
    a = kn.fused_linear_distill_loss(H.reshape(2, 3, 4), W, reduction="none",
                                     teacher_hidden=Ht.reshape(2, 3, 3),
                                     teacher_weight=wide[:, 2:5], grad_output=g.reshape(2, 3))
    r = kn.fused_linear_distill_loss(H, W, Ht @ Wt.T, reduction="none", grad_output=g)
    assert a[0].shape == (2, 3) and a[1].shape == (2, 3, 4)
    np.testing.assert_allclose(a[0].reshape(6), r[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a[1].reshape(6, 4), r[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a[2], r[2], rtol=0, atol=1e-12)
    e = kn.fused_linear_distill_loss(H[:0], W, teacher_hidden=Ht[:0], teacher_weight=Wt,
                                     reduction="sum")
    assert e[0] == 0.0 and e[1].shape == (0, 4) and not e[2].any()


def test_fused_teacher_linear_bad_arguments():
    H, W, T = fused_data(seed=26)
    Ht, Wt, bt = teacher_layer(seed=27)
    f = kn.fused_linear_distill_loss
    with pytest.raises(ValueError, match="one teacher: teacher, or teacher_hidden"):
        f(H, W, T, teacher_hidden=Ht, teacher_weight=Wt)
    with pytest.raises(ValueError, match="one teacher"):
        f(H, W, T, teacher_bias=bt)
    with pytest.raises(ValueError, match="no teacher: give teacher, or teacher_hidden"):
        f(H, W)
    with pytest.raises(ValueError, match="needs teacher_hidden and teacher_weight; got "
                                         "teacher_weight and teacher_bias only"):
        f(H, W, teacher_weight=Wt, teacher_bias=bt)
    with pytest.raises(ValueError, match="got teacher_hidden only"):
        f(H, W, teacher_hidden=Ht)
    with pytest.raises(ValueError, match="teacher_weight must be .V, d_t. with weight's V = 9"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt[:8])
    with pytest.raises(ValueError, match="teacher_weight must be"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt[None])
    with pytest.raises(ValueError, match="differ in their leading"):
        f(H, W, teacher_hidden=Ht[:4], teacher_weight=Wt)
    with pytest.raises(ValueError, match="differ in the teacher's hidden size d_t"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt[:, :2])
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(9,\)"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt, teacher_bias=bt[:8])
    with pytest.raises(TypeError, match="teacher_weight has dtype float32"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt.astype(np.float32))
    with pytest.raises(TypeError, match="teacher_bias has dtype float32"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt, teacher_bias=bt.astype(np.float32))
    with pytest.raises(TypeError, match="teacher_hidden has dtype int64"):
        f(H, W, teacher_hidden=Ht.astype(np.int64), teacher_weight=Wt.astype(np.int64))
    with pytest.raises(ValueError, match="contiguous in its last"):
        f(H, W, teacher_hidden=np.asfortranarray(Ht), teacher_weight=Wt)
    Ht2 = Ht.copy()
    Ht2[3, 1] = np.inf  # an inf teacher logit row: invalid
    with pytest.raises(kdloss.InvalidRowsError, match="1 of 5 rows"):
        f(H, W, teacher_hidden=Ht2, teacher_weight=Wt)


# ------------------------------------------------ the sparse (top-k) teacher
def fused_sparse_teacher(seed=0, n=5, v=9, k=4):
    """teacher_indices, teacher_logprobs [n, k]: the top-k of random
    teacher log-probs, in no particular order within a row."""
    _, _, I, LP = sparse_data(seed=seed, n=n, v=v, k=k)
    return I, LP


FUSED_SPARSE = [("renormalised", d) for d in SMOOTH_RENORM + ["tvd"]] + [("tail", d) for d in DIVS]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode,div", FUSED_SPARSE)
def test_fused_sparse_is_the_sparse_loss_of_h_wt(mode, div, reduction):
    """The sparse teacher beside hidden @ weight.T + bias: the loss of
    sparse_distill_loss on those logits materialised here (and of the
    closed form above), and its gradient dL chained by hand: dH = dL W,
    dW = dL^T H, db = column sums of dL."""
    H, W, _ = fused_data(seed=31)
    b = np.random.default_rng(32).normal(size=9)
    I, LP = fused_sparse_teacher(seed=33)
    labels = np.array([1, -100, 0, 3, 2])
    kw = dict(divergence=div, temperature=1.4, labels=labels, reduction=reduction, scale=3.0,
              **OPTS)
    loss, gh, gw, st = kn.fused_linear_distill_loss(H, W, bias=b, teacher_indices=I,
                                                    teacher_logprobs=LP, mode=mode, **kw)
    Z = H @ W.T + b
    ref, dl, rst = kn.sparse_distill_loss(Z, I, LP, mode=mode, **kw)
    np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gh, dl @ W, rtol=0, atol=1e-12 * max(1, np.abs(gh).max()))
    np.testing.assert_allclose(gw, dl.T @ H, rtol=0, atol=1e-12 * max(1, np.abs(gw).max()))
    np.testing.assert_allclose(st.pop("grad_bias"), dl.sum(0), rtol=0, atol=1e-12)
    assert st == rst == {"valid_rows": 4, "invalid_rows": 0, "bad_index_rows": 0}
    assert not gh[1].any()  # the ignored row
    book = sparse_textbook(Z, I, LP, mode, div, tau=1.4, reduction=reduction, labels=labels,
                           scale=3.0)
    np.testing.assert_allclose(loss, book, rtol=1e-10, atol=1e-13)


def test_fused_sparse_upstream_rows_layouts_and_dtypes():
    """grad_output per row (reduction none), [B, T, d] hidden with
    [B, T, k] supports, a strided (padded) support, float32 and float16
    log-probs (read exactly), the mode aliases and None, k = V (the dense
    loss of the teacher those log-probs came from), no rows."""
    H, W, _ = fused_data(seed=34, n=6)
    I, LP = fused_sparse_teacher(seed=35, n=6)
    g = np.array([0.5, -1.0, 2.0, 0.0, 1.5, 0.25])
    a = kn.fused_linear_distill_loss(H.reshape(2, 3, 4), W, reduction="none", mode="tail_bucket",
                                     divergence="akl", teacher_indices=I.reshape(2, 3, 4),
                                     teacher_logprobs=LP.reshape(2, 3, 4),
                                     grad_output=g.reshape(2, 3))
    ref, dl, _ = kn.sparse_distill_loss(H @ W.T, I, LP, mode="tail", divergence="akl",
                                        reduction="none")
    dl = dl * g[:, None]
    assert a[0].shape == (2, 3) and a[1].shape == (2, 3, 4)
    np.testing.assert_allclose(a[0].reshape(6), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a[1].reshape(6, 4), dl @ W, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a[2], dl.T @ H, rtol=0, atol=1e-12)
    iw = np.full((6, 7), -1, dtype=np.int64)
    iw[:, 1:5] = I
    lw = np.full((6, 7), np.nan)
    lw[:, 1:5] = LP
    b = kn.fused_linear_distill_loss(H, W, teacher_indices=iw[:, 1:5], teacher_logprobs=lw[:, 1:5],
                                     divergence="jsd")
    r = kn.fused_linear_distill_loss(H, W, teacher_indices=I, teacher_logprobs=LP, mode=None,
                                     divergence="jsd")
    r2 = kn.sparse_distill_loss(H @ W.T, I, LP, mode="renormalized", divergence="jsd")
    assert b[0] == r[0] and np.array_equal(b[2], r[2])
    assert r[0] == pytest.approx(r2[0], rel=1e-12)
    for dt in (np.float32, np.float16):
        lp = LP.astype(dt)
        c = kn.fused_linear_distill_loss(H, W, teacher_indices=I, teacher_logprobs=lp,
                                         mode="tail", divergence="tvd")
        e = kn.sparse_distill_loss(H @ W.T, I, lp.astype(np.float64), mode="tail",
                                   divergence="tvd")
        assert c[0] == pytest.approx(e[0], rel=1e-12)
        np.testing.assert_allclose(c[1], e[1] @ W, rtol=0, atol=1e-12)
    # k = V: the full log-softmax of T, renormalised and tail, is the dense loss of T
    T = np.random.default_rng(36).normal(size=(6, 9)) * 2
    full = np.tile(np.arange(9)[::-1], (6, 1))
    lpt = np.take_along_axis(np_log_softmax(T / 1.5), full, axis=1)
    d = kn.fused_linear_distill_loss(H, W, T, divergence="fkl", temperature=1.5)
    for mode in ("renormalised", "tail"):
        f = kn.fused_linear_distill_loss(H, W, teacher_indices=full, teacher_logprobs=lpt,
                                         mode=mode, divergence="fkl", temperature=1.5)
        assert f[0] == pytest.approx(d[0], rel=1e-10)
        np.testing.assert_allclose(f[1], d[1], rtol=0, atol=1e-10)
        np.testing.assert_allclose(f[2], d[2], rtol=0, atol=1e-10)
    e = kn.fused_linear_distill_loss(H[:0], W, teacher_indices=I[:0], teacher_logprobs=LP[:0],
                                     reduction="sum")
    assert e[0] == 0.0 and e[1].shape == (0, 4) and not e[2].any()


def test_fused_sparse_bad_index_rows():
    """A repeated index (row 1) and one out of [0, V) (row 3): invalid rows
    counted in bad_index_rows, NaN losses, no gradient from them; the other
    rows as sparse_distill_loss's; check_indices raises instead."""
    H, W, _ = fused_data(seed=37)
    I, LP = fused_sparse_teacher(seed=38)
    I[1, 2] = I[1, 0]
    with pytest.raises(kdloss.InvalidRowsError, match=r"1 of 5 rows.*repeated in its row \(1 rows"):
        kn.fused_linear_distill_loss(H, W, teacher_indices=I, teacher_logprobs=LP)
    I[3, 1] = 9
    for mode in ("renormalised", "tail"):
        kw = dict(mode=mode, divergence="jsd", reduction="none", raise_on_invalid=False)
        loss, gh, gw, st = kn.fused_linear_distill_loss(H, W, teacher_indices=I,
                                                        teacher_logprobs=LP, **kw)
        ref, dl, rst = kn.sparse_distill_loss(H @ W.T, I, LP, **kw)
        assert st == rst == {"valid_rows": 3, "invalid_rows": 2, "bad_index_rows": 2}
        assert np.isnan(loss[[1, 3]]).all() and not gh[[1, 3]].any()
        np.testing.assert_allclose(loss[[0, 2, 4]], ref[[0, 2, 4]], rtol=1e-12)
        np.testing.assert_allclose(gh, dl @ W, rtol=0, atol=1e-12)
        np.testing.assert_allclose(gw, dl.T @ H, rtol=0, atol=1e-12)
        m = kn.fused_linear_distill_loss(H, W, teacher_indices=I, teacher_logprobs=LP,
                                         **{**kw, "reduction": "mean"})
        assert m[0] == pytest.approx(np.nanmean(loss), rel=1e-12)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_PARAM") as e:
        kn.fused_linear_distill_loss(H, W, teacher_indices=I, teacher_logprobs=LP,
                                     check_indices=True)
    assert "row" in e.value.detail
    LP2 = LP.copy()
    LP2[2, 0] = 0.5  # a log-prob > 0: invalid, not a bad index
    _, _, _, st = kn.fused_linear_distill_loss(H, W, teacher_indices=fused_sparse_teacher(38)[0],
                                               teacher_logprobs=LP2, raise_on_invalid=False)
    assert st == {"valid_rows": 4, "invalid_rows": 1, "bad_index_rows": 0}


def test_fused_sparse_bad_arguments():
    H, W, T = fused_data(seed=39)
    Ht, Wt, _ = teacher_layer(seed=40)
    I, LP = fused_sparse_teacher(seed=41)
    f = kn.fused_linear_distill_loss
    sp = dict(teacher_indices=I, teacher_logprobs=LP)
    with pytest.raises(ValueError, match="one teacher: teacher, or teacher_hidden and "
                                         r"teacher_weight \(and teacher_bias\), or "
                                         "teacher_indices and teacher_logprobs; got teacher, "
                                         "teacher_indices, teacher_logprobs"):
        f(H, W, T, **sp)
    with pytest.raises(ValueError, match="got teacher_hidden, teacher_weight, teacher_indices$"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt, teacher_indices=I)
    with pytest.raises(ValueError, match="no teacher: give teacher, .* or teacher_indices and "
                                         "teacher_logprobs"):
        f(H, W)
    with pytest.raises(ValueError, match="needs teacher_indices and teacher_logprobs; got "
                                         "teacher_indices only"):
        f(H, W, teacher_indices=I)
    with pytest.raises(ValueError, match="got teacher_logprobs only"):
        f(H, W, teacher_logprobs=LP)
    with pytest.raises(ValueError, match="mode belong to the sparse teacher"):
        f(H, W, T, mode="tail")
    with pytest.raises(ValueError, match="check_indices belong to the sparse teacher"):
        f(H, W, teacher_hidden=Ht, teacher_weight=Wt, check_indices=True)
    with pytest.raises(ValueError, match="unknown mode 'topk'"):
        f(H, W, mode="topk", **sp)
    with pytest.raises(TypeError, match="teacher_indices must have dtype int64"):
        f(H, W, teacher_indices=I.astype(np.int32), teacher_logprobs=LP)
    with pytest.raises(TypeError, match="teacher_logprobs has dtype int64"):
        f(H, W, teacher_indices=I, teacher_logprobs=I)
    with pytest.raises(ValueError, match="teacher_indices shape .5, 4. != teacher_logprobs shape"):
        f(H, W, teacher_indices=I, teacher_logprobs=LP[:, :3])
    with pytest.raises(ValueError, match=r"support \(4, 4\) and hidden \(5, 4\) differ in their "
                                         "leading"):
        f(H, W, teacher_indices=I[:4], teacher_logprobs=LP[:4])
    with pytest.raises(ValueError, match="contiguous in its last"):
        f(H, W, teacher_indices=np.asfortranarray(I), teacher_logprobs=LP)
    with pytest.raises(kdloss.KdlossError, match="NOT_SUPPORTED") as e:
        f(H, W, divergence="rkl", **sp)  # infinite in the renormalised mode
    assert not isinstance(e.value, ValueError)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TOP_K"):  # k > V
        f(H, W[:3], teacher_indices=I, teacher_logprobs=LP)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TOP_K"):  # AKL head larger than k
        f(H, W, mode="tail", divergence="akl", head_rule="topk", top_k=5, **sp)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TEMPERATURE"):
        f(H, W, temperature=0.0, **sp)


# -------------------------------------------------------- vocabulary-parallel
def run_shards(S, T, widths, raise_on_invalid=True, **kw):
    """Every shard in this process, in lockstep; the all-reduces by numpy."""
    V = S.shape[1]
    offs = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)
    shards = [kn.VocabShard(np.ascontiguousarray(S[:, o:o + w]), np.ascontiguousarray(T[:, o:o + w]),
                            int(o), V, r, len(widths), **kw)
              for r, (o, w) in enumerate(zip(offs, widths))]
    ops = []
    for s in range(shards[0].num_steps):
        res = [sh.step(s) for sh in shards]
        assert all(x == res[0] for x in res)
        op, count = res[0]
        ops.append(op)
        if op is None:
            break
        stack = np.stack([sh.exchange[:count] for sh in shards])
        red = stack.max(0) if op == "max" else stack.sum(0)
        for sh in shards:
            sh.exchange[:count] = red
    out = [sh.result(raise_on_invalid) for sh in shards]
    return out, ops


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("widths", [[13], [7, 6], [1, 5, 4, 3]])
def test_shards_match_the_unsharded_loss(div, widths):
    rng = np.random.default_rng(9)
    S, T = rng.normal(size=(5, 13)) * 2, rng.normal(size=(5, 13)) * 2
    T[:, 6] = T[:, 7] = T[:, 0]  # ties across slice boundaries
    labels = np.array([0, 1, -100, 3, 4])
    kw = dict(divergence=div, temperature=1.5, labels=labels, reduction="none", **OPTS)
    out, ops = run_shards(S, T, widths, **kw)
    b, gb, sb = kn.distill_loss(S, T, **kw)
    for loss, _, st in out:
        np.testing.assert_allclose(loss, b, rtol=1e-12, atol=1e-14)
        assert st["valid_rows"] == 4 and st["invalid_rows"] == 0
    grad = np.concatenate([g for _, g, _ in out], axis=1)
    np.testing.assert_allclose(grad, gb, rtol=0, atol=1e-12 * np.abs(gb).max())
    assert ops[0] == "max" and ops[-1] is None and set(ops[1:-1]) == {"sum"}
    if div == "akl":
        np.testing.assert_array_equal(out[0][2]["head_size"], sb["head_size"])


def test_vocab_parallel_function_with_a_callable():
    rng = np.random.default_rng(10)
    S, T = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    loss, grad, st = kn.vocab_parallel_distill_loss(S, T, 0, 8, 0, 1, lambda buf, op: None,
                                                    divergence="akl", head_mask=True)
    b, gb, sb = kn.distill_loss(S, T, divergence="akl")
    assert loss == pytest.approx(b, rel=1e-12)
    np.testing.assert_allclose(grad, gb, atol=1e-14)
    assert (st["head_mask"].sum(1) == sb["head_size"]).all()


def test_shard_bad_arguments():
    S = np.zeros((2, 4))
    with pytest.raises(kdloss.KdlossValueError, match="BAD_PARAM"):
        kn.VocabShard(S, S, 0, 8, 2, 2).step(0)  # rank outside [0, num_shards)
    with pytest.raises(kdloss.KdlossValueError, match="BAD_SIZE"):
        kn.VocabShard(S, S, 6, 8, 1, 2).step(0)  # the slice runs past the vocabulary
    with pytest.raises(RuntimeError, match="before the last step"):
        kn.VocabShard(S, S, 0, 8, 0, 2).result()
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TOP_K"):
        kn.VocabShard(S, S, 0, 4, 0, 1, divergence="akl", head_rule="topk", top_k=9).step(0)
    with pytest.raises(ValueError, match="shape"):
        kn.VocabShard(S, S[:, :3], 0, 8, 0, 2)


# ------------------------------------------------- nothing written on failure
def _sentinels(*shapes):
    return [np.full(s, 7.25) for s in shapes]


def test_sparse_failure_writes_nothing():
    S, _, I, LP = sparse_data(seed=11)
    desc = _lib.new_desc(divergence="fkl", temperature=-1.0)
    loss, grad = _sentinels((1,), S.shape)
    counters = np.full(3, 99, dtype=np.int64)
    a = _lib.new_sparse_args()
    a.mode, a.rows, a.vocab, a.k = 0, 4, 11, 4
    a.student, a.ld_student, a.student_dtype = S.ctypes.data, 11, _lib.DTYPE["f64"]
    a.teacher_indices, a.ld_indices = I.ctypes.data, 4
    a.teacher_logprobs, a.ld_logprobs, a.teacher_dtype = LP.ctypes.data, 4, _lib.DTYPE["f64"]
    a.grad, a.ld_grad, a.grad_dtype = grad.ctypes.data, 11, _lib.DTYPE["f64"]
    a.out_dtype, a.loss = _lib.DTYPE["f64"], loss.ctypes.data
    a.info, a.valid_rows, a.bad_index_rows = (counters.ctypes.data + 8 * i for i in range(3))
    st = _lib.lib().kdl_ref_sparse_loss(ctypes.byref(desc), ctypes.byref(a))
    assert st == _lib.STATUS["BAD_TEMPERATURE"]
    assert (loss == 7.25).all() and (grad == 7.25).all() and (counters == 99).all()


def test_fused_failure_writes_nothing():
    H, W, T = fused_data(seed=12)
    desc = _lib.new_desc(divergence="fkl")
    loss, gh, gw = _sentinels((1,), H.shape, W.shape)
    a = _lib.new_fused_linear_args()
    a.rows, a.hidden, a.vocab = 5, 4, 9
    a.hidden_states, a.ld_hidden, a.hidden_dtype = H.ctypes.data, 3, _lib.DTYPE["f64"]  # ld < d
    a.weight, a.ld_weight, a.weight_dtype = W.ctypes.data, 4, _lib.DTYPE["f64"]
    a.teacher, a.ld_teacher, a.teacher_dtype = T.ctypes.data, 9, _lib.DTYPE["f64"]
    a.grad_hidden, a.ld_grad_hidden = gh.ctypes.data, 4
    a.grad_weight, a.ld_grad_weight = gw.ctypes.data, 4
    a.grad_dtype = a.out_dtype = _lib.DTYPE["f64"]
    a.loss = loss.ctypes.data
    st = _lib.lib().kdl_ref_fused_linear_loss(ctypes.byref(desc), ctypes.byref(a))
    assert st == _lib.STATUS["BAD_STRIDE"]
    assert (loss == 7.25).all() and (gh == 7.25).all() and (gw == 7.25).all()


def test_shard_failure_writes_nothing():
    rng = np.random.default_rng(13)
    S, T = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    sh = kn.VocabShard(S, T, 0, 5, 0, 1, divergence="fkl")
    sh.loss[:] = 7.25
    sh.grad[:] = 7.25
    ex = sh.exchange.copy()
    sh.desc.temperature = 0.0  # refused by every step
    with pytest.raises(kdloss.KdlossValueError, match="BAD_TEMPERATURE"):
        sh.step(0)
    assert (sh.loss == 7.25).all() and (sh.grad == 7.25).all()
    np.testing.assert_array_equal(sh.exchange, ex)


# ------------------------------------------------- the example's --simulate
EXAMPLE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "examples", "vocab_parallel_torch.py"))


@pytest.mark.skipif(not os.path.exists(EXAMPLE), reason="examples/ not present")
@pytest.mark.parametrize("world,div", [(3, "akl"), (4, "jsd")])
def test_vocab_parallel_example_simulated(world, div):
    """examples/vocab_parallel_torch.py --simulate: the ranks in one process
    through kdloss.numpy.VocabShard, no torch."""
    r = subprocess.run([sys.executable, EXAMPLE, "--simulate", "--world", str(world),
                        "--divergence", div, "--lib", _lib.library_path()],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK"), r.stdout
