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
[N, V] logits; the teacher as logits, as a frozen linear layer or as its
top-k) and vocab_parallel_distill_loss (a vocabulary slice per rank
of a torch.distributed process group).  The argument checks and the library
calls are kdloss._ops's, shared with kdloss.numpy.
"""

from __future__ import annotations

import contextlib
import functools

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



# ------------------------------------------------- operators and autograd
# Every op is a function impl(*args) -> tuple of tensors over the library
# call: output 0 is the loss (or value), then the gradients the one fused
# pass formed and the other results (empty tensors where not asked for).
# With torch.library.custom_op (PyTorch >= 2.4) each is the custom operator
# kdloss::<name>, so torch.compile keeps it in the graph as one opaque node
# (no graph break): its fake implementation gives the output shapes and
# dtypes (and runs the argument checks, which read metadata only), its
# autograd formula is plain torch ops.  Without custom_op (or with _USE_OPS
# False) the same impl, setup and backward run in _EagerOp, an
# autograd.Function.
_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_autograd")
_USE_OPS = True  # tests set it False to run the eager fallback

_OPT_NAMES = _ops.LOSS_OPTIONS
# the loss options in an operator schema, in _OPT_NAMES order
_OPT_SCHEMA = ("str divergence, float temperature, float alpha, float beta, str head_rule, "
               "float mu, int top_k, str reduction, float scale, int ignore_index")
_NOPT = len(_OPT_NAMES)


def _opt_args(opts):
    """The loss options as the operators take them (positional, typed)."""
    kinds = (str, float, float, float, str, float, int, str, float, int)
    return tuple(k(opts[n]) for k, n in zip(kinds, _OPT_NAMES))


def _opts(vals):
    return dict(zip(_OPT_NAMES, vals))


def _compiling():
    c = getattr(torch, "compiler", None)
    return c is not None and hasattr(c, "is_compiling") and c.is_compiling()


def _needs(x):
    """Whether the op should form a gradient for input x."""
    return isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()


def _empty(like, dtype=None):
    """The placeholder of an output not asked for."""
    return like.new_empty((0,), dtype=like.dtype if dtype is None else dtype)


class _Op:
    """An operator of this binding.  impl(*args) returns a tuple of tensors,
    output 0 the loss; fake(*args) the same shapes and dtypes.  grads maps
    an input position to the output holding its gradient (to be multiplied
    by the upstream gradient of output 0, per leading row when
    per_row(args)); later(grad_out, needs, args) -> {position: gradient}
    replaces that when per_row (the gradient needs the upstream gradient
    first).  Outputs other than 0 are not differentiable."""

    def __init__(self, name, schema, impl, fake, grads=None, per_row=None, later=None,
                 register=True):
        self.name, self.impl, self.fake = name, impl, fake
        self.grads, self.later = dict(grads or {}), later
        self.per_row = per_row or (lambda args: False)
        self.op = None
        if register and _HAS_CUSTOM_OP:
            self.op = torch.library.custom_op("kdloss::" + name, impl, mutates_args=(),
                                              schema=schema)
            self.op.register_fake(fake)
            if self.grads or later:
                torch.library.register_autograd("kdloss::" + name, self.backward,
                                                setup_context=self.setup)

    def __call__(self, *args):
        if self.op is not None and _USE_OPS:
            return self.op(*args)
        if self.grads or self.later:
            return _EagerOp.apply(self, *args)
        return self.impl(*args)

    def setup(self, ctx, inputs, output):
        ctx.n_in, ctx.per_row = len(inputs), bool(self.per_row(inputs))
        ctx.mark_non_differentiable(*output[1:])
        if self.later is not None and ctx.per_row:
            ctx.args = [None if isinstance(x, torch.Tensor) else x for x in inputs]
            ctx.tensor_pos = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
            ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_pos))
            return
        ctx.meta = {i: (inputs[i].shape, inputs[i].dtype) for i in self.grads
                    if isinstance(inputs[i], torch.Tensor)}
        ctx.save_for_backward(*(output[o] for o in self.grads.values()))

    def backward(self, ctx, grad_out, *_):
        needs = ctx.needs_input_grad[getattr(ctx, "first", 0):]
        grads = [None] * ctx.n_in
        if self.later is not None and ctx.per_row:
            args = list(ctx.args)
            for i, x in zip(ctx.tensor_pos, ctx.saved_tensors):
                args[i] = x
            for i, g in self.later(grad_out, needs, args).items():
                grads[i] = g
        else:
            for (i, _), g in zip(self.grads.items(), ctx.saved_tensors):
                if needs[i] and i in ctx.meta:
                    grads[i] = _scaled_grad(g, grad_out, ctx.per_row, ctx.meta[i][1],
                                            ctx.meta[i][0])
        return tuple(grads)


class _EagerOp(torch.autograd.Function):
    """An _Op without the custom operator: impl, setup and backward as the
    operator's autograd would run them."""

    @staticmethod
    def forward(ctx, op, *args):
        out = op.impl(*args)
        ctx.first, ctx.op = 1, op
        op.setup(ctx, args, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        return (None,) + ctx.op.backward(ctx, *grad_outs)


def _scaled_grad(grad, grad_out, per_row, dtype, shape):
    """grad [N, ...] times the upstream gradient (per row for reduction
    none), cast to dtype and viewed as shape."""
    # The product is formed in torch's opmath (float32 for a 16-bit grad) and
    # rounded once to grad's dtype: casting grad_out to a 16-bit dtype first
    # would round the upstream factor itself (2^-9 relative in bf16).  A 0-d
    # factor does not promote; a per-row one writes into a grad-dtype output,
    # so no float32 temporary of grad's size is made.
    go = grad_out.to(grad.device)
    if per_row:
        go = go.reshape((-1,) + (1,) * (grad.dim() - 1))
        g = torch.mul(grad, go, out=torch.empty_like(grad))
    else:
        g = grad * go.reshape(())
    return g.to(dtype).view(shape)


# ---------------------------------------------------------------- helpers
def _no_f64_on_cuda(dev, *tensors):
    if dev.type == "cuda" and any(t.dtype == torch.float64 for t in tensors):
        raise TypeError(
            "kdloss: float64 CUDA tensors are not supported by the GPU kernels; use float32, "
            "float16 or bfloat16 on the GPU, or CPU tensors for the float64 reference"
        )


def _loss_dtype(student_dtype):
    return torch.float64 if student_dtype == torch.float64 else torch.float32


def _loss_out(loss, student_dtype, lead, none):
    """The loss as returned: float32, float64 for a float64 student; the
    leading shape (reduction none) or 0-d."""
    loss = loss.to(_loss_dtype(student_dtype))
    return loss.reshape(lead) if none else loss.reshape(())


def _fake_loss(x, lead, none):
    return x.new_empty(tuple(lead) if none else (), dtype=_loss_dtype(x.dtype))


def _capturing(dev):
    """Whether dev's current stream is capturing a CUDA graph."""
    with torch.cuda.device(dev):
        return torch.cuda.is_current_stream_capturing()


def _no_host_read(dev, **flags):
    """The options that read a device result back to the host (a stream
    synchronisation), refused while the current stream captures a CUDA graph
    (torch.cuda.graph, torch.compile's cudagraphs): an error that says which,
    raised before anything is enqueued."""
    on = [k for k, v in flags.items() if v]
    if on and dev.type == "cuda" and _capturing(dev):
        raise RuntimeError(f"kdloss: {' and '.join(f'{k}=True' for k in on)} reads device "
                           "results back to the host, which is not allowed while the stream "
                           "captures a CUDA graph; pass False and check the returned counts "
                           "(return_stats) after the replay")


def _raise_invalid(raise_on_invalid, counters, rows, **kw):
    if raise_on_invalid:
        _ops.raise_invalid(int(counters[0].item()), rows, **kw)  # host sync on CUDA


def _counts(counters):
    return {"valid_rows": counters[1].reshape(()), "invalid_rows": counters[0].reshape(())}


def _is_none(reduction):
    return isinstance(reduction, str) and reduction.strip().lower() == "none"


# ------------------------------------------------------------ distill_loss
def _distill_checks(s, t, labels, opts):
    """distill_loss's (and the vocabulary-parallel loss's) argument checks:
    (device, LossDesc, labels as [N])."""
    dev = _ops.check_pair(_T, s, t, "student_logits", "teacher_logits")
    _no_f64_on_cuda(dev, s, t)
    desc = _lib.new_desc(**opts)
    lab = _ops.labels(_T, labels, s.shape, dev)
    return dev, desc, lab


def _distill_impl(student, teacher, labels, *rest):
    opts, (want_grad, want_stats, raise_on_invalid) = _opts(rest[:_NOPT]), rest[_NOPT:]
    dev, desc, lab = _distill_checks(student, teacher, labels, opts)
    _no_host_read(dev, raise_on_invalid=raise_on_invalid)
    none = desc.reduction == _lib.REDUCTION_NONE
    loss, grad, stats, counters = _ops.dense(_T, dev, desc, student, teacher, lab, want_grad,
                                             want_stats)
    _raise_invalid(raise_on_invalid, counters, _ops.rows_of(_T, student))
    loss = _loss_out(loss, student.dtype, student.shape[:-1], none)
    out_dt, grad_dt = _T.results(dev, student)
    if grad is None:
        grad = _empty(student, grad_dt)
    if stats is None:  # the fake's dtypes: the library's, not the returned loss's
        fstats, head = _empty(student, out_dt), _empty(counters)
    else:
        fstats = torch.stack([stats[k] for k in _lib.FLOAT_STATS])
        head = stats["head_size"]
    return loss, grad, counters, fstats, head


def _distill_fake(student, teacher, labels, *rest):
    opts, (want_grad, want_stats, _) = _opts(rest[:_NOPT]), rest[_NOPT:]
    dev, desc, _ = _distill_checks(student, teacher, labels, opts)
    V = student.shape[-1]
    N = student.numel() // V
    out_dt, grad_dt = _T.results(dev, student)
    return (_fake_loss(student, student.shape[:-1], desc.reduction == _lib.REDUCTION_NONE),
            student.new_empty((N, V) if want_grad else (0,), dtype=grad_dt),
            student.new_empty((2,), dtype=torch.int64),
            student.new_empty((len(_lib.FLOAT_STATS), N) if want_stats else (0,), dtype=out_dt),
            student.new_empty((N,) if want_stats else (0,), dtype=torch.int64))


_distill_fwd = _Op(
    "distill_fwd",
    "(Tensor student, Tensor teacher, Tensor? labels, " + _OPT_SCHEMA + ", bool want_grad, "
    "bool want_stats, bool raise_on_invalid) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _distill_impl, _distill_fake, grads={0: 1}, per_row=lambda a: _is_none(a[3 + 7]))


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
    opts = _opts((divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                  ignore_index))  # not locals(): torch.compile traces these functions
    if not _compiling():  # eager: the checks first (while compiling the fake runs them)
        _distill_checks(student_logits, teacher_logits, labels, opts)
    loss, _, counters, fstats, head = _distill_fwd(
        student_logits, teacher_logits, labels, *_opt_args(opts), _needs(student_logits),
        bool(return_stats), bool(raise_on_invalid))
    if not return_stats:
        return loss
    lead = student_logits.shape[:-1]
    stats = {k: fstats[i].reshape(lead) for i, k in enumerate(_lib.FLOAT_STATS)}
    stats["head_size"] = head.reshape(lead)
    stats.update(_counts(counters))
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


def _typed(spec, values):
    """Options as an operator takes them: spec is ((name, type), ...)."""
    return tuple(kind(values[name]) for name, kind in spec)


# ------------------------------------------------------------- Sinkhorn
_SINKD_OPTS = (("group_size", int), ("temperature", float), ("epsilon", float),
               ("max_iter", int), ("tol", float), ("check_every", int), ("metric", str),
               ("scale", float))


def _sinkd_checks(s, t, rest):
    dev = _ops.check_pair(_T, s, t, "student_logits", "teacher_logits")
    _no_f64_on_cuda(dev, s, t)
    opts = dict(zip((n for n, _ in _SINKD_OPTS), rest))
    return dev, _lib.new_sinkd_desc(**opts)


def _sinkd_groups(desc, N):
    n = desc.group_size if desc.group_size > 0 else N
    return n, (N // n if n > 0 and N % n == 0 else 0)  # the library refuses a ragged split


def _sinkd_impl(s, t, *rest):
    want_grad, want_plan, raise_on_invalid = rest[len(_SINKD_OPTS):]
    dev, desc = _sinkd_checks(s, t, rest)
    _no_host_read(dev, raise_on_invalid=raise_on_invalid)
    loss, grad, stats, info, G = _ops.sinkd(_T, dev, desc, s, t, want_grad, want_plan)
    _raise_invalid(raise_on_invalid, info, G, unit="groups")
    out_dt, grad_dt = _T.results(dev, s)
    return (_loss_out(loss, s.dtype, (), False), _empty(s, grad_dt) if grad is None else grad,
            stats["group_loss"], stats["iterations"], stats["marginal_error"],
            stats["plan"] if want_plan else _empty(s, out_dt), info.reshape(()))


def _sinkd_fake(s, t, *rest):
    want_grad, want_plan, _ = rest[len(_SINKD_OPTS):]
    dev, desc = _sinkd_checks(s, t, rest)
    out_dt, grad_dt = _T.results(dev, s)
    V = s.shape[-1]
    N = s.numel() // V
    n, G = _sinkd_groups(desc, N)
    e = s.new_empty
    return (_fake_loss(s, (), False), e((N, V) if want_grad else (0,), dtype=grad_dt),
            e((G,), dtype=out_dt), e((G,), dtype=torch.int64), e((G,), dtype=out_dt),
            e((G, n, n) if want_plan else (0,), dtype=out_dt), e((), dtype=torch.int64))


_sinkd_fwd = _Op(
    "sinkd_fwd",
    "(Tensor student, Tensor teacher, int group_size, float temperature, float epsilon, "
    "int max_iter, float tol, int check_every, str metric, float scale, bool want_grad, "
    "bool want_plan, bool raise_on_invalid) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)",
    _sinkd_impl, _sinkd_fake, grads={0: 1})


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
    [G, n, n] with return_plan.  The custom operator kdloss::sinkd_fwd
    (torch.compile keeps it in the graph).
    """
    opts = (group_size, temperature, epsilon, max_iter, tol, check_every, metric, scale)
    if not _compiling():
        _sinkd_checks(student_logits, teacher_logits, opts)
    out = _sinkd_fwd(student_logits, teacher_logits,
                     *_typed(_SINKD_OPTS, dict(zip((n for n, _ in _SINKD_OPTS), opts))),
                     _needs(student_logits), bool(return_plan), bool(raise_on_invalid))
    if not (return_stats or return_plan):
        return out[0]
    stats = dict(zip(("group_loss", "iterations", "marginal_error"), out[2:5]))
    if return_plan:
        stats["plan"] = out[5]
    stats["invalid_groups"] = out[6]
    return out[0], stats


_SINKHORN_OPTS = (("epsilon", float), ("metric", str), ("value", str), ("max_iter", int),
                  ("tol", float), ("check_every", int), ("eps_scaling", bool),
                  ("eps_scaling_factor", float), ("eps_stage_iter", int), ("debias", bool))
_SINKHORN_TENSORS = ("cost", "x", "y", "log_a", "log_b", "f_init", "g_init", "cost_xx",
                     "cost_yy", "self_yy")
# the outputs of kdloss::sinkhorn_fwd after value, in order
_SINKHORN_OUTS = ("plan", "grad_x", "f", "g", "iterations", "marginal_error", "self_yy",
                  "invalid_problems")


def _sinkhorn_checks(tensors, opts, want_grad_x):
    """sinkhorn's argument checks.  Returns (desc, device, single, (B, n, m,
    dim), the optional inputs batched, the work dtype)."""
    desc = _lib.new_sinkhorn_desc(**opts)
    given = {k: v for k, v in tensors.items() if v is not None}
    for k, v in given.items():
        _ops.check_array(_T, v, k)
        if not v.is_floating_point():
            raise TypeError(f"kdloss: {k} must be a floating tensor, got {v.dtype}")
    devices = {v.device for v in given.values()}
    if len(devices) > 1:
        raise ValueError(f"kdloss: all tensors must be on one device, got {sorted(map(str, devices))}")
    cost, x = tensors["cost"], tensors["x"]
    single, (B, n, m, dim) = _ops.sinkhorn_problem(_T, cost, x, tensors["y"], want_grad_x)
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
    syy = tensors["self_yy"]
    extras["self_yy"] = None if syy is None else syy.reshape(B)
    return desc, dev, single, (B, n, m, dim), extras, torch.float32 if cuda else torch.float64


def _sinkhorn_split(args):
    tensors = dict(zip(_SINKHORN_TENSORS, args))
    rest = args[len(_SINKHORN_TENSORS):]
    opts = dict(zip((n for n, _ in _SINKHORN_OPTS), rest))
    return tensors, opts, rest[len(_SINKHORN_OPTS):]


def _sinkhorn_impl(*args):
    tensors, opts, (want_plan, want_potentials, want_grad_x) = _sinkhorn_split(args)
    desc, dev, single, sizes, extras, work = _sinkhorn_checks(tensors, opts, want_grad_x)

    def prep(t):
        return None if t is None else t.detach().to(work).contiguous()

    inputs = {k: prep(v) for k, v in extras.items()}
    for k in ("cost", "x"):
        v = tensors[k]
        inputs[k] = prep(None if v is None else v[None] if single else v)
    want = {k for k, on in (("plan", want_plan), ("potentials", want_potentials),
                            ("grad_x", want_grad_x)) if on}
    out = _ops.sinkhorn(_T, dev, desc, sizes, inputs, want, work)
    like = inputs["cost"] if inputs["cost"] is not None else inputs["x"]
    info = out.pop("info", None)
    out["invalid_problems"] = (like.new_zeros((), dtype=torch.int64) if info is None
                               else info.reshape(()))
    return (out.pop("value"),) + tuple(out[k] if k in out else _empty(like)
                                       for k in _SINKHORN_OUTS)


def _sinkhorn_fake(*args):
    tensors, opts, (want_plan, want_potentials, want_grad_x) = _sinkhorn_split(args)
    desc, dev, single, (B, n, m, dim), _, work = _sinkhorn_checks(tensors, opts, want_grad_x)
    like = tensors["cost"] if tensors["cost"] is not None else tensors["x"]
    shapes = {"plan": (B, n, m) if want_plan else (0,),
              "grad_x": (B, n, dim) if want_grad_x else (0,),
              "f": (B, n) if want_potentials else (0,), "g": (B, m) if want_potentials else (0,),
              "iterations": (B,), "marginal_error": (B,),
              "self_yy": (B,) if desc.debias else (0,), "invalid_problems": ()}
    return (like.new_empty((B,), dtype=work),) + tuple(
        like.new_empty(shapes[k], dtype=torch.int64 if k in ("iterations", "invalid_problems")
                       else work) for k in _SINKHORN_OUTS)


_sinkhorn_fwd = _Op(
    "sinkhorn_fwd",
    "(" + ", ".join(f"Tensor? {k}" for k in _SINKHORN_TENSORS) + ", float epsilon, str metric, "
    "str value, int max_iter, float tol, int check_every, bool eps_scaling, "
    "float eps_scaling_factor, int eps_stage_iter, bool debias, bool want_plan, "
    "bool want_potentials, bool want_grad_x) -> (" + ", ".join(["Tensor"] * 9) + ")",
    _sinkhorn_impl, _sinkhorn_fake, grads={0: 1, 1: 2}, per_row=lambda a: True)


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
    Options as kdloss.numpy.sinkhorn.  The custom operator
    kdloss::sinkhorn_fwd (torch.compile keeps it in the graph).
    """
    tensors = {"cost": cost, "x": x, "y": y, "log_a": log_a, "log_b": log_b, "f_init": f_init,
               "g_init": g_init, "cost_xx": cost_xx, "cost_yy": cost_yy, "self_yy": self_yy}
    opts = dict(epsilon=epsilon, metric=metric, value=value, max_iter=max_iter, tol=tol,
                check_every=check_every, eps_scaling=eps_scaling,
                eps_scaling_factor=eps_scaling_factor, eps_stage_iter=eps_stage_iter,
                debias=debias)
    if not _compiling():
        _sinkhorn_checks(tensors, opts, return_grad_x)
    want_plan = bool(return_plan) or (cost is not None and _needs(cost))
    want_grad_x = bool(return_grad_x) or (x is not None and _needs(x))
    outs = _sinkhorn_fwd(*(tensors[k] for k in _SINKHORN_TENSORS), *_typed(_SINKHORN_OPTS, opts),
                         want_plan, bool(return_potentials), want_grad_x)
    dtype = (cost if cost is not None else x).dtype
    single = (cost if cost is not None else x).dim() == 2
    wanted = {"plan": return_plan, "grad_x": return_grad_x, "f": return_potentials,
              "g": return_potentials, "self_yy": debias,
              "invalid_problems": (cost if cost is not None else x).device.type == "cuda"}
    out = {}
    for k, v in zip(_SINKHORN_OUTS, outs[1:]):
        if wanted.get(k, True):
            v = v.to(dtype) if v.is_floating_point() else v
            out[k] = v if k == "invalid_problems" or not single else v[0]
    out["value"] = outs[0].to(dtype)[0] if single else outs[0].to(dtype)
    return out


_RAGGED_OPTS = (("epsilon", float), ("max_iter", int), ("tol", float), ("check_every", int),
                ("value", str), ("eps_scaling", bool), ("eps_scaling_factor", float),
                ("eps_stage_iter", int))


def _ragged_work(costs):
    def work_for(dev):
        if dev.type != "cuda":
            return torch.float64
        _lib.require_ot_gpu("sinkhorn_ragged")
        if any(c.dtype != torch.float32 for c in costs):
            raise TypeError("kdloss: the GPU Sinkhorn takes float32 tensors only")
        return torch.float32
    return work_for


def _ragged_impl(costs, *rest):
    opts = dict(zip((n for n, _ in _RAGGED_OPTS), rest))
    want_plan, want_potentials = rest[len(_RAGGED_OPTS):]
    desc = _lib.new_sinkhorn_desc(**opts)
    want = {k for k, on in (("plan", want_plan), ("potentials", want_potentials)) if on}
    _, _, out = _ops.sinkhorn_ragged(_T, desc, costs, want, _ragged_work(costs), split=False)
    info = out.pop("info", None)
    out["invalid_problems"] = (costs[0].new_zeros((), dtype=torch.int64) if info is None
                               else info.reshape(()))
    return tuple(out[k] if k in out else _empty(costs[0], torch.float64) for k in _RAGGED_OUTS)


_RAGGED_OUTS = ("value", "iterations", "marginal_error", "plan", "f", "g", "invalid_problems")


def _ragged_fake(costs, *rest):
    opts = dict(zip((n for n, _ in _RAGGED_OPTS), rest))
    want_plan, want_potentials = rest[len(_RAGGED_OPTS):]
    _lib.new_sinkhorn_desc(**opts)
    _ops.sinkhorn_ragged_checks(_T, costs)
    work = _ragged_work(costs)(costs[0].device)
    B = len(costs)
    sn = sum(c.shape[0] for c in costs)
    sm = sum(c.shape[1] for c in costs)
    cells = sum(c.shape[0] * c.shape[1] for c in costs)
    e = costs[0].new_empty
    return (e((B,), dtype=work), e((B,), dtype=torch.int64), e((B,), dtype=work),
            e((cells,) if want_plan else (0,), dtype=work if want_plan else torch.float64),
            e((sn,) if want_potentials else (0,), dtype=work if want_potentials else torch.float64),
            e((sm,) if want_potentials else (0,), dtype=work if want_potentials else torch.float64),
            e((), dtype=torch.int64))


_sinkhorn_ragged = _Op(
    "sinkhorn_ragged",
    "(Tensor[] costs, float epsilon, int max_iter, float tol, int check_every, str value, "
    "bool eps_scaling, float eps_scaling_factor, int eps_stage_iter, bool want_plan, "
    "bool want_potentials) -> (" + ", ".join(["Tensor"] * 7) + ")",
    _ragged_impl, _ragged_fake)


def sinkhorn_ragged(costs, epsilon=0.1, max_iter=1000, tol=1e-6, check_every=10,
                    value="transport", eps_scaling=False, eps_scaling_factor=0.8, eps_stage_iter=1,
                    return_plan=False, return_potentials=False):
    """A ragged batch of Sinkhorn problems in one call: costs is a list of
    [n_b, m_b] tensors (one dtype, one device), each problem with uniform
    weights; on CUDA the GPU solver (float32 tensors) on the current stream,
    on CPU the float64 reference.  Values only: no autograd (use sinkhorn
    per uniform batch for gradients).  Options as sinkhorn.  The custom
    operator kdloss::sinkhorn_ragged (torch.compile keeps it in the graph).

    Returns a dict: value, iterations, marginal_error ([B], the costs'
    dtype); plan (a list of [n_b, m_b]) with return_plan; f, g (lists) with
    return_potentials; invalid_problems (CUDA).
    """
    opts = dict(epsilon=epsilon, max_iter=max_iter, tol=tol, check_every=check_every,
                value=value, eps_scaling=eps_scaling, eps_scaling_factor=eps_scaling_factor,
                eps_stage_iter=eps_stage_iter)
    if not _compiling():
        _lib.new_sinkhorn_desc(**opts)
        _ops.sinkhorn_ragged_checks(_T, costs)
        _ragged_work(costs)(costs[0].device)
    outs = _sinkhorn_ragged([c.detach() for c in costs], *_typed(_RAGGED_OPTS, opts),
                            bool(return_plan), bool(return_potentials))
    out = dict(zip(_RAGGED_OUTS, outs))
    dtype = costs[0].dtype
    sizes = {"plan": [tuple(c.shape) for c in costs], "f": [c.shape[:1] for c in costs],
             "g": [c.shape[1:] for c in costs]}
    wanted = {"plan": return_plan, "f": return_potentials, "g": return_potentials,
              "invalid_problems": costs[0].device.type == "cuda"}
    result = {}
    for k, v in out.items():
        if not wanted.get(k, True):
            continue
        if k in ("iterations", "invalid_problems"):
            result[k] = v
        elif k in sizes:
            result[k] = [p.to(dtype) for p in _ops.split_packed(v, sizes[k])]
        else:
            result[k] = v.to(dtype)
    return result


# ------------------------------------------------------ extensions (kdloss_ext.h)
def _sparse_checks(s, idx, lp, labels, mode, opts):
    dev = _ops.sparse_inputs(_T, s, idx, lp, "student_logits")
    _no_f64_on_cuda(dev, s, lp)
    desc = _lib.new_desc(**opts)
    mode_code = _lib.parse_sparse_mode(mode)
    return dev, desc, mode_code, _ops.labels(_T, labels, s.shape, dev)


def _sparse_impl(s, idx, lp, labels, mode, *rest):
    opts, (want_grad, raise_on_invalid, check_indices) = _opts(rest[:_NOPT]), rest[_NOPT:]
    dev, desc, mode_code, lab = _sparse_checks(s, idx, lp, labels, mode, opts)
    _no_host_read(dev, raise_on_invalid=raise_on_invalid, check_indices=check_indices)
    if check_indices:
        _ops.check_indices(_T, idx, s.shape[-1])
    loss, grad, counters = _ops.sparse(_T, dev, desc, mode_code, s, idx, lp, lab, want_grad)
    if raise_on_invalid:
        n_invalid, _, n_bad = counters.tolist()  # host sync on CUDA
        _ops.raise_invalid(n_invalid, _ops.rows_of(_T, s), reason=_ops.sparse_reason(n_bad))
    none = desc.reduction == _lib.REDUCTION_NONE
    return (_loss_out(loss, s.dtype, s.shape[:-1], none),
            _empty(s, _T.results(dev, s)[1]) if grad is None else grad, counters)


def _sparse_fake(s, idx, lp, labels, mode, *rest):
    opts, (want_grad, _, _) = _opts(rest[:_NOPT]), rest[_NOPT:]
    dev, desc, _, _ = _sparse_checks(s, idx, lp, labels, mode, opts)
    V = s.shape[-1]
    return (_fake_loss(s, s.shape[:-1], desc.reduction == _lib.REDUCTION_NONE),
            s.new_empty((s.numel() // V, V) if want_grad else (0,),
                        dtype=_T.results(dev, s)[1]),
            s.new_empty((3,), dtype=torch.int64))


_sparse_fwd = _Op(
    "sparse_fwd",
    "(Tensor student, Tensor teacher_indices, Tensor teacher_logprobs, Tensor? labels, str mode, "
    + _OPT_SCHEMA + ", bool want_grad, bool raise_on_invalid, bool check_indices) "
    "-> (Tensor, Tensor, Tensor)",
    _sparse_impl, _sparse_fake, grads={0: 1}, per_row=lambda a: _is_none(a[5 + 7]))


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
    teacher gets none.  The custom operator kdloss::sparse_fwd
    (torch.compile keeps it in the graph).

    Returns the loss, or (loss, stats) with return_stats: valid_rows,
    invalid_rows, bad_index_rows (0-d int64 tensors).
    """
    opts = _opts((divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                  ignore_index))  # not locals(): torch.compile traces these functions
    if not _compiling():
        _sparse_checks(student_logits, teacher_indices, teacher_logprobs, labels, mode, opts)
    loss, _, counters = _sparse_fwd(student_logits, teacher_indices, teacher_logprobs, labels,
                                    mode, *_opt_args(opts), _needs(student_logits),
                                    bool(raise_on_invalid), bool(check_indices))
    if not return_stats:
        return loss
    stats = _counts(counters)
    stats["bad_index_rows"] = counters[2].reshape(())
    return loss, stats


def _fused_grad_dtype(dev, h, w, grad_dtype):
    """The dtype of dH, dW, db: grad_dtype when given (float32, the common
    16-bit dtype of hidden and weight, float64 on CPU); else on CUDA the
    inputs' dtype when both are bfloat16 or both float16 and float32
    otherwise, on CPU float64 (the reference's own)."""
    cuda = dev.type == "cuda"
    same16 = h.dtype in (torch.bfloat16, torch.float16) and w.dtype == h.dtype
    if grad_dtype is None:
        return (h.dtype if same16 else torch.float32) if cuda else torch.float64
    allowed = [torch.float32] + ([h.dtype] if same16 else []) + ([] if cuda else [torch.float64])
    if grad_dtype not in allowed:
        raise TypeError(f"kdloss: grad_dtype {grad_dtype} is not supported for hidden "
                        f"{h.dtype} and weight {w.dtype} on {dev.type}; expected one of "
                        f"{', '.join(map(str, allowed))} or None")
    return grad_dtype


def _fused_checks(h, w, t, bias, labels, tl, ts, mode, check_indices, opts, chunk_rows,
                  grad_dtype):
    """fused_linear_distill_loss's argument checks, tl the teacher as a
    linear layer (teacher_hidden, teacher_weight, teacher_bias), ts the
    sparse teacher (teacher_indices, teacher_logprobs), Nones for a source
    not given: (device, LossDesc, labels as [N], the gradients' dtype, the
    sparse mode code or None)."""
    dev = _ops.fused_inputs(_T, h, w, t, "teacher_logits", bias, *tl, *ts)
    sparse = _ops.fused_sparse_mode(ts[0], mode, check_indices)
    if dev.type == "cuda":
        same16 = h.dtype in (torch.bfloat16, torch.float16) and w.dtype == h.dtype
        if not same16 and (h.dtype != torch.float32 or w.dtype != torch.float32):
            raise TypeError("kdloss: the GPU fused linear + loss takes float32 hidden and weight, "
                            f"or both bfloat16 or both float16; got {h.dtype} and {w.dtype}")
        _no_f64_on_cuda(dev, t if t is not None else tl[0] if tl[0] is not None else ts[1])
    _lib.as_int("chunk_rows", chunk_rows)
    desc = _lib.new_desc(**opts)
    lab = _ops.labels(_T, labels, h.shape, dev)
    return dev, desc, lab, _fused_grad_dtype(dev, h, w, grad_dtype), sparse


# The operators' tensor inputs: hidden (0), weight (1), teacher (logits, 2),
# bias (3), labels (4), teacher_hidden (5), teacher_weight (6), teacher_bias
# (7), teacher_indices (8), teacher_logprobs (9); then (bwd: grad_output) the
# loss options and the rest (chunk_rows, want_hidden, want_weight, want_bias,
# grad_dtype, mode; fwd: raise_on_invalid, check_indices).
_FUSED_NT = 10


def _fused_split(rest):
    return _opts(rest[:_NOPT]), rest[_NOPT:]


def _fused_teachers(tl, ts, sparse):
    """_ops.fused_linear's teacher_linear and teacher_sparse keywords."""
    return dict(teacher_linear=tl if tl[0] is not None else None,
                teacher_sparse=None if sparse is None else (sparse,) + tuple(ts))


def _fused_impl(h, w, t, bias, labels, th, tw, tb, ti, tlp, *rest):
    opts, (chunk_rows, want_h, want_w, want_b, grad_dtype, mode, raise_on_invalid,
           check_indices) = _fused_split(rest)
    tl, ts = (th, tw, tb), (ti, tlp)
    dev, desc, lab, gdt, sparse = _fused_checks(h, w, t, bias, labels, tl, ts, mode,
                                                check_indices, opts, chunk_rows, grad_dtype)
    _no_host_read(dev, raise_on_invalid=raise_on_invalid, check_indices=check_indices)
    if check_indices:
        _ops.check_indices(_T, ti, w.shape[0])
    none = desc.reduction == _lib.REDUCTION_NONE
    loss, gh, gw, gb, counters, _ = _ops.fused_linear(
        _T, dev, desc, h, w, t, lab, chunk_rows, want_h and not none, want_w and not none, gdt,
        bias=bias, want_b=want_b and not none, **_fused_teachers(tl, ts, sparse))
    if raise_on_invalid:
        n_invalid, _, n_bad = counters.tolist()  # host sync on CUDA
        _ops.raise_invalid(n_invalid, _ops.rows_of(_T, h), reason=_ops.FUSED_REASON
                           if sparse is None else _ops.fused_sparse_reason(n_bad))
    return (_loss_out(loss, h.dtype, h.shape[:-1], none),) + tuple(
        _empty(h, gdt) if g is None else g for g in (gh, gw, gb)) + (counters,)


def _fused_grad_shapes(h, w, want_h, want_w, want_b):
    D, V = h.shape[-1], w.shape[0]
    return ((h.numel() // D, D) if want_h else (0,), (V, D) if want_w else (0,),
            (V,) if want_b else (0,))


def _fused_fake(h, w, t, bias, labels, th, tw, tb, ti, tlp, *rest):
    opts, (chunk_rows, want_h, want_w, want_b, grad_dtype, mode, _,
           check_indices) = _fused_split(rest)
    dev, desc, _, gdt, _ = _fused_checks(h, w, t, bias, labels, (th, tw, tb), (ti, tlp), mode,
                                         check_indices, opts, chunk_rows, grad_dtype)
    none = desc.reduction == _lib.REDUCTION_NONE
    shapes = _fused_grad_shapes(h, w, want_h and not none, want_w and not none,
                                want_b and not none)
    return ((_fake_loss(h, h.shape[:-1], none),) + tuple(h.new_empty(s, dtype=gdt) for s in shapes)
            + (h.new_empty((3,), dtype=torch.int64),))


def _grad_output_checks(h, go):
    """kdloss::fused_linear_bwd's upstream gradient: [N] on hidden's device
    in a float dtype the library reads (its pointer goes to the library as
    it is: a host tensor for CUDA hidden would be read as device memory)."""
    N = h.numel() // h.shape[-1]
    _ops.check_array(_T, go, "grad_output")
    if _T.dtype_code(go) is None or tuple(go.shape) != (N,):
        raise ValueError(f"kdloss: grad_output must be a float tensor of shape ({N},), got "
                         f"{go.dtype} {tuple(go.shape)}")
    _ops.same_device(_T, [("hidden", h), ("grad_output", go)])


def _fused_bwd_impl(h, w, t, bias, labels, th, tw, tb, ti, tlp, grad_output, *rest):
    opts, (chunk_rows, want_h, want_w, want_b, grad_dtype, mode) = _fused_split(rest)
    tl, ts = (th, tw, tb), (ti, tlp)
    dev, desc, lab, gdt, sparse = _fused_checks(h, w, t, bias, labels, tl, ts, mode, False,
                                                opts, chunk_rows, grad_dtype)
    _grad_output_checks(h, grad_output)
    go = _T.flat(grad_output, grad_output.numel())
    _, gh, gw, gb, _, _ = _ops.fused_linear(_T, dev, desc, h, w, t, lab, chunk_rows, want_h,
                                            want_w, gdt, bias=bias, want_b=want_b,
                                            grad_output=go,
                                            **_fused_teachers(tl, ts, sparse))
    return tuple(_empty(h, gdt) if g is None else g for g in (gh, gw, gb))


def _fused_bwd_fake(h, w, t, bias, labels, th, tw, tb, ti, tlp, grad_output, *rest):
    opts, (chunk_rows, want_h, want_w, want_b, grad_dtype, mode) = _fused_split(rest)
    gdt = _fused_checks(h, w, t, bias, labels, (th, tw, tb), (ti, tlp), mode, False, opts,
                        chunk_rows, grad_dtype)[3]
    _grad_output_checks(h, grad_output)
    return tuple(h.new_empty(s, dtype=gdt)
                 for s in _fused_grad_shapes(h, w, want_h, want_w, want_b))


_FUSED_IN = ("(Tensor hidden, Tensor weight, Tensor? teacher, Tensor? bias, Tensor? labels, "
             "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, "
             "Tensor? teacher_indices, Tensor? teacher_logprobs, ")
_FUSED_OPTS = ", int chunk_rows, bool want_hidden, bool want_weight, bool want_bias, " \
    "ScalarType? grad_dtype, str? mode"

_fused_linear_bwd = _Op(
    "fused_linear_bwd",
    _FUSED_IN + "Tensor grad_output, " + _OPT_SCHEMA + _FUSED_OPTS
    + ") -> (Tensor, Tensor, Tensor)", _fused_bwd_impl, _fused_bwd_fake)


def _fused_later(grad_out, needs, args):
    """Reduction none: dH, dW, db from a second library call with the
    upstream gradient of every row (kdloss::fused_linear_bwd)."""
    tensors = [None if x is None else x.detach() for x in args[:_FUSED_NT]]
    h, w, b = tensors[0], tensors[1], tensors[3]
    opts, (chunk_rows, _, _, _, gdt, mode, _, _) = _fused_split(args[_FUSED_NT:])
    go = grad_out.detach().reshape(-1)
    go = go.to(torch.float32 if h.device.type == "cuda" else torch.float64).contiguous()
    want_b = b is not None and needs[3]
    gh, gw, gb = _fused_linear_bwd(*tensors, go, *opts.values(), chunk_rows, needs[0], needs[1],
                                   want_b, gdt, mode)
    return {0: gh.to(h.dtype).view(h.shape) if needs[0] else None,
            1: gw.to(w.dtype) if needs[1] else None,
            3: gb.to(b.dtype) if want_b else None}


# Gradients to hidden (0), weight (1) and bias (3) only: the teacher, as
# logits (2), a linear layer (5, 6, 7) or its top-k (8, 9), is frozen and
# gets None.
_fused_linear_fwd = _Op(
    "fused_linear_fwd",
    _FUSED_IN + _OPT_SCHEMA + _FUSED_OPTS + ", bool raise_on_invalid, bool check_indices) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fused_impl, _fused_fake, grads={0: 1, 1: 2, 3: 3},
    per_row=lambda a: _is_none(a[_FUSED_NT + 7]), later=_fused_later)


def fused_linear_distill_loss(
    hidden,
    weight,
    teacher_logits=None,
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
    grad_dtype=None,
    teacher_hidden=None,
    teacher_weight=None,
    teacher_bias=None,
    teacher_indices=None,
    teacher_logprobs=None,
    mode=None,
    check_indices=False,
):
    """Distillation loss of the student logits hidden @ weight.T (+ bias; an
    output projection) against the teacher, with gradients to
    hidden, weight and bias through autograd, never holding the [N, V]
    student logits: on CUDA kdl_fused_linear_loss goes chunk by chunk over
    the rows (cuBLAS with FP32 accumulation: strict FP32 for float32 inputs,
    cublasGemmEx for 16-bit ones), on CPU the float64 reference
    kdl_ref_fused_linear_loss.

    hidden: [N, d] or [..., d]; weight: [V, d] (its rows may be strided, e.g.
        tied embeddings); bias: optional [V], weight's dtype.  CUDA: hidden
        and weight both float32, both bfloat16 or both float16; every
        divergence (AKL included).  CPU: any of float32, float64, float16,
        bfloat16.
    The teacher, exactly one of (else ValueError naming the arguments):
      teacher_logits: [..., V] with hidden's leading shape (CUDA: float32,
        float16 or bfloat16); or
      the teacher as a linear layer, logits teacher_hidden @ teacher_weight.T
        (+ teacher_bias), formed chunk by chunk like the student's and never
        held whole on CUDA: teacher_hidden [..., d_t] with hidden's leading
        shape (d_t may differ from d), teacher_weight [V, d_t] (rows may be
        strided), teacher_bias optional [V]; the three of one dtype, which
        may differ from the student's (CUDA: float32, bfloat16 or float16;
        CPU: also float64); or
      the sparse teacher, its top-k per row with the names and meaning of
        sparse_distill_loss: teacher_indices int64 [..., k] and
        teacher_logprobs [..., k] with hidden's leading shape, mode
        "renormalised" (None: the default) or "tail" / "tail_bucket", and
        check_indices; mode or check_indices without the sparse teacher is
        a ValueError.
    The teacher is frozen: no gradient flows to teacher_logits,
        teacher_hidden, teacher_weight, teacher_bias or teacher_logprobs.
        A teacher tensor
        that requires grad is accepted and read as it is; its .grad stays
        None (detach it, or compute it under torch.no_grad, to say so).
    chunk_rows: rows per chunk on CUDA (0: max(1, N/8) for float32 inputs,
        max(1, N/24) for 16-bit ones; with the teacher as a linear layer
        N/16 and N/40; at most 4096).
    Other options as distill_loss.

    Gradients: with reduction "mean" or "sum" dH, dW and db are computed in
    the forward call and scaled by the upstream gradient in backward.  With
    reduction "none" the upstream gradient weights each row, which must be
    known before dW is formed: forward computes the losses only, and
    backward calls the library again with the upstream gradient as
    grad_output (a second pass over the logits, chunk by chunk as the
    first, the teacher's linear layer included; the operator
    kdloss::fused_linear_bwd).
    grad_dtype: the dtype the library writes dH, dW, db in.  None: on CUDA
        the inputs' dtype when hidden and weight are both bfloat16 or both
        float16 (no float32 [V, d] buffer), float32 otherwise; on CPU
        float64.  torch.float32 (CUDA or CPU), the inputs' common 16-bit
        dtype, or torch.float64 (CPU) may be asked for.  Autograd casts the
        gradients to the inputs' dtypes.

    Returns the loss (float32; float64 on CPU for float64 hidden), or (loss,
    stats) with return_stats: valid_rows, invalid_rows, and with the sparse
    teacher bad_index_rows (0-d int64 tensors).
    """
    opts = _opts((divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                  ignore_index))  # not locals(): torch.compile traces these functions
    tl = (teacher_hidden, teacher_weight, teacher_bias)
    ts = (teacher_indices, teacher_logprobs)
    if not _compiling():
        _fused_checks(hidden, weight, teacher_logits, bias, labels, tl, ts, mode,
                      check_indices, opts, chunk_rows, grad_dtype)
    out = _fused_linear_fwd(hidden, weight, teacher_logits, bias, labels, *tl, *ts,
                            *_opt_args(opts), int(chunk_rows), _needs(hidden), _needs(weight),
                            bias is not None and _needs(bias), grad_dtype,
                            None if mode is None else str(mode), bool(raise_on_invalid),
                            bool(check_indices))
    if not return_stats:
        return out[0]
    stats = _counts(out[4])
    if teacher_indices is not None:
        stats["bad_index_rows"] = out[4][2].reshape(())
    return out[0], stats




def _vp_outputs(s, desc, sh, raise_on_invalid):
    """A finished shard's results as the operators return them (loss,
    gradient or an empty placeholder, counters, head sizes or an empty
    placeholder), after the invalid-row check."""
    _raise_invalid(raise_on_invalid, sh.counters, sh.rows)
    none = desc.reduction == _lib.REDUCTION_NONE
    return (_loss_out(sh.loss, s.dtype, s.shape[:-1], none),
            _empty(s, _T.results(s.device, s)[1]) if sh.grad is None else sh.grad, sh.counters,
            _empty(sh.counters) if sh.head_size is None else sh.head_size)


def _vocab_impl(s, t, labels, group, geometry, opts, want_grad, want_head_size,
                raise_on_invalid):
    """One rank's shard step loop (eager: the all-reduces are
    torch.distributed calls between the library's steps)."""
    import torch.distributed as dist

    dev = s.device
    cuda = dev.type == "cuda"
    desc = _lib.new_desc(**opts)
    lab = _ops.labels(_T, labels, s.shape, dev)
    if cuda:
        _lib.require_gpu("shard", "vocab_parallel_distill_loss")
    _no_host_read(dev, raise_on_invalid=raise_on_invalid)
    sh = _ops.Shard(_T, dev, desc, s, t, lab, geometry, want_grad, want_head_size)
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
    return _vp_outputs(s, desc, sh, raise_on_invalid)


# Eager: not a custom operator (python/README.md, torch.compile): the
# collectives run inside, between the library's steps, on a process group
# object.
_vocab_fwd = _Op("vocab_parallel_fwd", None, _vocab_impl, None, grads={0: 1},
                 per_row=lambda a: _is_none(a[5]["reduction"]), register=False)


# Compiled: one operator per step (kdloss::vocab_parallel_step for every step
# but the last, kdloss::vocab_parallel_finish for the last), each a pure
# function of the logits, the shard state and the reduced exchange of the
# step before, returning the new state and the exchange to reduce; the
# reductions between them are functional collectives, which the compiler
# traces, keeps in program order and never drops.  The step sequence comes
# from the library at trace time (_vp_plan).
try:
    import torch.distributed._functional_collectives as _funcol
except Exception:  # torch without distributed
    _funcol = None
_VP_TRACEABLE = (_HAS_CUSTOM_OP and _funcol is not None
                 and hasattr(getattr(torch, "compiler", None), "assume_constant_result"))
_VP_GEOM_SCHEMA = "int vocab_offset, int vocab, int rank, int world"


def _vp_plan_impl(divergence, world, teacher_key):
    """The protocol's shape for this divergence, num_shards and teacher key
    width, from the library: (state words of the header, state words per
    row, exchange doubles per row, ((op, doubles per row) of each step but
    the last, ...)).  The sequence of (op, count) depends only on whether
    the divergence is AKL, the rows, num_shards and the teacher dtype
    (kdloss_ext.h), so the reference runs it on a dummy shard of one and two
    rows with default options (while compiling, the float options may be
    symbolic); each step operator checks its (op, count) against it."""
    import numpy as np

    from .numpy import _NP

    desc = _lib.new_desc(divergence)  # the other options at their defaults
    dt = {"f64": np.float64, "f32": np.float32, "f16": np.float16}[teacher_key]
    # the last rank's one-column slice of a vocabulary of num_shards tokens
    geometry = (world - 1, world, world - 1, world)

    def shard(n):
        return _ops.Shard(_NP, None, desc, np.zeros((n, 1)), np.zeros((n, 1), dt), None, geometry,
                          False, False)

    one, two = shard(1), shard(2)
    row_words = two.state.size - one.state.size
    steps = []
    for s in range(one.num_steps):
        op, count = one.step(s)
        if op is None:
            break
        steps.append((op, count))
    return one.state.size - row_words, row_words, one.exchange.size, tuple(steps)


_vp_plan_cached = functools.lru_cache(maxsize=64)(_vp_plan_impl)


def _vp_plan(divergence, world, teacher_key):
    return _vp_plan_cached(str(divergence), int(world), teacher_key)


# run at trace time, its result a constant of the graph
_vp_plan_traced = torch.compiler.assume_constant_result(_vp_plan) if _VP_TRACEABLE else _vp_plan


def _teacher_key(t):
    return {torch.float64: "f64", torch.float32: "f32"}.get(t.dtype, "f16")


def _vp_split(rest):
    """opts, geometry, then the remaining arguments of a step operator."""
    return _opts(rest[:_NOPT]), tuple(rest[_NOPT:_NOPT + 4]), rest[_NOPT + 4:]


def _vp_run(s, t, labels, opts, geometry, step, state, exchange, want_grad, want_head_size):
    """A shard with the given state and reduced exchange (copied: the
    operators do not mutate their inputs), step `step` run on it."""
    dev, desc, lab = _distill_checks(s, t, labels, opts)
    cuda = dev.type == "cuda"
    if cuda:
        _lib.require_gpu("shard", "vocab_parallel_distill_loss")
    sh = _ops.Shard(_T, dev, desc, s, t, lab, geometry, want_grad, want_head_size)
    if state is not None:
        if state.shape != sh.state.shape:
            raise ValueError(f"kdloss: shard state of {state.numel()} words, the step expects "
                             f"{sh.state.numel()}")
        sh.state.copy_(state)
    if exchange is not None:
        if exchange.numel() > sh.exchange.numel():
            raise ValueError("kdloss: reduced exchange longer than the shard's exchange")
        sh.exchange[:exchange.numel()].copy_(exchange)
    with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
        op, count = sh.step(step, _T.handle(dev) if cuda else None)
    return sh, desc, op, count


def _vp_step_impl(s, t, labels, *rest):
    opts, geometry, (step, state, exchange) = _vp_split(rest)
    sh, _, op, count = _vp_run(s, t, labels, opts, geometry, step, state, exchange, False, False)
    plan = _vp_plan(opts["divergence"], geometry[3], _teacher_key(t))[3]
    if step >= len(plan) or (op, count) != (plan[step][0], plan[step][1] * sh.rows):
        raise RuntimeError(f"kdloss: shard step {step} returned ({op}, {count}), not the "
                           f"planned {plan[step] if step < len(plan) else 'last step'}")
    return sh.state, sh.exchange[:count].clone()


def _vp_step_fake(s, t, labels, *rest):
    opts, geometry, (step, _, _) = _vp_split(rest)
    _distill_checks(s, t, labels, opts)
    hdr, row, _, plan = _vp_plan(opts["divergence"], geometry[3], _teacher_key(t))
    N = s.numel() // s.shape[-1]
    return (s.new_empty((hdr + row * N,), dtype=torch.float64),
            s.new_empty((plan[step][1] * N,), dtype=torch.float64))


def _vp_finish_impl(s, t, labels, *rest):
    opts, geometry, (step, state, exchange, want_grad, want_head_size,
                     raise_on_invalid) = _vp_split(rest)
    _no_host_read(s.device, raise_on_invalid=raise_on_invalid)
    sh, desc, op, _ = _vp_run(s, t, labels, opts, geometry, step, state, exchange, want_grad,
                              want_head_size)
    if op is not None:
        raise RuntimeError(f"kdloss: shard step {step} is not the last step")
    return _vp_outputs(s, desc, sh, raise_on_invalid)


def _vp_finish_fake(s, t, labels, *rest):
    opts, geometry, (_, _, _, want_grad, want_head_size, _) = _vp_split(rest)
    dev, desc, _ = _distill_checks(s, t, labels, opts)
    V = s.shape[-1]
    N = s.numel() // V
    akl = desc.divergence == _lib.lib().kdl_divergence_from_name(b"akl")
    return (_fake_loss(s, s.shape[:-1], desc.reduction == _lib.REDUCTION_NONE),
            s.new_empty((N, V) if want_grad else (0,), dtype=_T.results(dev, s)[1]),
            s.new_empty((2,), dtype=torch.int64),
            s.new_empty((N,) if akl and want_head_size else (0,), dtype=torch.int64))


_vp_step = _Op(
    "vocab_parallel_step",
    "(Tensor student, Tensor teacher, Tensor? labels, " + _OPT_SCHEMA + ", " + _VP_GEOM_SCHEMA +
    ", int step, Tensor? state, Tensor? exchange) -> (Tensor, Tensor)",
    _vp_step_impl, _vp_step_fake, register=_VP_TRACEABLE)
_vp_finish = _Op(
    "vocab_parallel_finish",
    "(Tensor student, Tensor teacher, Tensor? labels, " + _OPT_SCHEMA + ", " + _VP_GEOM_SCHEMA +
    ", int step, Tensor state, Tensor exchange, bool want_grad, bool want_head_size, "
    "bool raise_on_invalid) -> (Tensor, Tensor, Tensor, Tensor)",
    _vp_finish_impl, _vp_finish_fake, grads={0: 1}, per_row=lambda a: _is_none(a[3 + 7]),
    register=_VP_TRACEABLE)


def _vp_traced(s, t, labels, group, geometry, opt_args, want_grad, want_head_size,
               raise_on_invalid):
    """The step loop as the compiler traces it: operators and functional
    all-reduces (also runs eagerly)."""
    import torch.distributed as dist

    _, _, _, plan = _vp_plan_traced(opt_args[0], geometry[3], _teacher_key(t))
    if group is None:
        group = dist.group.WORLD
    # the steps read the logits only; the gradient comes from the last one
    sd, td = s.detach(), t.detach()
    state = exchange = None
    for step, (op, _) in enumerate(plan):
        state, exchange = _vp_step(sd, td, labels, *opt_args, *geometry, step, state, exchange)
        exchange = _funcol.all_reduce(exchange, op, group)
    return _vp_finish(s, t, labels, *opt_args, *geometry, len(plan), state, exchange, want_grad,
                      want_head_size, raise_on_invalid)


def _no_trace(f):
    c = getattr(torch, "compiler", None)
    return c.disable(f) if c is not None and hasattr(c, "disable") else f


@_no_trace
def _vp_widths(W, dev, rank, world, group):
    """(vocab_offset, vocab) from the slice widths of the ranks: one
    all-reduce and a host read (a graph break when compiled)."""
    import torch.distributed as dist

    widths = torch.zeros(world, dtype=torch.int64, device=dev)
    widths[rank] = W
    dist.all_reduce(widths, group=group)
    widths = widths.tolist()
    return sum(widths[:rank]), sum(widths)


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

    torch.compile: traced as the operators kdloss::vocab_parallel_step (one
    per step but the last) and kdloss::vocab_parallel_finish with functional
    all-reduces between them, no graph break when vocab_offset and vocab are
    given (the width exchange reads the widths back: a graph break).

    Returns the loss, or (loss, stats) with return_stats: valid_rows,
    invalid_rows (0-d int64 tensors) and, for AKL, head_size (per row, the
    head of the whole vocabulary).
    """
    import torch.distributed as dist

    opts = _opts((divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                  ignore_index))  # not locals(): torch.compile traces these functions
    traced = _compiling() and _VP_TRACEABLE and _USE_OPS
    if not traced:  # eager: the checks first (while compiling the fakes run them)
        _distill_checks(student_logits, teacher_logits, labels, opts)
        _lib.require_ext("vocab_parallel_distill_loss")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("kdloss: vocab_parallel_distill_loss needs torch.distributed "
                               "initialised (dist.init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("kdloss: this process is not a member of the given process group")
    if (vocab_offset is None) != (vocab is None):
        raise ValueError("kdloss: give both vocab_offset and vocab, or neither")
    if vocab_offset is None:
        vocab_offset, vocab = _vp_widths(student_logits.shape[-1], student_logits.device, rank,
                                         world, group)
    geometry = (_lib.as_int("vocab_offset", vocab_offset), _lib.as_int("vocab", vocab), rank, world)
    if traced:
        loss, _, counters, head = _vp_traced(student_logits, teacher_logits, labels, group,
                                             geometry, _opt_args(opts), _needs(student_logits),
                                             bool(return_stats), bool(raise_on_invalid))
        akl = str(divergence).strip().lower() == "akl"
    else:
        loss, _, counters, head = _vocab_fwd(student_logits, teacher_logits, labels, group,
                                             geometry, opts, _needs(student_logits),
                                             bool(return_stats), bool(raise_on_invalid))
        akl = _lib.new_desc(**opts).divergence == _lib.lib().kdl_divergence_from_name(b"akl")
    if not return_stats:
        return loss
    stats = _counts(counters)
    if head.numel() or akl:
        stats["head_size"] = head.reshape(student_logits.shape[:-1])
    return loss, stats
