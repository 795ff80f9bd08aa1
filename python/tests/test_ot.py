"""Sinkhorn and SinKD through kdloss.numpy against a NumPy textbook
log-domain Sinkhorn written here; and the torch doors (skipped without
torch).  Skipped when the loaded library has no Sinkhorn API."""

import numpy as np
import pytest

import kdloss
import kdloss.numpy as kn
from kdloss import _lib


@pytest.fixture(autouse=True)
def _need_ot():
    if not _lib.ot_available():
        pytest.skip("the loaded libkdloss has no Sinkhorn API")


# ------------------------------------------------------------ the textbook
def lse(z, axis):
    m = z.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def tb_sinkhorn(C, eps, iters, la=None, lb=None):
    """f update then g update, from g = 0; returns P, f, g."""
    n, m = C.shape
    la = np.full(n, -np.log(n)) if la is None else la
    lb = np.full(m, -np.log(m)) if lb is None else lb
    f, g = np.zeros(n), np.zeros(m)
    for _ in range(iters):
        f = -eps * lse(lb[None, :] + (g[None, :] - C) / eps, axis=1)
        g = -eps * lse(la[:, None] + (f[:, None] - C) / eps, axis=0)
    P = np.exp(la[:, None] + lb[None, :] + (f[:, None] + g[None, :] - C) / eps)
    return P, f, g


def sqeuclid(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def l1(x, y):
    return np.abs(x[:, None, :] - y[None, :, :]).sum(-1)


def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def tb_sinkd(S, T, n, tau, eps, iters, metric="l1", scale=1.0, plans=None):
    """SinKD loss; with plans given, the plans are held fixed (the gradient's
    convention)."""
    ps, pt = softmax(S / tau), softmax(T / tau)
    dist = l1 if metric == "l1" else sqeuclid
    out, used = [], []
    for g in range(S.shape[0] // n):
        C = dist(ps[g * n:(g + 1) * n], pt[g * n:(g + 1) * n])
        P = tb_sinkhorn(C, eps, iters)[0] if plans is None else plans[g]
        used.append(P)
        out.append((P * C).sum())
    return scale * np.mean(out), used


RNG = np.random.default_rng(42)


# ------------------------------------------------------------------ Sinkhorn
@pytest.mark.parametrize("value", ["transport", "dual"])
def test_cost_matches_textbook(value):
    C = RNG.random((3, 5, 7))
    r = kn.sinkhorn(C, epsilon=0.05, tol=0.0, max_iter=60, value=value, return_plan=True,
                    return_potentials=True)
    assert list(r["iterations"]) == [60, 60, 60]
    for b in range(3):
        P, f, g = tb_sinkhorn(C[b], 0.05, 60)
        want = (P * C[b]).sum() if value == "transport" else f.mean() + g.mean()
        assert r["value"][b] == pytest.approx(want, rel=1e-10)
        np.testing.assert_allclose(r["plan"][b], P, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(r["f"][b], f, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r["g"][b], g, rtol=1e-9, atol=1e-12)
        assert r["marginal_error"][b] == pytest.approx(np.abs(P.sum(1) - 1 / 5).sum(), abs=1e-12)


def test_single_problem_and_weights():
    C = RNG.random((4, 6))
    a = RNG.random(4)
    a /= a.sum()
    b = RNG.random(6)
    b /= b.sum()
    r = kn.sinkhorn(C, epsilon=0.1, log_a=np.log(a), log_b=np.log(b), tol=0.0, max_iter=40,
                    return_plan=True)
    P, _, _ = tb_sinkhorn(C, 0.1, 40, np.log(a), np.log(b))
    assert np.ndim(r["value"]) == 0 and r["plan"].shape == (4, 6)
    assert r["value"] == pytest.approx((P * C).sum(), rel=1e-10)
    np.testing.assert_allclose(r["plan"].sum(0), b, rtol=1e-12)  # columns exact after a g update


def test_converges_to_tolerance():
    C = RNG.random((2, 6, 6))
    r = kn.sinkhorn(C, epsilon=0.1, tol=1e-9, max_iter=5000, check_every=5)
    assert np.all(r["marginal_error"] <= 1e-9)
    assert np.all(r["iterations"] < 5000) and np.all(r["iterations"] % 5 == 0)


@pytest.mark.parametrize("metric", ["sqeuclidean", "l1"])
def test_points_and_grad_x(metric):
    x = RNG.normal(size=(2, 5, 3))
    y = RNG.normal(size=(2, 4, 3))
    r = kn.sinkhorn(x=x, y=y, metric=metric, epsilon=0.5, tol=0.0, max_iter=50, return_plan=True,
                    return_grad_x=True)
    dist = sqeuclid if metric == "sqeuclidean" else l1
    for b in range(2):
        C = dist(x[b], y[b])
        P, _, _ = tb_sinkhorn(C, 0.5, 50)
        assert r["value"][b] == pytest.approx((P * C).sum(), rel=1e-9)
        d = x[b][:, None, :] - y[b][None, :, :]
        dC = 2 * d if metric == "sqeuclidean" else np.sign(d)
        np.testing.assert_allclose(r["grad_x"][b], (P[:, :, None] * dC).sum(1), rtol=1e-8,
                                   atol=1e-12)


def test_debiased_divergence():
    x = RNG.normal(size=(5, 2))
    y = RNG.normal(size=(6, 2)) + 1.0
    r = kn.sinkhorn(x=x, y=y, epsilon=0.3, tol=0.0, max_iter=80, debias=True)

    def V(u, v):
        C = sqeuclid(u, v)
        return (tb_sinkhorn(C, 0.3, 80)[0] * C).sum()

    want = V(x, y) - 0.5 * V(x, x) - 0.5 * V(y, y)
    assert r["value"] == pytest.approx(want, rel=1e-8)
    assert r["self_yy"] == pytest.approx(V(y, y), rel=1e-8)
    # the teacher-side self term given back: same value
    again = kn.sinkhorn(x=x, y=y, epsilon=0.3, tol=0.0, max_iter=80, debias=True,
                        self_yy=np.array([r["self_yy"]]))
    assert again["value"] == pytest.approx(r["value"], rel=1e-12)
    # with a given cost: the self costs are needed
    C, Cxx, Cyy = sqeuclid(x, y), sqeuclid(x, x), sqeuclid(y, y)
    rc = kn.sinkhorn(C, epsilon=0.3, tol=0.0, max_iter=80, debias=True, cost_xx=Cxx, cost_yy=Cyy)
    assert rc["value"] == pytest.approx(want, rel=1e-8)


def test_sinkhorn_bad_inputs():
    C = RNG.random((3, 4))
    with pytest.raises(ValueError, match="BAD_EPSILON"):
        kn.sinkhorn(C, epsilon=0.0)
    with pytest.raises(ValueError, match="either cost, or the points"):
        kn.sinkhorn()
    with pytest.raises(ValueError, match="either cost, or the points"):
        kn.sinkhorn(C, x=C, y=C)
    with pytest.raises(ValueError, match="unknown metric"):
        kn.sinkhorn(x=C, y=C, metric="cosine")
    with pytest.raises(ValueError, match="unknown value"):
        kn.sinkhorn(C, value="primal")
    with pytest.raises(ValueError, match="log_a has shape"):
        kn.sinkhorn(C, log_a=np.zeros(4))
    with pytest.raises(ValueError, match="BAD_ITERATIONS"):
        kn.sinkhorn(C, max_iter=0)
    bad = C.copy()
    bad[1, 2] = np.nan
    with pytest.raises(kdloss.KdlossError, match="NONFINITE_INPUT"):
        kn.sinkhorn(bad)


def test_ragged_batch_matches_textbook_per_problem():
    """kdloss.numpy.sinkhorn_ragged packs problems of different sizes into
    one call: each problem's value, plan and potentials against the
    textbook on that problem alone."""
    rng = np.random.default_rng(21)
    costs = [rng.random((n, m)) for n, m in ((5, 7), (9, 4), (3, 3), (1, 6))]
    r = kn.sinkhorn_ragged(costs, epsilon=0.2, max_iter=40, tol=0.0, return_plan=True,
                           return_potentials=True)
    assert r["value"].shape == (4,) and (r["iterations"] == 40).all()
    for b, C in enumerate(costs):
        P, f, g = tb_sinkhorn(C, 0.2, 40)
        np.testing.assert_allclose(r["plan"][b], P, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(r["f"][b], f, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r["g"][b], g, rtol=1e-10, atol=1e-12)
        assert r["value"][b] == pytest.approx(float((P * C).sum()), rel=1e-10)
    with pytest.raises(TypeError, match="non-empty list"):
        kn.sinkhorn_ragged([])
    with pytest.raises(ValueError, match=r"costs\[1\] must be a non-empty \[n, m\]"):
        kn.sinkhorn_ragged([costs[0], np.zeros(3)])
    with pytest.raises(TypeError, match=r"costs\[1\] has dtype float32"):
        kn.sinkhorn_ragged([costs[0], costs[1].astype(np.float32)])


# --------------------------------------------------------------------- SinKD
@pytest.mark.parametrize("metric", ["l1", "sqeuclidean"])
def test_sinkd_against_textbook(metric):
    S = RNG.normal(size=(8, 11)) * 2
    T = RNG.normal(size=(8, 11)) * 2
    loss, grad, st = kn.sinkd_loss(S, T, group_size=4, temperature=2.0, epsilon=0.1, max_iter=20,
                                   metric=metric, scale=3.0, return_plan=True)
    want, plans = tb_sinkd(S, T, 4, 2.0, 0.1, 20, metric, 3.0)
    assert loss == pytest.approx(want, rel=1e-10)
    assert st["group_loss"].mean() == pytest.approx(loss, rel=1e-12)  # scaled per group
    np.testing.assert_allclose(st["plan"], np.stack(plans), rtol=1e-9, atol=1e-15)
    assert list(st["iterations"]) == [20, 20] and st["invalid_groups"] == 0
    # gradient: the plans held fixed, by central differences
    h = 1e-6
    g = np.zeros_like(S)
    for idx in np.ndindex(S.shape):
        sp, sm = S.copy(), S.copy()
        sp[idx] += h
        sm[idx] -= h
        g[idx] = (tb_sinkd(sp, T, 4, 2.0, 0.1, 20, metric, 3.0, plans)[0] -
                  tb_sinkd(sm, T, 4, 2.0, 0.1, 20, metric, 3.0, plans)[0]) / (2 * h)
    np.testing.assert_allclose(grad, g, rtol=1e-5, atol=1e-8)


def test_sinkd_one_group_and_leading_dims():
    S = RNG.normal(size=(2, 3, 9))
    T = RNG.normal(size=(2, 3, 9))
    loss, grad, st = kn.sinkd_loss(S, T)  # group_size 0: one group of all 6 rows
    want, _ = tb_sinkd(S.reshape(6, 9), T.reshape(6, 9), 6, 2.0, 0.1, 20)
    assert loss == pytest.approx(want, rel=1e-10) and grad.shape == S.shape
    per_seq, _, st = kn.sinkd_loss(S, T, group_size=3)
    assert st["group_loss"].shape == (2,)


def test_sinkd_invalid_and_bad():
    S = RNG.normal(size=(6, 5))
    T = RNG.normal(size=(6, 5))
    S[4, 1] = np.nan
    with pytest.raises(kdloss.InvalidRowsError, match="1 of 3 groups"):
        kn.sinkd_loss(S, T, group_size=2)
    loss, grad, st = kn.sinkd_loss(S, T, group_size=2, raise_on_invalid=False)
    assert st["invalid_groups"] == 1 and np.isnan(st["group_loss"][2]) and not grad[4:].any()
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match="BAD_GROUP"):
        kn.sinkd_loss(T, T, group_size=4)
    with pytest.raises(ValueError, match="BAD_TEMPERATURE"):
        kn.sinkd_loss(T, T, temperature=0)


# --------------------------------------------------------------------- torch
def test_torch_sinkhorn_and_sinkd():
    try:
        import torch

        import kdloss.torch as kt
    except ImportError as e:
        pytest.skip(f"torch is not importable: {e}")

    C = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    r = kt.sinkhorn(C, epsilon=0.1, tol=0.0, max_iter=30, return_plan=True)
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (r["value"] * up).sum().backward()
    torch.testing.assert_close(C.grad, r["plan"] * up.view(3, 1, 1))
    ref = kn.sinkhorn(C.detach().numpy(), epsilon=0.1, tol=0.0, max_iter=30)
    np.testing.assert_allclose(r["value"].detach().numpy(), ref["value"], rtol=1e-12)

    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 2, dtype=torch.float64)
    r = kt.sinkhorn(x=x, y=y, epsilon=0.5, return_grad_x=True, return_potentials=True)
    assert r["value"].dim() == 0 and r["f"].shape == (5,)
    r["value"].backward()
    torch.testing.assert_close(x.grad, r["grad_x"])
    r32 = kt.sinkhorn(x=x.detach().float(), y=y.float(), epsilon=0.5)
    assert r32["value"].dtype == torch.float32

    S = torch.randn(8, 11, dtype=torch.float64, requires_grad=True)
    T = torch.randn(8, 11, dtype=torch.float64)
    loss, st = kt.sinkd_loss(S, T, group_size=4, return_stats=True)
    (2.0 * loss).backward()
    l_np, g_np, _ = kn.sinkd_loss(S.detach().numpy(), T.numpy(), group_size=4)
    assert loss.item() == pytest.approx(l_np, rel=1e-12)
    np.testing.assert_allclose(S.grad.numpy(), 2.0 * g_np, rtol=1e-12)
    assert st["group_loss"].shape == (2,)
    costs = [torch.rand(n, m, dtype=torch.float64) for n, m in ((4, 6), (7, 2))]
    rr = kt.sinkhorn_ragged(costs, epsilon=0.3, max_iter=25, tol=0.0, return_plan=True)
    rn = kn.sinkhorn_ragged([c.numpy() for c in costs], epsilon=0.3, max_iter=25, tol=0.0)
    np.testing.assert_allclose(rr["value"].numpy(), rn["value"], rtol=1e-12)
    assert [tuple(p.shape) for p in rr["plan"]] == [(4, 6), (7, 2)]
    r32 = kt.sinkhorn_ragged([c.float() for c in costs], epsilon=0.3, max_iter=25, tol=0.0)
    assert r32["value"].dtype == torch.float32
    np.testing.assert_allclose(r32["value"].numpy(), rn["value"], rtol=1e-5)
    with pytest.raises(ValueError, match="one device|either cost"):
        kt.sinkhorn()
    with pytest.raises(TypeError, match="torch.Tensor"):
        kt.sinkhorn(np.zeros((2, 2)))
