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
of a torch.distributed process group).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

from . import _lib

__all__ = [
    "distill_loss",
    "DistillLoss",
    "sinkd_loss",
    "sinkhorn",
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


# ---------------------------------------------------------------- checks
def _check_logits(x, name, what="vocabulary", last="V", dtypes=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kdloss: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None:
        if x.dtype not in dtypes:
            raise TypeError(f"kdloss: {name} has dtype {x.dtype}; expected "
                            f"{' or '.join(map(str, dtypes))}")
    elif x.dtype not in _DTYPES:
        raise TypeError(
            f"kdloss: {name} has dtype {x.dtype}; expected float32, float16, bfloat16 or float64"
        )
    if x.dim() < 1:
        raise ValueError(f"kdloss: {name} must have shape [N, {last}] or [..., {last}], got a scalar")
    if x.shape[-1] < 1:
        raise ValueError(f"kdloss: {name} has an empty {what} dimension (shape {tuple(x.shape)})")
    if x.shape[-1] > 1 and x.numel() and x.stride(-1) != 1:
        raise ValueError(
            f"kdloss: {name} must be contiguous in its last ({what}) dimension, got stride "
            f"{x.stride(-1)} (shape {tuple(x.shape)}); call {name}.contiguous()"
        )
    if x.is_complex() or x.layout != torch.strided:
        raise TypeError(f"kdloss: {name} must be a dense real tensor")


def _rows(x):
    """[..., V] -> ([N, V] tensor, N, V, ld).  Leading dims are flattened
    without a copy when they can be; rows that overlap (broadcast) or run
    backwards are copied into plain rows."""
    V = x.shape[-1]
    N = x.numel() // V
    if x.dim() == 2:
        x2 = x
    else:
        try:
            x2 = x.view(N, V)
        except RuntimeError:
            x2 = x.reshape(N, V)
    if N <= 1:
        return x2, N, V, V
    ld = x2.stride(0)
    if ld < V:
        x2 = x2.contiguous()
        ld = V
    return x2, N, V, ld


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None and t.numel() else None


# ---------------------------------------------------------- the fused call
def _compute(student, teacher, labels, desc, want_grad, want_stats):
    """One call of the library.  Returns (loss [N] or [1], grad [N, V] or
    None, stats dict or None, info tensor [1], valid tensor [1])."""
    s2, N, V, lds = _rows(student.detach())
    t2, _, _, ldt = _rows(teacher.detach())
    dev = student.device
    cuda = dev.type == "cuda"
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"kdloss: tensors on {dev} are not supported (cpu or cuda only)")
    none = desc.reduction == _lib.REDUCTION_NONE

    if cuda:
        if student.dtype == torch.float64 or teacher.dtype == torch.float64:
            raise TypeError(
                "kdloss: float64 CUDA tensors are not supported by the GPU kernels; use float32, "
                "float16 or bfloat16 on the GPU, or CPU tensors for the float64 reference"
            )
        out_dtype, grad_dtype = torch.float32, student.dtype
    else:
        out_dtype, grad_dtype = torch.float64, torch.float64

    loss = torch.zeros(N if none else 1, dtype=out_dtype, device=dev)
    grad = torch.empty((N, V), dtype=grad_dtype, device=dev) if want_grad else None
    stats = None
    if want_stats:
        stats = {k: torch.zeros(N, dtype=out_dtype, device=dev) for k in _lib.FLOAT_STATS}
        stats["head_size"] = torch.zeros(N, dtype=torch.int64, device=dev)
    info = torch.zeros(1, dtype=torch.int64, device=dev)
    valid = torch.zeros(1, dtype=torch.int64, device=dev)

    a = _lib.new_args()
    a.rows, a.vocab = N, V
    a.student, a.ld_student = _ptr(s2), lds
    a.student_dtype = _lib.DTYPE[_DTYPES[student.dtype]]
    a.teacher, a.ld_teacher = _ptr(t2), ldt
    a.teacher_dtype = _lib.DTYPE[_DTYPES[teacher.dtype]]
    a.labels = _ptr(labels)
    if grad is not None:
        a.grad, a.ld_grad = _ptr(grad), V
        a.grad_dtype = _lib.DTYPE[_DTYPES[grad_dtype]]
    a.out_dtype = _lib.DTYPE[_DTYPES[out_dtype]]
    a.loss = _ptr(loss)
    if stats is not None:
        for k in _lib.FLOAT_STATS:
            setattr(a, "stat_" + k, _ptr(stats[k]))
        a.stat_head_size = _ptr(stats["head_size"])
    a.info = _ptr(info)
    a.valid_rows = _ptr(valid)

    L = _lib.lib()
    if not cuda:
        _lib.check(L.kdl_ref_loss_forward_backward(ctypes.byref(desc), ctypes.byref(a)),
                   "kdl_ref_loss_forward_backward")
    else:
        with torch.cuda.device(dev):
            h = _lib.handle_for_current_device(dev.index)
            stream = torch.cuda.current_stream(dev).cuda_stream
            _lib.check(L.kdl_set_stream(h, ctypes.c_void_p(stream)), "kdl_set_stream")
            nbytes = ctypes.c_size_t(0)
            _lib.check(L.kdl_loss_workspace_size(h, ctypes.byref(desc), ctypes.byref(a),
                                                 ctypes.byref(nbytes)), "kdl_loss_workspace_size")
            # Freed when this returns: the caching allocator reuses it only in
            # stream order on this same stream, after the kernels that use it.
            ws = torch.empty(nbytes.value, dtype=torch.uint8, device=dev) if nbytes.value else None
            _lib.check(L.kdl_loss_forward_backward(h, ctypes.byref(desc), ctypes.byref(a),
                                                   _ptr(ws), nbytes.value),
                       "kdl_loss_forward_backward")
    return loss, grad, stats, info, valid


class _DistillLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, desc, raise_on_invalid, side):
        want_grad = ctx.needs_input_grad[0]
        loss, grad, stats, info, valid = _compute(student, teacher, labels, desc, want_grad,
                                                  side["want_stats"])
        N = loss.numel() if desc.reduction == _lib.REDUCTION_NONE else None
        if raise_on_invalid:
            n_invalid = int(info.item())  # host sync on CUDA
            if n_invalid:
                raise _lib.InvalidRowsError(n_invalid, student.numel() // student.shape[-1])
        side["stats"], side["info"], side["valid"] = stats, info, valid
        ctx.none = N is not None
        ctx.student_shape = student.shape
        ctx.student_dtype = student.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        lead = student.shape[:-1]
        out_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss = loss.to(out_dtype)
        return loss.reshape(lead) if ctx.none else loss.reshape(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.saved_tensors:  # the student needs no gradient
            return None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        if ctx.none:
            g = grad * grad_out.reshape(-1, 1).to(grad.dtype)
        else:
            g = grad * grad_out.to(grad.dtype)
        g = g.to(ctx.student_dtype).view(ctx.student_shape)
        return g, None, None, None, None, None


def _check_labels(labels, student):
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"kdloss: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"kdloss: labels must have dtype torch.int64, got {labels.dtype}")
    lead = student.shape[:-1]
    N = student.numel() // student.shape[-1]
    if labels.shape != lead and tuple(labels.shape) != (N,):
        raise ValueError(f"kdloss: labels shape {tuple(labels.shape)} does not match the rows of "
                         f"the logits (expected {tuple(lead)} or ({N},))")
    if labels.device != student.device:
        raise ValueError(f"kdloss: labels are on {labels.device}, the logits on {student.device}")
    return labels.detach().reshape(N).contiguous()


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
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kdloss: student_logits shape {tuple(student_logits.shape)} != "
                         f"teacher_logits shape {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"kdloss: student_logits are on {student_logits.device}, "
                         f"teacher_logits on {teacher_logits.device}")
    desc = _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction,
                         scale=scale, ignore_index=ignore_index)
    lab = _check_labels(labels, student_logits)
    side = {"want_stats": bool(return_stats)}
    loss = _DistillLossFunction.apply(student_logits, teacher_logits, lab, desc,
                                      bool(raise_on_invalid), side)
    if not return_stats:
        return loss
    lead = student_logits.shape[:-1]
    stats = {k: v.reshape(lead) for k, v in side["stats"].items()}
    stats["valid_rows"] = side["valid"].reshape(())
    stats["invalid_rows"] = side["info"].reshape(())
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
        _lib.new_desc(**{k: v for k, v in self.options.items()})  # names checked now

    def forward(self, student_logits, teacher_logits, labels=None):
        return distill_loss(student_logits, teacher_logits, labels=labels,
                            raise_on_invalid=self.raise_on_invalid, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# ------------------------------------------------------------- Sinkhorn
def _gpu_call(dev, size_fn, run_fn, desc, a, name):
    """Handle, stream, workspace and the call, for a CUDA device."""
    L = _lib.lib()
    with torch.cuda.device(dev):
        h = _lib.handle_for_current_device(dev.index)
        _lib.check(L.kdl_set_stream(h, ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)),
                   "kdl_set_stream")
        nbytes = ctypes.c_size_t(0)
        _lib.check(size_fn(h, ctypes.byref(desc), ctypes.byref(a), ctypes.byref(nbytes)),
                   name + "_workspace_size")
        ws = torch.empty(nbytes.value, dtype=torch.uint8, device=dev) if nbytes.value else None
        _lib.check(run_fn(h, ctypes.byref(desc), ctypes.byref(a), _ptr(ws), nbytes.value), name)


class _SinkdFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, desc, raise_on_invalid, side):
        s2, N, V, lds = _rows(student.detach())
        t2, _, _, ldt = _rows(teacher.detach())
        dev = student.device
        cuda = dev.type == "cuda"
        if cuda:
            _lib.require_ot_gpu("sinkd_loss")
            if torch.float64 in (student.dtype, teacher.dtype):
                raise TypeError("kdloss: float64 CUDA tensors are not supported by the GPU "
                                "kernels; use float32, float16 or bfloat16 on the GPU")
            out_dtype, grad_dtype = torch.float32, student.dtype
        else:
            out_dtype = grad_dtype = torch.float64
        n = desc.group_size if desc.group_size > 0 else N
        G = N // n if n > 0 and N % n == 0 else 0
        want_grad = ctx.needs_input_grad[0]
        loss = torch.zeros(1, dtype=out_dtype, device=dev)
        grad = torch.zeros((N, V), dtype=grad_dtype, device=dev) if want_grad else None
        stats = {"group_loss": torch.zeros(G, dtype=out_dtype, device=dev),
                 "iterations": torch.zeros(G, dtype=torch.int64, device=dev),
                 "marginal_error": torch.zeros(G, dtype=out_dtype, device=dev)}
        if side["want_plan"]:
            stats["plan"] = torch.zeros((G, n, n), dtype=out_dtype, device=dev)
        info = torch.zeros(1, dtype=torch.int64, device=dev)

        a = _lib.new_sinkd_args()
        a.rows, a.vocab = N, V
        a.student, a.ld_student = _ptr(s2), lds
        a.student_dtype = _lib.DTYPE[_DTYPES[student.dtype]]
        a.teacher, a.ld_teacher = _ptr(t2), ldt
        a.teacher_dtype = _lib.DTYPE[_DTYPES[teacher.dtype]]
        if grad is not None:
            a.grad, a.ld_grad = _ptr(grad), V
            a.grad_dtype = _lib.DTYPE[_DTYPES[grad_dtype]]
        a.out_dtype = _lib.DTYPE[_DTYPES[out_dtype]]
        a.loss = _ptr(loss)
        a.group_loss = _ptr(stats["group_loss"])
        a.iterations = _ptr(stats["iterations"])
        a.marginal_error = _ptr(stats["marginal_error"])
        a.plan = _ptr(stats.get("plan"))
        a.info = _ptr(info)
        L = _lib.lib()
        if cuda:
            _gpu_call(dev, L.kdl_sinkd_workspace_size, L.kdl_sinkd, desc, a, "kdl_sinkd")
        else:
            _lib.check(L.kdl_ref_sinkd(ctypes.byref(desc), ctypes.byref(a)), "kdl_ref_sinkd")
        if raise_on_invalid:
            n_invalid = int(info.item())
            if n_invalid:
                raise _lib.InvalidRowsError(n_invalid, G, unit="groups")
        stats["invalid_groups"] = info.reshape(())
        side["stats"] = stats
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss.to(torch.float64 if student.dtype == torch.float64 else torch.float32).reshape(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.saved_tensors:
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        g = (grad * grad_out.to(grad.dtype)).to(ctx.student_dtype).view(ctx.student_shape)
        return g, None, None, None, None


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
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kdloss: student_logits shape {tuple(student_logits.shape)} != "
                         f"teacher_logits shape {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"kdloss: student_logits are on {student_logits.device}, "
                         f"teacher_logits on {teacher_logits.device}")
    desc = _lib.new_sinkd_desc(group_size=group_size, temperature=temperature, epsilon=epsilon,
                               max_iter=max_iter, tol=tol, check_every=check_every, metric=metric,
                               scale=scale)
    side = {"want_plan": bool(return_plan)}
    loss = _SinkdFunction.apply(student_logits, teacher_logits, desc, bool(raise_on_invalid), side)
    if return_stats or return_plan:
        return loss, side["stats"]
    return loss


class _SinkhornFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost, x, desc, meta, extras, side):
        B, n, m, dim, single, dev, dtype = meta
        cuda = dev.type == "cuda"
        work = torch.float32 if cuda else torch.float64

        def prep(t):
            return None if t is None else t.detach().to(work).contiguous()

        C, X = prep(cost), prep(x)
        Y = prep(extras["y"])
        ex = {k: prep(v) for k, v in extras.items() if k != "y"}
        want_plan = side["want_plan"] or (cost is not None and ctx.needs_input_grad[0])
        want_gx = side["want_grad_x"] or (x is not None and ctx.needs_input_grad[1])
        out = {"value": torch.zeros(B, dtype=work, device=dev),
               "iterations": torch.zeros(B, dtype=torch.int64, device=dev),
               "marginal_error": torch.zeros(B, dtype=work, device=dev)}
        if want_plan:
            out["plan"] = torch.zeros((B, n, m), dtype=work, device=dev)
        if side["want_potentials"]:
            out["f"] = torch.zeros((B, n), dtype=work, device=dev)
            out["g"] = torch.zeros((B, m), dtype=work, device=dev)
        if want_gx:
            out["grad_x"] = torch.zeros((B, n, dim), dtype=work, device=dev)
        syy_given = ex.get("self_yy") is not None
        if desc.debias:
            out["self_yy"] = ex["self_yy"].clone() if syy_given else torch.zeros(B, dtype=work,
                                                                                 device=dev)
        info = torch.zeros(1, dtype=torch.int64, device=dev) if cuda else None

        a = _lib.new_sinkhorn_args()
        a.batch, a.n, a.m, a.dim = B, n, m, dim
        a.dtype = _lib.DTYPE[_DTYPES[work]]
        a.cost, a.x, a.y = _ptr(C), _ptr(X), _ptr(Y)
        a.log_a, a.log_b = _ptr(ex.get("log_a")), _ptr(ex.get("log_b"))
        a.f_init, a.g_init = _ptr(ex.get("f_init")), _ptr(ex.get("g_init"))
        a.cost_xx, a.cost_yy = _ptr(ex.get("cost_xx")), _ptr(ex.get("cost_yy"))
        if desc.debias:
            a.self_yy = _ptr(out["self_yy"])
            a.self_yy_given = 1 if syy_given else 0
        a.value = _ptr(out["value"])
        a.iterations = _ptr(out["iterations"])
        a.marginal_error = _ptr(out["marginal_error"])
        a.plan, a.grad_x = _ptr(out.get("plan")), _ptr(out.get("grad_x"))
        a.f, a.g = _ptr(out.get("f")), _ptr(out.get("g"))
        a.info = _ptr(info)
        L = _lib.lib()
        if cuda:
            _gpu_call(dev, L.kdl_sinkhorn_workspace_size, L.kdl_sinkhorn, desc, a, "kdl_sinkhorn")
            out["invalid_problems"] = info.reshape(())
        else:
            _lib.check(L.kdl_ref_sinkhorn(ctypes.byref(desc), ctypes.byref(a)), "kdl_ref_sinkhorn")
        ctx.save_for_backward(out.get("plan") if cost is not None else None,
                              out.get("grad_x") if x is not None else None)
        ctx.cost_dtype = None if cost is None else cost.dtype
        ctx.x_dtype = None if x is None else x.dtype
        value = out.pop("value")
        side["out"] = {k: v for k, v in out.items()
                       if k not in ("plan", "grad_x") or side["want_" + k]}
        for k in ("marginal_error", "plan", "f", "g", "grad_x", "self_yy"):
            if k in side["out"]:
                side["out"][k] = side["out"][k].to(dtype)
        return value.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        plan, grad_x = ctx.saved_tensors
        gv = grad_value.reshape(-1)
        gc = gx = None
        if plan is not None and ctx.needs_input_grad[0]:
            gc = (plan * gv.to(plan.dtype).view(-1, 1, 1)).to(ctx.cost_dtype)
        if grad_x is not None and ctx.needs_input_grad[1]:
            gx = (grad_x * gv.to(grad_x.dtype).view(-1, 1, 1)).to(ctx.x_dtype)
        return gc, gx, None, None, None, None


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
    if (cost is None) == (x is None and y is None):
        raise ValueError("kdloss: give either cost, or the points x and y")
    tensors = {"cost": cost, "x": x, "y": y, "log_a": log_a, "log_b": log_b, "f_init": f_init,
               "g_init": g_init, "cost_xx": cost_xx, "cost_yy": cost_yy, "self_yy": self_yy}
    given = {k: v for k, v in tensors.items() if v is not None}
    for k, v in given.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"kdloss: {k} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"kdloss: {k} must be a floating tensor, got {v.dtype}")
    devices = {v.device for v in given.values()}
    if len(devices) != 1:
        raise ValueError(f"kdloss: all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = devices.pop()
    if cost is not None:
        if cost.dim() not in (2, 3):
            raise ValueError(f"kdloss: cost must be [n, m] or [B, n, m], got {tuple(cost.shape)}")
        single = cost.dim() == 2
        B, n, m = (1,) + tuple(cost.shape) if single else tuple(cost.shape)
        dim, dtype = 0, cost.dtype
    else:
        if x is None or y is None:
            raise ValueError("kdloss: points need both x and y")
        if x.dim() not in (2, 3) or y.dim() != x.dim():
            raise ValueError(f"kdloss: x and y must be [n, d] / [m, d] or [B, n, d] / [B, m, d], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        single = x.dim() == 2
        xs = (1,) + tuple(x.shape) if single else tuple(x.shape)
        ys = (1,) + tuple(y.shape) if single else tuple(y.shape)
        if xs[0] != ys[0] or xs[2] != ys[2]:
            raise ValueError(f"kdloss: x {tuple(x.shape)} and y {tuple(y.shape)} differ in batch "
                             "or dimension")
        B, n, dim = xs
        m = ys[1]
        dtype = x.dtype
    if dev.type == "cuda":
        _lib.require_ot_gpu("sinkhorn")
        if any(v.dtype != torch.float32 for v in given.values()):
            raise TypeError("kdloss: the GPU Sinkhorn takes float32 tensors only")
    if return_grad_x and x is None:
        raise ValueError("kdloss: return_grad_x needs points x and y")
    shapes = {"log_a": (n,), "log_b": (m,), "f_init": (n,), "g_init": (m,), "cost_xx": (n, n),
              "cost_yy": (m, m)}
    extras = {"y": None if y is None else (y[None] if single else y)}
    for k, shp in shapes.items():
        v = tensors[k]
        if v is not None:
            v = v[None] if single else v
            if tuple(v.shape) != (B,) + shp:
                raise ValueError(f"kdloss: {k} has shape {tuple(tensors[k].shape)}, expected "
                                 f"{shp if single else (B,) + shp}")
        extras[k] = v
    extras["self_yy"] = None if self_yy is None else self_yy.reshape(B)
    side = {"want_plan": bool(return_plan), "want_potentials": bool(return_potentials),
            "want_grad_x": bool(return_grad_x)}
    c3 = None if cost is None else (cost[None] if single else cost)
    x3 = None if x is None else (x[None] if single else x)
    meta = (B, n, m, dim, single, dev, dtype)
    value_t = _SinkhornFunction.apply(c3, x3, desc, meta, extras, side)
    out = side["out"]
    if single:
        out = {k: (v.reshape(()) if k == "invalid_problems" else v[0]) for k, v in out.items()}
        value_t = value_t[0]
    out["value"] = value_t
    return out


# ------------------------------------------------------ extensions (kdloss_ext.h)
def _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
               ignore_index):
    return _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction,
                         scale=scale, ignore_index=ignore_index)


def _same_device(pairs):
    dev = pairs[0][1].device
    for name, t in pairs[1:]:
        if t is not None and t.device != dev:
            raise ValueError(f"kdloss: {name} is on {t.device}, {pairs[0][0]} on {dev}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"kdloss: tensors on {dev} are not supported (cpu or cuda only)")
    return dev


def _no_f64_on_cuda(dev, *tensors):
    if dev.type == "cuda" and any(t.dtype == torch.float64 for t in tensors):
        raise TypeError(
            "kdloss: float64 CUDA tensors are not supported by the GPU kernels; use float32, "
            "float16 or bfloat16 on the GPU, or CPU tensors for the float64 reference"
        )


def _loss_out(loss, student_dtype, lead, none):
    loss = loss.to(torch.float64 if student_dtype == torch.float64 else torch.float32)
    return loss.reshape(lead) if none else loss.reshape(())


def _scaled_grad(grad, grad_out, none, dtype, shape):
    """grad [N, ...] times the upstream gradient (per row for reduction
    none), cast to dtype and viewed as shape."""
    if none:
        g = grad * grad_out.reshape((-1,) + (1,) * (grad.dim() - 1)).to(grad.dtype)
    else:
        g = grad * grad_out.to(grad.dtype)
    return g.to(dtype).view(shape)


class _SparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, indices, logprobs, labels, desc, mode, raise_on_invalid, side):
        s2, N, V, lds = _rows(student.detach())
        i2, _, k, ldi = _rows(indices.detach())
        l2, _, _, ldl = _rows(logprobs.detach())
        dev = student.device
        cuda = dev.type == "cuda"
        if cuda:
            _lib.require_ext_gpu("sparse_distill_loss")
            out_dtype, grad_dtype = torch.float32, student.dtype
        else:
            out_dtype = grad_dtype = torch.float64
        none = desc.reduction == _lib.REDUCTION_NONE
        want_grad = ctx.needs_input_grad[0]
        loss = torch.zeros(N if none else 1, dtype=out_dtype, device=dev)
        grad = torch.empty((N, V), dtype=grad_dtype, device=dev) if want_grad else None
        counters = torch.zeros(3, dtype=torch.int64, device=dev)  # info, valid, bad index rows

        a = _lib.new_sparse_args()
        a.mode, a.rows, a.vocab, a.k = mode, N, V, k
        a.student, a.ld_student = _ptr(s2), lds
        a.student_dtype = _lib.DTYPE[_DTYPES[student.dtype]]
        a.teacher_indices, a.ld_indices = _ptr(i2), ldi
        a.teacher_logprobs, a.ld_logprobs = _ptr(l2), ldl
        a.teacher_dtype = _lib.DTYPE[_DTYPES[logprobs.dtype]]
        a.labels = _ptr(labels)
        if grad is not None:
            a.grad, a.ld_grad = _ptr(grad), V
            a.grad_dtype = _lib.DTYPE[_DTYPES[grad_dtype]]
        a.out_dtype = _lib.DTYPE[_DTYPES[out_dtype]]
        a.loss = _ptr(loss)
        base = counters.data_ptr()
        a.info, a.valid_rows, a.bad_index_rows = base, base + 8, base + 16
        L = _lib.lib()
        if cuda:
            _gpu_call(dev, L.kdl_sparse_workspace_size, L.kdl_sparse_loss, desc, a, "kdl_sparse_loss")
        else:
            _lib.check(L.kdl_ref_sparse_loss(ctypes.byref(desc), ctypes.byref(a)),
                       "kdl_ref_sparse_loss")
        if raise_on_invalid:
            n_invalid, _, n_bad = counters.tolist()  # host sync on CUDA
            if n_invalid:
                from .numpy import _sparse_reason

                raise _lib.InvalidRowsError(n_invalid, N, reason=_sparse_reason(n_bad))
        side["counters"] = counters
        ctx.none = none
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return _loss_out(loss, student.dtype, student.shape[:-1], none)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        nones = (None,) * 7
        if not ctx.saved_tensors:
            return (None,) + nones
        (grad,) = ctx.saved_tensors
        return (_scaled_grad(grad, grad_out, ctx.none, ctx.student_dtype, ctx.student_shape),) + nones


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
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_indices, "teacher_indices", "support", "k", dtypes=(torch.int64,))
    _check_logits(teacher_logprobs, "teacher_logprobs", "support", "k")
    if teacher_indices.shape != teacher_logprobs.shape:
        raise ValueError(f"kdloss: teacher_indices shape {tuple(teacher_indices.shape)} != "
                         f"teacher_logprobs shape {tuple(teacher_logprobs.shape)}")
    if teacher_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"kdloss: the teacher's support {tuple(teacher_indices.shape)} and the "
                         f"student {tuple(student_logits.shape)} differ in their leading (row) shape")
    dev = _same_device([("student_logits", student_logits), ("teacher_indices", teacher_indices),
                        ("teacher_logprobs", teacher_logprobs)])
    _no_f64_on_cuda(dev, student_logits, teacher_logprobs)
    desc = _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                      ignore_index)
    mode_code = _lib.parse_sparse_mode(mode)
    lab = _check_labels(labels, student_logits)
    if check_indices:
        i2, N, k, ldi = _rows(teacher_indices.detach().cpu())
        _lib.check(_lib.lib().kdl_sparse_check_indices(N, student_logits.shape[-1], k, _ptr(i2), ldi),
                   "kdl_sparse_check_indices")
    side = {}
    loss = _SparseFunction.apply(student_logits, teacher_indices, teacher_logprobs, lab, desc,
                                 mode_code, bool(raise_on_invalid), side)
    if not return_stats:
        return loss
    c = side["counters"]
    return loss, {"valid_rows": c[1].reshape(()), "invalid_rows": c[0].reshape(()),
                  "bad_index_rows": c[2].reshape(())}


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, labels, desc, chunk_rows, raise_on_invalid, side):
        h2, N, D, ldh = _rows(hidden.detach())
        w2, V, _, ldw = _rows(weight.detach())
        t2, _, _, ldt = _rows(teacher.detach())
        dev = hidden.device
        cuda = dev.type == "cuda"
        if cuda:
            _lib.require_ext_gpu("fused_linear_distill_loss")
            out_dtype = grad_dtype = torch.float32
        else:
            out_dtype = grad_dtype = torch.float64
        none = desc.reduction == _lib.REDUCTION_NONE
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # reduction none: the upstream gradient weights the rows, which the
        # fused call cannot apply to dW; backward recomputes chunk by chunk
        fused_grads = not none
        loss = torch.zeros(N if none else 1, dtype=out_dtype, device=dev)
        gh = torch.empty((N, D), dtype=grad_dtype, device=dev) if fused_grads and want_h else None
        gw = torch.empty((V, D), dtype=grad_dtype, device=dev) if fused_grads and want_w else None
        counters = torch.zeros(2, dtype=torch.int64, device=dev)

        a = _lib.new_fused_linear_args()
        a.rows, a.hidden, a.vocab = N, D, V
        a.hidden_states, a.ld_hidden = _ptr(h2), ldh
        a.hidden_dtype = _lib.DTYPE[_DTYPES[hidden.dtype]]
        a.weight, a.ld_weight = _ptr(w2), ldw
        a.weight_dtype = _lib.DTYPE[_DTYPES[weight.dtype]]
        a.teacher, a.ld_teacher = _ptr(t2), ldt
        a.teacher_dtype = _lib.DTYPE[_DTYPES[teacher.dtype]]
        a.labels = _ptr(labels)
        if gh is not None:
            a.grad_hidden, a.ld_grad_hidden = _ptr(gh), D
        if gw is not None:
            a.grad_weight, a.ld_grad_weight = _ptr(gw), D
        a.grad_dtype = _lib.DTYPE[_DTYPES[grad_dtype]]
        a.chunk_rows = chunk_rows
        a.out_dtype = _lib.DTYPE[_DTYPES[out_dtype]]
        a.loss = _ptr(loss)
        a.info, a.valid_rows = counters.data_ptr(), counters.data_ptr() + 8
        L = _lib.lib()
        if cuda:
            _gpu_call(dev, L.kdl_fused_linear_workspace_size, L.kdl_fused_linear_loss, desc, a,
                      "kdl_fused_linear_loss")
        else:
            _lib.check(L.kdl_ref_fused_linear_loss(ctypes.byref(desc), ctypes.byref(a)),
                       "kdl_ref_fused_linear_loss")
        if raise_on_invalid:
            n_invalid = int(counters[0].item())  # host sync on CUDA
            if n_invalid:
                raise _lib.InvalidRowsError(n_invalid, N, reason="a NaN or +inf logit, or every "
                                            "logit -inf, in hidden @ weight.T or the teacher")
        side["counters"] = counters
        ctx.none, ctx.desc = none, desc
        ctx.chunk = L.kdl_fused_linear_chunk_rows(ctypes.byref(a))
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        if none:
            ctx.save_for_backward(hidden, weight, teacher, labels)
        else:
            ctx.save_for_backward(gh, gw)
        return _loss_out(loss, hidden.dtype, hidden.shape[:-1], none)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 6
        if not ctx.none:
            gh, gw = ctx.saved_tensors
            dh = (gh * grad_out.to(gh.dtype)).to(ctx.hidden_dtype).view(ctx.hidden_shape) \
                if want_h and gh is not None else None
            dw = (gw * grad_out.to(gw.dtype)).to(ctx.weight_dtype) \
                if want_w and gw is not None else None
            return (dh, dw) + nones
        # reduction none: per chunk of rows, logits = H_c W^T, the dense
        # loss's gradient dL_c (the same loss kernel / reference), weighted
        # by the upstream rows; dH_c = dL_c W, dW += dL_c^T H_c.  Only a
        # [chunk, V] block of logits exists at a time.
        hidden, weight, teacher, labels = ctx.saved_tensors
        h2, N, D, _ = _rows(hidden.detach())
        t2, _, V, _ = _rows(teacher.detach())
        work = torch.float32 if hidden.device.type == "cuda" else torch.float64
        w = weight.detach().to(work)
        go = grad_out.reshape(N).to(work)
        dh = torch.zeros((N, D), dtype=work, device=hidden.device) if want_h else None
        dw = torch.zeros((V, D), dtype=work, device=hidden.device) if want_w else None
        c = max(int(ctx.chunk), 1)
        for r0 in range(0, N, c):
            hc = h2[r0:r0 + c].to(work)
            logits = hc @ w.T
            lab = None if labels is None else labels[r0:r0 + c]
            _, g, _, _, _ = _compute(logits, t2[r0:r0 + c], lab, ctx.desc, True, False)
            g = g.to(work) * go[r0:r0 + c, None]
            if dh is not None:
                dh[r0:r0 + c] = g @ w
            if dw is not None:
                dw += g.T @ hc
        if dh is not None:
            dh = dh.to(ctx.hidden_dtype).view(ctx.hidden_shape)
        if dw is not None:
            dw = dw.to(ctx.weight_dtype)
        return (dh, dw) + nones


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
):
    """Distillation loss of the student logits hidden @ weight.T (an output
    projection without bias) against the teacher's logits, with gradients to
    hidden and weight through autograd, never holding the [N, V] student
    logits: on CUDA kdl_fused_linear_loss goes chunk by chunk over the rows
    (cuBLAS, strict FP32; workspace chunk x V floats), on CPU the float64
    reference kdl_ref_fused_linear_loss.

    hidden: [N, d] or [..., d]; weight: [V, d] (its rows may be strided, e.g.
        tied embeddings); teacher_logits: [..., V] with hidden's leading shape.
        CUDA: hidden and weight float32, the teacher float32, float16 or
        bfloat16, AKL not available (KdlossError NOT_SUPPORTED).  CPU: any of
        float32, float64, float16, bfloat16.
    chunk_rows: rows per chunk on CUDA (0: max(1, N/8), at most 4096).
    Other options as distill_loss; the teacher gets no gradient.

    Gradients: with reduction "mean" or "sum" dH and dW are computed in the
    forward call and scaled by the upstream gradient in backward.  With
    reduction "none" the upstream gradient weights each row, which the fused
    call cannot fold into dW: forward computes the losses only and backward
    recomputes the logits chunk by chunk (torch matmul, then the dense loss
    kernel or reference on each [chunk, V] block).

    Returns the loss (float32; float64 on CPU for float64 hidden), or (loss,
    stats) with return_stats: valid_rows, invalid_rows (0-d int64 tensors).
    """
    _check_logits(hidden, "hidden", "hidden", "d")
    _check_logits(weight, "weight", "hidden", "d")
    _check_logits(teacher_logits, "teacher_logits")
    if weight.dim() != 2:
        raise ValueError(f"kdloss: weight must be [V, d], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"kdloss: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "differ in the hidden size d")
    want = tuple(hidden.shape[:-1]) + (weight.shape[0],)
    if tuple(teacher_logits.shape) != want:
        raise ValueError(f"kdloss: teacher_logits has shape {tuple(teacher_logits.shape)}, "
                         f"expected {want} (hidden's rows, weight's V)")
    dev = _same_device([("hidden", hidden), ("weight", weight), ("teacher_logits", teacher_logits)])
    if dev.type == "cuda":
        if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
            raise TypeError("kdloss: the GPU fused linear + loss takes float32 hidden and weight, "
                            f"got {hidden.dtype} and {weight.dtype}")
        _no_f64_on_cuda(dev, teacher_logits)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) and not hasattr(
            chunk_rows, "__index__"):
        raise TypeError(f"kdloss: chunk_rows must be an integer, got {chunk_rows!r}")
    desc = _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                      ignore_index)
    lab = _check_labels(labels, teacher_logits)
    side = {}
    loss = _FusedLinearFunction.apply(hidden, weight, teacher_logits, lab, desc, int(chunk_rows),
                                      bool(raise_on_invalid), side)
    if not return_stats:
        return loss
    c = side["counters"]
    return loss, {"valid_rows": c[1].reshape(()), "invalid_rows": c[0].reshape(())}


_SHARD_REDUCE = {_lib.SHARD_OP_MAX: "MAX", _lib.SHARD_OP_SUM: "SUM"}


class _VocabParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, desc, geom, group, raise_on_invalid, side):
        import torch.distributed as dist

        offset, vocab, rank, world = geom
        s2, N, W, lds = _rows(student.detach())
        t2, _, _, ldt = _rows(teacher.detach())
        dev = student.device
        cuda = dev.type == "cuda"
        if cuda:
            _lib.require_ext_gpu("vocab_parallel_distill_loss")
            out_dtype, grad_dtype = torch.float32, student.dtype
        else:
            out_dtype = grad_dtype = torch.float64
        none = desc.reduction == _lib.REDUCTION_NONE
        akl = desc.divergence == _lib.lib().kdl_divergence_from_name(b"akl")
        want_grad = ctx.needs_input_grad[0]
        loss = torch.zeros(N if none else 1, dtype=out_dtype, device=dev)
        grad = torch.empty((N, W), dtype=grad_dtype, device=dev) if want_grad else None
        counters = torch.zeros(2, dtype=torch.int64, device=dev)
        head_size = torch.zeros(N, dtype=torch.int64, device=dev) \
            if akl and side["want_stats"] else None

        a = _lib.new_shard_args()
        a.rows, a.vocab, a.vocab_offset, a.vocab_local = N, vocab, offset, W
        a.shard_rank, a.num_shards = rank, world
        a.student, a.ld_student = _ptr(s2), lds
        a.student_dtype = _lib.DTYPE[_DTYPES[student.dtype]]
        a.teacher, a.ld_teacher = _ptr(t2), ldt
        a.teacher_dtype = _lib.DTYPE[_DTYPES[teacher.dtype]]
        a.labels = _ptr(labels)
        if grad is not None:
            a.grad, a.ld_grad = _ptr(grad), W
            a.grad_dtype = _lib.DTYPE[_DTYPES[grad_dtype]]
        a.out_dtype = _lib.DTYPE[_DTYPES[out_dtype]]
        a.loss = _ptr(loss)
        a.info, a.valid_rows = counters.data_ptr(), counters.data_ptr() + 8
        a.stat_head_size = _ptr(head_size)
        state_bytes, ex_count, num_steps = _lib.shard_sizes(desc, a)
        # the opaque per-shard state (host for the reference, device for the
        # GPU path) and the exchange buffer the all-reduces work on
        state = torch.zeros(state_bytes, dtype=torch.uint8, device=dev)
        exchange = torch.zeros(max(ex_count, 1), dtype=torch.float64, device=dev)
        a.state, a.exchange = _ptr(state), _ptr(exchange)

        L = _lib.lib()
        op, count = ctypes.c_int(0), ctypes.c_int64(0)
        ctx_dev = torch.cuda.device(dev) if cuda else contextlib.nullcontext()
        with ctx_dev:
            if cuda:
                h = _lib.handle_for_current_device(dev.index)
                _lib.check(L.kdl_set_stream(h, ctypes.c_void_p(
                    torch.cuda.current_stream(dev).cuda_stream)), "kdl_set_stream")
            for s in range(num_steps):
                if cuda:
                    st = L.kdl_shard_step(h, ctypes.byref(desc), ctypes.byref(a), s,
                                          ctypes.byref(op), ctypes.byref(count))
                    _lib.check(st, "kdl_shard_step")
                else:
                    st = L.kdl_ref_shard_step(ctypes.byref(desc), ctypes.byref(a), s,
                                              ctypes.byref(op), ctypes.byref(count))
                    _lib.check(st, "kdl_ref_shard_step")
                if op.value == _lib.SHARD_OP_DONE:
                    break
                if count.value:  # the same on every shard: every shard skips it or not
                    dist.all_reduce(exchange[:count.value],
                                    op=getattr(dist.ReduceOp, _SHARD_REDUCE[op.value]),
                                    group=group)
        if raise_on_invalid:
            n_invalid = int(counters[0].item())  # the same on every shard; host sync on CUDA
            if n_invalid:
                raise _lib.InvalidRowsError(n_invalid, N)
        side["counters"], side["head_size"] = counters, head_size
        ctx.none = none
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return _loss_out(loss, student.dtype, student.shape[:-1], none)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        nones = (None,) * 7
        if not ctx.saved_tensors:
            return (None,) + nones
        (grad,) = ctx.saved_tensors
        return (_scaled_grad(grad, grad_out, ctx.none, ctx.student_dtype, ctx.student_shape),) + nones


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

    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kdloss: student_logits shape {tuple(student_logits.shape)} != "
                         f"teacher_logits shape {tuple(teacher_logits.shape)}")
    dev = _same_device([("student_logits", student_logits), ("teacher_logits", teacher_logits)])
    _no_f64_on_cuda(dev, student_logits, teacher_logits)
    desc = _loss_desc(divergence, temperature, alpha, beta, head_rule, mu, top_k, reduction, scale,
                      ignore_index)
    _lib.require_ext("vocab_parallel_distill_loss")
    lab = _check_labels(labels, student_logits)
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
    for name, val in (("vocab_offset", vocab_offset), ("vocab", vocab)):
        if isinstance(val, bool) or not isinstance(val, int) and not hasattr(val, "__index__"):
            raise TypeError(f"kdloss: {name} must be an integer, got {val!r}")
    side = {"want_stats": bool(return_stats)}
    loss = _VocabParallelFunction.apply(student_logits, teacher_logits, lab, desc,
                                        (int(vocab_offset), int(vocab), rank, world), group,
                                        bool(raise_on_invalid), side)
    if not return_stats:
        return loss
    c = side["counters"]
    stats = {"valid_rows": c[1].reshape(()), "invalid_rows": c[0].reshape(())}
    if side["head_size"] is not None:
        stats["head_size"] = side["head_size"].reshape(student_logits.shape[:-1])
    return loss, stats
