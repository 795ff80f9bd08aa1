"""kdloss for NumPy arrays: the float64 CPU reference, no torch needed.

    loss, grad, stats = kdloss.numpy.distill_loss(student, teacher, divergence="fkl")

Maths, options and conventions are those of kdloss.torch.distill_loss (and of
the C library's kdl_ref_loss_forward_backward); see python/README.md.  The
argument checks and the library calls are kdloss._ops's, shared with
kdloss.torch.
"""

from __future__ import annotations

import numpy as np

from . import _lib, _ops

__all__ = [
    "distill_loss",
    "sinkhorn",
    "sinkhorn_ragged",
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


class _Numpy(_ops.Backend):
    """NumPy arrays on the host: every op runs the float64 reference."""

    kind, kinds, int64 = "numpy array", "numpy arrays", "int64"
    F64, F32, I64, U8 = np.float64, np.float32, np.int64, np.uint8
    ARRAY, DTYPES = np.ndarray, _DTYPES

    def code_of(self, dtype):
        dtype = np.dtype(dtype)
        if dtype.name == "bfloat16" and dtype.itemsize == 2:
            return _lib.DTYPE["bf16"]  # e.g. ml_dtypes.bfloat16: passed as its raw 16-bit words
        return super().code_of(dtype)

    def last_contiguous(self, x):
        return x.strides[-1] == x.itemsize

    def stride_text(self, x):
        return f"strides {x.strides} for itemsize {x.itemsize}"

    def contiguous_hint(self, name):
        return f"use np.ascontiguousarray({name})"

    def rows(self, x):
        C = x.shape[-1]
        N = int(np.prod(x.shape[:-1], dtype=np.int64))
        x2 = x.reshape(N, C)  # a view when the leading dims allow it, else a copy
        if N <= 1:
            return x2, N, C, C
        item, s0 = x2.itemsize, x2.strides[0]
        if s0 % item != 0 or s0 < C * item:
            # overlapping, broadcast or reversed rows: copy into plain rows
            x2 = np.ascontiguousarray(x2)
            s0 = x2.strides[0]
        return x2, N, C, s0 // item

    def flat(self, x, n):
        return np.ascontiguousarray(x.reshape(n))

    def pack(self, arrays, dtype):
        return np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays])

    def to_host(self, x):
        return x

    def addr(self, x):
        return x.ctypes.data if x is not None and x.size else None

    def zeros(self, shape, dtype, dev):
        return np.zeros(shape, dtype=dtype)


_NP = _Numpy()


def _loss(loss, lead, desc):
    """The loss array as returned: the leading shape (reduction none) or a
    float64 scalar."""
    return loss.reshape(lead) if desc.reduction == _lib.REDUCTION_NONE else np.float64(loss[0])


def _counts(counters):
    return {"valid_rows": int(counters[1]), "invalid_rows": int(counters[0])}


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
    desc = _ops.loss_desc(locals())
    _ops.check_pair(_NP, student, teacher, "student", "teacher")
    lab = _ops.labels(_NP, labels, student.shape)
    loss, grad, stats, counters = _ops.dense(_NP, None, desc, student, teacher, lab,
                                             compute_grad, True)
    if raise_on_invalid:
        _ops.raise_invalid(int(counters[0]), _ops.rows_of(_NP, student))
    lead = student.shape[:-1]
    out = {k: v.reshape(lead) for k, v in stats.items()}
    out.update(_counts(counters))
    return (_loss(loss, lead, desc), None if grad is None else grad.reshape(student.shape), out)


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
    for k, v in (("cost", cost), ("x", x), ("y", y)):
        if v is not None and not isinstance(v, np.ndarray):
            raise TypeError(f"kdloss: {k} must be a numpy array, got {type(v).__name__}")
    single, (B, n, m, dim) = _ops.sinkhorn_problem(_NP, cost, x, y, return_grad_x)

    def batched(a, name, shape=()):
        if a is None:
            return None
        a = np.asarray(a, dtype=np.float64) if name == "self_yy" else a
        return _f64(a[None] if single else a, name, (B,) + shape)

    inputs = {k: batched(v, k, shp) for k, v, shp in (
        ("cost", cost, (n, m)), ("x", x, (n, dim)), ("y", y, (m, dim)), ("log_a", log_a, (n,)),
        ("log_b", log_b, (m,)), ("f_init", f_init, (n,)), ("g_init", g_init, (m,)),
        ("cost_xx", cost_xx, (n, n)), ("cost_yy", cost_yy, (m, m)))}
    if self_yy is not None:
        inputs["self_yy"] = _f64(np.atleast_1d(np.asarray(self_yy, dtype=np.float64)),
                                 "self_yy", (B,))
    want = {k for k, on in (("plan", return_plan), ("potentials", return_potentials),
                            ("grad_x", return_grad_x)) if on}
    out = _ops.sinkhorn(_NP, None, desc, (B, n, m, dim), inputs, want, np.float64)
    if single:
        out = {k: v[0] for k, v in out.items()}
    return out


def sinkhorn_ragged(costs, epsilon=0.1, max_iter=1000, tol=1e-6, check_every=10,
                    value="transport", eps_scaling=False, eps_scaling_factor=0.8, eps_stage_iter=1,
                    return_plan=False, return_potentials=False):
    """A ragged batch of Sinkhorn problems in one call (float64 CPU
    reference): costs is a list of [n_b, m_b] arrays (one dtype), each
    problem with uniform weights.  Options as sinkhorn.

    Returns a dict of float64 arrays: value, iterations (int64),
    marginal_error ([B]); plan (a list of [n_b, m_b]) with return_plan; f, g
    (lists of [n_b], [m_b]) with return_potentials.
    """
    desc = _lib.new_sinkhorn_desc(epsilon=epsilon, max_iter=max_iter, tol=tol,
                                  check_every=check_every, eps_scaling=eps_scaling,
                                  eps_scaling_factor=eps_scaling_factor,
                                  eps_stage_iter=eps_stage_iter, value=value)
    want = {k for k, on in (("plan", return_plan), ("potentials", return_potentials)) if on}
    return _ops.sinkhorn_ragged(_NP, desc, costs, want, lambda dev: np.float64)[2]


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
    _ops.check_pair(_NP, student, teacher, "student", "teacher")
    loss, grad, stats, info, G = _ops.sinkd(_NP, None, desc, student, teacher, compute_grad,
                                            return_plan)
    n_invalid = int(info[0])
    if raise_on_invalid:
        _ops.raise_invalid(n_invalid, G, unit="groups")
    stats["invalid_groups"] = n_invalid
    return np.float64(loss[0]), None if grad is None else grad.reshape(student.shape), stats


# ------------------------------------------------------ extensions (kdloss_ext.h)
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
    desc = _ops.loss_desc(locals())
    m = _lib.parse_sparse_mode(mode)
    _ops.sparse_inputs(_NP, student, teacher_indices, teacher_logprobs, "student")
    lab = _ops.labels(_NP, labels, student.shape)
    if check_indices:
        _ops.check_indices(_NP, teacher_indices, student.shape[-1])
    loss, grad, counters = _ops.sparse(_NP, None, desc, m, student, teacher_indices,
                                       teacher_logprobs, lab, compute_grad)
    n_invalid, n_valid, n_bad = (int(x) for x in counters)
    if raise_on_invalid:
        _ops.raise_invalid(n_invalid, _ops.rows_of(_NP, student), reason=_ops.sparse_reason(n_bad))
    stats = {"valid_rows": n_valid, "invalid_rows": n_invalid, "bad_index_rows": n_bad}
    return (_loss(loss, student.shape[:-1], desc),
            None if grad is None else grad.reshape(student.shape), stats)


def fused_linear_distill_loss(
    hidden,
    weight,
    teacher=None,
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
    bias=None,
    grad_output=None,
    teacher_hidden=None,
    teacher_weight=None,
    teacher_bias=None,
    teacher_indices=None,
    teacher_logprobs=None,
    mode=None,
    check_indices=False,
):
    """Distillation loss of the student logits hidden @ weight.T (+ bias)
    against the teacher, with the gradients to hidden, weight (and bias),
    by the float64 CPU reference (kdl_ref_fused_linear_loss; it
    materialises the float64 logits in C, as a reference does).

    hidden: [N, d] or [..., d]; weight: [V, d]; bias: optional [V] of
    weight's dtype.  The teacher, exactly one of: teacher, its logits [..., V]
    of hidden's leading shape; or the teacher as a linear layer, its logits
    teacher_hidden @ teacher_weight.T (+ teacher_bias) with teacher_hidden
    [..., d_t] (hidden's leading shape, d_t may differ from d),
    teacher_weight [V, d_t] and the optional teacher_bias [V], the three of
    one dtype; or the sparse teacher, its top-k per row as
    sparse_distill_loss takes it: teacher_indices int64 and
    teacher_logprobs [..., k] of hidden's leading shape, mode
    "renormalised" (None: the default) or "tail" / "tail_bucket", and
    check_indices (ValueError for two sources, none, teacher_weight /
    teacher_bias without teacher_hidden, one of teacher_indices /
    teacher_logprobs without the other, or mode / check_indices without
    the sparse teacher).  The teacher is frozen: no gradient is formed for
    it.  Any of float32, float64, float16, bfloat16.
    chunk_rows is the GPU path's chunk (ignored here).  grad_output
    (reduction "none" only): the upstream gradient of each row's loss
    ([...] or [N]); the gradients are then those of sum_i grad_output[i]
    loss_i.  Other options as distill_loss.

    Returns (loss, grad_hidden, grad_weight, stats): grad_hidden of hidden's
    shape and grad_weight [V, d], float64 (None when compute_grad is False;
    for reduction none without grad_output the gradients of the sum of the
    per-token losses); stats valid_rows, invalid_rows, bad_index_rows (with
    the sparse teacher), and grad_bias [V] (float64) when a bias is given
    and compute_grad is True.
    """
    desc = _ops.loss_desc(locals())
    _ops.fused_inputs(_NP, hidden, weight, teacher, "teacher", bias, teacher_hidden,
                      teacher_weight, teacher_bias, teacher_indices, teacher_logprobs)
    sparse = _ops.fused_sparse_mode(teacher_indices, mode, check_indices)
    lab = _ops.labels(_NP, labels, hidden.shape)
    N = _ops.rows_of(_NP, hidden)
    go = None
    if grad_output is not None:
        go = _f64(grad_output, "grad_output")
        if go.shape not in (hidden.shape[:-1], (N,)):
            raise ValueError(f"kdloss: grad_output has shape {go.shape}, expected "
                             f"{hidden.shape[:-1]} or ({N},)")
        go = go.reshape(N)
    lin = None if teacher_hidden is None else (teacher_hidden, teacher_weight, teacher_bias)
    if check_indices:
        _ops.check_indices(_NP, teacher_indices, weight.shape[0])
    loss, gh, gw, gb, counters, _ = _ops.fused_linear(
        _NP, None, desc, hidden, weight, teacher, lab, chunk_rows, compute_grad, compute_grad,
        np.float64, bias=bias, want_b=compute_grad and bias is not None, grad_output=go,
        teacher_linear=lin,
        teacher_sparse=None if sparse is None else (sparse, teacher_indices, teacher_logprobs))
    n_bad = int(counters[2])
    if raise_on_invalid:
        _ops.raise_invalid(int(counters[0]), N, reason=_ops.FUSED_REASON if sparse is None
                           else _ops.fused_sparse_reason(n_bad))
    stats = _counts(counters)
    if sparse is not None:
        stats["bad_index_rows"] = n_bad
    if gb is not None:
        stats["grad_bias"] = gb
    return (_loss(loss, hidden.shape[:-1], desc),
            None if gh is None else gh.reshape(hidden.shape), gw, stats)


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
        self.desc = _ops.loss_desc(locals())
        _ops.check_pair(_NP, student, teacher, "student", "teacher")
        lab = _ops.labels(_NP, labels, student.shape)
        self._shard = _ops.Shard(_NP, None, self.desc, student, teacher, lab,
                                 (vocab_offset, vocab, rank, num_shards), compute_grad, True,
                                 head_mask)
        sh = self._shard
        self.shape = student.shape
        self.num_steps, self.exchange, self.args, self.rows = (sh.num_steps, sh.exchange, sh.args,
                                                               sh.rows)
        self.loss, self.grad, self.head_size, self.head_mask = (sh.loss, sh.grad, sh.head_size,
                                                                sh.head_mask)
        self.done = False

    def step(self, s):
        """Runs step s; returns (op, count): op "max" or "sum" (all-reduce
        self.exchange[:count] with it before the next step) or None when
        the last step has run (loss and gradient are written)."""
        name, count = self._shard.step(s)
        self.done = name is None
        return name, count

    def result(self, raise_on_invalid=True):
        """(loss, grad, stats) after the last step: loss as distill_loss's,
        grad d loss / d this slice (float64, the slice's shape) or None;
        stats valid_rows, invalid_rows and, for AKL, head_size [...] and
        head_mask (when asked for)."""
        if not self.done:
            raise RuntimeError("kdloss: VocabShard.result() before the last step ran")
        sh = self._shard
        stats = _counts(sh.counters)
        if raise_on_invalid:
            _ops.raise_invalid(stats["invalid_rows"], self.rows)
        lead = self.shape[:-1]
        if sh.head_size is not None:
            stats["head_size"] = sh.head_size.reshape(lead)
        if sh.head_mask is not None:
            stats["head_mask"] = sh.head_mask.reshape(self.shape)
        grad = None if sh.grad is None else sh.grad.reshape(self.shape)
        return _loss(sh.loss, lead, self.desc), grad, stats


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
