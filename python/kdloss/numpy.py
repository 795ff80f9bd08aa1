"""kdloss for NumPy arrays: the float64 CPU reference, no torch needed.

    loss, grad, stats = kdloss.numpy.distill_loss(student, teacher, divergence="fkl")

Maths, options and conventions are those of kdloss.torch.distill_loss (and of
the C library's kdl_ref_loss_forward_backward); see python/README.md.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib

__all__ = [
    "distill_loss",
    "sinkhorn",
    "sinkd_loss",
    "sparse_distill_loss",
    "fused_linear_distill_loss",
    "VocabShard",
    "vocab_parallel_distill_loss",
]

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


def _rows(a, name, what="vocabulary", last="V"):
    """[..., V] array -> ([N, V] view or copy, N, V, ld in elements)."""
    if a.ndim < 1:
        raise ValueError(f"kdloss: {name} must have shape [N, {last}] or [..., {last}], got a scalar")
    V = a.shape[-1]
    if V < 1:
        raise ValueError(f"kdloss: {name} has an empty {what} dimension (shape {a.shape})")
    item = a.itemsize
    if V > 1 and a.size and a.strides[-1] != item:
        raise ValueError(
            f"kdloss: {name} must be contiguous in its last ({what}) dimension, got strides "
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


# ------------------------------------------------------------------ Sinkhorn
def _f64(a, name, shape=None):
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"kdloss: {name} must be a numpy array, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"kdloss: {name} must be a float array, got dtype {a.dtype}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"kdloss: {name} has shape {a.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(a, dtype=np.float64)


def sinkhorn(cost=None, x=None, y=None, epsilon=0.1, log_a=None, log_b=None, metric="sqeuclidean",
             value="transport", max_iter=1000, tol=1e-6, check_every=10, eps_scaling=False,
             eps_scaling_factor=0.8, eps_stage_iter=1, debias=False, cost_xx=None, cost_yy=None,
             self_yy=None, f_init=None, g_init=None, return_plan=False, return_potentials=False,
             return_grad_x=False):
    """Batched log-domain Sinkhorn (float64 CPU reference).

    The problems: cost [n, m] (one) or [B, n, m]; or points x [n, d] / [B, n, d]
    and y [m, d] / [B, m, d] with metric "sqeuclidean" or "l1".  log_a [B, n],
    log_b [B, m]: log-weights (default uniform).  value "transport" <P, C> or
    "dual" <a, f> + <b, g>; debias gives the Sinkhorn divergence (with a given
    cost it needs cost_xx [B, n, n] and cost_yy [B, m, m], or self_yy [B] =
    V(b, b) from an earlier call).  tol = 0 runs exactly max_iter iterations.

    Returns a dict of float64 arrays over the problems (scalars for one
    problem): value, iterations (int64), marginal_error; plan [B, n, m] with
    return_plan; f [B, n], g [B, m] with return_potentials; grad_x [B, n, d]
    (d value / d x, the plan held fixed) with return_grad_x; self_yy with
    debias.  Ragged batches (per-problem sizes) are in the C API only.
    """
    desc = _lib.new_sinkhorn_desc(epsilon=epsilon, max_iter=max_iter, tol=tol,
                                  check_every=check_every, eps_scaling=eps_scaling,
                                  eps_scaling_factor=eps_scaling_factor,
                                  eps_stage_iter=eps_stage_iter, value=value, debias=debias,
                                  metric=metric)
    if (cost is None) == (x is None and y is None):
        raise ValueError("kdloss: give either cost, or the points x and y")
    if cost is not None:
        if not isinstance(cost, np.ndarray) or cost.ndim not in (2, 3):
            raise ValueError("kdloss: cost must be a numpy array [n, m] or [B, n, m]")
        single = cost.ndim == 2
        C = _f64(cost[None] if single else cost, "cost")
        B, n, m = C.shape
        dim = 0
        X = Y = None
    else:
        if x is None or y is None:
            raise ValueError("kdloss: points need both x and y")
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise TypeError("kdloss: x and y must be numpy arrays")
        if x.ndim not in (2, 3) or y.ndim != x.ndim:
            raise ValueError(f"kdloss: x and y must be [n, d] / [m, d] or [B, n, d] / [B, m, d], "
                             f"got {x.shape} and {y.shape}")
        single = x.ndim == 2
        X = _f64(x[None] if single else x, "x")
        Y = _f64(y[None] if single else y, "y")
        if X.shape[0] != Y.shape[0] or X.shape[2] != Y.shape[2]:
            raise ValueError(f"kdloss: x {x.shape} and y {y.shape} differ in batch or dimension")
        B, n, dim = X.shape
        m = Y.shape[1]
        C = None
    if return_grad_x and X is None:
        raise ValueError("kdloss: return_grad_x needs points x and y")

    def batched(a, name, shape):
        if a is None:
            return None
        return _f64(a[None] if single else a, name, (B,) + shape)

    la = batched(log_a, "log_a", (n,))
    lb = batched(log_b, "log_b", (m,))
    fi = batched(f_init, "f_init", (n,))
    gi = batched(g_init, "g_init", (m,))
    cxx = batched(cost_xx, "cost_xx", (n, n))
    cyy = batched(cost_yy, "cost_yy", (m, m))
    syy_in = None if self_yy is None else _f64(np.atleast_1d(np.asarray(self_yy, dtype=np.float64)),
                                               "self_yy", (B,))

    out = {"value": np.zeros(B), "iterations": np.zeros(B, dtype=np.int64),
           "marginal_error": np.zeros(B)}
    if return_plan:
        out["plan"] = np.zeros((B, n, m))
    if return_potentials:
        out["f"] = np.zeros((B, n))
        out["g"] = np.zeros((B, m))
    if return_grad_x:
        out["grad_x"] = np.zeros((B, n, dim))
    if debias:
        out["self_yy"] = syy_in.copy() if syy_in is not None else np.zeros(B)

    a = _lib.new_sinkhorn_args()
    a.batch, a.n, a.m, a.dim = B, n, m, dim
    a.dtype = _lib.DTYPE["f64"]
    a.cost, a.x, a.y = _ptr(C), _ptr(X), _ptr(Y)
    a.log_a, a.log_b, a.f_init, a.g_init = _ptr(la), _ptr(lb), _ptr(fi), _ptr(gi)
    a.cost_xx, a.cost_yy = _ptr(cxx), _ptr(cyy)
    if debias:
        a.self_yy = _ptr(out["self_yy"])
        a.self_yy_given = 1 if syy_in is not None else 0
    a.value = _ptr(out["value"])
    a.iterations = _ptr(out["iterations"])
    a.marginal_error = _ptr(out["marginal_error"])
    a.plan = _ptr(out.get("plan"))
    a.f, a.g = _ptr(out.get("f")), _ptr(out.get("g"))
    a.grad_x = _ptr(out.get("grad_x"))
    _lib.check(_lib.lib().kdl_ref_sinkhorn(ctypes.byref(desc), ctypes.byref(a)), "kdl_ref_sinkhorn")
    if single:
        out = {k: v[0] for k, v in out.items()}
    return out


def sinkd_loss(student, teacher, group_size=0, temperature=2.0, epsilon=0.1, max_iter=20, tol=0.0,
               check_every=10, metric="l1", scale=1.0, raise_on_invalid=True, compute_grad=True,
               return_plan=False):
    """SinKD loss (float64 CPU reference): per group of group_size rows (0:
    one group of all rows), the Sinkhorn distance <P, C> between the
    student's and the teacher's softmax(logits / temperature) rows under an
    L1 (or squared L2) cost over the vocabulary, uniform marginals, averaged
    over the valid groups and multiplied by scale.  (SinKD's code normalises
    the plan to mass n: its number is n times this one.)

    student, teacher: [N, V] or [..., V] (rows flattened), as distill_loss.
    Returns (loss, grad, stats): loss a float64 scalar; grad d loss / d
    student (the plan held fixed) of the student's shape, float64, or None;
    stats: group_loss, iterations, marginal_error ([G]), invalid_groups, and
    plan [G, n, n] with return_plan.
    """
    desc = _lib.new_sinkd_desc(group_size=group_size, temperature=temperature, epsilon=epsilon,
                               max_iter=max_iter, tol=tol, check_every=check_every, metric=metric,
                               scale=scale)
    if not isinstance(student, np.ndarray) or not isinstance(teacher, np.ndarray):
        raise TypeError("kdloss: student and teacher must be numpy arrays "
                        f"(got {type(student).__name__} and {type(teacher).__name__})")
    if student.shape != teacher.shape:
        raise ValueError(f"kdloss: student shape {student.shape} != teacher shape {teacher.shape}")
    s_dt = _kdl_dtype(student, "student")
    t_dt = _kdl_dtype(teacher, "teacher")
    s2, N, V, lds = _rows(student, "student")
    t2, _, _, ldt = _rows(teacher, "teacher")
    n = desc.group_size if desc.group_size > 0 else N
    G = N // n if n > 0 and N % n == 0 else 0  # the library refuses a ragged split

    loss = np.zeros(1)
    grad = np.zeros((N, V)) if compute_grad else None
    stats = {"group_loss": np.zeros(G), "iterations": np.zeros(G, dtype=np.int64),
             "marginal_error": np.zeros(G)}
    if return_plan:
        stats["plan"] = np.zeros((G, n, n))
    info = np.zeros(1, dtype=np.int64)

    a = _lib.new_sinkd_args()
    a.rows, a.vocab = N, V
    a.student, a.ld_student, a.student_dtype = _ptr(s2), lds, s_dt
    a.teacher, a.ld_teacher, a.teacher_dtype = _ptr(t2), ldt, t_dt
    if grad is not None:
        a.grad, a.ld_grad, a.grad_dtype = _ptr(grad), V, _lib.DTYPE["f64"]
    a.out_dtype = _lib.DTYPE["f64"]
    a.loss = _ptr(loss)
    a.group_loss = _ptr(stats["group_loss"])
    a.iterations = _ptr(stats["iterations"])
    a.marginal_error = _ptr(stats["marginal_error"])
    a.plan = _ptr(stats.get("plan"))
    a.info = _ptr(info)
    _lib.check(_lib.lib().kdl_ref_sinkd(ctypes.byref(desc), ctypes.byref(a)), "kdl_ref_sinkd")
    n_invalid = int(info[0])
    if n_invalid and raise_on_invalid:
        raise _lib.InvalidRowsError(n_invalid, G, unit="groups")
    stats["invalid_groups"] = n_invalid
    if grad is not None:
        grad = grad.reshape(student.shape)
    return np.float64(loss[0]), grad, stats


# ------------------------------------------------------ extensions (kdloss_ext.h)
def _check_array(a, name):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"kdloss: {name} must be a numpy array, got {type(a).__name__}")


def _labels(labels, lead, N):
    if labels is None:
        return None
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"kdloss: labels must be a numpy int64 array, got {type(labels).__name__}")
    if labels.dtype != np.int64:
        raise TypeError(f"kdloss: labels must have dtype int64, got {labels.dtype}")
    if labels.shape != tuple(lead) and labels.shape != (N,):
        raise ValueError(f"kdloss: labels shape {labels.shape} does not match the rows "
                         f"(expected {tuple(lead)} or ({N},))")
    return np.ascontiguousarray(labels.reshape(N))


def _sparse_reason(bad_index_rows):
    return ("a NaN or +inf student logit or every one -inf; a teacher log-prob NaN or > 0; "
            f"an index out of [0, V) or repeated in its row ({int(bad_index_rows)} rows); "
            "renormalised: every log-prob -inf; tail: given teacher mass > 1 + 1e-3")


def _sparse_inputs(student, teacher_indices, teacher_logprobs):
    """Shape and dtype checks shared by the NumPy door: returns the row views
    and sizes."""
    _check_array(student, "student")
    _check_array(teacher_indices, "teacher_indices")
    _check_array(teacher_logprobs, "teacher_logprobs")
    if teacher_indices.dtype != np.int64:
        raise TypeError(f"kdloss: teacher_indices must have dtype int64, got {teacher_indices.dtype}")
    if teacher_indices.shape != teacher_logprobs.shape:
        raise ValueError(f"kdloss: teacher_indices shape {teacher_indices.shape} != "
                         f"teacher_logprobs shape {teacher_logprobs.shape}")
    if student.ndim < 1 or teacher_indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"kdloss: the teacher's support {teacher_indices.shape} and the student "
                         f"{student.shape} differ in their leading (row) shape")
    return (_rows(student, "student"), _rows(teacher_indices, "teacher_indices", "support", "k"),
            _rows(teacher_logprobs, "teacher_logprobs", "support", "k"))


def sparse_distill_loss(
    student,
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
    compute_grad=True,
):
    """Distillation loss against a sparse teacher given per row as its top-k
    (indices, log-probabilities), by the float64 CPU reference
    (kdl_ref_sparse_loss).

    student: [N, V] or [..., V] logits (float32, float64, float16, bfloat16).
    teacher_indices: int64 [..., k], distinct per row, in [0, V), any order;
    teacher_logprobs: [..., k] the teacher's log-probabilities of those tokens
        at the distillation temperature (temperature divides the student only).
    mode: "renormalised" (the top-k renormalised on the support against the
        full-vocabulary student softmax; fkl, jsd, tvd, skl, srkl) or "tail"
        (alias "tail_bucket": k support cells plus one bucket of the rest;
        every divergence, the AKL head among the support cells).
    check_indices: check the indices first (kdl_sparse_check_indices) and
        raise KdlossValueError (BAD_PARAM) on an index out of range or
        repeated, instead of making the row invalid.
    Other options as distill_loss.

    Returns (loss, grad, stats): loss a float64 scalar (mean, sum) or array of
    the leading shape (none); grad d loss / d student, float64 of the
    student's shape, or None; stats valid_rows, invalid_rows, bad_index_rows.
    """
    desc = _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction,
                         scale=scale, ignore_index=ignore_index)
    m = _lib.parse_sparse_mode(mode)
    (s2, N, V, lds), (i2, _, k, ldi), (l2, _, _, ldl) = _sparse_inputs(
        student, teacher_indices, teacher_logprobs)
    s_dt = _kdl_dtype(student, "student")
    t_dt = _kdl_dtype(teacher_logprobs, "teacher_logprobs")
    lead = student.shape[:-1]
    lab = _labels(labels, lead, N)
    if check_indices:
        _lib.check(_lib.lib().kdl_sparse_check_indices(N, V, k, _ptr(i2), ldi),
                   "kdl_sparse_check_indices")
    none = desc.reduction == _lib.REDUCTION_NONE
    loss = np.zeros(N if none else 1)
    grad = np.zeros((N, V)) if compute_grad else None
    counters = np.zeros(3, dtype=np.int64)  # info, valid, bad index rows
    a = _sparse_args(desc, m, (s2, N, V, lds, s_dt), (i2, k, ldi), (l2, ldl, t_dt), lab, grad,
                     _lib.DTYPE["f64"], loss, counters)
    _lib.check(_lib.lib().kdl_ref_sparse_loss(ctypes.byref(desc), ctypes.byref(a)),
               "kdl_ref_sparse_loss")
    n_invalid, n_valid, n_bad = (int(x) for x in counters)
    if n_invalid and raise_on_invalid:
        raise _lib.InvalidRowsError(n_invalid, N, reason=_sparse_reason(n_bad))
    stats = {"valid_rows": n_valid, "invalid_rows": n_invalid, "bad_index_rows": n_bad}
    if grad is not None:
        grad = grad.reshape(student.shape)
    return (loss.reshape(lead) if none else np.float64(loss[0])), grad, stats


def _sparse_args(desc, mode, student, support, logprobs, labels, grad, grad_dtype, loss, counters):
    """A SparseArgs over arrays already checked (counters: int64 [3] for
    info, valid_rows, bad_index_rows)."""
    s2, N, V, lds, s_dt = student
    i2, k, ldi = support
    l2, ldl, t_dt = logprobs
    a = _lib.new_sparse_args()
    a.mode, a.rows, a.vocab, a.k = mode, N, V, k
    a.student, a.ld_student, a.student_dtype = _ptr(s2), lds, s_dt
    a.teacher_indices, a.ld_indices = _ptr(i2), ldi
    a.teacher_logprobs, a.ld_logprobs, a.teacher_dtype = _ptr(l2), ldl, t_dt
    a.labels = _ptr(labels)
    if grad is not None:
        a.grad, a.ld_grad, a.grad_dtype = _ptr(grad), V, grad_dtype
    a.out_dtype = _lib.DTYPE["f64"]
    a.loss = _ptr(loss)
    base = counters.ctypes.data
    a.info, a.valid_rows, a.bad_index_rows = base, base + 8, base + 16
    return a


def fused_linear_distill_loss(
    hidden,
    weight,
    teacher,
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
    compute_grad=True,
):
    """Distillation loss of the student logits hidden @ weight.T (no bias)
    against the teacher's logits, with the gradients to hidden and weight, by
    the float64 CPU reference (kdl_ref_fused_linear_loss; it materialises the
    float64 logits in C, as a reference does).

    hidden: [N, d] or [..., d]; weight: [V, d]; teacher: [..., V] logits of
    the same leading shape as hidden.  Any of float32, float64, float16,
    bfloat16.  chunk_rows is the GPU path's chunk (ignored here).  Other
    options as distill_loss.

    Returns (loss, grad_hidden, grad_weight, stats): grad_hidden of hidden's
    shape and grad_weight [V, d], float64 (None when compute_grad is False;
    for reduction none the gradients of the sum of the per-token losses);
    stats valid_rows, invalid_rows.
    """
    desc = _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         head_rule=head_rule, mu=mu, top_k=top_k, reduction=reduction,
                         scale=scale, ignore_index=ignore_index)
    _check_array(hidden, "hidden")
    _check_array(weight, "weight")
    _check_array(teacher, "teacher")
    if weight.ndim != 2:
        raise ValueError(f"kdloss: weight must be [V, d], got shape {weight.shape}")
    if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"kdloss: hidden {hidden.shape} and weight {weight.shape} differ in the "
                         "hidden size d")
    if teacher.shape != hidden.shape[:-1] + (weight.shape[0],):
        raise ValueError(f"kdloss: teacher has shape {teacher.shape}, expected "
                         f"{hidden.shape[:-1] + (weight.shape[0],)} (hidden's rows, weight's V)")
    h_dt = _kdl_dtype(hidden, "hidden")
    w_dt = _kdl_dtype(weight, "weight")
    t_dt = _kdl_dtype(teacher, "teacher")
    h2, N, D, ldh = _rows(hidden, "hidden", "hidden", "d")
    w2, V, _, ldw = _rows(weight, "weight", "hidden", "d")
    t2, _, _, ldt = _rows(teacher, "teacher")
    lead = hidden.shape[:-1]
    lab = _labels(labels, lead, N)
    none = desc.reduction == _lib.REDUCTION_NONE
    loss = np.zeros(N if none else 1)
    gh = np.zeros((N, D)) if compute_grad else None
    gw = np.zeros((V, D)) if compute_grad else None
    counters = np.zeros(2, dtype=np.int64)
    a = _lib.new_fused_linear_args()
    a.rows, a.hidden, a.vocab = N, D, V
    a.hidden_states, a.ld_hidden, a.hidden_dtype = _ptr(h2), ldh, h_dt
    a.weight, a.ld_weight, a.weight_dtype = _ptr(w2), ldw, w_dt
    a.teacher, a.ld_teacher, a.teacher_dtype = _ptr(t2), ldt, t_dt
    a.labels = _ptr(lab)
    if compute_grad:
        a.grad_hidden, a.ld_grad_hidden = _ptr(gh), D
        a.grad_weight, a.ld_grad_weight = _ptr(gw), D
    a.grad_dtype = _lib.DTYPE["f64"]
    _lib._set_numbers(a, "kdl_fused_linear_args_t", ints=(("chunk_rows", chunk_rows),))
    a.out_dtype = _lib.DTYPE["f64"]
    a.loss = _ptr(loss)
    a.info, a.valid_rows = counters.ctypes.data, counters.ctypes.data + 8
    _lib.check(_lib.lib().kdl_ref_fused_linear_loss(ctypes.byref(desc), ctypes.byref(a)),
               "kdl_ref_fused_linear_loss")
    n_invalid, n_valid = int(counters[0]), int(counters[1])
    if n_invalid and raise_on_invalid:
        raise _lib.InvalidRowsError(n_invalid, N, reason="a NaN or +inf logit, or every logit "
                                    "-inf, in the student's hidden @ weight.T or the teacher")
    if gh is not None:
        gh = gh.reshape(hidden.shape)
    return ((loss.reshape(lead) if none else np.float64(loss[0])), gh, gw,
            {"valid_rows": n_valid, "invalid_rows": n_invalid})


_SHARD_OPS = {_lib.SHARD_OP_DONE: None, _lib.SHARD_OP_MAX: "max", _lib.SHARD_OP_SUM: "sum"}


class VocabShard:
    """One shard (rank) of the vocabulary-parallel loss, run step by step on
    the float64 CPU reference (kdl_ref_shard_step).

    student, teacher: this shard's slice [N, V_local] (or [..., V_local]) of
    the logits, columns [vocab_offset, vocab_offset + V_local) of a vocabulary
    of `vocab` tokens; rank in [0, num_shards) orders the slices.  Every
    shard passes the same options, rows, vocab, num_shards, labels and dtypes.

        sh = VocabShard(S_slice, T_slice, offset, V, rank, R, divergence="akl")
        for s in range(sh.num_steps):
            op, count = sh.step(s)          # "max", "sum", or None after the last
            if op is None:
                break
            all_reduce(sh.exchange[:count], op)   # in place, over the R shards
        loss, grad, stats = sh.result()

    vocab_parallel_distill_loss runs that loop with a given all_reduce.
    """

    def __init__(self, student, teacher, vocab_offset, vocab, rank, num_shards, divergence="fkl",
                 temperature=1.0, labels=None, ignore_index=-100, reduction="mean", alpha=0.1,
                 beta=0.5, head_rule="reference", mu=0.5, top_k=1, scale=1.0, compute_grad=True,
                 head_mask=False):
        self.desc = _lib.new_desc(divergence=divergence, temperature=temperature, alpha=alpha,
                                  beta=beta, head_rule=head_rule, mu=mu, top_k=top_k,
                                  reduction=reduction, scale=scale, ignore_index=ignore_index)
        _check_array(student, "student")
        _check_array(teacher, "teacher")
        if student.shape != teacher.shape:
            raise ValueError(f"kdloss: student shape {student.shape} != teacher shape "
                             f"{teacher.shape}")
        s_dt = _kdl_dtype(student, "student")
        t_dt = _kdl_dtype(teacher, "teacher")
        self._s, N, W, lds = _rows(student, "student")
        self._t, _, _, ldt = _rows(teacher, "teacher")
        self.shape = student.shape
        self._lead = student.shape[:-1]
        self._labels = _labels(labels, self._lead, N)
        self._none = self.desc.reduction == _lib.REDUCTION_NONE
        self._akl = self.desc.divergence == _lib.lib().kdl_divergence_from_name(b"akl")
        self.loss = np.zeros(N if self._none else 1)
        self.grad = np.zeros((N, W)) if compute_grad else None
        self._counters = np.zeros(2, dtype=np.int64)
        self.head_size = np.zeros(N, dtype=np.int64) if self._akl else None
        self.head_mask = np.zeros((N, W), dtype=np.uint8) if self._akl and head_mask else None
        a = _lib.new_shard_args()
        a.rows = N
        _lib._set_numbers(a, "kdl_shard_args_t", ints=(
            ("vocab_offset", vocab_offset), ("vocab", vocab), ("shard_rank", rank),
            ("num_shards", num_shards)))
        a.vocab_local = W
        a.student, a.ld_student, a.student_dtype = _ptr(self._s), lds, s_dt
        a.teacher, a.ld_teacher, a.teacher_dtype = _ptr(self._t), ldt, t_dt
        a.labels = _ptr(self._labels)
        if self.grad is not None:
            a.grad, a.ld_grad, a.grad_dtype = _ptr(self.grad), W, _lib.DTYPE["f64"]
        a.out_dtype = _lib.DTYPE["f64"]
        a.loss = _ptr(self.loss)
        a.info, a.valid_rows = self._counters.ctypes.data, self._counters.ctypes.data + 8
        a.stat_head_size = _ptr(self.head_size)
        a.head_mask = _ptr(self.head_mask)
        state_bytes, ex_count, self.num_steps = _lib.shard_sizes(self.desc, a)
        # float64 storage: the state's records hold doubles and int64s
        self._state = np.zeros((state_bytes + 7) // 8)
        self.exchange = np.zeros(max(ex_count, 1))
        a.state, a.exchange = _ptr(self._state), _ptr(self.exchange)
        self.args = a
        self.rows = N
        self.done = False

    def step(self, s):
        """Runs step s; returns (op, count): op "max" or "sum" (all-reduce
        self.exchange[:count] with it before the next step) or None when
        the last step has run (loss and gradient are written)."""
        op, count = ctypes.c_int(0), ctypes.c_int64(0)
        _lib.check(_lib.lib().kdl_ref_shard_step(ctypes.byref(self.desc), ctypes.byref(self.args),
                                                 int(s), ctypes.byref(op), ctypes.byref(count)),
                   "kdl_ref_shard_step")
        name = _SHARD_OPS[op.value]
        self.done = name is None
        return name, int(count.value)

    def result(self, raise_on_invalid=True):
        """(loss, grad, stats) after the last step: loss as distill_loss's,
        grad d loss / d this slice (float64, the slice's shape) or None;
        stats valid_rows, invalid_rows and, for AKL, head_size [...] and
        head_mask (when asked for)."""
        if not self.done:
            raise RuntimeError("kdloss: VocabShard.result() before the last step ran")
        n_invalid, n_valid = int(self._counters[0]), int(self._counters[1])
        if n_invalid and raise_on_invalid:
            raise _lib.InvalidRowsError(n_invalid, self.rows)
        stats = {"valid_rows": n_valid, "invalid_rows": n_invalid}
        if self.head_size is not None:
            stats["head_size"] = self.head_size.reshape(self._lead)
        if self.head_mask is not None:
            stats["head_mask"] = self.head_mask.reshape(self.shape)
        grad = None if self.grad is None else self.grad.reshape(self.shape)
        loss = self.loss.reshape(self._lead) if self._none else np.float64(self.loss[0])
        return loss, grad, stats


def vocab_parallel_distill_loss(student, teacher, vocab_offset, vocab, rank, num_shards,
                                all_reduce, raise_on_invalid=True, **options):
    """The vocabulary-parallel loss of one shard with a caller's all-reduce:
    all_reduce(buffer, op) reduces the float64 array `buffer` in place over
    the shards with op "max" or "sum" (every shard calls it with the same op
    and length, in the same order).  Arguments and result as VocabShard."""
    sh = VocabShard(student, teacher, vocab_offset, vocab, rank, num_shards, **options)
    for s in range(sh.num_steps):
        op, count = sh.step(s)
        if op is None:
            break
        all_reduce(sh.exchange[:count], op)
    return sh.result(raise_on_invalid)
