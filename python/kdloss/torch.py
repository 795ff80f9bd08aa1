"""kdloss for PyTorch: fused distillation losses as autograd functions.

    import kdloss.torch as kt
    loss = kt.distill_loss(student_logits, teacher_logits, divergence="akl")
    loss.backward()

CUDA tensors run the fused GPU kernels of libkdloss on PyTorch's current
stream (no host synchronisation unless raise_on_invalid asks for the count of
invalid rows); CPU tensors run the float64 CPU reference.  The gradient with
respect to the student logits is computed in the forward call (one pass over
the logits) and saved; backward only multiplies it by the upstream gradient.
The teacher is a constant: it never receives a gradient.

Also: sinkd_loss (SinKD, Sinkhorn distance between student and teacher rows)
and sinkhorn (batched log-domain Sinkhorn, differentiable in cost and x); and
the extensions of kdloss_ext.h: sparse_distill_loss (a top-k teacher),
fused_linear_distill_loss (hidden @ weight.T and the loss, never holding the
[N, V] logits) and vocab_parallel_distill_loss (a vocabulary slice per rank
of a torch.distributed process group).  The argument checks and the library
calls are kdloss._ops's, shared with kdloss.numpy.
"""

from __future__ import annotations

import contextlib

import torch

from . import _lib, _ops

__all__ = [
    "distill_loss",
    "DistillLoss",
    "sinkd_loss",
    "sinkhorn",
    "sinkhorn_ragged",
    "sparse_distill_loss",
    "fused_linear_distill_loss",
    "vocab_parallel_distill_loss",
]

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
}


class _Torch(_ops.Backend):
    """torch tensors: the reference on CPU tensors, the GPU entry points on
    CUDA tensors (the tensor's device, PyTorch's current stream, a workspace
    from the caching allocator)."""

    kind, kinds, int64 = "torch.Tensor", "torch.Tensors", "torch.int64"
    F64, F32, I64, U8 = torch.float64, torch.float32, torch.int64, torch.uint8
    ARRAY, DTYPES = torch.Tensor, _DTYPES

    def check_layout(self, x, name):
        if x.is_complex() or x.layout != torch.strided:
            raise TypeError(f"kdloss: {name} must be a dense real tensor")

    def last_contiguous(self, x):
        return x.stride(-1) == 1

    def stride_text(self, x):
        return f"stride {x.stride(-1)}"

    def contiguous_hint(self, name):
        return f"call {name}.contiguous()"

    def rows(self, x):
        """Leading dims are flattened without a copy when they can be; rows
        that overlap (broadcast) are copied into plain rows."""
        x = x.detach()
        C = x.shape[-1]
        N = x.numel() // C
        if x.dim() == 2:
            x2 = x
        else:
            try:
                x2 = x.view(N, C)
            except RuntimeError:
                x2 = x.reshape(N, C)
        if N <= 1:
            return x2, N, C, C
        ld = x2.stride(0)
        if ld < C:
            x2 = x2.contiguous()
            ld = C
        return x2, N, C, ld

    def flat(self, x, n):
        return x.detach().reshape(n).contiguous()

    def pack(self, arrays, dtype):
        return torch.cat([a.detach().reshape(-1).to(dtype) for a in arrays])

    def to_host(self, x):
        return x.detach().cpu()

    def addr(self, x):
        return x.data_ptr() if x is not None and x.numel() else None

    def zeros(self, shape, dtype, dev):
        return torch.zeros(shape, dtype=dtype, device=dev)

    def empty(self, shape, dtype, dev):
        return torch.empty(shape, dtype=dtype, device=dev)

    def device(self, x):
        return x.device

    def is_gpu(self, dev):
        return dev.type == "cuda"

    def call(self, op, dev, desc, args, what):
        if dev.type != "cuda":
            _lib.call_ref(op, desc, args)
            return
        _lib.require_gpu(op, what)
        with torch.cuda.device(dev):
            h = _lib.handle_for_current_device(dev.index)
            # The workspace is freed when this returns: the caching allocator
            # reuses it only in stream order on this same stream, after the
            # kernels that use it.
            _lib.call_gpu(op, h, torch.cuda.current_stream(dev).cuda_stream, desc, args,
                          lambda n: torch.empty(n, dtype=torch.uint8, device=dev))

    def handle(self, dev):
        """The thread's handle on dev (made current by the caller) with
        PyTorch's current stream set."""
        h = _lib.handle_for_current_device(dev.index)
        _lib.check(_lib.lib().kdl_set_stream(h, torch.cuda.current_stream(dev).cuda_stream),
                   "kdl_set_stream")
        return h


_T = _Torch()


# ---------------------------------------------------------------- autograd
class _Later:
    """Gradients computed in backward by fn(grad_out, needs, *saved), for
    when the forward call cannot form them (saved: tensors kept for it)."""

    def __init__(self, fn, *saved):
        self.fn, self.saved = fn, saved


class _FusedGradFunction(torch.autograd.Function):
    """One autograd node for every op: run(needs, *inputs) calls the library
    once and returns (loss, grads), grads aligned with inputs (None where an
    input gets no gradient) or a _Later.  Backward multiplies the saved
    gradients by the upstream gradient, per leading row when per_row
    (reduction none, a batch of problems); no other pass over the data."""

    @staticmethod
    def forward(ctx, run, per_row, *inputs):
        loss, grads = run(ctx.needs_input_grad[2:], *inputs)
        ctx.per_row = per_row
        ctx.meta = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in inputs]
        if isinstance(grads, _Later):
            ctx.later, ctx.grads = grads.fn, None
            ctx.save_for_backward(*grads.saved)
        else:
            ctx.later, ctx.grads = None, grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad[2:]
        if ctx.later is not None:
            grads = ctx.later(grad_out, needs, *ctx.saved_tensors)
        else:
            grads = tuple(
                None if g is None or not need else
                _scaled_grad(g, grad_out, ctx.per_row, meta[1], meta[0])
                for g, need, meta in zip(ctx.grads, needs, ctx.meta))
        return (None, None) + tuple(grads)


def _scaled_grad(grad, grad_out, per_row, dtype, shape):
    """grad [N, ...] times the upstream gradient (per row for reduction
    none), cast to dtype and viewed as shape."""
    if per_row:
        g = grad * grad_out.reshape((-1,) + (1,) * (grad.dim() - 1)).to(grad.dtype)
    else:
        g = grad * grad_out.to(grad.dtype)
    return g.to(dtype).view(shape)


# ---------------------------------------------------------------- helpers
def _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
               ignore_index):
    return _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction,
                         scale=scale, ignore_index=ignore_index)


def _no_f64_on_cuda(dev, *tensors):
    if dev.type == "cuda" and any(t.dtype == torch.float64 for t in tensors):
        raise TypeError(
            "kdloss: float64 CUDA tensors are not supported by the GPU kernels; use float32, "
            "float16 or bfloat16 on the GPU, or CPU tensors for the float64 reference"
        )


def _loss_out(loss, student_dtype, lead, none):
    """The loss as returned: float32, float64 for a float64 student; the
    leading shape (reduction none) or 0-d."""
    loss = loss.to(torch.float64 if student_dtype == torch.float64 else torch.float32)
    return loss.reshape(lead) if none else loss.reshape(())


def _raise_invalid(raise_on_invalid, counters, rows, **kw):
    if raise_on_invalid:
        _ops.raise_invalid(int(counters[0].item()), rows, **kw)  # host sync on CUDA


def _counts(counters):
    return {"valid_rows": counters[1].reshape(()), "invalid_rows": counters[0].reshape(())}


def _distill_checks(s, t, labels, opts):
    """distill_loss's argument checks: (device, LossDesc, labels as [N])."""
    dev = _ops.check_pair(_T, s, t, "student_logits", "teacher_logits")
    _no_f64_on_cuda(dev, s, t)
    desc = _loss_desc(**opts)
    lab = _ops.labels(_T, labels, s.shape, dev)
    return dev, desc, lab


# ------------------------------------------------- torch.compile support
# With torch.library.custom_op (PyTorch >= 2.4), distill_loss (without
# return_stats) is the custom operator kdloss::distill_fwd: Dynamo keeps it
# in the graph as one opaque node (no graph break), its fake implementation
# gives the output shapes and dtypes, and its autograd formula is plain torch
# ops.  The operator returns the loss and the gradient to the student from
# the one fused pass; backward multiplies that gradient by the upstream
# gradient, as _FusedGradFunction does.  Older PyTorch: _FusedGradFunction.
_OPT_NAMES = ("divergence", "temperature", "alpha", "beta", "head_rule", "mu", "top_k",
              "reduction", "scale", "ignore_index")
_distill_fwd = None

if hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_autograd"):
    def _distill_fwd_impl(student, teacher, labels, divergence, temperature, alpha, beta,
                          head_rule, mu, top_k, reduction, scale, ignore_index, want_grad,
                          raise_on_invalid):
        opts = dict(zip(_OPT_NAMES, (divergence, temperature, alpha, beta, head_rule, mu, top_k,
                                     reduction, scale, ignore_index)))
        dev, desc, lab = _distill_checks(student, teacher, labels, opts)
        none = desc.reduction == _lib.REDUCTION_NONE
        loss, grad, _, counters = _ops.dense(_T, dev, desc, student, teacher, lab, want_grad,
                                             False)
        _raise_invalid(raise_on_invalid, counters, _ops.rows_of(_T, student))
        loss = _loss_out(loss, student.dtype, student.shape[:-1], none)
        if grad is None:
            grad = student.new_empty((0,), dtype=_T.results(dev, student)[1])
        return loss, grad

    _distill_fwd = torch.library.custom_op(
        "kdloss::distill_fwd", _distill_fwd_impl, mutates_args=(),
        schema="(Tensor student, Tensor teacher, Tensor? labels, str divergence, "
               "float temperature, float alpha, float beta, str head_rule, float mu, int top_k, "
               "str reduction, float scale, int ignore_index, bool want_grad, "
               "bool raise_on_invalid) -> (Tensor, Tensor)")

    @_distill_fwd.register_fake
    def _distill_fwd_fake(student, teacher, labels, divergence, temperature, alpha, beta,
                          head_rule, mu, top_k, reduction, scale, ignore_index, want_grad,
                          raise_on_invalid):
        """Shapes and dtypes only (the argument checks run too: they read
        metadata only)."""
        opts = dict(zip(_OPT_NAMES, (divergence, temperature, alpha, beta, head_rule, mu, top_k,
                                     reduction, scale, ignore_index)))
        dev, desc, _ = _distill_checks(student, teacher, labels, opts)
        lead = student.shape[:-1]
        out_dt = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss = student.new_empty(lead if desc.reduction == _lib.REDUCTION_NONE else (),
                                 dtype=out_dt)
        grad_shape = (student.numel() // student.shape[-1], student.shape[-1]) if want_grad \
            else (0,)
        return loss, student.new_empty(grad_shape, dtype=_T.results(dev, student)[1])

    def _distill_setup(ctx, inputs, output):
        student, reduction = inputs[0], inputs[10]
        ctx.per_row = reduction.strip().lower() == "none"
        ctx.meta = (student.shape, student.dtype)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    def _distill_bwd(ctx, grad_loss, _grad_grad):
        (grad,) = ctx.saved_tensors
        g = None
        if ctx.needs_input_grad[0]:
            g = _scaled_grad(grad, grad_loss, ctx.per_row, ctx.meta[1], ctx.meta[0])
        return (g,) + (None,) * 14

    torch.library.register_autograd("kdloss::distill_fwd", _distill_bwd,
                                    setup_context=_distill_setup)


def _distill_op(s, t, labels, opts, raise_on_invalid):
    """distill_loss through kdloss::distill_fwd.  Eagerly the checks run
    here first (Dynamo cannot trace their ctypes calls; while compiling the
    fake implementation runs them), then once more in the operator."""
    if not torch.compiler.is_compiling():
        _distill_checks(s, t, labels, opts)
    want_grad = torch.is_grad_enabled() and s.requires_grad
    o = opts
    loss, _ = _distill_fwd(s, t, labels, o["divergence"], float(o["temperature"]),
                           float(o["alpha"]), float(o["beta"]), o["head_rule"], float(o["mu"]),
                           int(o["top_k"]), o["reduction"], float(o["scale"]),
                           int(o["ignore_index"]), want_grad, bool(raise_on_invalid))
    return loss


def distill_loss(
    student_logits,
    teacher_logits,
    divergence="akl",
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    alpha=0.1,
    beta=0.5,
    head_rule="reference",
    mu=0.5,
    top_k=1,
    scale=1.0,
    raise_on_invalid=True,
    return_stats=False,
):
    """Distillation loss of the student's logits against the teacher's, with
    its gradient to the student computed in the same fused pass.

    student_logits, teacher_logits: tensors of the same shape [N, V] or
        [..., V] on the same device; float32, float16, bfloat16 (or float64 on
        CPU); they may differ in dtype.  The last dimension must be contiguous;
        rows may be strided (e.g. a slice of a padded vocabulary).
    divergence: "fkl" KL(p||q), "rkl" KL(q||p), "fkl_rkl", "akl" (adaptive),
        "jsd" (generalised, weight beta), "tvd", "skl" / "srkl" (skew alpha);
        p is the teacher's softmax(t/temperature), q the student's.
    labels: optional int64 tensor [N] or [...]; rows equal to ignore_index are
        ignored (loss 0, zero gradient, not counted in the mean).
    head_rule, mu, top_k: the AKL head ("reference", "mass", "topk").
    reduction: "mean" (over valid rows), "sum", or "none" (per-token loss of
        the leading shape).
    scale: multiplies loss and gradient (e.g. temperature ** 2).
    raise_on_invalid: raise kdloss.InvalidRowsError when a row has a NaN/+inf
        logit or only -inf logits (on CUDA this synchronises the stream); with
        False such rows get loss NaN (reduction none) and a zero gradient and
        are left out of the reduction.
    return_stats: also return a dict of per-token statistics (fkl, rkl,
        g_head, g_tail, w_head, w_tail, head_size) and valid_rows /
        invalid_rows (0-d int64 tensors).

    Returns the loss (float32; float64 for float64 students), or (loss, stats).
    CUDA: runs on torch.cuda.current_stream(); CPU: the float64 reference.
    """
    opts = dict(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction, scale=scale,
                ignore_index=ignore_index)
    if _distill_fwd is not None and not return_stats:
        return _distill_op(student_logits, teacher_logits, labels, opts, raise_on_invalid)
    dev, desc, lab = _distill_checks(student_logits, teacher_logits, labels, opts)
    none = desc.reduction == _lib.REDUCTION_NONE
    lead = student_logits.shape[:-1]
    side = {}

    def run(needs, s, t):
        loss, grad, stats, counters = _ops.dense(_T, dev, desc, s, t, lab, needs[0],
                                                 bool(return_stats))
        _raise_invalid(raise_on_invalid, counters, _ops.rows_of(_T, s))
        side.update(stats=stats, counters=counters)
        return _loss_out(loss, s.dtype, lead, none), (grad, None)

    loss = _FusedGradFunction.apply(run, none, student_logits, teacher_logits)
    if not return_stats:
        return loss
    stats = {k: v.reshape(lead) for k, v in side["stats"].items()}
    stats.update(_counts(side["counters"]))
    return loss, stats


class DistillLoss(torch.nn.Module):
    """nn.Module door to distill_loss (same options, fixed at construction).

        crit = DistillLoss("akl", temperature=2.0, scale=4.0)
        loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, divergence="akl", temperature=1.0, ignore_index=-100, reduction="mean",
                 alpha=0.1, beta=0.5, head_rule="reference", mu=0.5, top_k=1, scale=1.0,
                 raise_on_invalid=True):
        super().__init__()
        self.options = dict(divergence=divergence, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, alpha=alpha, beta=beta,
                            head_rule=head_rule, mu=mu, top_k=top_k, scale=scale)
        self.raise_on_invalid = raise_on_invalid
        _lib.new_desc(**self.options)  # names checked now

    def forward(self, student_logits, teacher_logits, labels=None):
        return distill_loss(student_logits, teacher_logits, labels=labels,
                            raise_on_invalid=self.raise_on_invalid, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# ------------------------------------------------------------- Sinkhorn
def sinkd_loss(student_logits, teacher_logits, group_size=0, temperature=2.0, epsilon=0.1,
               max_iter=20, tol=0.0, check_every=10, metric="l1", scale=1.0,
               raise_on_invalid=True, return_stats=False, return_plan=False):
    """SinKD loss: per group of group_size rows (0: one group of all rows;
    with [B, T, V] logits, group_size=T is one group per sequence), the
    Sinkhorn distance <P, C> between the rows of softmax(student/temperature)
    and softmax(teacher/temperature), C an L1 (or "sqeuclidean") cost over the
    vocabulary, uniform marginals 1/n, max_iter log-domain iterations (tol = 0:
    exactly max_iter, as SinKD), averaged over valid groups, times scale.
    SinKD's code normalises the plan to mass n: its number is n times this.

    The gradient to the student (d loss / d C = P with the plan held fixed,
    then through the cost and the softmax) is computed in the forward call;
    the teacher gets none.  Shapes, dtypes, devices, layout and errors as
    distill_loss.  Returns the loss (0-d), or (loss, stats) with return_stats:
    group_loss, iterations, marginal_error ([G]), invalid_groups, and plan
    [G, n, n] with return_plan.
    """
    dev = _ops.check_pair(_T, student_logits, teacher_logits, "student_logits", "teacher_logits")
    _no_f64_on_cuda(dev, student_logits, teacher_logits)
    desc = _lib.new_sinkd_desc(group_size=group_size, temperature=temperature, epsilon=epsilon,
                               max_iter=max_iter, tol=tol, check_every=check_every, metric=metric,
                               scale=scale)
    side = {}

    def run(needs, s, t):
        loss, grad, stats, info, G = _ops.sinkd(_T, dev, desc, s, t, needs[0], bool(return_plan))
        _raise_invalid(raise_on_invalid, info, G, unit="groups")
        stats["invalid_groups"] = info.reshape(())
        side["stats"] = stats
        return _loss_out(loss, s.dtype, (), False), (grad, None)

    loss = _FusedGradFunction.apply(run, False, student_logits, teacher_logits)
    if return_stats or return_plan:
        return loss, side["stats"]
    return loss


def sinkhorn(cost=None, x=None, y=None, epsilon=0.1, log_a=None, log_b=None, metric="sqeuclidean",
             value="transport", max_iter=1000, tol=1e-6, check_every=10, eps_scaling=False,
             eps_scaling_factor=0.8, eps_stage_iter=1, debias=False, cost_xx=None, cost_yy=None,
             self_yy=None, f_init=None, g_init=None, return_plan=False, return_potentials=False,
             return_grad_x=False):
    """Batched log-domain Sinkhorn: cost [n, m] or [B, n, m], or points x
    [(B,) n, d] and y [(B,) m, d] (metric "sqeuclidean" or "l1"); optional
    log-weights log_a [(B,) n], log_b [(B,) m] (default uniform).  On CUDA
    tensors the GPU solver (float32) on the current stream; on CPU the float64
    reference.  All tensors on one device.

    Returns a dict: value [B] (0-d for one problem) -- differentiable with
    respect to cost (d value / d C = P) and x (through the cost, the plan held
    fixed; y gets no gradient) -- iterations, marginal_error, and plan, f, g,
    grad_x, self_yy (with debias), invalid_problems (CUDA) when asked for.
    Options as kdloss.numpy.sinkhorn.
    """
    desc = _lib.new_sinkhorn_desc(epsilon=epsilon, max_iter=max_iter, tol=tol,
                                  check_every=check_every, eps_scaling=eps_scaling,
                                  eps_scaling_factor=eps_scaling_factor,
                                  eps_stage_iter=eps_stage_iter, value=value, debias=debias,
                                  metric=metric)
    tensors = {"cost": cost, "x": x, "y": y, "log_a": log_a, "log_b": log_b, "f_init": f_init,
               "g_init": g_init, "cost_xx": cost_xx, "cost_yy": cost_yy, "self_yy": self_yy}
    given = {k: v for k, v in tensors.items() if v is not None}
    for k, v in given.items():
        _ops.check_array(_T, v, k)
        if not v.is_floating_point():
            raise TypeError(f"kdloss: {k} must be a floating tensor, got {v.dtype}")
    devices = {v.device for v in given.values()}
    if len(devices) > 1:
        raise ValueError(f"kdloss: all tensors must be on one device, got {sorted(map(str, devices))}")
    single, (B, n, m, dim) = _ops.sinkhorn_problem(_T, cost, x, y, return_grad_x)
    dev = devices.pop()
    cuda = dev.type == "cuda"
    if cuda:
        _lib.require_ot_gpu("sinkhorn")
        if any(v.dtype != torch.float32 for v in given.values()):
            raise TypeError("kdloss: the GPU Sinkhorn takes float32 tensors only")
    shapes = {"y": (m, dim), "log_a": (n,), "log_b": (m,), "f_init": (n,), "g_init": (m,),
              "cost_xx": (n, n), "cost_yy": (m, m)}
    extras = {}
    for k, shp in shapes.items():
        v = tensors[k]
        if v is not None:
            v = v[None] if single else v
            if k != "y" and tuple(v.shape) != (B,) + shp:
                raise ValueError(f"kdloss: {k} has shape {tuple(tensors[k].shape)}, expected "
                                 f"{shp if single else (B,) + shp}")
        extras[k] = v
    extras["self_yy"] = None if self_yy is None else self_yy.reshape(B)
    dtype = (cost if cost is not None else x).dtype
    work = torch.float32 if cuda else torch.float64
    wanted = {"plan": bool(return_plan), "grad_x": bool(return_grad_x)}
    side = {}

    def run(needs, C, X):
        def prep(t):
            return None if t is None else t.detach().to(work).contiguous()

        inputs = {k: prep(v) for k, v in extras.items()}
        inputs.update(cost=prep(C), x=prep(X))
        want = {k for k, on in (("plan", wanted["plan"] or (C is not None and needs[0])),
                                ("potentials", return_potentials),
                                ("grad_x", wanted["grad_x"] or (X is not None and needs[1]))) if on}
        out = _ops.sinkhorn(_T, dev, desc, (B, n, m, dim), inputs, want, work)
        if "info" in out:
            out["invalid_problems"] = out.pop("info").reshape(())
        grads = (out.get("plan") if C is not None else None,
                 out.get("grad_x") if X is not None else None)
        value = out.pop("value")
        side["out"] = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()
                       if k not in wanted or wanted[k]}
        return value.to(dtype), grads

    c3 = None if cost is None else (cost[None] if single else cost)
    x3 = None if x is None else (x[None] if single else x)
    value_t = _FusedGradFunction.apply(run, True, c3, x3)
    out = side["out"]
    if single:
        out = {k: (v.reshape(()) if k == "invalid_problems" else v[0]) for k, v in out.items()}
        value_t = value_t[0]
    out["value"] = value_t
    return out


def sinkhorn_ragged(costs, epsilon=0.1, max_iter=1000, tol=1e-6, check_every=10,
                    value="transport", eps_scaling=False, eps_scaling_factor=0.8, eps_stage_iter=1,
                    return_plan=False, return_potentials=False):
    """A ragged batch of Sinkhorn problems in one call: costs is a list of
    [n_b, m_b] tensors (one dtype, one device), each problem with uniform
    weights; on CUDA the GPU solver (float32 tensors) on the current stream,
    on CPU the float64 reference.  Values only: no autograd (use sinkhorn
    per uniform batch for gradients).  Options as sinkhorn.

    Returns a dict: value, iterations, marginal_error ([B], the costs'
    dtype); plan (a list of [n_b, m_b]) with return_plan; f, g (lists) with
    return_potentials; invalid_problems (CUDA).
    """
    desc = _lib.new_sinkhorn_desc(epsilon=epsilon, max_iter=max_iter, tol=tol,
                                  check_every=check_every, eps_scaling=eps_scaling,
                                  eps_scaling_factor=eps_scaling_factor,
                                  eps_stage_iter=eps_stage_iter, value=value)
    want = {k for k, on in (("plan", return_plan), ("potentials", return_potentials)) if on}

    def work_for(dev):
        if dev.type != "cuda":
            return torch.float64
        _lib.require_ot_gpu("sinkhorn_ragged")
        if any(c.dtype != torch.float32 for c in costs):
            raise TypeError("kdloss: the GPU Sinkhorn takes float32 tensors only")
        return torch.float32

    with torch.no_grad():
        _, dtype, out = _ops.sinkhorn_ragged(_T, desc, costs, want, work_for)
    if "info" in out:
        out["invalid_problems"] = out.pop("info").reshape(())
    return {k: (v if k in ("iterations", "invalid_problems") else
                [p.to(dtype) for p in v] if isinstance(v, list) else v.to(dtype))
            for k, v in out.items()}


# ------------------------------------------------------ extensions (kdloss_ext.h)
def sparse_distill_loss(
    student_logits,
    teacher_indices,
    teacher_logprobs,
    mode="renormalised",
    divergence="fkl",
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    alpha=0.1,
    beta=0.5,
    head_rule="reference",
    mu=0.5,
    top_k=1,
    scale=1.0,
    raise_on_invalid=True,
    check_indices=False,
    return_stats=False,
):
    """Distillation loss against a sparse teacher: per row its top-k token
    indices and log-probabilities instead of full logits (kdl_sparse_loss on
    CUDA tensors, the float64 reference kdl_ref_sparse_loss on CPU tensors).

    student_logits: [N, V] or [..., V] (float32, float16, bfloat16; float64 on
        CPU), last dimension contiguous, rows may be strided.
    teacher_indices: int64 [..., k] (same leading shape), distinct per row, in
        [0, V), any order, k <= min(V, 1024).
    teacher_logprobs: [..., k] float, the teacher's log-probabilities of those
        tokens at the distillation temperature (temperature divides the
        student's logits only; divide log-probs taken at temperature 1 by it
        yourself, exact in the renormalised mode).
    mode: "renormalised" -- the top-k renormalised on the support, the student
        the full-vocabulary softmax, the dense divergence over all V tokens
        (fkl, jsd, tvd, skl, srkl; rkl, fkl_rkl and akl are infinite there and
        raise KdlossError NOT_SUPPORTED) -- or "tail" / "tail_bucket" -- the k
        support cells plus one bucket holding the rest of both distributions
        (every divergence; the AKL head among the support cells).
    check_indices: check the indices on the host first (kdl_sparse_check_indices;
        CUDA indices are copied to the host) and raise KdlossValueError
        (BAD_PARAM) for one out of range or repeated, instead of an invalid row.
    Other options, devices, dtypes, errors and the fused gradient as
    distill_loss.  The gradient reaches every one of the V student logits
    (through the softmax normaliser and, in tail mode, the bucket); the
    teacher gets none.

    Returns the loss, or (loss, stats) with return_stats: valid_rows,
    invalid_rows, bad_index_rows (0-d int64 tensors).
    """
    dev = _ops.sparse_inputs(_T, student_logits, teacher_indices, teacher_logprobs,
                             "student_logits")
    _no_f64_on_cuda(dev, student_logits, teacher_logprobs)
    desc = _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                      ignore_index)
    mode_code = _lib.parse_sparse_mode(mode)
    lab = _ops.labels(_T, labels, student_logits.shape, dev)
    if check_indices:
        _ops.check_indices(_T, teacher_indices, student_logits.shape[-1])
    none = desc.reduction == _lib.REDUCTION_NONE
    side = {}

    def run(needs, s, idx, lp):
        loss, grad, counters = _ops.sparse(_T, dev, desc, mode_code, s, idx, lp, lab, needs[0])
        if raise_on_invalid:
            n_invalid, _, n_bad = counters.tolist()  # host sync on CUDA
            _ops.raise_invalid(n_invalid, _ops.rows_of(_T, s), reason=_ops.sparse_reason(n_bad))
        side["counters"] = counters
        return _loss_out(loss, s.dtype, s.shape[:-1], none), (grad, None, None)

    loss = _FusedGradFunction.apply(run, none, student_logits, teacher_indices, teacher_logprobs)
    if not return_stats:
        return loss
    stats = _counts(side["counters"])
    stats["bad_index_rows"] = side["counters"][2].reshape(())
    return loss, stats


def fused_linear_distill_loss(
    hidden,
    weight,
    teacher_logits,
    divergence="fkl",
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    alpha=0.1,
    beta=0.5,
    head_rule="reference",
    mu=0.5,
    top_k=1,
    scale=1.0,
    chunk_rows=0,
    raise_on_invalid=True,
    return_stats=False,
    bias=None,
):
    """Distillation loss of the student logits hidden @ weight.T (+ bias; an
    output projection) against the teacher's logits, with gradients to
    hidden, weight and bias through autograd, never holding the [N, V]
    student logits: on CUDA kdl_fused_linear_loss goes chunk by chunk over
    the rows (cuBLAS with FP32 accumulation: strict FP32 for float32 inputs,
    cublasGemmEx for 16-bit ones), on CPU the float64 reference
    kdl_ref_fused_linear_loss.

    hidden: [N, d] or [..., d]; weight: [V, d] (its rows may be strided, e.g.
        tied embeddings); teacher_logits: [..., V] with hidden's leading shape;
        bias: optional [V], weight's dtype.  CUDA: hidden and weight both
        float32, both bfloat16 or both float16, the teacher float32, float16
        or bfloat16; every divergence (AKL included).  CPU: any of float32,
        float64, float16, bfloat16.
    chunk_rows: rows per chunk on CUDA (0: max(1, N/8) for float32 inputs,
        max(1, N/24) for 16-bit ones, at most 4096).
    Other options as distill_loss; the teacher gets no gradient.

    Gradients: with reduction "mean" or "sum" dH, dW and db are computed in
    the forward call and scaled by the upstream gradient in backward.  With
    reduction "none" the upstream gradient weights each row, which must be
    known before dW is formed: forward computes the losses only, and
    backward calls the library again with the upstream gradient as
    grad_output (a second pass over the logits, chunk by chunk as the
    first).  The gradients are formed in float32 on CUDA (float64 on CPU)
    and cast to the inputs' dtypes.

    Returns the loss (float32; float64 on CPU for float64 hidden), or (loss,
    stats) with return_stats: valid_rows, invalid_rows (0-d int64 tensors).
    """
    dev = _ops.fused_inputs(_T, hidden, weight, teacher_logits, "teacher_logits", bias)
    cuda = dev.type == "cuda"
    if cuda:
        same16 = hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype
        if not same16 and (hidden.dtype != torch.float32 or weight.dtype != torch.float32):
            raise TypeError("kdloss: the GPU fused linear + loss takes float32 hidden and weight, "
                            f"or both bfloat16 or both float16; got {hidden.dtype} and "
                            f"{weight.dtype}")
        _no_f64_on_cuda(dev, teacher_logits)
    chunk_rows = _lib.as_int("chunk_rows", chunk_rows)
    desc = _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                      ignore_index)
    lab = _ops.labels(_T, labels, teacher_logits.shape, dev)
    none = desc.reduction == _lib.REDUCTION_NONE
    work = torch.float32 if cuda else torch.float64  # of the gradients (and grad_output)
    N = _ops.rows_of(_T, teacher_logits)
    side = {}

    def call(needs, h, w, t, b, grad_output=None):
        return _ops.fused_linear(_T, dev, desc, h, w, t, lab, chunk_rows, needs[0], needs[1],
                                 work, bias=b, want_b=b is not None and needs[3],
                                 grad_output=grad_output)

    def backward_none(grad_out, needs, h, w, t, b):
        go = grad_out.detach().reshape(N).to(work).contiguous()
        _, gh, gw, gb, _, _ = call(needs, h, w, t, b, go)
        return (None if gh is None else gh.to(h.dtype).view(h.shape),
                None if gw is None else gw.to(w.dtype), None,
                None if gb is None else gb.to(b.dtype))

    def run(needs, h, w, t, b):
        loss, gh, gw, gb, counters, _ = call((False,) * 4 if none else needs, h, w, t, b)
        _raise_invalid(raise_on_invalid, counters, N, reason=_ops.FUSED_REASON)
        side["counters"] = counters
        grads = _Later(backward_none, h, w, t, b) if none else (gh, gw, None, gb)
        return _loss_out(loss, h.dtype, h.shape[:-1], none), grads

    loss = _FusedGradFunction.apply(run, none, hidden, weight, teacher_logits, bias)
    if not return_stats:
        return loss
    return loss, _counts(side["counters"])


def vocab_parallel_distill_loss(
    student_logits,
    teacher_logits,
    group=None,
    vocab_offset=None,
    vocab=None,
    divergence="fkl",
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    alpha=0.1,
    beta=0.5,
    head_rule="reference",
    mu=0.5,
    top_k=1,
    scale=1.0,
    raise_on_invalid=True,
    return_stats=False,
):
    """Vocabulary-parallel distillation loss: this rank holds columns
    [vocab_offset, vocab_offset + V_local) of the student and teacher logits
    of every row, the ranks of `group` (a torch.distributed process group;
    None: the default group) hold contiguous slices in rank order that cover
    the vocabulary.  Runs the shard step protocol of kdloss_ext.h
    (kdl_shard_step on CUDA tensors, kdl_ref_shard_step on CPU tensors),
    all-reducing the float64 exchange buffer over the group with MAX or SUM as
    each step says (on CUDA, dist.all_reduce in stream order after the step's
    kernels on the current stream).  The loss is the unsharded loss (to
    rounding; the same AKL head, ties by global index) and is the same on
    every rank; autograd gives d loss / d this rank's slice.

    student_logits, teacher_logits: [N, V_local] or [..., V_local], same
        leading shape on every rank (dtypes and layout as distill_loss).
    vocab_offset, vocab: this slice's first global column and the whole
        vocabulary size; both None (default) exchanges the slice widths with
        one all_reduce over the group (a host synchronisation on CUDA).
    labels: as distill_loss, the same on every rank.
    Other options as distill_loss.  Every rank must call this with the same
    options (the collective calls follow from them).

    Returns the loss, or (loss, stats) with return_stats: valid_rows,
    invalid_rows (0-d int64 tensors) and, for AKL, head_size (per row, the
    head of the whole vocabulary).
    """
    import torch.distributed as dist

    dev = _ops.check_pair(_T, student_logits, teacher_logits, "student_logits", "teacher_logits")
    _no_f64_on_cuda(dev, student_logits, teacher_logits)
    desc = _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                      ignore_index)
    _lib.require_ext("vocab_parallel_distill_loss")
    lab = _ops.labels(_T, labels, student_logits.shape, dev)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kdloss: vocab_parallel_distill_loss needs torch.distributed "
                           "initialised (dist.init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("kdloss: this process is not a member of the given process group")
    W = student_logits.shape[-1]
    if (vocab_offset is None) != (vocab is None):
        raise ValueError("kdloss: give both vocab_offset and vocab, or neither")
    if vocab_offset is None:
        widths = torch.zeros(world, dtype=torch.int64, device=dev)
        widths[rank] = W
        dist.all_reduce(widths, group=group)
        widths = widths.tolist()
        vocab_offset, vocab = sum(widths[:rank]), sum(widths)
    geometry = (_lib.as_int("vocab_offset", vocab_offset), _lib.as_int("vocab", vocab), rank, world)
    none = desc.reduction == _lib.REDUCTION_NONE
    cuda = dev.type == "cuda"
    side = {}

    def run(needs, s, t):
        if cuda:
            _lib.require_gpu("shard", "vocab_parallel_distill_loss")
        sh = _ops.Shard(_T, dev, desc, s, t, lab, geometry, needs[0], bool(return_stats))
        with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
            h = _T.handle(dev) if cuda else None
            for step in range(sh.num_steps):
                op, count = sh.step(step, h)
                if op is None:
                    break
                if count:  # the same on every shard: every shard skips it or not
                    dist.all_reduce(sh.exchange[:count], op=getattr(dist.ReduceOp, op.upper()),
                                    group=group)
        # the count is the same on every shard; host sync on CUDA
        _raise_invalid(raise_on_invalid, sh.counters, sh.rows)
        side["counters"], side["head_size"] = sh.counters, sh.head_size
        return _loss_out(sh.loss, s.dtype, s.shape[:-1], none), (sh.grad, None)

    loss = _FusedGradFunction.apply(run, none, student_logits, teacher_logits)
    if not return_stats:
        return loss
    stats = _counts(side["counters"])
    if side["head_size"] is not None:
        stats["head_size"] = side["head_size"].reshape(student_logits.shape[:-1])
    return loss, stats
