"""kdloss.numpy against a NumPy textbook of every divergence (written here,
independently of the library): losses against the formulas, gradients
against central finite differences.  Needs numpy only."""

import math

import numpy as np
import pytest

import kdloss
import kdloss.numpy as kn

DIVS = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]


from textbook import divergence, np_kl, np_log_softmax, reduce  # noqa: E402

log_softmax = np_log_softmax


# ------------------------------------------------------------ the textbook
def akl_head(p, rule, mu, k):
    order = np.argsort(-p, kind="stable")  # descending, ties by lower index
    c = np.cumsum(p[order])
    if rule == "reference":
        head = c <= mu
        head[0] = True
    elif rule == "mass":
        head = np.concatenate([[0.0], c[:-1]]) < mu
    else:
        head = np.arange(p.size) < k
    mask = np.zeros(p.size, dtype=bool)
    mask[order[head]] = True
    return mask


def row_loss(s, t, div, T=1.0, alpha=0.1, beta=0.5, rule="reference", mu=0.5, k=1, weights=None):
    q = np.exp(log_softmax(s / T))
    p = np.exp(log_softmax(t / T))
    if div == "akl" and weights is None:
        weights = akl_weights(s, t, T, rule, mu, k)
    return float(divergence(p, q, div, alpha, beta, np_kl, weights))


def akl_weights(s, t, T=1.0, rule="reference", mu=0.5, k=1):
    q = np.exp(log_softmax(s / T))
    p = np.exp(log_softmax(t / T))
    head = akl_head(p, rule, mu, k)
    gh = np.abs(p - q)[head].sum()
    gt = np.abs(p - q)[~head].sum()
    if gh + gt == 0:
        return 0.5, 0.5
    return gh / (gh + gt), gt / (gh + gt)


def textbook(S, T_, div, reduction="mean", labels=None, ignore_index=-100, scale=1.0,
             weights=None, **kw):
    rows = []
    keep = []
    for i in range(S.shape[0]):
        ignored = labels is not None and labels[i] == ignore_index
        w = None if weights is None else weights[i]
        rows.append(0.0 if ignored else row_loss(S[i], T_[i], div, weights=w, **kw))
        keep.append(not ignored)
    return reduce(np.array(rows), sum(keep), reduction, scale)


def fd_grad(S, T_, div, h=1e-6, **kw):
    """Central differences of the textbook; AKL weights held at the base
    point (they are constants for the gradient).  For reduction none, the
    gradient of the sum of per-token losses."""
    temp = kw.get("T", 1.0)
    weights = None
    if div == "akl":
        weights = [akl_weights(S[i], T_[i], temp, kw.get("rule", "reference"), kw.get("mu", 0.5),
                               kw.get("k", 1)) for i in range(S.shape[0])]
    g = np.zeros_like(S)
    for idx in np.ndindex(S.shape):
        sp, sm = S.copy(), S.copy()
        sp[idx] += h
        sm[idx] -= h
        fp = np.sum(textbook(sp, T_, div, weights=weights, **kw))
        fm = np.sum(textbook(sm, T_, div, weights=weights, **kw))
        g[idx] = (fp - fm) / (2 * h)
    return g


def logits(rng, n, v, outliers=True):
    x = rng.normal(size=(n, v))
    if outliers:  # a few large logits per row, so the softmax is not uniform
        for i in range(n):
            x[i, rng.integers(0, v, 2)] += rng.uniform(2, 5, 2)
    return x


@pytest.fixture
def data():
    rng = np.random.default_rng(1234)
    return logits(rng, 5, 13), logits(rng, 5, 13)


def opts(div):
    return dict(divergence=div, alpha=0.2, beta=0.3, mu=0.5, head_rule="reference", top_k=1)


def tb_kw(div, T=1.0):
    return dict(T=T, alpha=0.2, beta=0.3, rule="reference", mu=0.5, k=1)


# ------------------------------------------------------------------ tests
def test_closed_form_two_tokens():
    s = np.array([[0.25, -1.0], [2.0, 0.5]])
    t = np.array([[1.0, 0.0], [-0.5, 0.75]])
    loss, grad, stats = kn.distill_loss(s, t, divergence="fkl")
    q = np.exp(log_softmax(s))
    p = np.exp(log_softmax(t))
    fkl = (p * np.log(p / q)).sum(1)
    assert loss == pytest.approx(fkl.mean(), rel=1e-14)
    np.testing.assert_allclose(grad, (q - p) / 2, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(stats["fkl"], fkl, rtol=1e-13)
    np.testing.assert_allclose(stats["rkl"], (q * np.log(q / p)).sum(1), rtol=1e-13)
    assert stats["valid_rows"] == 2 and stats["invalid_rows"] == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("div", DIVS)
def test_loss_and_grad_against_textbook(data, div, reduction):
    S, T_ = data
    loss, grad, _ = kn.distill_loss(S, T_, reduction=reduction, **opts(div))
    want = textbook(S, T_, div, reduction=reduction, **tb_kw(div))
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-14)
    g = fd_grad(S, T_, div, reduction=reduction, **tb_kw(div))
    np.testing.assert_allclose(grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule,mu,k", [("reference", 0.5, 1), ("reference", 0.9, 1),
                                       ("mass", 0.5, 1), ("mass", 0.2, 1), ("topk", 0.5, 3)])
def test_akl_head_rules(data, rule, mu, k):
    S, T_ = data
    loss, grad, st = kn.distill_loss(S, T_, divergence="akl", head_rule=rule, mu=mu, top_k=k,
                                     reduction="none")
    for i in range(S.shape[0]):
        p = np.exp(log_softmax(T_[i]))
        assert st["head_size"][i] == akl_head(p, rule, mu, k).sum()
        wh, wt = akl_weights(S[i], T_[i], 1.0, rule, mu, k)
        assert st["w_head"][i] == pytest.approx(wh, rel=1e-12)
        assert st["w_tail"][i] == pytest.approx(wt, rel=1e-12)
        assert st["g_head"][i] + st["g_tail"][i] == pytest.approx(
            np.abs(p - np.exp(log_softmax(S[i]))).sum(), rel=1e-12)
    want = textbook(S, T_, "akl", reduction="none", rule=rule, mu=mu, k=k)
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    g = fd_grad(S, T_, "akl", reduction="none", rule=rule, mu=mu, k=k)
    np.testing.assert_allclose(grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd", "akl"])
def test_temperature_and_scale(data, div):
    S, T_ = data
    tau, scale = 2.5, 2.5 ** 2
    loss, grad, _ = kn.distill_loss(S, T_, temperature=tau, scale=scale, **opts(div))
    want = textbook(S, T_, div, scale=scale, **tb_kw(div, T=tau))
    assert loss == pytest.approx(want, rel=1e-12)
    g = fd_grad(S, T_, div, scale=scale, **tb_kw(div, T=tau))
    np.testing.assert_allclose(grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_labels_ignore_index(data, ignore_index):
    S, T_ = data
    labels = np.array([3, ignore_index, 1, ignore_index, 0], dtype=np.int64)
    loss, grad, st = kn.distill_loss(S, T_, divergence="fkl", labels=labels,
                                     ignore_index=ignore_index)
    keep = labels != ignore_index
    want = textbook(S[keep], T_[keep], "fkl")
    assert loss == pytest.approx(want, rel=1e-12)
    assert np.all(grad[~keep] == 0)
    g = fd_grad(S, T_, "fkl", labels=labels, ignore_index=ignore_index)
    np.testing.assert_allclose(grad, g, rtol=1e-5, atol=1e-7)
    assert st["valid_rows"] == keep.sum()
    none, _, _ = kn.distill_loss(S, T_, divergence="fkl", labels=labels, ignore_index=ignore_index,
                                 reduction="none")
    assert np.all(none[~keep] == 0)


def test_all_ignored_gives_zero(data):
    S, T_ = data
    labels = np.full(S.shape[0], -100, dtype=np.int64)
    loss, grad, st = kn.distill_loss(S, T_, labels=labels)
    assert loss == 0 and not np.any(grad) and st["valid_rows"] == 0


def test_empty_batch():
    S = np.zeros((0, 9))
    loss, grad, st = kn.distill_loss(S, S.copy())
    assert loss == 0 and grad.shape == (0, 9) and st["valid_rows"] == 0
    loss, grad, _ = kn.distill_loss(S, S.copy(), reduction="none")
    assert loss.shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_inputs(data, dtype):
    S, T_ = data
    s, t = S.astype(dtype), T_.astype(dtype)
    loss, grad, _ = kn.distill_loss(s, t, divergence="jsd")
    # the reference converts exactly to double: compare with the upcast values
    want = textbook(s.astype(np.float64), t.astype(np.float64), "jsd", beta=0.5)
    assert loss == pytest.approx(want, rel=1e-12)
    assert grad.dtype == np.float64
    mixed, _, _ = kn.distill_loss(s, T_, divergence="fkl")
    assert mixed == pytest.approx(textbook(s.astype(np.float64), T_, "fkl"), rel=1e-12)


def test_bfloat16_via_ml_dtypes(data):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    S, T_ = data
    s = S.astype(ml_dtypes.bfloat16)
    loss, _, _ = kn.distill_loss(s, T_, divergence="fkl")
    assert loss == pytest.approx(textbook(s.astype(np.float64), T_, "fkl"), rel=1e-12)


def test_strided_rows_and_leading_dims(data):
    S, T_ = data
    wide = np.full((5, 20), np.nan)  # NaN padding: a read past the row shows up
    wide[:, :13] = S
    loss, grad, _ = kn.distill_loss(wide[:, :13], T_, divergence="rkl")
    ref, ref_grad, _ = kn.distill_loss(S, T_, divergence="rkl")
    assert loss == ref
    np.testing.assert_array_equal(grad, ref_grad)
    # [B, T, V], and a slice whose leading dims cannot be viewed as rows
    S3 = np.random.default_rng(5).normal(size=(2, 4, 13))
    T3 = np.random.default_rng(6).normal(size=(2, 4, 13))
    l3, g3, st = kn.distill_loss(S3, T3, divergence="fkl", reduction="none")
    assert l3.shape == (2, 4) and g3.shape == (2, 4, 13) and st["fkl"].shape == (2, 4)
    np.testing.assert_allclose(l3.reshape(-1), textbook(S3.reshape(8, 13), T3.reshape(8, 13), "fkl",
                                                         reduction="none"), rtol=1e-12)
    ls, gs, _ = kn.distill_loss(S3[:, :-1], T3[:, :-1], divergence="fkl", reduction="none")
    np.testing.assert_array_equal(ls, l3[:, :-1])
    np.testing.assert_allclose(gs, g3[:, :-1], rtol=1e-15)
    # a single row [V]
    l1, g1, _ = kn.distill_loss(S[0], T_[0], divergence="fkl", reduction="none")
    assert l1.shape == () and g1.shape == (13,)


def test_shift_invariance(data):
    S, T_ = data
    a, ga, _ = kn.distill_loss(S, T_, divergence="akl")
    b, gb, _ = kn.distill_loss(S + 100.0, T_ - 50.0, divergence="akl")
    assert b == pytest.approx(a, rel=1e-9)
    np.testing.assert_allclose(gb, ga, rtol=1e-8, atol=1e-12)


def test_invalid_rows(data):
    S, T_ = data
    S = S.copy()
    S[1, 4] = np.nan
    with pytest.raises(kdloss.InvalidRowsError, match="1 of 5 rows are invalid") as e:
        kn.distill_loss(S, T_)
    assert e.value.invalid_rows == 1
    loss, grad, st = kn.distill_loss(S, T_, divergence="fkl", reduction="none", raise_on_invalid=False)
    assert math.isnan(loss[1]) and not np.any(grad[1]) and st["invalid_rows"] == 1
    mean, _, _ = kn.distill_loss(S, T_, divergence="fkl", raise_on_invalid=False)
    keep = [0, 2, 3, 4]
    assert mean == pytest.approx(textbook(S[keep], T_[keep], "fkl"), rel=1e-12)


def test_masked_vocabulary_minus_inf(data):
    S, T_ = data
    S, T_ = S.copy(), T_.copy()
    S[:, -3:] = -np.inf
    T_[:, -3:] = -np.inf
    loss, grad, _ = kn.distill_loss(S, T_, divergence="fkl")
    assert loss == pytest.approx(textbook(S[:, :-3], T_[:, :-3], "fkl"), rel=1e-12)
    assert not np.any(grad[:, -3:]) and np.all(np.isfinite(grad))


def test_no_grad(data):
    S, T_ = data
    loss, grad, _ = kn.distill_loss(S, T_, compute_grad=False)
    assert grad is None and loss > 0


# ---------------------------------------------------------------- bad input
def test_bad_inputs(data):
    S, T_ = data
    with pytest.raises(TypeError, match="dtype int32"):
        kn.distill_loss(S.astype(np.int32), T_)
    with pytest.raises(TypeError, match="numpy arrays"):
        kn.distill_loss(S.tolist(), T_)
    with pytest.raises(ValueError, match="shape"):
        kn.distill_loss(S, T_[:, :-1])
    with pytest.raises(ValueError, match="contiguous in its last"):
        kn.distill_loss(np.asfortranarray(S), T_)
    with pytest.raises(ValueError, match="unknown divergence"):
        kn.distill_loss(S, T_, divergence="kld")
    with pytest.raises(ValueError, match="BAD_TEMPERATURE") as e:
        kn.distill_loss(S, T_, temperature=0.0)
    assert isinstance(e.value, RuntimeError) and "temperature = 0" in str(e.value)
    with pytest.raises(ValueError, match="BAD_TEMPERATURE"):
        kn.distill_loss(S, T_, temperature=float("inf"))
    with pytest.raises(ValueError, match="BAD_ALPHA"):
        kn.distill_loss(S, T_, divergence="skl", alpha=1.0)
    with pytest.raises(ValueError, match="BAD_BETA"):
        kn.distill_loss(S, T_, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="BAD_MU"):
        kn.distill_loss(S, T_, mu=1.0)
    with pytest.raises(ValueError, match="BAD_TOP_K"):
        kn.distill_loss(S, T_, head_rule="topk", top_k=14)
    with pytest.raises(ValueError, match="BAD_SCALE"):
        kn.distill_loss(S, T_, scale=float("nan"))
    with pytest.raises(TypeError, match="int64"):
        kn.distill_loss(S, T_, labels=np.zeros(5, dtype=np.int32))
    with pytest.raises(ValueError, match="labels shape"):
        kn.distill_loss(S, T_, labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="empty vocabulary"):
        kn.distill_loss(np.zeros((3, 0)), np.zeros((3, 0)))
