"""kdloss for NumPy arrays: the float64 CPU reference, no torch needed.

    loss, grad, stats = kdloss.numpy.distill_loss(student, teacher, divergence="fkl")

Maths, options and conventions are those of kdloss.torch.distill_loss (and of
the C library's kdl_ref_loss_forward_backward); see python/README.md.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib

__all__ = ["distill_loss", "sinkhorn", "sinkd_loss"]

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
