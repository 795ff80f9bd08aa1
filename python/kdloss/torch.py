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
_OT_MISSING = (
    "kdloss.torch.{name}: the Sinkhorn / SinKD C API (include/kdloss/kdloss_ot.h) is not "
    "available in this version of the binding yet"
)


def sinkd_loss(*args, **kwargs):
    """SinKD loss (Sinkhorn distance between student and teacher
    distributions).  Not bound yet: raises NotImplementedError."""
    raise NotImplementedError(_OT_MISSING.format(name="sinkd_loss"))


def sinkhorn(*args, **kwargs):
    """Batched log-domain Sinkhorn.  Not bound yet: raises NotImplementedError."""
    raise NotImplementedError(_OT_MISSING.format(name="sinkhorn"))
