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
and sinkhorn (batched log-domain Sinkhorn, differentiable in cost and x).
"""

from __future__ import annotations

import ctypes

import torch

from . import _lib

__all__ = ["distill_loss", "DistillLoss", "sinkd_loss", "sinkhorn"]

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
}


# ---------------------------------------------------------------- checks
def _check_logits(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kdloss: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"kdloss: {name} has dtype {x.dtype}; expected float32, float16, bfloat16 or float64"
        )
    if x.dim() < 1:
        raise ValueError(f"kdloss: {name} must have shape [N, V] or [..., V], got a scalar")
    if x.shape[-1] < 1:
        raise ValueError(f"kdloss: {name} has an empty vocabulary dimension (shape {tuple(x.shape)})")
    if x.shape[-1] > 1 and x.numel() and x.stride(-1) != 1:
        raise ValueError(
            f"kdloss: {name} must be contiguous in its last (vocabulary) dimension, got stride "
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
