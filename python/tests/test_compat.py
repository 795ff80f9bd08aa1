"""kdloss.compat against textbook PyTorch of the PEERS' formulas (written
here from the semantics read in TRL's and Liger-Kernel's source, see the
module docstring of kdloss.compat): log_softmax, elementwise KL terms,
logsumexp mixtures, each peer's divisors; values and autograd gradients on
random [B, T, V] inputs with -100 labels, every reduction, beta in {0, 0.3,
0.5, 1}, temperatures 1 and 2.  The peers' own code (TRL's function, and
Liger's Triton kernels run by Triton's interpreter) is compared in
test_peers_kd.py.

Tolerances.  float64: kdloss's CPU reference and the textbook are both
float64 on the same inputs; they differ by rounding in sums of about V
terms of size ~1, so rtol 1e-10 / atol 1e-12 holds with a wide margin.
float32: the compat functions are called with float32 inputs and compared
with the textbook in float64 on the same (upcast) inputs, the exact answer
for those inputs; kdloss computes in float64 on CPU and rounds the loss and
the gradient to float32 once (relative 6e-8), so rtol 1e-6 (16 ulps) with
atol 1e-7 * the largest gradient entry holds, while any wrong divisor,
beta or temperature would be off by far more.
"""

import math

import pytest

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    pytest.skip(f"torch is not importable: {e}", allow_module_level=True)

import kdloss  # noqa: E402
import kdloss.compat as kc  # noqa: E402
from kdloss import _lib  # noqa: E402

BETAS = [0.0, 0.3, 0.5, 1.0]
TEMPS = [1.0, 2.0]
REDS = ["batchmean", "sum", "mean"]
DTYPES = [torch.float64, torch.float32]
B, T, V = 2, 5, 11


def _tol(dtype):
    return (1e-10, 1e-12) if dtype == torch.float64 else (1e-6, 1e-7)


def _close(got, want, dtype, what):
    rtol, atol = _tol(dtype)
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=rtol,
                               atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _data(seed, dtype, lead=(B, T), labels=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    t = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    lab = None
    if labels:
        lab = torch.randint(0, V, lead, generator=g)
        flat = lab.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 3)]] = -100
    return s, t, lab


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------- textbook
def _elem_terms(ls, lt, beta):
    """Per-vocabulary-element terms of the peers' generalised JSD, ls the
    student's log-probabilities, lt the teacher's: beta 0 the forward KL
    p (log p - log q), beta 1 the reverse KL q (log q - log p), otherwise
    beta p (log p - log m) + (1 - beta) q (log q - log m), m = beta p +
    (1 - beta) q formed with logsumexp."""
    if beta == 0:
        return lt.exp() * (lt - ls)
    if beta == 1:
        return ls.exp() * (ls - lt)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
    return beta * lt.exp() * (lt - lm) + (1 - beta) * ls.exp() * (ls - lm)


def trl_textbook(s, t, labels, beta, temperature, reduction, legacy=False, num_items=None):
    """TRL's reductions: the current (trl.experimental.gkd) rule, or the
    older trl/trainer rule with legacy."""
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)
    terms = _elem_terms(ls, lt, beta)
    if labels is not None:
        terms = terms[labels != -100]  # [kept, V]
    if num_items is not None:
        return terms.sum() / num_items
    if reduction == "batchmean":
        if labels is not None:
            kept = (labels != -100).sum()
            return terms.sum() / (kept if legacy else kept.clamp_min(1))
        return terms.sum() / (terms.shape[0] * terms.shape[1] if legacy else terms.shape[0])
    return terms.sum() if reduction == "sum" else terms.mean()


def liger_jsd_textbook(x, y, labels, beta, ignore_index=-100):
    """Liger's JSD of log-probabilities x (student), y (teacher), [BT, V]:
    the sum over kept rows divided by their number."""
    terms = _elem_terms(x, y, beta)
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    return terms[keep].sum() / keep.sum()


def kl_textbook(x, target, reduction, log_target):
    terms = target.exp() * (target - x) if log_target else target * (target.log() - x)
    if reduction == "batchmean":
        return terms.sum() / x.shape[0]
    return terms.sum() if reduction == "sum" else terms.mean()


def tvd_textbook(p, q, labels, reduction, ignore_index=-100):
    terms = 0.5 * (p - q).abs()
    keep = torch.ones(p.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    kept = terms[keep]
    if reduction == "sum":
        return kept.sum()
    return kept.sum() / (keep.sum() * (1 if reduction == "batchmean" else p.shape[1]))


# --------------------------------------------------------------------- TRL
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("legacy", [False, True])
def test_trl_value_and_grad(dtype, beta, temperature, reduction, with_labels, legacy):
    s, t, lab = _data(1, dtype, labels=with_labels)
    a = _leaf(s)
    got = kc.trl_generalized_jsd_loss(a, t, lab, beta=beta, temperature=temperature,
                                      reduction=reduction, legacy=legacy)
    assert got.dtype == dtype and got.shape == ()
    got.backward()
    b = _leaf(s.to(torch.float64))
    want = trl_textbook(b, t.to(torch.float64), lab, beta, temperature, reduction, legacy)
    want.backward()
    _close(got, want, dtype, "loss")
    _close(a.grad, b.grad, dtype, "grad")
    assert a.grad.dtype == dtype


@pytest.mark.parametrize("reduction", REDS)
def test_trl_divisors(reduction):
    """The divisors themselves, as numbers: without labels the current
    batchmean divides by B (shape[0]) and the legacy one by shape[0] *
    shape[1] (B*T, or N*V for a 2-D [N, V] input); num_items_in_batch
    replaces the divisor."""
    total = {}
    for lead in ((B, T), (7,)):
        s, t, lab = _data(2, torch.float64, lead=lead)
        for labels in (None, lab):
            for legacy in (False, True):
                got = kc.trl_generalized_jsd_loss(s, t, labels, beta=0.3, reduction=reduction,
                                                  legacy=legacy)
                want = trl_textbook(s, t, labels, 0.3, 1.0, reduction, legacy)
                _close(got, want, torch.float64, f"{lead} labels {labels is not None} {legacy}")
        total[lead] = float(kc.trl_generalized_jsd_loss(s, t, None, beta=0.3, reduction="sum"))
        got = kc.trl_generalized_jsd_loss(s, t, None, beta=0.3, num_items_in_batch=torch.tensor(3))
        assert math.isclose(float(got), total[lead] / 3, rel_tol=1e-12)
    if reduction == "batchmean":
        s, t, _ = _data(2, torch.float64)
        cur = float(kc.trl_generalized_jsd_loss(s, t, None, beta=0.3))
        old = float(kc.trl_generalized_jsd_loss(s, t, None, beta=0.3, legacy=True))
        assert math.isclose(cur, total[(B, T)] / B, rel_tol=1e-12)
        assert math.isclose(old, total[(B, T)] / (B * T), rel_tol=1e-12)
        s, t, _ = _data(2, torch.float64, lead=(7,))
        old = float(kc.trl_generalized_jsd_loss(s, t, None, beta=0.3, legacy=True))
        assert math.isclose(old, total[(7,)] / (7 * V), rel_tol=1e-12)


def test_trl_rejects_and_edge_cases():
    s, t, lab = _data(3, torch.float64)
    with pytest.raises(ValueError, match="per-vocabulary-element"):
        kc.trl_generalized_jsd_loss(s, t, lab, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        kc.trl_generalized_jsd_loss(s, t, lab, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        kc.trl_generalized_jsd_loss(s, t, lab, num_items_in_batch=4, legacy=True)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            kc.trl_generalized_jsd_loss(s, t, lab, beta=beta)
    # every token masked: the current batchmean clamps the divisor to 1 (0);
    # "mean" and the legacy batchmean divide 0 by 0 (NaN), as TRL
    none_kept = torch.full_like(lab, -100)
    assert float(kc.trl_generalized_jsd_loss(s, t, none_kept)) == 0.0
    assert float(trl_textbook(s, t, none_kept, 0.5, 1.0, "batchmean")) == 0.0
    for reduction, legacy in (("mean", False), ("mean", True), ("batchmean", True)):
        assert torch.isnan(kc.trl_generalized_jsd_loss(s, t, none_kept, reduction=reduction,
                                                       legacy=legacy))
        assert torch.isnan(trl_textbook(s, t, none_kept, 0.5, 1.0, reduction, legacy))
    assert float(kc.trl_generalized_jsd_loss(s, t, none_kept, reduction="sum")) == 0.0
    # labels of another integer dtype are accepted (TRL compares them with -100)
    _close(kc.trl_generalized_jsd_loss(s, t, lab.to(torch.int32)),
           trl_textbook(s, t, lab, 0.5, 1.0, "batchmean"), torch.float64, "int32 labels")


@pytest.mark.parametrize("beta", BETAS)
def test_trl_bfloat16(beta):
    """bfloat16 logits (as TRL is run): the loss and the gradient come back
    in bfloat16, each rounded once from kdloss's float64 CPU result
    (relative error at most 2^-8), so within 2^-7 relative of the float64
    textbook on the same inputs."""
    s, t, lab = _data(20, torch.bfloat16)
    a = _leaf(s)
    got = kc.trl_generalized_jsd_loss(a, t, lab, beta=beta, temperature=2.0)
    got.backward()
    assert got.dtype == torch.bfloat16 and a.grad.dtype == torch.bfloat16
    b = _leaf(s.to(torch.float64))
    want = trl_textbook(b, t.to(torch.float64), lab, beta, 2.0, "batchmean")
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=2 ** -7, atol=0)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=2 ** -7,
                               atol=2 ** -7 * float(b.grad.abs().max()))


def test_trl_beta_ends_are_the_kls():
    """beta 0 is KL(teacher||student) and beta 1 KL(student||teacher),
    checked against torch's own kl_div (an independent formula)."""
    s, t, _ = _data(4, torch.float64)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    fkl = F.kl_div(ls, lt, reduction="sum", log_target=True) / B
    rkl = F.kl_div(lt, ls, reduction="sum", log_target=True) / B
    _close(kc.trl_generalized_jsd_loss(s, t, beta=0.0), fkl, torch.float64, "beta 0")
    _close(kc.trl_generalized_jsd_loss(s, t, beta=1.0), rkl, torch.float64, "beta 1")


# --------------------------------------------------------------- Liger JSD
def _logprob_inputs(seed, dtype, labels=True):
    s, t, lab = _data(seed, dtype, labels=labels)
    x = _leaf(s.reshape(-1, V))
    return x, t.reshape(-1, V), (None if lab is None else lab.reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("with_labels", [True, False])
def test_liger_jsd(dtype, beta, with_labels):
    """Value and gradient to the logits upstream of log_softmax (Liger's
    inputs are log-probabilities); the module equals the function."""
    x, y, lab = _logprob_inputs(5, dtype, with_labels)
    got = kc.jsd(F.log_softmax(x, -1), F.log_softmax(y, -1), lab, beta=beta)
    assert got.dtype == dtype
    got.backward()
    x64 = _leaf(x.detach().to(torch.float64))
    want = liger_jsd_textbook(F.log_softmax(x64, -1), F.log_softmax(y.to(torch.float64), -1),
                              lab, beta)
    want.backward()
    _close(got, want, dtype, "loss")
    _close(x.grad, x64.grad, dtype, "grad")
    mod = kc.JSD(beta=beta)(F.log_softmax(x, -1), F.log_softmax(y, -1), lab)
    assert float(mod.detach()) == float(got.detach())


@pytest.mark.parametrize("beta", BETAS)
def test_liger_jsd_leaf_gradient_difference(beta):
    """The documented difference: with the log-probabilities themselves a
    leaf, Liger's gradient (its formula differentiated as if exp(X) were
    free) and kdloss's differ per row by a multiple of exp(X), and by
    nothing else (so log_softmax's backward removes it)."""
    x, y, lab = _logprob_inputs(6, torch.float64)
    X = _leaf(F.log_softmax(x.detach(), -1))
    Y = F.log_softmax(y, -1)
    kc.jsd(X, Y, lab, beta=beta).backward()
    X2 = _leaf(X.detach())
    liger_jsd_textbook(X2, Y, lab, beta).backward()
    diff = X.grad - X2.grad
    c = diff.sum(-1, keepdim=True)  # exp(X) sums to 1 per row
    torch.testing.assert_close(diff, c * X.detach().exp(), rtol=0, atol=1e-12)
    assert float(c.abs().max()) > 1e-3  # the difference is real, not vacuous


def test_liger_jsd_rejects():
    x, y, lab = _logprob_inputs(7, torch.float64)
    with pytest.raises(ValueError, match="2-D"):
        kc.jsd(x.reshape(B, T, V), y.reshape(B, T, V))
    with pytest.raises(ValueError, match="shift_labels"):
        kc.jsd(x, y, lab[:-1])
    with pytest.raises(ValueError, match="beta"):
        kc.JSD(beta=2.0)
    assert torch.isnan(kc.jsd(x, y, torch.full_like(lab, -100)))  # 0 / 0, as Liger


# ----------------------------------------------------------- Liger KLDiv
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("log_target", [False, True])
def test_liger_kl_div(dtype, reduction, log_target):
    x, y, _ = _logprob_inputs(8, dtype, labels=False)
    lt = F.log_softmax(y, -1)
    target = lt if log_target else lt.exp()
    got = kc.kl_div(F.log_softmax(x, -1), target, reduction=reduction, log_target=log_target)
    got.backward()
    x64 = _leaf(x.detach().to(torch.float64))
    lt64 = F.log_softmax(y.to(torch.float64), -1)
    want = kl_textbook(F.log_softmax(x64, -1), lt64 if log_target else lt64.exp(), reduction,
                       log_target)
    want.backward()
    _close(got, want, dtype, "loss")
    _close(x.grad, x64.grad, dtype, "grad")
    # torch's own nn.KLDivLoss on 2-D input is the convention Liger follows
    ref = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)(
        F.log_softmax(x64.detach(), -1), lt64 if log_target else lt64.exp())
    _close(got.detach(), ref, dtype, "nn.KLDivLoss")
    mod = kc.KLDivLoss(reduction=reduction, log_target=log_target)(F.log_softmax(x, -1), target)
    assert float(mod.detach()) == float(got.detach())


def test_liger_kl_div_rejects_and_zero_targets():
    x, y, _ = _logprob_inputs(9, torch.float64, labels=False)
    with pytest.raises(ValueError, match="per-vocabulary-element"):
        kc.KLDivLoss(reduction="none")
    with pytest.raises(ValueError, match="2-D"):
        kc.kl_div(x.reshape(B, T, V), y.reshape(B, T, V), reduction="batchmean")
    # a target with zero probabilities: 0 log 0 = 0 (Liger: 0 * (log eps - x))
    p = F.softmax(y, -1).clone()
    p[:, :3] = 0
    p = p / p.sum(-1, keepdim=True)
    X = F.log_softmax(x, -1)
    want = (p * (p.clamp_min(1e-10).log() - X)).sum() / X.shape[0]
    _close(kc.kl_div(X, p, reduction="batchmean"), want, torch.float64, "zero targets")


# ------------------------------------------------------------- Liger TVD
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("with_labels", [True, False])
def test_liger_tvd(dtype, reduction, with_labels):
    """Probabilities in; value and gradient to the logits upstream of
    softmax."""
    x, y, lab = _logprob_inputs(10, dtype, with_labels)
    got = kc.tvd(F.softmax(x, -1), F.softmax(y, -1), lab, reduction=reduction)
    got.backward()
    x64 = _leaf(x.detach().to(torch.float64))
    want = tvd_textbook(F.softmax(x64, -1), F.softmax(y.to(torch.float64), -1), lab, reduction)
    want.backward()
    _close(got, want, dtype, "loss")
    _close(x.grad, x64.grad, dtype, "grad")
    mod = kc.TVDLoss(reduction=reduction)(F.softmax(x, -1), F.softmax(y, -1), lab)
    assert float(mod.detach()) == float(got.detach())


def test_liger_tvd_defaults_and_zero_probabilities():
    x, y, lab = _logprob_inputs(11, torch.float64)
    p, q = F.softmax(x, -1), F.softmax(y, -1)
    # the function's default is "mean", the module's "batchmean" (as in Liger)
    _close(kc.tvd(p, q, lab), tvd_textbook(p, q, lab, "mean"), torch.float64, "fn default")
    _close(kc.TVDLoss()(p, q, lab), tvd_textbook(p, q, lab, "batchmean"), torch.float64,
           "module default")
    # zero student probabilities: a finite gradient (0 there), the value exact
    pz = p.detach().clone()
    pz[:, :2] = 0
    pz = _leaf(pz / pz.sum(-1, keepdim=True))
    got = kc.tvd(pz, q, lab, reduction="sum")
    got.backward()
    _close(got, tvd_textbook(pz.detach(), q, lab, "sum"), torch.float64, "zero p")
    assert torch.isfinite(pz.grad).all() and (pz.grad[:, :2] == 0).all()
    with pytest.raises(ValueError, match="per-vocabulary-element"):
        kc.tvd(p, q, lab, reduction="none")


# ------------------------------------------------------- Liger fused JSD
def _need_ext():
    if not _lib.ext_available():
        pytest.skip("the loaded libkdloss has no kdloss_ext.h API (fused linear)")


def _fused_data(seed, dtype, d=6, d_t=9):
    _need_ext()
    g = torch.Generator().manual_seed(seed)
    n = B * T
    H = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    Ht = torch.randn(n, d_t, generator=g, dtype=torch.float64).to(dtype)
    Wt = (torch.randn(V, d_t, generator=g, dtype=torch.float64) * 0.9).to(dtype)
    lab = torch.randint(0, V, (n,), generator=g)
    lab[torch.randperm(n, generator=g)[:3]] = -100
    return H, W, Ht, Wt, lab


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("with_labels", [True, False])
def test_liger_fused_linear_jsd(dtype, beta, temperature, with_labels):
    H, W, Ht, Wt, lab = _fused_data(12, dtype)
    lab = lab if with_labels else None
    h, w = _leaf(H), _leaf(W)
    ht, wt = _leaf(Ht), _leaf(Wt)  # the teacher is frozen: no gradient reaches it
    got = kc.FusedLinearJSD(jsd_beta=beta, temperature=temperature)(h, w, ht, wt, lab)
    got.backward()
    assert ht.grad is None and wt.grad is None
    h64, w64 = _leaf(H.to(torch.float64)), _leaf(W.to(torch.float64))
    s = h64 @ w64.T / temperature
    t = Ht.to(torch.float64) @ Wt.to(torch.float64).T / temperature
    want = liger_jsd_textbook(F.log_softmax(s, -1), F.log_softmax(t, -1), lab, beta)
    want.backward()
    _close(got, want, dtype, "loss")
    _close(h.grad, h64.grad, dtype, "dH")
    _close(w.grad, w64.grad, dtype, "dW")
    fn = kc.fused_linear_jsd(H, W, Ht, Wt, lab, jsd_beta=beta, temperature=temperature)
    assert float(fn.detach()) == float(got.detach())


def test_liger_fused_linear_jsd_rejects():
    H, W, Ht, Wt, lab = _fused_data(13, torch.float64)
    with pytest.raises(ValueError, match="temperature"):
        kc.FusedLinearJSD(temperature=0)
    with pytest.raises(ValueError, match="jsd_beta"):
        kc.FusedLinearJSD(jsd_beta=-1)
    with pytest.raises(ValueError, match="2-D"):
        kc.fused_linear_jsd(H.reshape(B, T, -1), W, Ht.reshape(B, T, -1), Wt)
    with pytest.raises(ValueError, match="shift_labels"):
        kc.fused_linear_jsd(H, W, Ht, Wt, lab[:-1])


# ------------------------------------------------- the peers themselves
def test_against_trl_itself():
    trl = pytest.importorskip("trl", reason="trl is not installed: compared with the textbook only")
    try:
        from trl.experimental.gkd import GKDTrainer
        legacy = False
    except ImportError:
        from trl.trainer.gkd_trainer import GKDTrainer
        legacy = True

    s, t, lab = _data(14, torch.float64)
    for beta in BETAS:
        for temperature in TEMPS:
            for reduction in REDS:
                want = GKDTrainer.generalized_jsd_loss(s, t, labels=lab, beta=beta,
                                                       temperature=temperature,
                                                       reduction=reduction)
                got = kc.trl_generalized_jsd_loss(s, t, lab, beta=beta, temperature=temperature,
                                                  reduction=reduction, legacy=legacy)
                _close(got, want, torch.float64, f"trl {trl.__version__} {beta} {reduction}")


def _cuda_ready():
    return torch.cuda.is_available() and kdloss.device_available()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs torch.cuda and a CUDA build of kdloss")


@pytest.mark.cuda
@cuda
def test_against_liger_itself_cuda():
    pytest.importorskip("liger_kernel", reason="liger_kernel is not installed")
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    dev = torch.device("cuda")
    x, y, lab = _logprob_inputs(15, torch.float32)
    X, Y, lab = F.log_softmax(x, -1).to(dev), F.log_softmax(y, -1).to(dev), lab.to(dev)
    for beta in BETAS:
        _close(kc.JSD(beta)(X, Y, lab), LigerJSD(beta)(X, Y, lab), torch.float32, "jsd")
    for r in REDS:
        _close(kc.KLDivLoss(reduction=r)(X, Y.exp()), LigerKLDIVLoss(reduction=r)(X, Y.exp()),
               torch.float32, "kl")
        _close(kc.TVDLoss(r)(X.exp(), Y.exp(), lab), LigerTVDLoss(r)(X.exp(), Y.exp(), lab),
               torch.float32, "tvd")
    H, W, Ht, Wt, flab = (a.to(dev) for a in _fused_data(16, torch.float32))
    for beta in BETAS:
        for temperature in TEMPS:
            _close(kc.FusedLinearJSD(beta, temperature=temperature)(H, W, Ht, Wt, flab),
                   LigerFusedLinearJSD(beta, temperature=temperature)(H, W, Ht, Wt, flab),
                   torch.float32, "fused")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("beta", BETAS)
def test_compat_on_cuda(beta):
    """The CUDA kernels through compat, against the float64 textbook."""
    s, t, lab = _data(17, torch.float32)
    a = _leaf(s.cuda())
    got = kc.trl_generalized_jsd_loss(a, t.cuda(), lab.cuda(), beta=beta, temperature=2.0)
    got.backward()
    b = _leaf(s.to(torch.float64))
    want = trl_textbook(b, t.to(torch.float64), lab, beta, 2.0, "batchmean")
    want.backward()
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=1e-4, atol=1e-6)
    H, W, Ht, Wt, flab = _fused_data(18, torch.float32)
    h = _leaf(H.cuda())
    got = kc.fused_linear_jsd(h, W.cuda(), Ht.cuda(), Wt.cuda(), flab.cuda(), jsd_beta=beta)
    s64 = H.double() @ W.double().T
    want = liger_jsd_textbook(F.log_softmax(s64, -1),
                              F.log_softmax(Ht.double() @ Wt.double().T, -1), flab, beta)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)

