"""kdloss.torch against textbook PyTorch autograd of every divergence
(formulas written here, independently of the library), gradcheck, the
autograd plumbing, and argument checking.  Skipped without torch; the CUDA
tests are marked `cuda` and skipped without a device."""

import math

import pytest

try:  # absent, or present but unusable (e.g. missing CUDA libraries): skip
    import torch
    import torch.nn.functional as F
except ImportError as e:
    pytest.skip(f"torch is not importable: {e}", allow_module_level=True)

import kdloss  # noqa: E402
import kdloss.torch as kt  # noqa: E402
from textbook import divergence, torch_akl_weights, torch_kl, torch_reduce  # noqa: E402

DIVS = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]
SMOOTH = ["fkl", "rkl", "fkl_rkl", "jsd", "skl", "srkl"]


# ------------------------------------------------------------ the textbook
def textbook(s, t, div, temperature=1.0, alpha=0.1, beta=0.5, head_rule="reference", mu=0.5,
             top_k=1, labels=None, ignore_index=-100, reduction="mean", scale=1.0):
    """Per-token divergence of softmax(t/T) (teacher p) and softmax(s/T)
    (student q), by the formulas, differentiated by autograd."""
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    q = F.softmax(s / temperature, dim=-1)
    p = F.softmax(t / temperature, dim=-1)
    weights = None
    if div == "akl":
        with torch.no_grad():
            ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
            c = ps.cumsum(-1)
            if head_rule == "reference":
                head_sorted = c <= mu
                head_sorted[:, 0] = True
            elif head_rule == "mass":
                head_sorted = (c - ps) < mu
            else:
                head_sorted = torch.arange(p.shape[-1]).expand_as(p) < top_k
            head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        weights = torch_akl_weights(p, q, head)
    loss = divergence(p, q, div, alpha, beta, torch_kl, weights)
    return torch_reduce(loss, labels, ignore_index, reduction, scale)


def make(n=6, v=29, seed=0, dtype=torch.float64, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n, v)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    # outliers so the distributions are peaked
    s.view(-1, shape[-1])[:, 3] += 4.0
    t.view(-1, shape[-1])[:, 3] += 3.0
    t.view(-1, shape[-1])[:, 5] += 2.5
    return s.to(dtype), t.to(dtype)


def both(s, t, div, upstream=None, **kw):
    """(loss, grad) of the library and of the textbook, same upstream."""
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    a = kt.distill_loss(s1, t, divergence=div, **kw)
    b = textbook(s2, t, div, **kw)
    w = upstream if upstream is not None else torch.ones_like(b)
    (a * w.reshape(a.shape)).sum().backward()
    (b * w).sum().backward()
    return a.detach(), s1.grad, b.detach().reshape(a.shape), s2.grad


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("div", DIVS)
def test_against_textbook_autograd(div, reduction):
    s, t = make()
    up = torch.rand(6, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7,
                                                                                           dtype=torch.float64)
    a, ga, b, gb = both(s, t, div, upstream=up, reduction=reduction, alpha=0.2, beta=0.3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("div", SMOOTH)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(div, reduction):
    s, t = make(n=3, v=7)
    s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: kt.distill_loss(x, t, divergence=div, reduction=reduction, temperature=1.5,
                                  alpha=0.25, beta=0.4),
        (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("rule,mu,k", [("reference", 0.5, 1), ("reference", 0.8, 1),
                                       ("mass", 0.5, 1), ("topk", 0.5, 4)])
def test_akl_head_rules(rule, mu, k):
    s, t = make(seed=3)
    a, ga, b, gb = both(s, t, "akl", head_rule=rule, mu=mu, top_k=k, reduction="sum")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("div", DIVS)
def test_temperature_and_scale(div):
    s, t = make(seed=4)
    tau = 2.0
    a, ga, b, gb = both(s, t, div, temperature=tau, scale=tau * tau)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_ignore_index(reduction):
    s, t = make(seed=5)
    labels = torch.tensor([1, -100, 4, 2, -100, 0])
    a, ga, b, gb = both(s, t, "jsd", labels=labels, reduction=reduction)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)
    assert not ga[1].any() and not ga[4].any()
    labels = torch.tensor([1, 9, 4, 2, 9, 0])
    a, ga, b, gb = both(s, t, "fkl", labels=labels, ignore_index=9, reduction=reduction)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


def test_all_ignored_zero_loss_and_grad():
    s, t = make()
    s.requires_grad_()
    loss = kt.distill_loss(s, t, labels=torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0 and not s.grad.any()


def test_leading_dims_and_strided_rows():
    s, t = make(shape=(2, 5, 29), seed=6)
    a, ga, b, gb = both(s, t, "rkl", reduction="none")
    assert a.shape == (2, 5) and ga.shape == (2, 5, 29)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)
    # the next-token slice [:, :-1]: leading dims not viewable as rows
    a, ga, b, gb = both(s[:, :-1], t[:, :-1], "fkl", reduction="mean")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)
    # a padded vocabulary: rows of stride 40 over V = 29 (NaN in the padding)
    wide = torch.full((6, 40), float("nan"), dtype=torch.float64)
    s2, t2 = make(seed=7)
    wide[:, :29] = s2
    view = wide[:, :29].clone().requires_grad_()  # leaf with ld 29 ...
    leaf = wide.clone().requires_grad_()
    loss = kt.distill_loss(leaf[:, :29], t2, divergence="fkl")  # ... and a true ld-40 view
    loss.backward()
    ref = kt.distill_loss(view, t2, divergence="fkl")
    ref.backward()
    assert loss.item() == ref.item()
    assert torch.equal(leaf.grad[:, :29], view.grad) and not leaf.grad[:, 29:].any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3),
                                       (torch.bfloat16, 1e-2)])
def test_low_precision_cpu(dtype, tol):
    s, t = make(dtype=dtype, seed=8)
    s.requires_grad_()
    loss = kt.distill_loss(s, t, divergence="akl")
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == dtype
    s64 = s.detach().double().requires_grad_()
    ref = textbook(s64, t.double(), "akl")
    ref.backward()
    # the reference reads the exact values: loss to float32, gradient to dtype rounding
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=tol, atol=tol * 1e-2)
    # mixed dtypes: bf16 student, f32 teacher
    m = kt.distill_loss(s.detach(), t.float(), divergence="fkl")
    assert m.item() == pytest.approx(textbook(s.detach().double(), t.float().double(), "fkl").item(),
                                     rel=1e-6)


def test_module_equals_functional():
    s, t = make(seed=9)
    labels = torch.tensor([0, 1, -100, 3, 4, 5])
    crit = kt.DistillLoss("jsd", temperature=2.0, beta=0.3, scale=4.0)
    assert "jsd" in repr(crit)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    a = crit(s1, t, labels)
    b = kt.distill_loss(s2, t, divergence="jsd", temperature=2.0, beta=0.3, scale=4.0,
                        labels=labels)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(s1.grad, s2.grad)
    with pytest.raises(ValueError, match="unknown divergence"):
        kt.DistillLoss("kl")


def test_stats():
    s, t = make(seed=10)
    loss, st = kt.distill_loss(s, t, divergence="akl", reduction="none", return_stats=True)
    p = F.softmax(t, -1)
    q = F.softmax(s, -1)
    torch.testing.assert_close(st["fkl"], (p * (p.log() - q.log())).sum(-1))
    torch.testing.assert_close(st["rkl"], (q * (q.log() - p.log())).sum(-1))
    torch.testing.assert_close(loss, st["w_head"] * st["fkl"] + st["w_tail"] * st["rkl"])
    torch.testing.assert_close(st["g_head"] + st["g_tail"], (p - q).abs().sum(-1))
    assert st["head_size"].dtype == torch.int64 and (st["head_size"] >= 1).all()
    assert int(st["valid_rows"]) == 6 and int(st["invalid_rows"]) == 0


def test_invalid_rows():
    s, t = make(seed=11)
    t[2, 5] = float("inf")
    with pytest.raises(kdloss.InvalidRowsError, match="1 of 6 rows"):
        kt.distill_loss(s, t)
    s.requires_grad_()
    loss = kt.distill_loss(s, t, divergence="fkl", reduction="none", raise_on_invalid=False)
    assert math.isnan(loss[2].item()) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    loss = kt.distill_loss(s, t, divergence="fkl", raise_on_invalid=False)
    loss.backward()
    assert not s.grad[2].any() and torch.isfinite(loss)


def test_teacher_gets_no_gradient_and_no_grad_mode():
    s, t = make(seed=12)
    t.requires_grad_()
    s.requires_grad_()
    kt.distill_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        loss = kt.distill_loss(s, t)
    assert not loss.requires_grad
    only_t = kt.distill_loss(s.detach(), t)  # student constant: backward yields nothing
    only_t.backward()
    assert t.grad is None


def test_empty_batch():
    s = torch.zeros(0, 11, dtype=torch.float64, requires_grad=True)
    loss = kt.distill_loss(s, torch.zeros(0, 11, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0 and s.grad.shape == (0, 11)


def test_bad_inputs():
    s, t = make()
    with pytest.raises(TypeError, match="dtype torch.int64"):
        kt.distill_loss(s.long(), t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kt.distill_loss(s.numpy(), t)
    with pytest.raises(ValueError, match="shape"):
        kt.distill_loss(s, t[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        kt.distill_loss(s, t[:-1])
    with pytest.raises(ValueError, match="contiguous in its last"):
        kt.distill_loss(s.t().contiguous().t(), t)
    with pytest.raises(ValueError, match="contiguous in its last"):
        kt.distill_loss(torch.randn(6, 58, dtype=torch.float64)[:, ::2], t)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        kt.distill_loss(s, t, divergence="kl")
    with pytest.raises(ValueError, match="unknown reduction"):
        kt.distill_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="KDL_STATUS_BAD_TEMPERATURE") as e:
        kt.distill_loss(s, t, temperature=0)
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(ValueError, match="BAD_TEMPERATURE"):
        kt.distill_loss(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match="BAD_TOP_K"):
        kt.distill_loss(s, t, head_rule="topk", top_k=0)
    with pytest.raises(TypeError, match="torch.int64"):
        kt.distill_loss(s, t, labels=torch.zeros(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels shape"):
        kt.distill_loss(s, t, labels=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="scalar"):
        kt.distill_loss(torch.tensor(1.0), torch.tensor(1.0))


# ------------------------------------------------------------------- CUDA
def _cuda_ready():
    return torch.cuda.is_available() and kdloss.device_available()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs torch.cuda and a CUDA build of kdloss")


def _cuda_call(*args, **kw):
    try:
        return kt.distill_loss(*args, **kw)
    except kdloss.KdlossError as e:
        if e.status_name == "KDL_STATUS_NOT_IMPLEMENTED":
            pytest.skip(f"GPU loss not built yet: {e}")
        raise


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_reference(div, dtype):
    s, t = make(n=16, v=1000, seed=13, dtype=dtype)
    labels = torch.arange(16)
    labels[3] = -100
    sc = s.cuda().requires_grad_()
    loss = _cuda_call(sc, t.cuda(), divergence=div, labels=labels.cuda(), temperature=1.5)
    (loss * 2.0).backward()
    assert loss.device.type == "cuda" and sc.grad.dtype == dtype
    s0 = s.clone().requires_grad_()
    ref = kt.distill_loss(s0, t, divergence=div, labels=labels, temperature=1.5)
    (ref * 2.0).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(sc.grad.cpu().float(), s0.grad.float(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.cuda
@cuda
def test_cuda_device_mismatch_and_f64():
    s, t = make()
    with pytest.raises(ValueError, match="teacher_logits on cpu"):
        kt.distill_loss(s.float().cuda(), t.float())
    with pytest.raises(TypeError, match="float64 CUDA"):
        kt.distill_loss(s.cuda(), t.cuda())
    with pytest.raises(ValueError, match="labels are on"):
        kt.distill_loss(s.float().cuda(), t.float().cuda(), labels=torch.zeros(6, dtype=torch.int64))


@pytest.mark.cuda
@cuda
def test_cuda_side_stream_reduction_none():
    s, t = make(n=8, v=517, seed=14, dtype=torch.float32)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        sc = s.cuda().requires_grad_()
        loss = _cuda_call(sc, t.cuda(), divergence="fkl", reduction="none",
                          raise_on_invalid=False)
        loss.sum().backward()
    st.synchronize()
    ref = kt.distill_loss(s.double(), t.double(), divergence="fkl", reduction="none")
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
