"""kdloss.compat against the peers THEMSELVES, on CPU: the loss and the
gradient that TRL's and Liger-Kernel's own code compute on the same inputs
(test_compat.py checks the same calls against textbook torch written from
the peers' source; this module needs no reading of that source to be right).

- TRL's GKDTrainer.generalized_jsd_loss (plain torch) in this process, its
  GOLDTrainer's (probabilities too) and IWOPDTrainer's (top-k supports), and
  TRL's own GKDTrainer.compute_loss on tiny GPT-2 models with kdloss's loss
  put in its place (python/README.md's one-attribute subclass).
- Liger-Kernel's liger_jsd, liger_kl_div, liger_tvd and
  liger_fused_linear_jsd: Triton kernels, run by Triton's interpreter on CPU
  tensors in a subprocess (peer_liger_cases.py says why and how).
- The signatures: a call written for the peer (positional order, names,
  defaults) is a call of kdloss.compat's, so a switch is a change of import.
- Liger-Kernel's chunked LigerFusedLinearJSDLoss (plain torch): its soft
  part is kdloss's fused linear JSD with reduction "mean", which
  kdloss.compat's docstring says; this checks it, biases included.

The versions pinned here are the ones scripts/setup.sh installs (CI), and
those the results in the docs were read with.  Without a peer (or with
KDL_WITH_PEERS=0 at setup) its tests skip with the reason.

Tolerances.  TRL in float64 runs the same maths in float64 as kdloss's CPU
reference: both within rounding of sums of about V terms, rtol 1e-10.  In
float32 TRL rounds every intermediate (log_softmax, logsumexp of the
mixture, V products) to float32 while kdloss rounds its float64 result
once: the difference is TRL's own rounding, at most ~V·eps32 relative to the
sum of |terms| (V = 301: 2e-5; observed well below), so rtol 2e-5 against
that scale.  Liger computes in float32 in the same way: the same bound.
Gradients: float32 rounding of per-element values of size max|g|, so atol
1e-5·max|g| (and rtol 1e-4).  A wrong divisor, beta, temperature or sign
changes the result by O(1) relative: far outside these.
"""

import os
import subprocess
import sys
import warnings

import pytest

try:
    import torch
except ImportError as e:
    pytest.skip(f"torch is not importable: {e}", allow_module_level=True)

import kdloss.compat as kc  # noqa: E402
import kdloss.torch as kt  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import peer_liger_cases as cases  # noqa: E402

TRL_PIN = "trl==1.16.0"
LIGER_PIN = "liger-kernel==0.8.5"


def _close(got, want, what, rtol, atol_frac):
    got = torch.as_tensor(got, dtype=torch.float64).detach()
    want = torch.as_tensor(want, dtype=torch.float64).detach()
    atol = atol_frac * max(float(want.detach().abs().max()), 1e-30)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------- TRL
def _trl_trainer_loss(module, trainer):
    """trainer.generalized_jsd_loss of trl.experimental.<module>, or a skip
    with the reason (not installed, or a version without this path)."""
    import importlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = getattr(importlib.import_module(f"trl.experimental.{module}"), trainer)
    except Exception as e:
        pytest.skip(f"TRL's {trainer} not importable ({type(e).__name__}: {e}); pip install {TRL_PIN}")
    return cls.generalized_jsd_loss


@pytest.fixture(scope="module")
def trl_loss():
    return _trl_trainer_loss("gkd.gkd_trainer", "GKDTrainer")


def _trl_inputs(dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(3, 5, 97, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(3, 5, 97, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 97, (3, 5), generator=g)
    lab[0, :2] = -100
    lab[2, 4] = -100
    return s.to(dtype), t.to(dtype), lab


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "items"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_trl_generalized_jsd_loss(trl_loss, dtype, beta, temperature, reduction, with_labels):
    s, t, lab = _trl_inputs(dtype)
    lab = lab if with_labels else None
    kw = dict(beta=beta, temperature=temperature)
    if reduction == "items":  # the trainer's num_items_in_batch (a tensor or an int)
        kw["num_items_in_batch"] = torch.tensor(9) if with_labels else 15
    else:
        kw["reduction"] = reduction
    sp, sk = s.clone().requires_grad_(), s.clone().requires_grad_()
    want = trl_loss(sp, t, lab, **kw)
    got = kc.trl_generalized_jsd_loss(sk, t, lab, **kw)
    assert got.dtype == want.dtype
    want.backward()
    got.backward()
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    _close(got, want, "loss", rtol, rtol)
    _close(sk.grad, sp.grad, "grad", 1e4 * rtol, 0.5 * rtol)


@pytest.fixture(scope="module")
def gold_loss():
    return _trl_trainer_loss("gold.gold_trainer", "GOLDTrainer")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "items"])
@pytest.mark.parametrize("probs", [False, True])
def test_trl_gold_generalized_jsd_loss(gold_loss, beta, reduction, probs):
    """GOLD's loss on logits (temperature 2) and on probabilities
    (logits_are_probs: softmax of logits of scale 1, so every row sums to 1
    and no entry is near the 1e-8 clamp); gradients to the logits upstream,
    float64."""
    s, t, lab = _trl_inputs(torch.float64)
    if probs:
        s, t = s / 3, t / 3
    kw = dict(beta=beta, logits_are_probs=probs)
    kw.update(num_items_in_batch=7) if reduction == "items" else kw.update(reduction=reduction)
    if not probs:
        kw["temperature"] = 2.0
    grads, losses = [], []
    for fn in (gold_loss, kc.trl_gold_generalized_jsd_loss):
        z = s.clone().requires_grad_()
        x, y = (torch.softmax(z, -1), torch.softmax(t, -1)) if probs else (z, t)
        loss = fn(x, y, lab, **kw)
        loss.backward()
        losses.append(loss.detach())
        grads.append(z.grad)
    _close(losses[1], losses[0], "loss", 1e-10, 1e-10)
    _close(grads[1], grads[0], "grad", 1e-6, 1e-10)


@pytest.fixture(scope="module")
def iw_opd_loss():
    return _trl_trainer_loss("iw_opd.iw_opd_trainer", "IWOPDTrainer")


IW_CASES = [(0.0, True), (1.0, True), (0.0, False), (1.0, False), (0.4, False)]


@pytest.mark.parametrize("beta,add_tail", IW_CASES)
@pytest.mark.parametrize("top_k", [1, 5, 0, 97])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "items"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_trl_iw_opd_top_k(iw_opd_loss, beta, add_tail, top_k, reduction, with_labels):
    """IW-OPD's top-k loss (teacher's, student's or the union support; with
    the tail bucket: kdloss's sparse teacher; without: kdloss's dense loss on
    the gathered logits), and its full-vocabulary path (top_k 0, and top_k =
    V), against TRL's own function: float64, temperature 2, loss and
    gradient.  Logits of scale 3 over 97 tokens keep every top-k's mass well
    below TRL's 1 - 1e-7 clamp."""
    s, t, lab = _trl_inputs(torch.float64)
    lab = lab if with_labels else None
    kw = dict(beta=beta, temperature=2.0, top_k=top_k, add_tail=add_tail)
    kw.update(num_items_in_batch=7) if reduction == "items" else kw.update(reduction=reduction)
    sp, sk = s.clone().requires_grad_(), s.clone().requires_grad_()
    want = iw_opd_loss(sp, t, lab, **kw)
    got = kc.trl_iw_opd_generalized_jsd_loss(sk, t, lab, **kw)
    want.backward()
    got.backward()
    _close(got, want, "loss", 1e-10, 1e-12)
    _close(sk.grad, sp.grad, "grad", 1e-6, 1e-10)


def test_trl_iw_opd_union_with_tail_is_refused(iw_opd_loss):
    s, t, lab = _trl_inputs(torch.float64)
    with pytest.raises(ValueError, match="union"):
        kc.trl_iw_opd_generalized_jsd_loss(s, t, lab, beta=0.5, top_k=3, add_tail=True)


def test_trl_no_token_kept(trl_loss):
    """Every label -100: TRL's batchmean gives 0 (its count is clamped to 1)
    and its sum 0; the same from kdloss.compat."""
    s, t, lab = _trl_inputs(torch.float64)
    lab[:] = -100
    for reduction in ("batchmean", "sum"):
        want = trl_loss(s, t, lab, reduction=reduction)
        got = kc.trl_generalized_jsd_loss(s, t, lab, reduction=reduction)
        assert float(want) == 0.0 and float(got) == 0.0, reduction


# ------------------------------------------------- Liger (Triton kernels)
@pytest.fixture(scope="module")
def liger_results(tmp_path_factory):
    import importlib.util

    for mod, pin in (("liger_kernel", LIGER_PIN), ("triton", "triton (comes with torch)")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed: pip install {pin}")
    out = tmp_path_factory.mktemp("liger") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, cases.__file__, str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"the Liger worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return torch.load(out)


def _compat_fns():
    return {kind: getattr(kc, kind) for kind in cases.KINDS}


UNMASKED = [c for c in cases.cases() if "mask" not in c[2]]
MASKED = [c for c in cases.cases() if c[2].get("mask") == "inf"]


@pytest.mark.parametrize("case_id,kind,opt", UNMASKED, ids=[c[0] for c in UNMASKED])
def test_liger(liger_results, case_id, kind, opt):
    peer = liger_results[case_id]
    if isinstance(peer, str):
        pytest.fail(f"Liger raised on {case_id}: {peer}")
    want_loss, want_grads = peer
    got_loss, got_grads = cases.run(_compat_fns(), case_id, kind, opt)
    _close(got_loss, want_loss, f"{case_id} loss", 2e-5, 2e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        _close(got_grads[name], want, f"{case_id} d{name}", 1e-4, 1e-5)


@pytest.mark.parametrize("case_id,kind,opt", MASKED, ids=[c[0] for c in MASKED])
def test_liger_masked_vocabulary(liger_results, case_id, kind, opt):
    """Both models' logits at -inf on the same vocabulary entries (a padded
    or masked vocabulary): kdloss.compat's loss and gradient are the peer's
    on the rows WITHOUT those entries, and the masked entries get a zero
    gradient.  Liger-Kernel 0.8.5 itself gives NaN there for JSD (every
    beta) and KL, finite TVD (the -inf - -inf of its log-space terms):
    asserted, since python/README.md says so; a new peer version that
    changes it fails here and the README is to be updated."""
    drop = liger_results[case_id.replace("-inf", "-drop")]
    got_loss, got_grads = cases.run(_compat_fns(), case_id, kind, opt)
    _close(got_loss, drop[0], f"{case_id} loss vs the peer without the masked columns", 2e-5, 2e-5)
    g = got_grads["zs"]
    _close(g[:, :-cases.MASKED], drop[1]["zs"], f"{case_id} dzs", 1e-4, 1e-5)
    assert torch.all(g[:, -cases.MASKED:] == 0)
    peer_masked = float(liger_results[case_id][0])
    assert (peer_masked != peer_masked) == (kind != "tvd"), (case_id, peer_masked)


def test_trl_masked_vocabulary(trl_loss):
    """The same for TRL's function: on [B, T, V] logits with the last 40
    entries at -inf in both models, kdloss.compat gives TRL's loss and
    gradient of the rows without them; TRL itself gives NaN (0 * (-inf - -inf)
    in its elementwise KL), asserted for the README's sake as above."""
    s, t, lab = _trl_inputs(torch.float64)
    s[..., -40:] = float("-inf")
    t[..., -40:] = float("-inf")
    for beta in (0.0, 0.5, 1.0):
        sk = s.clone().requires_grad_()
        sd = s[..., :-40].clone().requires_grad_()
        got = kc.trl_generalized_jsd_loss(sk, t, lab, beta=beta)
        want = trl_loss(sd, t[..., :-40].contiguous(), lab, beta=beta)
        got.backward()
        want.backward()
        _close(got, want, f"beta {beta} loss", 1e-10, 1e-10)
        _close(sk.grad[..., :-40], sd.grad, f"beta {beta} grad", 1e-6, 1e-10)
        assert torch.all(sk.grad[..., -40:] == 0)
        assert torch.isnan(trl_loss(s, t, lab, beta=beta)), beta


def test_liger_covers_every_compat_kind(liger_results):
    """The worker ran every case it was given, and the cases reach each
    Liger function kdloss.compat mirrors (a case list that lost a kind
    would otherwise pass)."""
    kinds = {kind for _, kind, _ in cases.cases()}
    assert kinds == set(cases.KINDS)
    assert set(liger_results) - {"__signatures__"} == {c[0] for c in cases.cases()}


def _same_call(ours, theirs, what):
    """A call written for the peer is a call of ours: the peer's parameters
    come first, in its order, with its kinds and defaults (ours may give a
    default where the peer has none); what we add after them is keyword-only
    and has a default."""
    assert [p[:2] for p in ours[:len(theirs)]] == [p[:2] for p in theirs], (what, ours, theirs)
    for (name, _, mine), (_, _, peer) in zip(ours, theirs):
        assert peer is None or mine == peer, (what, name, mine, peer)
    for name, kind, default in ours[len(theirs):]:
        assert kind == "KEYWORD_ONLY" and default is not None, (what, name)


def test_liger_signatures(liger_results):
    sigs = liger_results["__signatures__"]
    assert len(sigs) == 4 + 2 * 4
    for key, theirs in sigs.items():
        name, _, method = key.partition(".")
        obj = getattr(kc, name)
        _same_call(cases.parameters(getattr(obj, method) if method else obj), theirs, key)


@pytest.mark.parametrize("ours,module,trainer", [
    ("trl_generalized_jsd_loss", "gkd.gkd_trainer", "GKDTrainer"),
    ("trl_gold_generalized_jsd_loss", "gold.gold_trainer", "GOLDTrainer"),
    ("trl_iw_opd_generalized_jsd_loss", "iw_opd.iw_opd_trainer", "IWOPDTrainer")])
def test_trl_signatures(ours, module, trainer):
    _same_call(cases.parameters(getattr(kc, ours)),
               cases.parameters(_trl_trainer_loss(module, trainer)), ours)


# ------------------------------------- Liger's chunked fused linear JSD
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_liger_chunked_fused_linear_jsd_soft_part(beta, temperature, with_bias):
    """LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1):
    kdloss.torch.fused_linear_distill_loss, divergence jsd (fkl at beta 0,
    rkl at 1: the peer's special cases), reduction "mean" over the tokens
    whose label is not ignore_index.  Inputs float64: the peer's gradients
    are float64 (rtol 1e-9), but it adds the chunks' losses into a float32
    scalar (torch's default dtype), so the loss is float32-rounded: rtol
    1e-6 (a few ulps of float32 over a handful of chunk sums)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as e:
        pytest.skip(f"liger_kernel.chunked_loss not importable ({e}): pip install {LIGER_PIN}")
    x = cases.inputs(f"chunked-{beta}-{temperature}-{with_bias}")
    d = torch.float64
    H, W = x["H"].to(d).requires_grad_(), x["W"].to(d).requires_grad_()
    Ht, Wt, lab = x["Ht"].to(d), x["Wt"].to(d), x["labels"]
    g = torch.Generator().manual_seed(5)
    b = (0.5 * torch.randn(cases.VOCAB, generator=g, dtype=d)).requires_grad_() if with_bias else None
    bt = 0.5 * torch.randn(cases.VOCAB, generator=g, dtype=d) if with_bias else None
    peer = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                   temperature=temperature, compiled=False, chunk_size=3)
    want = peer(H, W, Ht, Wt, lab, b, bt)
    grads_want = torch.autograd.grad(want, [H, W] + ([b] if with_bias else []))
    div, kb = ("fkl", 0.5) if beta == 0 else ("rkl", 0.5) if beta == 1 else ("jsd", beta)
    got = kt.fused_linear_distill_loss(H, W, divergence=div, beta=kb, temperature=temperature,
                                       labels=lab, reduction="mean", bias=b,
                                       teacher_hidden=Ht, teacher_weight=Wt, teacher_bias=bt)
    grads_got = torch.autograd.grad(got, [H, W] + ([b] if with_bias else []))
    _close(got, want, "loss", 1e-6, 1e-6)
    for name, gg, gw in zip(("dH", "dW", "db"), grads_got, grads_want):
        _close(gg, gw, name, 1e-9, 1e-11)


def test_trl_gkd_compute_loss_with_kdloss(trl_loss):
    """TRL's own GKDTrainer.compute_loss (the training step's loss: student
    and teacher forward, causal shift, -100 labels) with kdloss's loss as
    the trainer's generalized_jsd_loss attribute, as python/README.md shows,
    against the same step with TRL's: loss and the gradient of every student
    parameter.  Tiny GPT-2 models built from a config (no download), float64."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except Exception as e:
        pytest.skip(f"transformers' GPT-2 not importable ({e})")
    import types

    torch.manual_seed(3)
    cfg = dict(vocab_size=97, n_positions=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: two equal steps
    student = GPT2LMHeadModel(GPT2Config(n_embd=16, **cfg)).double()
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=24, **cfg)).double()
    ids = torch.randint(0, 97, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 7:] = -100  # padding
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    results = []
    for loss_fn in (trl_loss, kc.trl_generalized_jsd_loss):
        trainer = types.SimpleNamespace(teacher_model=teacher, beta=0.3,
                                        generalized_jsd_loss=loss_fn)
        student.zero_grad()
        loss = GKDTrainer.compute_loss(trainer, student, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (want, gw), (got, gg) = results
    _close(got, want, "compute_loss", 1e-10, 1e-12)
    for name in gw:
        _close(gg[name], gw[name], f"d{name}", 1e-7, 1e-10)
