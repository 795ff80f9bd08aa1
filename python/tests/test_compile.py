"""kdloss.torch.distill_loss under torch.compile: the custom operator
kdloss::distill_fwd keeps the fused loss in the graph (no graph break with
fullgraph=True), compiled results and gradients equal eager ones, the
operator passes torch.library.opcheck (schema, fake implementation,
autograd registration), and errors surface as in eager mode.  CPU tensors
(the float64 reference); skipped without torch or torch.library.custom_op."""

import pytest

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    pytest.skip(f"torch is not importable: {e}", allow_module_level=True)

import kdloss  # noqa: E402
import kdloss.torch as kt  # noqa: E402

if kt._distill_fwd is None:
    pytest.skip("this torch has no torch.library.custom_op: distill_loss runs eagerly only",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (the parametrised steps share one code
    object, which would otherwise hit Dynamo's recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(shape=(3, 4, 11), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 5, shape[:-1], generator=g)
    labels.view(-1)[1] = -100
    return s, t, labels


def _step(div, reduction, legacy=False):
    """A small training-step-like function: ops on both sides of the loss.
    legacy: through the autograd.Function path (return_stats=True), which
    does not use the custom operator."""
    def f(s, t, labels):
        loss = kt.distill_loss(s * 1.5, t, divergence=div, temperature=2.0, labels=labels,
                               reduction=reduction, scale=4.0, return_stats=legacy)
        if legacy:
            loss = loss[0]
        if reduction == "none":
            loss = (loss * torch.arange(1, loss.numel() + 1, dtype=loss.dtype)
                    .reshape(loss.shape)).sum()
        return loss + 0.25 * s.square().mean()
    return f


def _run(f, s, t, labels):
    s = s.clone().requires_grad_()
    out = f(s, t, labels)
    out.backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("div", ["fkl", "akl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_matches_eager(div, reduction):
    s, t, labels = _inputs()
    f = _step(div, reduction)
    want, want_grad = _run(f, s, t, labels)
    got, got_grad = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), s, t, labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    old, old_grad = _run(_step(div, reduction, legacy=True), s, t, labels)
    torch.testing.assert_close(got, old, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, old_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inductor_matches_eager_and_textbook(dtype):
    """Inductor (C++ on CPU) around the operator; the loss also against
    forward KL written with torch ops and differentiated by autograd."""
    s, t, _ = _inputs((5, 7), seed=1, dtype=dtype)
    f = _step("fkl", "mean")
    want, want_grad = _run(f, s, t, None)
    got, got_grad = _run(torch.compile(f, fullgraph=True), s, t, None)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    s64 = s.double().requires_grad_()
    p = F.softmax(t.double() / 2.0, -1)
    kl = (p * (p.log() - F.log_softmax(s64 * 1.5 / 2.0, -1))).sum(-1).mean() * 4.0
    ref = kl + 0.25 * s64.square().mean()
    ref.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_no_graph_breaks():
    s, t, labels = _inputs()
    ex = torch._dynamo.explain(_step("akl", "mean"))(s.clone().requires_grad_(), t, labels)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_module_and_dynamic_shapes():
    crit = kt.DistillLoss("jsd", temperature=1.5, reduction="sum")
    f = torch.compile(lambda s, t, lab: crit(s, t, lab), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    for shape in [(2, 3, 9), (4, 5, 13)]:
        s, t, labels = _inputs(shape, seed=shape[0])
        want, want_grad = _run(lambda a, b, c: crit(a, b, c), s, t, labels)
        got, got_grad = _run(f, s, t, labels)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("want_grad", [True, False])
def test_opcheck(reduction, want_grad):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck is not available")
    s, t, labels = _inputs()
    s.requires_grad_(want_grad)
    args = (s, t, labels, "akl", 2.0, 0.1, 0.5, "reference", 0.5, 1, reduction, 1.0, -100,
            want_grad, True)
    torch.library.opcheck(torch.ops.kdloss.distill_fwd.default, args)


def test_errors_as_eager():
    s, t, _ = _inputs()
    f = torch.compile(lambda a, b, **kw: kt.distill_loss(a, b, **kw), fullgraph=True,
                      backend="aot_eager")
    # Argument errors found while tracing (the fake implementation runs the
    # checks) come wrapped by Dynamo, with kdloss's message.
    with pytest.raises((ValueError, torch._dynamo.exc.TorchRuntimeError),
                       match=r"kdloss: student_logits shape \(3, 4, 11\) != teacher_logits"):
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


def test_return_stats_still_eager():
    """return_stats keeps the autograd.Function path (not compiled)."""
    s, t, labels = _inputs()
    s.requires_grad_()
    loss, stats = kt.distill_loss(s, t, labels=labels, return_stats=True)
    ref = kt.distill_loss(s.detach(), t, labels=labels)
    torch.testing.assert_close(loss.detach(), ref, rtol=0, atol=0)
    assert int(stats["valid_rows"]) == 11
