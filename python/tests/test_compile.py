"""kdloss.torch under torch.compile: every entry point is one or more
custom operators (kdloss::distill_fwd, sinkd_fwd, sinkhorn_fwd,
sinkhorn_ragged, sparse_fwd, fused_linear_fwd and fused_linear_bwd, the
latter two also with the teacher as a linear layer and as its top-k; the
vocabulary-parallel loss vocab_parallel_step and vocab_parallel_finish with
functional all-reduces between them), so torch.compile(fullgraph=True)
keeps it in the graph with no graph break; compiled results and gradients
(aot_eager and Inductor) equal eager ones; the eager fallback for a torch
without custom_op gives the same numbers; each operator passes
torch.library.opcheck (schema, fake implementation, autograd registration)
with the arguments the public functions give it; errors surface as in
eager mode.  CPU tensors (the float64 reference); skipped without torch or
torch.library.custom_op."""

import contextlib

import pytest

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    pytest.skip(f"torch is not importable: {e}", allow_module_level=True)

import kdloss  # noqa: E402
import kdloss.torch as kt  # noqa: E402

if not kt._HAS_CUSTOM_OP:
    pytest.skip("this torch has no torch.library.custom_op: kdloss.torch runs eagerly only",
                allow_module_level=True)

needs_ot = pytest.mark.skipif(not kdloss.ot_available(), reason="library built without OT")
needs_ext = pytest.mark.skipif(not kdloss.ext_available(), reason="library built without ext")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (the parametrised steps share one code
    object, which would otherwise hit Dynamo's recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_raises(match):
    """A ValueError raised inside a compiled function: dynamo may wrap it
    in its TorchRuntimeError (the message kept)."""
    return pytest.raises((ValueError, torch._dynamo.exc.TorchRuntimeError), match=match)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(shape=(3, 4, 11), seed=0, dtype=torch.float64):
    g = _gen(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 5, shape[:-1], generator=g)
    labels.view(-1)[1] = -100
    return s, t, labels


def _weights(x):
    """Distinct weights so that per-row results all reach the gradient."""
    return torch.arange(1, x.numel() + 1, dtype=x.dtype).reshape(x.shape)


# ------------------------------------------------------------------- cases
# Each case: (inputs, which of them get a gradient, a training-step-like
# function with ops on both sides of the loss, returning a scalar).
def _distill_case(div="akl", reduction="mean", stats=False):
    s, t, labels = _inputs()

    def f(s, t, labels):
        out = kt.distill_loss(s * 1.5, t, divergence=div, temperature=2.0, labels=labels,
                              reduction=reduction, scale=4.0, return_stats=stats)
        loss = out[0] if stats else out
        if reduction == "none":
            loss = (loss * _weights(loss)).sum()
        if stats:  # the statistics are results too (not differentiable)
            st = out[1]
            loss = loss + 0.01 * st["fkl"].sum() + 0.001 * st["head_size"].sum() \
                + st["valid_rows"] - st["invalid_rows"]
        return loss + 0.25 * s.square().mean()
    return (s, t, labels), (0,), f


def _sinkd_case(stats=False):
    s, t, _ = _inputs((2, 3, 7), seed=3)

    def f(s, t):
        out = kt.sinkd_loss(s * 1.5, t, group_size=3, temperature=2.0, epsilon=0.2, max_iter=15,
                            return_stats=stats, return_plan=stats)
        if not stats:
            return out + s.square().mean()
        loss, st = out
        return (loss + st["group_loss"].sum() * 0.5 + st["plan"].sum() * 0.1
                + st["marginal_error"].sum() + st["iterations"].sum())
    return (s, t), (0,), f


def _sinkhorn_case(kind="cost"):
    g = _gen(5)
    if kind == "cost":
        C = torch.rand(2, 4, 5, generator=g, dtype=torch.float64)

        def f(C):
            r = kt.sinkhorn(C * 2.0, epsilon=0.1, max_iter=200, tol=1e-9, return_plan=True,
                            return_potentials=True)
            return ((r["value"] * _weights(r["value"])).sum() + r["plan"].sum()
                    + r["f"].square().sum() + r["iterations"].sum())
        return (C,), (0,), f
    if kind == "single":
        C = torch.rand(4, 3, generator=g, dtype=torch.float64)
        return (C,), (0,), lambda C: kt.sinkhorn(C.exp(), epsilon=0.2, value="dual")["value"] * 3
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)

    def f(x, y):
        r = kt.sinkhorn(x=x * 0.5, y=y, epsilon=0.3, max_iter=300, tol=1e-10, debias=True,
                        return_grad_x=True)
        return (r["value"] * _weights(r["value"])).sum() + r["self_yy"].sum() + r["grad_x"].sum()
    return (x, y), (0,), f


def _ragged_case():
    g = _gen(7)
    costs = [torch.rand(n, m, generator=g, dtype=torch.float64)
             for n, m in ((3, 4), (2, 2), (5, 3))]

    def f(a, b, c):
        r = kt.sinkhorn_ragged([a, b * 2, c], epsilon=0.2, max_iter=100, return_plan=True,
                               return_potentials=True)
        return (r["value"].sum() + sum(p.sum() for p in r["plan"]) + r["g"][1].sum()
                + r["iterations"].sum())
    return tuple(costs), (), f


def _sparse_case(mode="tail", reduction="mean"):
    s, t, labels = _inputs((2, 3, 13), seed=9)
    lp, idx = torch.log_softmax(t / 2.0, -1).topk(5, dim=-1)

    def f(s, idx, lp, labels):
        loss, st = kt.sparse_distill_loss(s * 1.5, idx, lp, mode=mode, divergence="jsd",
                                          temperature=2.0, labels=labels, reduction=reduction,
                                          return_stats=True)
        if reduction == "none":
            loss = (loss * _weights(loss)).sum()
        return loss + st["valid_rows"] + st["bad_index_rows"] + s.square().mean()
    return (s, idx, lp, labels), (0,), f


def _fused_case(reduction="mean", bias=True, div="akl"):
    g = _gen(11)
    h = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(9, generator=g, dtype=torch.float64) if bias else None
    t = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[1, -100, 2], [0, 3, 4]])

    def f(h, w, t, labels, b=None):
        loss, st = kt.fused_linear_distill_loss(h * 1.5, w, t, divergence=div, temperature=2.0,
                                                labels=labels, reduction=reduction, bias=b,
                                                return_stats=True)
        if reduction == "none":
            loss = (loss * _weights(loss)).sum()
        return loss + st["valid_rows"] + h.square().mean() + w.abs().sum() * 0.1
    args = (h, w, t, labels) + ((b,) if bias else ())
    return args, (0, 1, 4) if bias else (0, 1), f


def _fused_teacher_linear_case(reduction="mean", tbias=True, div="akl"):
    """The teacher as a linear layer, its hidden states formed in the graph
    (a stand-in for a frozen teacher's last layer); d_t != d."""
    g = _gen(12)
    h = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64) * 0.5
    ht = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    wt = torch.randn(9, 4, generator=g, dtype=torch.float64)
    bt = torch.randn(9, generator=g, dtype=torch.float64) if tbias else None
    labels = torch.tensor([[1, -100, 2], [0, 3, 4]])

    def f(h, w, ht, wt, labels, bt=None):
        loss = kt.fused_linear_distill_loss(h * 1.5, w, divergence=div, temperature=2.0,
                                            labels=labels, reduction=reduction,
                                            teacher_hidden=torch.tanh(ht), teacher_weight=wt,
                                            teacher_bias=bt)
        if reduction == "none":
            loss = (loss * _weights(loss)).sum()
        return loss + h.square().mean() + w.abs().sum() * 0.1
    args = (h, w, ht, wt, labels) + ((bt,) if tbias else ())
    return args, (0, 1), f


def _fused_sparse_case(mode="tail", reduction="mean", div="jsd"):
    """The sparse teacher: its top-k of log-probs formed in the graph."""
    g = _gen(13)
    h = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64) * 0.5
    t = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[1, -100, 2], [0, 3, 4]])

    def f(h, w, t, labels):
        lp, idx = torch.log_softmax(t / 2.0, -1).topk(4, dim=-1)
        loss, st = kt.fused_linear_distill_loss(h * 1.5, w, divergence=div, temperature=2.0,
                                                labels=labels, reduction=reduction,
                                                teacher_indices=idx, teacher_logprobs=lp,
                                                mode=mode, return_stats=True)
        if reduction == "none":
            loss = (loss * _weights(loss)).sum()
        return loss + st["valid_rows"] + st["bad_index_rows"] + h.square().mean() \
            + w.abs().sum() * 0.1
    return (h, w, t, labels), (0, 1), f


CASES = {
    "distill_mean": lambda: _distill_case("akl", "mean"),
    "distill_none_stats": lambda: _distill_case("jsd", "none", stats=True),
    "distill_sum_stats": lambda: _distill_case("fkl", "sum", stats=True),
    "sinkd": lambda: _sinkd_case(),
    "sinkd_stats_plan": lambda: _sinkd_case(stats=True),
    "sinkhorn_cost": lambda: _sinkhorn_case("cost"),
    "sinkhorn_single": lambda: _sinkhorn_case("single"),
    "sinkhorn_points_debias": lambda: _sinkhorn_case("points"),
    "sinkhorn_ragged": _ragged_case,
    "sparse_tail": lambda: _sparse_case("tail", "mean"),
    "sparse_renorm_none": lambda: _sparse_case("renormalised", "none"),
    "fused_mean_bias": lambda: _fused_case("mean", True),
    "fused_sum": lambda: _fused_case("sum", False, "fkl"),
    "fused_none_bias": lambda: _fused_case("none", True, "jsd"),
    "fused_tl_mean": lambda: _fused_teacher_linear_case("mean", True),
    "fused_tl_none": lambda: _fused_teacher_linear_case("none", False, "jsd"),
    "fused_sparse_tail_mean": lambda: _fused_sparse_case("tail", "mean", "akl"),
    "fused_sparse_renorm_none": lambda: _fused_sparse_case("renormalised", "none"),
}
MARKS = {k: (needs_ot if k.startswith("sink") else needs_ext if k.startswith(("sparse", "fused"))
             else ()) for k in CASES}
PARAMS = [pytest.param(k, marks=MARKS[k]) for k in CASES]


def _run(f, inputs, grad_pos):
    args = [x.clone().requires_grad_() if i in grad_pos else x for i, x in enumerate(inputs)]
    out = f(*args)
    grads = torch.autograd.grad(out, [args[i] for i in grad_pos]) if grad_pos else ()
    return out.detach(), grads


def _close(got, want, **tol):
    (gv, gg), (wv, wg) = got, want
    torch.testing.assert_close(gv, wv, **tol)
    assert len(gg) == len(wg)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a, b, **tol)


@contextlib.contextmanager
def _eager_fallback():
    """The path of a torch without torch.library.custom_op."""
    old, kt._USE_OPS = kt._USE_OPS, False
    try:
        yield
    finally:
        kt._USE_OPS = old


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_matches_eager(case, backend):
    inputs, grad_pos, f = CASES[case]()
    want = _run(f, inputs, grad_pos)
    got = _run(torch.compile(f, fullgraph=True, backend=backend), inputs, grad_pos)
    _close(got, want, rtol=1e-12, atol=1e-12)
    with _eager_fallback():
        old = _run(f, inputs, grad_pos)
    _close(old, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", PARAMS)
def test_no_graph_breaks(case):
    inputs, grad_pos, f = CASES[case]()
    args = [x.clone().requires_grad_() if i in grad_pos else x for i, x in enumerate(inputs)]
    ex = torch._dynamo.explain(f)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


@contextlib.contextmanager
def _record_calls():
    """The (operator name, arguments) of every kdloss operator called."""
    calls, orig = [], kt._Op.__call__

    def rec(self, *args):
        calls.append((self.name, args))
        return orig(self, *args)
    kt._Op.__call__ = rec
    try:
        yield calls
    finally:
        kt._Op.__call__ = orig


@pytest.mark.parametrize("case", PARAMS)
def test_opcheck(case):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck is not available")
    inputs, grad_pos, f = CASES[case]()
    with _record_calls() as calls:
        _run(f, inputs, grad_pos)
    assert calls
    names = set()
    for name, args in calls:
        names.add(name)
        torch.library.opcheck(getattr(torch.ops.kdloss, name).default, args)
    if case in ("fused_none_bias", "fused_tl_none", "fused_sparse_renorm_none"):
        # backward is the second operator
        assert names == {"fused_linear_fwd", "fused_linear_bwd"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inductor_matches_textbook(dtype):
    """Inductor (C++ on CPU) around the operator; the loss also against
    forward KL written with torch ops and differentiated by autograd."""
    s, t, _ = _inputs((5, 7), seed=1, dtype=dtype)

    def f(s, t):
        return kt.distill_loss(s * 1.5, t, divergence="fkl", temperature=2.0, scale=4.0) \
            + 0.25 * s.square().mean()
    got, (got_grad,) = _run(torch.compile(f, fullgraph=True), (s, t), (0,))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    s64 = s.double().requires_grad_()
    p = F.softmax(t.double() / 2.0, -1)
    kl = (p * (p.log() - F.log_softmax(s64 * 1.5 / 2.0, -1))).sum(-1).mean() * 4.0
    ref = kl + 0.25 * s64.square().mean()
    ref.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


@needs_ot
def test_sinkhorn_gradient_is_the_plan_compiled():
    """d value / d C = P through the compiled graph (an independent check of
    the autograd formula: the plan the operator returns)."""
    C = torch.rand(2, 4, 5, generator=_gen(2), dtype=torch.float64)
    f = torch.compile(lambda C: kt.sinkhorn(C, epsilon=0.1, max_iter=500, tol=1e-12,
                                            return_plan=True), fullgraph=True, backend="aot_eager")
    Cg = C.clone().requires_grad_()
    r = f(Cg)
    (r["value"] * torch.tensor([2.0, -3.0], dtype=torch.float64)).sum().backward()
    want = r["plan"] * torch.tensor([2.0, -3.0], dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(Cg.grad, want, rtol=1e-12, atol=1e-14)


def test_module_and_dynamic_shapes():
    crit = kt.DistillLoss("jsd", temperature=1.5, reduction="sum")
    f = torch.compile(lambda s, t, lab: crit(s, t, lab), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    for shape in [(2, 3, 9), (4, 5, 13)]:
        s, t, labels = _inputs(shape, seed=shape[0])
        want = _run(lambda a, b, c: crit(a, b, c), (s, t, labels), (0,))
        _close(_run(f, (s, t, labels), (0,)), want, rtol=1e-12, atol=1e-12)


@needs_ext
def test_fused_dynamic_shapes():
    f = torch.compile(lambda h, w, t: kt.fused_linear_distill_loss(h, w, t, reduction="none")
                      .sum(), fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (3, 7):
        g = _gen(n)
        h = torch.randn(n, 4, generator=g, dtype=torch.float64)
        w = torch.randn(6, 4, generator=g, dtype=torch.float64)
        t = torch.randn(n, 6, generator=g, dtype=torch.float64)
        want = _run(lambda a, b, c: kt.fused_linear_distill_loss(a, b, c, reduction="none").sum(),
                    (h, w, t), (0, 1))
        _close(_run(f, (h, w, t), (0, 1)), want, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_teacher_linear_is_frozen_compiled(reduction):
    """A teacher tensor that requires grad: compiled (fullgraph) as eager,
    the student's gradients those of the teacher-logits path given
    H_t @ W_t.T computed here, the teacher's gradient None."""
    (h, w, ht, wt, labels), _, _ = _fused_teacher_linear_case(reduction, False)

    def f(h, w, ht, wt):
        return kt.fused_linear_distill_loss(h, w, teacher_hidden=ht, teacher_weight=wt,
                                            labels=labels, reduction=reduction).sum()
    runs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x = [v.clone().requires_grad_() for v in (h, w, ht, wt)]
        fn(*x).backward()
        runs.append(x)
        assert x[2].grad is None and x[3].grad is None
    x = [v.clone().requires_grad_() for v in (h, w)]
    kt.fused_linear_distill_loss(*x, ht @ wt.T, labels=labels, reduction=reduction).sum() \
        .backward()
    for run in runs:
        for a, b in zip(run, x):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@needs_ext
def test_fused_sparse_is_frozen_compiled():
    """Log-probs that require grad: compiled (fullgraph) as eager, the
    student's gradients those of sparse_distill_loss on hidden @ weight.T
    materialised here, the log-probs' gradient None."""
    (h, w, t, labels), _, _ = _fused_sparse_case()
    lp, idx = torch.log_softmax(t, -1).topk(4, dim=-1)

    def f(h, w, lp):
        return kt.fused_linear_distill_loss(h, w, teacher_indices=idx, teacher_logprobs=lp,
                                            labels=labels, mode="tail", reduction="none").sum()
    runs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x = [v.clone().requires_grad_() for v in (h, w, lp)]
        fn(*x).backward()
        runs.append(x)
        assert x[2].grad is None
    x = [v.clone().requires_grad_() for v in (h, w)]
    kt.sparse_distill_loss(x[0] @ x[1].T, idx, lp, labels=labels, mode="tail",
                           reduction="none").sum().backward()
    for run in runs:
        for a, b in zip(run, x):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_no_grad_and_frozen_student():
    """Without a gradient wanted the operator returns an empty gradient and
    the loss is unchanged."""
    s, t, labels = _inputs()
    f = torch.compile(lambda a, b: kt.distill_loss(a, b, divergence="fkl"), fullgraph=True,
                      backend="aot_eager")
    want = kt.distill_loss(s, t, divergence="fkl")
    with torch.no_grad():
        torch.testing.assert_close(f(s, t), want, rtol=0, atol=0)
    assert not f(s, t).requires_grad


def test_errors_as_eager():
    s, t, _ = _inputs()
    f = torch.compile(lambda a, b, **kw: kt.distill_loss(a, b, **kw), fullgraph=True,
                      backend="aot_eager")
    # Argument errors found while tracing (the fake implementation runs the
    # checks) come wrapped by Dynamo, with kdloss's message.
    with _compiled_raises(r"kdloss: student_logits shape \(3, 4, 11\) != teacher_logits"):
        f(s, t[:, :, :5])
    bad = s.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(kdloss.InvalidRowsError):
        kt.distill_loss(bad, t)
    torch._dynamo.reset()
    with pytest.raises(kdloss.InvalidRowsError):
        f(bad, t)
    loss = f(bad, t, reduction="none", raise_on_invalid=False)
    assert torch.isnan(loss[1, 2]) and torch.isfinite(loss[0]).all()


@needs_ext
def test_sparse_and_fused_errors_as_eager():
    s, t, _ = _inputs((2, 9))
    lp, idx = torch.log_softmax(t, -1).topk(3, dim=-1)
    idx[1, 2] = 40  # out of range
    f = torch.compile(lambda *a, **kw: kt.sparse_distill_loss(*a, **kw), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(kdloss.InvalidRowsError):
        f(s, idx, lp)
    with pytest.raises(kdloss.KdlossValueError, match="KDL_STATUS_BAD_PARAM"):
        f(s, idx, lp, check_indices=True)
    loss, st = f(s, idx, lp, reduction="none", raise_on_invalid=False, return_stats=True)
    assert torch.isnan(loss[1]) and int(st["bad_index_rows"]) == 1
    h = torch.randn(2, 4, dtype=torch.float64)
    g = torch.compile(lambda *a: kt.fused_linear_distill_loss(*a), fullgraph=True,
                      backend="aot_eager")
    with _compiled_raises("differ in the hidden size"):
        g(h, torch.randn(9, 5, dtype=torch.float64), t)
    k = torch.compile(lambda *a, **kw: kt.fused_linear_distill_loss(*a, **kw), fullgraph=True,
                      backend="aot_eager")
    w = torch.randn(9, 4, dtype=torch.float64)
    with _compiled_raises("give one teacher: teacher_logits, or teacher_hidden"):
        k(h, w, t, teacher_hidden=h, teacher_weight=w)
    with _compiled_raises("got teacher_weight only"):
        k(h, w, teacher_weight=w)
    # the sparse teacher: two sources, a half, a bad index (invalid row, or
    # KdlossValueError with check_indices), as in eager mode
    with _compiled_raises("got teacher_logits, teacher_indices, teacher_logprobs"):
        k(h, w, t, teacher_indices=idx, teacher_logprobs=lp)
    with _compiled_raises("got teacher_indices only"):
        k(h, w, teacher_indices=idx)
    with pytest.raises(kdloss.InvalidRowsError, match=r"\(1 rows\)"):
        k(h, w, teacher_indices=idx, teacher_logprobs=lp)
    with pytest.raises(kdloss.KdlossValueError, match="KDL_STATUS_BAD_PARAM"):
        k(h, w, teacher_indices=idx, teacher_logprobs=lp, check_indices=True)
    loss, st = k(h, w, teacher_indices=idx, teacher_logprobs=lp, reduction="none",
                 raise_on_invalid=False, return_stats=True)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and int(st["bad_index_rows"]) == 1


def test_stats_match_plain_loss():
    """return_stats runs the operator too: the same loss as without it, and
    the counts."""
    s, t, labels = _inputs()
    s.requires_grad_()
    f = torch.compile(lambda a, b, c: kt.distill_loss(a, b, labels=c, return_stats=True),
                      fullgraph=True, backend="aot_eager")
    loss, stats = f(s, t, labels)
    ref = kt.distill_loss(s.detach(), t, labels=labels)
    torch.testing.assert_close(loss.detach(), ref, rtol=0, atol=0)
    assert int(stats["valid_rows"]) == 11 and int(stats["invalid_rows"]) == 0
    assert stats["fkl"].shape == (3, 4) and stats["head_size"].dtype == torch.int64


def _cuda_ready():
    return torch.cuda.is_available() and kdloss.device_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ready(), reason="needs torch.cuda and a CUDA build of kdloss")
@pytest.mark.parametrize("case", PARAMS)
def test_cuda_fullgraph_matches_eager(case):
    """The same steps on CUDA float32 tensors (the GPU entry points inside
    the operators, Inductor's Triton code around them)."""
    inputs, grad_pos, f = CASES[case]()
    inputs = tuple(x.cuda().float() if x.is_floating_point() else x.cuda() for x in inputs)
    try:
        want = _run(f, inputs, grad_pos)
    except NotImplementedError as e:  # no GPU entry point for this op in the library
        pytest.skip(str(e))
    got = _run(torch.compile(f, fullgraph=True), inputs, grad_pos)
    _close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ vocabulary-parallel
# Compiled, vocab_parallel_distill_loss is kdloss::vocab_parallel_step per
# step but the last, kdloss::vocab_parallel_finish for the last, and
# functional all-reduces between them (here over one gloo rank; several
# ranks: vocab_parallel_ranks.py, run by test_ext_torch.py).
needs_vp = pytest.mark.skipif(not kt._VP_TRACEABLE, reason="no functional collectives")


VP_CASES = {
    "fkl_mean_labels": dict(divergence="fkl", temperature=2.0, scale=4.0),
    "akl_none_stats": dict(divergence="akl", reduction="none", return_stats=True),
    "akl_topk_sum_f32": dict(divergence="akl", head_rule="topk", top_k=3, reduction="sum"),
    "jsd_none": dict(divergence="jsd", beta=0.3, reduction="none"),
}


def _vp_case(name):
    kw = dict(VP_CASES[name])
    dtype = torch.float32 if name.endswith("f32") else torch.float64
    s, t, labels = _inputs((3, 4, 11), seed=5, dtype=dtype)
    t[..., 1::4] = t[..., :1]  # ties at the AKL boundary
    stats = kw.pop("return_stats", False)

    def f(s, t, labels, fn=kt.vocab_parallel_distill_loss, **geom):
        out = fn(s * 1.5, t, labels=labels, return_stats=stats, **geom, **kw)
        loss = out[0] if stats else out
        if kw.get("reduction") == "none":
            loss = (loss * _weights(loss)).sum()
        if stats:
            st = out[1]
            loss = loss + st["valid_rows"] - st["invalid_rows"] + 0.01 * st["head_size"].sum()
        return loss + 0.25 * s.square().mean()
    return (s, t, labels), (0,), f


VP_PARAMS = [pytest.param(k, marks=needs_ext) for k in VP_CASES]


@needs_vp
@pytest.mark.parametrize("case", VP_PARAMS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_vocab_parallel_fullgraph_matches_eager(one_rank, case, backend):
    """Compiled with fullgraph=True (the slice given): the eager loss and
    gradient (the autograd.Function with dist.all_reduce), the fallback's, and
    the unsharded loss's."""
    inputs, grad_pos, f = _vp_case(case)
    g = lambda s, t, labels: f(s, t, labels, vocab_offset=0, vocab=11)  # noqa: E731
    want = _run(g, inputs, grad_pos)
    got = _run(torch.compile(g, fullgraph=True, backend=backend), inputs, grad_pos)
    _close(got, want, rtol=1e-12, atol=1e-12)
    with _eager_fallback():
        _close(_run(g, inputs, grad_pos), want, rtol=0, atol=0)
    dense = _run(lambda s, t, labels: f(s, t, labels, fn=kt.distill_loss), inputs, grad_pos)
    _close(got, dense, rtol=1e-12, atol=1e-12)


@needs_vp
@needs_ext
def test_vocab_parallel_no_graph_breaks_and_opcheck(one_rank):
    """One graph; the step operators and the functional all-reduces in it,
    in protocol order; opcheck on the arguments the loss gives each
    operator."""
    inputs, grad_pos, f = _vp_case("akl_none_stats")
    g = lambda s, t, labels: f(s, t, labels, vocab_offset=0, vocab=11)  # noqa: E731
    args = [x.clone().requires_grad_() if i in grad_pos else x for i, x in enumerate(inputs)]
    ex = torch._dynamo.explain(g)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    code = "\n".join(gm.code for gm in ex.graphs)
    plan = kt._vp_plan("akl", 1, "f64")[3]
    # docs/extensions.md: max (3 fields), sum-exps and digit 0 (2 + 512), digits 1..7 of
    # the 8-byte key (512), ties (R = 1), partial sums (8); the finish step after them
    assert plan == (("max", 3), ("sum", 514)) + (("sum", 512),) * 7 + (("sum", 1), ("sum", 8))
    assert code.count("kdloss.vocab_parallel_step") == len(plan)
    assert code.count("kdloss.vocab_parallel_finish") == 1
    assert code.count("all_reduce") >= len(plan)
    # the operators as the compiled path calls them (run eagerly)
    with _record_calls() as calls:
        _run(lambda s, t, labels: kt._vp_traced(s, t, labels, None, (0, 11, 0, 1), kt._opt_args(
            dict(divergence="akl", temperature=1.0, alpha=0.1, beta=0.5, head_rule="reference",
                 mu=0.5, top_k=1, reduction="none", scale=1.0, ignore_index=-100)),
            True, True, True)[0].sum(), inputs, grad_pos)
    names = [n for n, _ in calls]
    assert names == ["vocab_parallel_step"] * len(plan) + ["vocab_parallel_finish"]
    for name, a in calls:
        torch.library.opcheck(getattr(torch.ops.kdloss, name).default, a)


@needs_vp
@needs_ext
def test_vocab_parallel_dynamic_shapes_and_errors(one_rank):
    """Row counts as symbolic sizes; an argument error raised while tracing
    (the fake runs the checks); invalid rows raise at run time as eagerly."""
    def loss(s, t, **kw):
        return kt.vocab_parallel_distill_loss(s, t, vocab_offset=0, vocab=s.shape[-1],
                                              divergence="akl", **kw)
    f = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (3, 7):
        s, t, _ = _inputs((n, 6), seed=n)
        _close(_run(f, (s, t), (0,)), _run(loss, (s, t), (0,)), rtol=1e-12, atol=1e-12)
    s, t, _ = _inputs((3, 6))
    with _compiled_raises("shape"):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(s, t[:, :5])
    bad = s.clone()
    bad[1, 2] = float("nan")
    torch._dynamo.reset()
    g = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(kdloss.InvalidRowsError):
        g(bad, t)
    out = g(bad, t, reduction="none", raise_on_invalid=False)
    assert torch.isnan(out[1]) and torch.isfinite(out[0]) and torch.isfinite(out[2])
