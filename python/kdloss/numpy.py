"""kdloss for NumPy arrays: the float64 CPU reference, no torch needed.

    loss, grad, stats = kdloss.numpy.distill_loss(student, teacher, divergence="fkl")

Maths, options and conventions are those of kdloss.torch.distill_loss (and of
the C library's kdl_ref_loss_forward_backward); see python/README.md.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib

__all__ = ["distill_loss"]

_DTYPES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.float16): "f16",
}


def _kdl_dtype(a, name):
    t = _DTYPES.get(a.dtype)
    if t is None and a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:
        t = "bf16"  # e.g. ml_dtypes.bfloat16: passed as its raw 16-bit words
    if t is None:
        raise TypeError(
            f"kdloss: {name} has dtype {a.dtype}; expected float32, float64, float16 or bfloat16"
        )
    return _lib.DTYPE[t]


def _rows(a, name):
    """[..., V] array -> ([N, V] view or copy, N, V, ld in elements)."""
    if a.ndim < 1:
        raise ValueError(f"kdloss: {name} must have shape [N, V] or [..., V], got a scalar")
    V = a.shape[-1]
    if V < 1:
        raise ValueError(f"kdloss: {name} has an empty vocabulary dimension (shape {a.shape})")
    item = a.itemsize
    if V > 1 and a.size and a.strides[-1] != item:
        raise ValueError(
            f"kdloss: {name} must be contiguous in its last (vocabulary) dimension, got strides "
            f"{a.strides} for itemsize {item}; use np.ascontiguousarray({name})"
        )
    N = int(np.prod(a.shape[:-1], dtype=np.int64))
    a2 = a.reshape(N, V)  # a view when the leading dims allow it, else a copy
    if N <= 1:
        return a2, N, V, V
    s0 = a2.strides[0]
    if s0 % item != 0 or s0 < V * item:
        # overlapping, broadcast or reversed rows: copy into plain rows
        a2 = np.ascontiguousarray(a2)
        s0 = a2.strides[0]
    return a2, N, V, s0 // item


def _ptr(a):
    return ctypes.c_void_p(a.ctypes.data) if a is not None and a.size else None


def distill_loss(
    student,
    teacher,
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
    compute_grad=True,
):
    """Distillation loss of student logits against teacher logits, its
    gradient with respect to the student logits, and per-token statistics,
    computed by the float64 CPU reference.

    student, teacher: arrays of shape [N, V] or [..., V] (same shape; float32,
        float64, float16 or bfloat16; they may differ), contiguous in the last
        dimension; rows may be strided (a slice of a wider array).
    labels: optional int64 array of shape [N] or [...] (the leading dims);
        rows whose label equals ignore_index are ignored (loss 0, zero
        gradient, not counted).
    divergence: "fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl".
    head_rule (AKL): "reference", "mass", "topk"; mu, top_k its parameters.
    alpha: SKL/SRKL skew in [0, 1); beta: JSD weight in (0, 1).
    reduction: "mean" (over valid rows), "sum" or "none".
    scale multiplies loss and gradient (e.g. temperature**2).

    Returns (loss, grad, stats):
      loss: numpy float64 scalar (mean, sum) or float64 array of the leading
        shape (none; NaN on invalid rows, 0 on ignored rows);
      grad: float64 array of the student's shape, d loss / d student (for
        reduction none: the gradient of the sum of the per-token losses), or
        None when compute_grad is False;
      stats: dict of arrays of the leading shape: fkl, rkl, g_head, g_tail,
        w_head, w_tail (float64), head_size (int64); and valid_rows,
        invalid_rows (int).

    Raises TypeError / ValueError on bad arguments (KdlossValueError, a
    ValueError and RuntimeError, for values the library refuses), and
    InvalidRowsError when a row is invalid unless raise_on_invalid=False.
    """
    desc = _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction,
                         scale=scale, ignore_index=ignore_index)
    if not isinstance(student, np.ndarray) or not isinstance(teacher, np.ndarray):
        raise TypeError("kdloss: student and teacher must be numpy arrays "
                        f"(got {type(student).__name__} and {type(teacher).__name__})")
    if student.shape != teacher.shape:
        raise ValueError(f"kdloss: student shape {student.shape} != teacher shape {teacher.shape}")
    s_dt = _kdl_dtype(student, "student")
    t_dt = _kdl_dtype(teacher, "teacher")
    lead = student.shape[:-1] if student.ndim else ()
    s2, N, V, lds = _rows(student, "student")
    t2, _, _, ldt = _rows(teacher, "teacher")

    lab = None
    if labels is not None:
        if not isinstance(labels, np.ndarray):
            raise TypeError(f"kdloss: labels must be a numpy int64 array, got {type(labels).__name__}")
        if labels.dtype != np.int64:
            raise TypeError(f"kdloss: labels must have dtype int64, got {labels.dtype}")
        if labels.shape != lead and labels.shape != (N,):
            raise ValueError(f"kdloss: labels shape {labels.shape} does not match the rows of the "
                             f"logits (expected {lead} or ({N},))")
        lab = np.ascontiguousarray(labels.reshape(N))

    none = desc.reduction == _lib.REDUCTION_NONE
    loss = np.zeros(N if none else 1, dtype=np.float64)
    grad = np.zeros((N, V), dtype=np.float64) if compute_grad else None
    stats = {k: np.zeros(N, dtype=np.float64) for k in _lib.FLOAT_STATS}
    head_size = np.zeros(N, dtype=np.int64)
    info = np.zeros(1, dtype=np.int64)
    valid = np.zeros(1, dtype=np.int64)

    a = _lib.new_args()
    a.rows, a.vocab = N, V
    a.student, a.ld_student, a.student_dtype = _ptr(s2), lds, s_dt
    a.teacher, a.ld_teacher, a.teacher_dtype = _ptr(t2), ldt, t_dt
    a.labels = _ptr(lab)
    if grad is not None:
        a.grad, a.ld_grad, a.grad_dtype = _ptr(grad), V, _lib.DTYPE["f64"]
    a.out_dtype = _lib.DTYPE["f64"]
    a.loss = _ptr(loss)
    for k in _lib.FLOAT_STATS:
        setattr(a, "stat_" + k, _ptr(stats[k]))
    a.stat_head_size = _ptr(head_size)
    a.info = _ptr(info)
    a.valid_rows = _ptr(valid)

    _lib.check(_lib.lib().kdl_ref_loss_forward_backward(ctypes.byref(desc), ctypes.byref(a)),
               "kdl_ref_loss_forward_backward")
    n_invalid = int(info[0])
    if n_invalid and raise_on_invalid:
        raise _lib.InvalidRowsError(n_invalid, N)

    out = {k: v.reshape(lead) for k, v in stats.items()}
    out["head_size"] = head_size.reshape(lead)
    out["valid_rows"] = int(valid[0])
    out["invalid_rows"] = n_invalid
    loss_out = loss.reshape(lead) if none else np.float64(loss[0])
    if grad is not None:
        grad = grad.reshape(student.shape)
    return loss_out, grad, out
