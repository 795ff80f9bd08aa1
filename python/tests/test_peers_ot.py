"""kdloss's Sinkhorn against the peer OT libraries THEMSELVES, on CPU
(test_ot.py checks the same solver against textbook maths; this module
checks that kdloss and the peers' own code agree on the same inputs).

- POT (pip install pot==0.9.7.post1): ot.sinkhorn / sinkhorn2 with
  method "sinkhorn_log", ot.solve and ot.solve_sample (reg_type "KL",
  debias), ot.batch.solve_batch, ot.dist, empirical_sinkhorn_divergence;
  in numpy and, for gradients, in torch with autograd.
- flash-sinkhorn (pip install flash-sinkhorn==0.4.1): its Triton kernels run
  by Triton's interpreter on CPU tensors, in a subprocess (section 6).
Without a peer its tests skip with the reason.

Conventions (read from the peers' source):
- POT's plan is P = exp(u_i + v_j - C_ij/reg), reg = kdloss's eps; its log
  scalings are u = log a + f/eps, v = log b + g/eps up to a constant shift.
- ot.sinkhorn2 and empirical_sinkhorn2 return <P, C> = kdloss TRANSPORT.
  ot.solve / solve_batch with reg_type "KL" return value = <P, C> +
  eps KL(P || a b^T) (= kdloss DUAL at the fixed point, DESIGN section 2)
  and value_linear = <P, C> (TRANSPORT).
- POT's log solver updates v then u (rows exact) and stops on the L2 norm
  of the column error; solve_batch updates u then v (as kdloss) and stops on
  the largest L2 row error; kdloss stops on the L1 row error.  Both are the
  same Sinkhorn map, so they share the fixed point and its linear rate.

Tolerances.  Each solver stops at marginal error delta (kdloss: L1 <= tol;
POT: L2 < stopThr, so L1 < sqrt(m) stopThr).  A linearly convergent
iteration with rate kappa that has reached delta is within about
delta / (1 - kappa) of its fixed point; kappa is read off kdloss's own
iteration count (the error fell from at most 2 to tol in that many
iterations: kappa = (tol/2)^(1/iters)).  The plans may then differ by
L1 <= SAFETY (tol + sqrt(m) stopThr) / (1 - kappa) (_plan_bound, SAFETY 10),
elementwise by no more, and values by max|C| times that.  A wrong weight, a
cost off by a factor, eps vs 1/eps, or TRANSPORT vs DUAL changes the numbers
at O(eps) or more: far outside these bounds (1e-9 or below).
"""

import math
import os
import sys

import numpy as np
import pytest

from kdloss import numpy as kn

POT_PIN = "pot==0.9.7.post1"
FLASH_PIN = "flash-sinkhorn==0.4.1"
KD_TOL = 1e-12      # kdloss: L1 row error
POT_TOL = 1e-13     # POT: L2 marginal error
MAX_ITER = 200000
SAFETY = 10.0


def _pot():
    return pytest.importorskip("ot", reason=f"POT not installed: pip install {POT_PIN}")


def _torch():
    return pytest.importorskip("torch", reason="torch not installed (gradients through POT)")


def _plan_bound(iters, m):
    """L1 bound on the difference of two plans stopped at KD_TOL / POT_TOL
    (module docstring): rate from kdloss's iteration count."""
    kappa = (KD_TOL / 2.0) ** (1.0 / max(int(iters), 1))
    return SAFETY * (KD_TOL + math.sqrt(m) * POT_TOL) / (1.0 - kappa)


def _weights(rng, k):
    w = rng.random(k) + 0.2
    return w / w.sum()


def _centered(d):
    return d - d.mean()


def _check_potentials(f, g, u, v, la, lb, eps, tol):
    """kdloss f, g vs POT log scalings u, v (u = la + f/eps + c, v = lb +
    g/eps - c): equal after removing the free constant.  A half step moves
    u_i by log(row_i / a_i), about |row_i - a_i| / a_i: tol is the plan
    bound over the smallest weight."""
    df = f / eps + la - u
    dg = g / eps + lb - v
    shift = df.mean()
    np.testing.assert_allclose(df - shift, 0.0, atol=tol)
    np.testing.assert_allclose(dg + shift, 0.0, atol=tol)


# ------------------------------------------------------------------ 1. one cost matrix
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.02, 0.005])
def test_plan_and_transport_value_vs_pot_sinkhorn_log(eps):
    ot = _pot()
    rng = np.random.default_rng(1)
    n, m = 12, 17                       # rectangular, costs in [0, 1): eps = 0.005 is 1/200 of it
    C = rng.random((n, m))
    a, b = _weights(rng, n), _weights(rng, m)
    P, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=MAX_ITER,
                         stopThr=POT_TOL, log=True, warn=False)
    assert log["err"][-1] < POT_TOL, "POT did not converge"
    r = kn.sinkhorn(C, epsilon=eps, log_a=np.log(a), log_b=np.log(b), max_iter=MAX_ITER,
                    tol=KD_TOL, return_plan=True, return_potentials=True)
    assert r["marginal_error"] <= KD_TOL
    bound = _plan_bound(r["iterations"], m)
    assert np.abs(r["plan"] - P).sum() <= bound
    np.testing.assert_allclose(r["value"], np.sum(P * C), rtol=0, atol=C.max() * bound)
    if eps >= 0.02:                     # (a second solve: skipped where POT needs 10^4 iterations)
        v2 = ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", numItermax=MAX_ITER,
                          stopThr=POT_TOL, warn=False)   # sinkhorn2 returns <P, C>: TRANSPORT
        np.testing.assert_allclose(r["value"], v2, rtol=0, atol=C.max() * bound)
    _check_potentials(r["f"], r["g"], log["log_u"], log["log_v"], np.log(a), np.log(b), eps,
                      tol=bound / min(a.min(), b.min()))


def test_dual_value_vs_pot_solve_kl():
    """ot.solve(reg_type="KL").value = <P, C> + eps KL(P || a b^T) is kdloss
    DUAL at the fixed point; value_linear is TRANSPORT."""
    ot = _pot()
    rng = np.random.default_rng(2)
    n, m, eps = 15, 8, 0.05
    C = rng.random((n, m)) * 2.0
    a, b = _weights(rng, n), _weights(rng, m)
    res = ot.solve(C, a, b, reg=eps, reg_type="KL", max_iter=MAX_ITER, tol=POT_TOL)
    kw = dict(epsilon=eps, log_a=np.log(a), log_b=np.log(b), max_iter=MAX_ITER, tol=KD_TOL)
    dual = kn.sinkhorn(C, value="dual", **kw)
    tr = kn.sinkhorn(C, value="transport", **kw)
    bound = C.max() * _plan_bound(dual["iterations"], m)
    # DUAL vs TRANSPORT differ by eps KL: the test would see a mix-up
    assert abs(float(res.value) - float(res.value_linear)) > 1e3 * bound
    np.testing.assert_allclose(dual["value"], res.value, rtol=0, atol=bound)
    np.testing.assert_allclose(tr["value"], res.value_linear, rtol=0, atol=bound)


# ------------------------------------------------------------------ 2. batches
def test_batch_vs_pot_solve_batch():
    ot = _pot()
    from ot.batch import solve_batch

    rng = np.random.default_rng(3)
    B, n, m, eps = 5, 9, 14, 0.03
    C = rng.random((B, n, m))
    a = np.stack([_weights(rng, n) for _ in range(B)])
    b = np.stack([_weights(rng, m) for _ in range(B)])
    res = solve_batch(C, reg=eps, a=a, b=b, max_iter=MAX_ITER, tol=POT_TOL, method="log_sinkhorn",
                      reg_type="kl", grad="detach")
    kw = dict(epsilon=eps, log_a=np.log(a), log_b=np.log(b), max_iter=MAX_ITER, tol=KD_TOL)
    tr = kn.sinkhorn(C, value="transport", return_plan=True, return_potentials=True, **kw)
    dual = kn.sinkhorn(C, value="dual", **kw)
    assert tr["value"].shape == (B,)
    # POT iterates every problem until the worst converges: bound by kdloss's slowest
    bound = _plan_bound(tr["iterations"].max(), m)
    for k in range(B):
        assert np.abs(tr["plan"][k] - res.plan[k]).sum() <= bound, k
        u, v = res.potentials[0][k], res.potentials[1][k]
        _check_potentials(tr["f"][k], tr["g"][k], u, v, np.log(a[k]), np.log(b[k]), eps,
                          tol=bound / min(a[k].min(), b[k].min()))
    np.testing.assert_allclose(tr["value"], res.value_linear, rtol=0, atol=C.max() * bound)
    np.testing.assert_allclose(dual["value"], res.value, rtol=0, atol=C.max() * bound)


@pytest.mark.parametrize("value", ["transport", "dual"])
def test_ragged_batch_vs_pot_per_problem(value):
    """One kdloss call on problems of different sizes (no padding) vs POT
    solving each problem on its own (uniform weights, as sinkhorn_ragged)."""
    ot = _pot()
    rng = np.random.default_rng(4)
    eps = 0.04
    costs = [rng.random(s) for s in ((5, 9), (12, 7), (16, 16), (3, 20), (1, 4))]
    r = kn.sinkhorn_ragged(costs, epsilon=eps, max_iter=MAX_ITER, tol=KD_TOL, value=value,
                           return_plan=True)
    for k, C in enumerate(costs):
        res = ot.solve(C, reg=eps, reg_type="KL", max_iter=MAX_ITER, tol=POT_TOL)
        bound = _plan_bound(r["iterations"][k], C.shape[1])
        assert np.abs(r["plan"][k] - res.plan).sum() <= bound, k
        want = res.value_linear if value == "transport" else res.value
        np.testing.assert_allclose(r["value"][k], want, rtol=0, atol=C.max() * bound, err_msg=k)


# ------------------------------------------------------------------ 3. points
@pytest.mark.parametrize("metric,pot_metric", [("sqeuclidean", "sqeuclidean"), ("l1", "cityblock")])
def test_points_vs_pot_dist(metric, pot_metric):
    ot = _pot()
    rng = np.random.default_rng(5)
    B, n, m, d, eps = 2, 11, 19, 3, 0.05
    x, y = rng.random((B, n, d)), rng.random((B, m, d))
    a = np.stack([_weights(rng, n) for _ in range(B)])
    b = np.full((B, m), 1.0 / m)
    r = kn.sinkhorn(x=x, y=y, metric=metric, epsilon=eps, log_a=np.log(a), log_b=np.log(b),
                    max_iter=MAX_ITER, tol=KD_TOL, return_plan=True)
    for k in range(B):
        M = ot.dist(x[k], y[k], metric=pot_metric)
        P = ot.sinkhorn(a[k], b[k], M, eps, method="sinkhorn_log", numItermax=MAX_ITER,
                        stopThr=POT_TOL, warn=False)
        bound = _plan_bound(r["iterations"][k], m)
        assert np.abs(r["plan"][k] - P).sum() <= bound, k
        np.testing.assert_allclose(r["value"][k], np.sum(P * M), rtol=0, atol=M.max() * bound)


# ------------------------------------------------------------------ 4. gradients
# Compared: the DUAL value's gradient.  kdloss gives d DUAL / d C = P (envelope
# theorem, exact at the fixed point); POT's ot.solve(reg_type="KL",
# grad="autodiff") differentiates its DUAL-valued result through every
# iteration, which converges to the same P.  Not compared: ot.sinkhorn2's
# autodiff gradient is the true derivative of <P(C), C>, i.e. P + <C, dP/dC>,
# while kdloss's TRANSPORT gradient holds the plan fixed (P): different
# quantities (the test below checks that they do differ, so a kdloss switch
# would be seen).
def _pot_dual_autodiff(ot, torch, M, a, b, eps):
    res = ot.solve(M, a, b, reg=eps, reg_type="KL", max_iter=MAX_ITER, tol=POT_TOL,
                   grad="autodiff")
    return res.value


def test_dual_gradient_wrt_cost_vs_pot_autodiff():
    ot, torch = _pot(), _torch()
    import kdloss.torch as kt

    rng = np.random.default_rng(6)
    n, m, eps = 7, 10, 0.1
    C0 = rng.random((n, m))
    a, b = _weights(rng, n), _weights(rng, m)
    ta, tb = torch.tensor(a), torch.tensor(b)
    Ck = torch.tensor(C0, requires_grad=True)
    r = kt.sinkhorn(Ck, epsilon=eps, log_a=ta.log(), log_b=tb.log(), value="dual",
                    max_iter=MAX_ITER, tol=KD_TOL, return_plan=True)
    r["value"].backward()
    Cp = torch.tensor(C0, requires_grad=True)
    vp = _pot_dual_autodiff(ot, torch, Cp, ta, tb, eps)
    vp.backward()
    bound = _plan_bound(int(r["iterations"]), m)
    np.testing.assert_allclose(r["value"].item(), vp.item(), rtol=0, atol=C0.max() * bound)
    assert np.abs(Ck.grad.numpy() - Cp.grad.numpy()).sum() <= bound
    np.testing.assert_array_equal(Ck.grad.numpy(), r["plan"].detach().numpy())

    # TRANSPORT: POT's sinkhorn2 autodiff is d<P(C),C>/dC, not kdloss's plan-fixed P
    Ct = torch.tensor(C0, requires_grad=True)
    ot.sinkhorn2(ta, tb, Ct, eps, method="sinkhorn_log", numItermax=MAX_ITER, stopThr=POT_TOL,
                 warn=False).backward()
    assert np.abs(Ct.grad.numpy() - Ck.grad.numpy()).max() > 1e3 * bound


@pytest.mark.parametrize("metric,pot_metric", [("sqeuclidean", "sqeuclidean"), ("l1", "cityblock")])
def test_dual_gradient_wrt_x_vs_pot_autodiff(metric, pot_metric):
    ot, torch = _pot(), _torch()
    import kdloss.torch as kt

    rng = np.random.default_rng(7)
    n, m, d, eps = 9, 6, 4, 0.1
    x0, y0 = rng.random((n, d)), rng.random((m, d))
    a, b = _weights(rng, n), _weights(rng, m)
    ta, tb = torch.tensor(a), torch.tensor(b)
    xk = torch.tensor(x0, requires_grad=True)
    r = kt.sinkhorn(x=xk, y=torch.tensor(y0), metric=metric, epsilon=eps, log_a=ta.log(),
                    log_b=tb.log(), value="dual", max_iter=MAX_ITER, tol=KD_TOL)
    r["value"].backward()
    xp = torch.tensor(x0, requires_grad=True)
    M = ot.dist(xp, torch.tensor(y0), metric=pot_metric)
    _pot_dual_autodiff(ot, torch, M, ta, tb, eps).backward()
    # grad_i = sum_j P_ij dC_ij/dx_i: plan L1 error times max |dC/dx|
    dc = 2.0 * np.abs(x0[:, None] - y0[None]).max() if metric == "sqeuclidean" else 1.0
    tol = dc * _plan_bound(int(r["iterations"]), m)
    np.testing.assert_allclose(xk.grad.numpy(), xp.grad.numpy(), rtol=0, atol=tol)


# ------------------------------------------------------------------ 5. Sinkhorn divergence
@pytest.mark.parametrize("metric,pot_metric", [("sqeuclidean", "sqeuclidean"), ("l1", "cityblock")])
def test_debiased_divergence_vs_pot(metric, pot_metric):
    """kdloss debias vs ot.solve_sample(debias=True): value = V(a,b) -
    (V(a,a) + V(b,b))/2 of the KL (DUAL) values, value_linear the same of
    <P, C> (TRANSPORT); and vs empirical_sinkhorn_divergence (TRANSPORT,
    clamped at 0 by POT: the case is chosen with S > 0)."""
    ot = _pot()
    rng = np.random.default_rng(8)
    n, m, d, eps = 10, 13, 2, 0.1
    x, y = rng.random((n, d)), rng.random((m, d)) + 0.3
    a, b = _weights(rng, n), _weights(rng, m)
    res = ot.solve_sample(x, y, a, b, metric=pot_metric, reg=eps, reg_type="KL", debias=True,
                          max_iter=MAX_ITER, tol=POT_TOL)
    kw = dict(x=x, y=y, metric=metric, epsilon=eps, log_a=np.log(a), log_b=np.log(b),
              max_iter=MAX_ITER, tol=KD_TOL, debias=True)
    dual = kn.sinkhorn(value="dual", **kw)
    tr = kn.sinkhorn(value="transport", **kw)
    # three problems, weights 1, 1/2, 1/2.  kdloss reports the (a, b)
    # problem's iterations; the self problems can be far slower (L1 self
    # costs: 10x here), so the rate is that of the slowest, read off kdloss
    # solving each self problem on its own.
    iters = [dual["iterations"]] + [
        kn.sinkhorn(x=z, y=z, metric=metric, epsilon=eps, log_a=np.log(w), log_b=np.log(w),
                    max_iter=MAX_ITER, tol=KD_TOL)["iterations"] for z, w in ((x, a), (y, b))]
    cmax = ot.dist(np.vstack([x, y]), metric=pot_metric).max()
    tol = 2.0 * cmax * _plan_bound(max(iters), max(n, m))
    np.testing.assert_allclose(dual["value"], res.value, rtol=0, atol=tol)
    np.testing.assert_allclose(tr["value"], res.value_linear, rtol=0, atol=tol)
    assert dual["value"] > 0
    s = ot.bregman.empirical_sinkhorn_divergence(x, y, eps, a, b, metric=pot_metric,
                                                 method="sinkhorn_log", numIterMax=MAX_ITER,
                                                 stopThr=POT_TOL, warn=False)
    assert s > 1e3 * tol
    np.testing.assert_allclose(tr["value"], s, rtol=0, atol=tol)


# ------------------------------------------------------------------ 6. flash-sinkhorn
# flash-sinkhorn's kernels are Triton, and its entry points refuse CPU
# tensors with an is_cuda check before any work.  They run here on CPU in a
# subprocess: Triton's interpreter must be on (TRITON_INTERPRET=1) before
# triton itself is first imported -- once triton was imported without it
# (by torch.compile in another test module, say), launching an interpreted
# kernel fails ("Cannot call @triton.jit'd outside of the scope of a
# kernel"), and the variable must stay set at launch, so it cannot be
# restored after the import in this process.  In the subprocess
# Tensor.is_cuda reads True, so the CPU tensors pass the check; everything
# else is the peer's own code.  allow_tf32=False (FP32 dot products, no TF32
# rounding of the points), autotune=False (the autotuner times on a GPU).
_FLASH_EPS, _FLASH_ITERS, _FLASH_LOSS_ITERS = 0.05, (3, 40), 30
_FLASH_SCRIPT = r"""
import json, sys
import torch
import flash_sinkhorn as fs
from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_alternating
case = json.loads(sys.stdin.read())
x, y, a, b = (torch.tensor(case[k], dtype=torch.float32) for k in "xyab")
torch.Tensor.is_cuda = property(lambda self: True)
out = {"version": fs.__version__}
for it in case["iters"]:
    f, g = sinkhorn_flashstyle_alternating(x, y, a, b, eps=case["eps"], n_iters=it, cost_scale=1.0,
                                           allow_tf32=False, autotune=False)
    out["fg%d" % it] = [f.double().tolist(), g.double().tolist()]
for debias in (False, True):
    loss = fs.SamplesLoss("sinkhorn", backend="alternating", eps=case["eps"],
                          n_iters=case["loss_iters"], use_epsilon_scaling=False,
                          allow_tf32=False, autotune=False, debias=debias)
    out["loss%d" % debias] = float(loss(a, x, b, y))
print(json.dumps(out))
"""


def _flash_case():
    rng = np.random.default_rng(9)
    n, m, d = 10, 13, 3
    x, y = rng.random((n, d)), rng.random((m, d))
    return x, y, _weights(rng, n), np.full(m, 1.0 / m)


@pytest.fixture(scope="module")
def flash():
    import importlib.util
    import json
    import subprocess

    for mod, why in (("torch", "torch"), ("triton", "triton"), ("flash_sinkhorn", "flash-sinkhorn")):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            pytest.skip(f"{why} not installed: pip install {FLASH_PIN}")
    x, y, a, b = _flash_case()
    case = dict(x=x.tolist(), y=y.tolist(), a=a.tolist(), b=b.tolist(), eps=_FLASH_EPS,
                iters=list(_FLASH_ITERS), loss_iters=_FLASH_LOSS_ITERS)
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", _FLASH_SCRIPT], input=json.dumps(case), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"flash-sinkhorn in Triton's interpreter failed:\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# flash-sinkhorn's alternating solver in its default (GeomLoss) convention is
# kdloss's iteration: f_i = -eps LSE_j(log b_j + (g_j - C_ij)/eps) from g = 0,
# then g from the new f, with C = cost_scale |x - y|^2 (cost_scale 1 = kdloss
# "sqeuclidean"; GeomLoss's |x - y|^2 / 2 would be cost_scale 0.5).  So after
# the same number of iterations, converged or not, the potentials are the
# same numbers; flash-sinkhorn computes in float32 (exp2/log2 LSE), kdloss in
# float64.  The Sinkhorn map is non-expansive in the sup norm, so float32
# rounding does not grow over the iterations: a few ulp of the potentials'
# scale (max C ~ 3) per step, atol 1e-5.  Its inputs are rounded to float32
# first, so both solve the same problem.
def _f32(*v):
    return [np.asarray(u, dtype=np.float32).astype(np.float64) for u in v]


@pytest.mark.parametrize("iters", _FLASH_ITERS)
def test_flash_sinkhorn_potentials_same_iterate(flash, iters):
    x, y, a, b = _f32(*_flash_case())
    r = kn.sinkhorn(x=x, y=y, epsilon=_FLASH_EPS, log_a=np.log(a), log_b=np.log(b), tol=0.0,
                    max_iter=iters, value="dual", return_potentials=True)
    f, g = (np.array(v) for v in flash[f"fg{iters}"])
    np.testing.assert_allclose(f, r["f"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(g, r["g"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(a @ f + b @ g, r["value"], rtol=0, atol=1e-5)
    assert iters < 40 or r["marginal_error"] < 0.05   # 40 iterations: near the fixed point


# SamplesLoss (GeomLoss-style API), backend "alternating", fixed eps and
# n_iters: its loss is <a, f> + <b, g> = kdloss DUAL after the same
# iterations, and with debias the Sinkhorn divergence of those values.
@pytest.mark.parametrize("debias", [False, True])
def test_flash_sinkhorn_samples_loss_dual(flash, debias):
    x, y, a, b = _f32(*_flash_case())
    r = kn.sinkhorn(x=x, y=y, epsilon=_FLASH_EPS, log_a=np.log(a), log_b=np.log(b), tol=0.0,
                    max_iter=_FLASH_LOSS_ITERS, value="dual", debias=debias)
    np.testing.assert_allclose(flash[f"loss{int(debias)}"], r["value"], rtol=0, atol=1e-5)
