"""What kdloss.numpy and kdloss.torch share: the argument checks, the
normalisation of inputs into rows, and for every op the buffers, the ctypes
argument struct and the library call, written once over a small array
backend (numpy.py and torch.py each give one; see Backend).

The front ends keep what is theirs: the public signatures, the shapes of
their results, and (torch) autograd, devices and streams.
"""

from __future__ import annotations

import ctypes

from . import _lib

FLOAT_DTYPES = "float32, float64, float16 or bfloat16"

# The options of the dense loss (kdl_loss_desc_t, _lib.new_desc's keywords),
# which every loss of both front ends takes under these names.
LOSS_OPTIONS = ("divergence", "temperature", "alpha", "beta", "head_rule", "mu", "top_k",
                "reduction", "scale", "ignore_index")


def loss_options(values):
    """The loss options among a public function's arguments (its locals()),
    as a dict in LOSS_OPTIONS order."""
    return {k: values[k] for k in LOSS_OPTIONS}


def loss_desc(values):
    """The LossDesc of the loss options among values (names checked)."""
    return _lib.new_desc(**loss_options(values))


class Backend:
    """The array operations the shared code needs, given by each front end
    (numpy.py: _Numpy, torch.py: _Torch).  `dev` is the backend's device
    object (None for NumPy); dtypes are the backend's own (np.float64,
    torch.float32, ...).

    Attributes: kind / kinds (what an input must be, for messages), int64
    (the index dtype's name), F64, F32, I64, U8 (dtypes), ARRAY (the array
    type), DTYPES (float dtype -> the library's short name).  Methods without a
    default here:

      last_contiguous(x)    unit stride in the last dimension
      stride_text(x), contiguous_hint(name)   for the message when not
      rows(x)               [..., C] -> ([N, C] view or copy, N, C, ld in
                            elements) of a checked input (plain rows when
                            they overlap or run backwards)
      flat(x, n)            x as a contiguous 1-D array of n elements
      to_host(x)            x on the host
      addr(x)               the address of x's first element; None for None
                            or an empty x
      pack(arrays, dtype)   the arrays flattened, concatenated, in dtype
      zeros(shape, dtype, dev)
    """

    kind = kinds = int64 = ""
    F64 = F32 = I64 = U8 = None
    ARRAY = ()  # the array type
    DTYPES = {}  # the backend's float dtypes -> "f32", "f16", "bf16", "f64"

    def is_array(self, x):
        return isinstance(x, self.ARRAY)

    def dtype_code(self, x):
        """The kdl_dtype_t of x's dtype, None when the library has none."""
        return self.code_of(x.dtype)

    def code_of(self, dtype):
        """The kdl_dtype_t of a backend dtype, or None."""
        t = self.DTYPES.get(dtype)
        return None if t is None else _lib.DTYPE[t]

    def shape(self, x):
        return tuple(x.shape)

    def is_int64(self, x):
        return x.dtype == self.I64

    def dtype_of(self, x):
        return x.dtype

    def check_layout(self, x, name):
        """Checks beyond dtype and shape (torch: dense, real)."""

    def empty(self, shape, dtype, dev):
        """An array the library overwrites whole (zeros where that is cheap)."""
        return self.zeros(shape, dtype, dev)

    def device(self, x):
        return None

    def is_gpu(self, dev):
        return False

    def call(self, op, dev, desc, args, what):
        """Runs op (a key of _lib.ENTRY_POINTS) on dev: the reference on the
        host, the GPU entry point on a device."""
        _lib.call_ref(op, desc, args)

    def results(self, dev, x):
        """(loss dtype, gradient dtype) of the library's outputs for a
        student of x's dtype on dev: float64 on the host, float32 and the
        student's dtype on a device."""
        if self.is_gpu(dev):
            return self.F32, self.dtype_of(x)
        return self.F64, self.F64


# ---------------------------------------------------------------- checks
def check_array(be, x, name):
    if not be.is_array(x):
        raise TypeError(f"kdloss: {name} must be a {be.kind}, got {type(x).__name__}")


def check_matrix(be, x, name, what="vocabulary", last="V", index=False):
    """An input read as rows [..., C]: its type, dtype (a float dtype of the
    library, or int64 with index=True), at least one dimension, a non-empty
    last dimension, unit stride in it."""
    check_array(be, x, name)
    if index:
        if not be.is_int64(x):
            raise TypeError(f"kdloss: {name} must have dtype {be.int64}, got {x.dtype}")
    elif be.dtype_code(x) is None:
        raise TypeError(f"kdloss: {name} has dtype {x.dtype}; expected {FLOAT_DTYPES}")
    be.check_layout(x, name)
    shape = be.shape(x)
    if not shape:
        raise ValueError(f"kdloss: {name} must have shape [N, {last}] or [..., {last}], got a scalar")
    if shape[-1] < 1:
        raise ValueError(f"kdloss: {name} has an empty {what} dimension (shape {shape})")
    if shape[-1] > 1 and _numel(shape) and not be.last_contiguous(x):
        raise ValueError(f"kdloss: {name} must be contiguous in its last ({what}) dimension, got "
                         f"{be.stride_text(x)} (shape {shape}); {be.contiguous_hint(name)}")


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def rows_of(be, x):
    """N of a checked [..., C] input."""
    return _numel(be.shape(x)[:-1])


def check_pair(be, s, t, sname, tname):
    """Student and teacher logits of one shape on one device; returns the
    device."""
    if not (be.is_array(s) and be.is_array(t)):
        raise TypeError(f"kdloss: {sname} and {tname} must be {be.kinds} "
                        f"(got {type(s).__name__} and {type(t).__name__})")
    check_matrix(be, s, sname)
    check_matrix(be, t, tname)
    if be.shape(s) != be.shape(t):
        raise ValueError(f"kdloss: {sname} shape {be.shape(s)} != {tname} shape {be.shape(t)}")
    return same_device(be, [(sname, s), (tname, t)])


def same_device(be, pairs):
    """The device of the first (name, array); ValueError when another is
    elsewhere or the device is neither the host nor a CUDA device."""
    first, x0 = pairs[0]
    dev = be.device(x0)
    for name, x in pairs[1:]:
        if x is not None and be.device(x) != dev:
            raise ValueError(f"kdloss: {first} is on {dev}, {name} on {be.device(x)}")
    if dev is not None and dev.type not in ("cpu", "cuda"):
        raise ValueError(f"kdloss: tensors on {dev} are not supported (cpu or cuda only)")
    return dev


def labels(be, lab, shape, dev=None):
    """Labels of the rows of an input of `shape` ([..., C]): [...] or [N]
    int64 on the input's device; returns them as a contiguous [N], or None."""
    if lab is None:
        return None
    if not be.is_array(lab):
        raise TypeError(f"kdloss: labels must be a {be.kind} of int64, got {type(lab).__name__}")
    if not be.is_int64(lab):
        raise TypeError(f"kdloss: labels must have dtype {be.int64}, got {lab.dtype}")
    lead = tuple(shape[:-1])
    n = _numel(lead)
    if be.shape(lab) != lead and be.shape(lab) != (n,):
        raise ValueError(f"kdloss: labels shape {be.shape(lab)} does not match the rows of the "
                         f"logits (expected {lead} or ({n},))")
    if be.device(lab) != dev:
        raise ValueError(f"kdloss: labels are on {be.device(lab)}, the logits on {dev}")
    return be.flat(lab, n)


def sparse_inputs(be, s, idx, lp, sname):
    """The student and the teacher's support (indices, log-probs); returns
    the device."""
    check_matrix(be, s, sname)
    _check_support(be, idx, lp, s, "the student")
    return same_device(be, [(sname, s), ("teacher_indices", idx), ("teacher_logprobs", lp)])


def _check_support(be, idx, lp, x, xname):
    """The teacher's support: int64 teacher_indices and float
    teacher_logprobs [..., k] of one shape, x's leading (row) shape."""
    check_matrix(be, idx, "teacher_indices", "support", "k", index=True)
    check_matrix(be, lp, "teacher_logprobs", "support", "k")
    if be.shape(idx) != be.shape(lp):
        raise ValueError(f"kdloss: teacher_indices shape {be.shape(idx)} != "
                         f"teacher_logprobs shape {be.shape(lp)}")
    if be.shape(idx)[:-1] != be.shape(x)[:-1]:
        raise ValueError(f"kdloss: the teacher's support {be.shape(idx)} and {xname} "
                         f"{be.shape(x)} differ in their leading (row) shape")


_FUSED_SOURCES = ("{t}", "teacher_hidden and teacher_weight (and teacher_bias)",
                  "teacher_indices and teacher_logprobs")


def fused_teacher(be, t, th, tw, tb, tname, ti=None, tlp=None):
    """Which teacher a fused linear call is given: "logits" (t, named
    tname), "linear" (the teacher as a linear layer th @ tw.T (+ tb)) or
    "sparse" (its top-k, indices ti and log-probs tlp).  ValueError naming
    the arguments unless exactly one source is given whole."""
    given = {"logits": t is not None, "linear": any(x is not None for x in (th, tw, tb)),
             "sparse": ti is not None or tlp is not None}
    srcs = [k for k, v in given.items() if v]
    names = ", or ".join(x.format(t=tname) for x in _FUSED_SOURCES)
    if len(srcs) > 1:
        got = [k for k, x in ((tname, t), ("teacher_hidden", th), ("teacher_weight", tw),
                              ("teacher_bias", tb), ("teacher_indices", ti),
                              ("teacher_logprobs", tlp)) if x is not None]
        raise ValueError(f"kdloss: give one teacher: {names}; got {', '.join(got)}")
    if not srcs:
        raise ValueError(f"kdloss: no teacher: give {names}")
    kind = srcs[0]
    if kind == "linear" and (th is None or tw is None):
        got = [k for k, x in (("teacher_hidden", th), ("teacher_weight", tw),
                              ("teacher_bias", tb)) if x is not None]
        raise ValueError(f"kdloss: the teacher as a linear layer needs teacher_hidden and "
                         f"teacher_weight; got {' and '.join(got)} only")
    if kind == "sparse" and (ti is None or tlp is None):
        one = "teacher_indices" if tlp is None else "teacher_logprobs"
        raise ValueError("kdloss: the sparse teacher needs teacher_indices and teacher_logprobs; "
                         f"got {one} only")
    return kind


def fused_sparse_mode(ti, mode, check_indices):
    """The sparse mode code of a fused linear call whose teacher has been
    checked (fused_inputs): None without the sparse teacher, where mode and
    check_indices are ValueErrors; mode None is "renormalised"."""
    if ti is None:
        extra = [k for k, v in (("mode", mode is not None), ("check_indices", check_indices))
                 if v]
        if extra:
            raise ValueError(f"kdloss: {' and '.join(extra)} belong to the sparse teacher "
                             "(teacher_indices, teacher_logprobs), which is not given")
        return None
    return _lib.parse_sparse_mode("renormalised" if mode is None else mode)


def _check_bias(be, b, name, owner, dtype, V):
    """An optional bias [V] read in `owner`'s dtype."""
    if b is None:
        return
    check_array(be, b, name)
    if b.dtype != dtype:
        raise TypeError(f"kdloss: {name} has dtype {b.dtype}; it is read in {owner}'s dtype "
                        f"{dtype}")
    if be.shape(b) != (V,):
        raise ValueError(f"kdloss: {name} must have shape ({V},) ({owner}'s V), got "
                         f"{be.shape(b)}")


def fused_inputs(be, h, w, t, tname, bias=None, th=None, tw=None, tb=None, ti=None, tlp=None):
    """hidden [..., d], weight [V, d], the optional bias [V] in weight's
    dtype, and one teacher (fused_teacher): its logits t [..., V]; or the
    teacher as a linear layer, teacher_hidden th [..., d_t] with hidden's
    leading shape, teacher_weight tw [V, d_t] and the optional
    teacher_bias tb [V], all three of one float dtype; or the sparse
    teacher, teacher_indices ti (int64) and teacher_logprobs tlp [..., k]
    with hidden's leading shape.  Returns the device."""
    kind = fused_teacher(be, t, th, tw, tb, tname, ti, tlp)
    lin = kind == "linear"
    check_matrix(be, h, "hidden", "hidden", "d")
    check_matrix(be, w, "weight", "hidden", "d")
    hs, ws = be.shape(h), be.shape(w)
    if len(ws) != 2:
        raise ValueError(f"kdloss: weight must be [V, d], got shape {ws}")
    if hs[-1] != ws[1]:
        raise ValueError(f"kdloss: hidden {hs} and weight {ws} differ in the hidden size d")
    if lin:
        check_matrix(be, th, "teacher_hidden", "hidden", "d_t")
        check_matrix(be, tw, "teacher_weight", "hidden", "d_t")
        ths, tws = be.shape(th), be.shape(tw)
        if len(tws) != 2 or tws[0] != ws[0]:
            raise ValueError(f"kdloss: teacher_weight must be [V, d_t] with weight's V = "
                             f"{ws[0]}, got shape {tws}")
        if ths[:-1] != hs[:-1]:
            raise ValueError(f"kdloss: teacher_hidden {ths} and hidden {hs} differ in their "
                             "leading (row) shape")
        if ths[-1] != tws[1]:
            raise ValueError(f"kdloss: teacher_hidden {ths} and teacher_weight {tws} differ "
                             "in the teacher's hidden size d_t")
        if tw.dtype != th.dtype:
            raise TypeError(f"kdloss: teacher_weight has dtype {tw.dtype}; the teacher layer "
                            f"is read in teacher_hidden's dtype {th.dtype}")
        _check_bias(be, tb, "teacher_bias", "teacher_hidden", th.dtype, ws[0])
    elif kind == "sparse":
        _check_support(be, ti, tlp, h, "hidden")
    else:
        check_matrix(be, t, tname)
        ts = be.shape(t)
        if ts != hs[:-1] + (ws[0],):
            raise ValueError(f"kdloss: {tname} has shape {ts}, expected {hs[:-1] + (ws[0],)} "
                             "(hidden's rows, weight's V)")
    _check_bias(be, bias, "bias", "weight", w.dtype, ws[0])
    return same_device(be, [("hidden", h), ("weight", w), (tname, t), ("bias", bias),
                            ("teacher_hidden", th), ("teacher_weight", tw),
                            ("teacher_bias", tb), ("teacher_indices", ti),
                            ("teacher_logprobs", tlp)])


def check_indices(be, idx, vocab):
    """kdl_sparse_check_indices on the host: KdlossValueError (BAD_PARAM)
    for an index out of [0, vocab) or repeated in its row."""
    i2, N, k, ld = be.rows(be.to_host(idx))
    _lib.check(_lib.lib().kdl_sparse_check_indices(N, vocab, k, be.addr(i2), ld),
               "kdl_sparse_check_indices")


def sinkhorn_problem(be, cost, x, y, want_grad_x):
    """(single, (B, n, m, dim)) of the problems given by cost [(B,) n, m],
    or by the points x [(B,) n, d] and y [(B,) m, d] (dim 0 for a cost);
    single when the batch dimension is absent."""
    if (cost is None) == (x is None and y is None):
        raise ValueError("kdloss: give either cost, or the points x and y")
    if cost is not None:
        cs = be.shape(cost)
        if len(cs) not in (2, 3):
            raise ValueError(f"kdloss: cost must be [n, m] or [B, n, m], got {cs}")
        single = len(cs) == 2
        B, n, m = (1,) + cs if single else cs
        dim = 0
    else:
        if x is None or y is None:
            raise ValueError("kdloss: points need both x and y")
        xs, ys = be.shape(x), be.shape(y)
        if len(xs) not in (2, 3) or len(ys) != len(xs):
            raise ValueError("kdloss: x and y must be [n, d] / [m, d] or [B, n, d] / [B, m, d], "
                             f"got {xs} and {ys}")
        single = len(xs) == 2
        if single:
            xs, ys = (1,) + xs, (1,) + ys
        if xs[0] != ys[0] or xs[2] != ys[2]:
            raise ValueError(f"kdloss: x {be.shape(x)} and y {be.shape(y)} differ in batch or "
                             "dimension")
        B, n, dim = xs
        m = ys[1]
    if want_grad_x and x is None:
        raise ValueError("kdloss: return_grad_x needs points x and y")
    return single, (B, n, m, dim)


def sparse_reason(bad_index_rows):
    return ("a NaN or +inf student logit or every one -inf; a teacher log-prob NaN or > 0; "
            f"an index out of [0, V) or repeated in its row ({int(bad_index_rows)} rows); "
            "renormalised: every log-prob -inf; tail: given teacher mass > 1 + 1e-3, or "
            "< 1 - 1e-3 with k = V")


FUSED_REASON = ("a NaN or +inf logit, or every logit -inf, in the student's hidden @ weight.T "
                "or the teacher")


def fused_sparse_reason(bad_index_rows):
    """The invalid-row reasons of the fused linear loss with the sparse
    teacher."""
    return ("a NaN or +inf logit, or every logit -inf, in the student's hidden @ weight.T; "
            + sparse_reason(bad_index_rows).split("; ", 1)[1])


# --------------------------------------------------------- struct filling
def put(be, args, x, ptr, ld=None, ld_value=None, dtype=None, code=None):
    """Points args.<ptr> at x (None: NULL), sets args.<ld> to ld_value and
    args.<dtype> to code."""
    setattr(args, ptr, be.addr(x))
    if ld is not None:
        setattr(args, ld, ld_value)
    if dtype is not None:
        setattr(args, dtype, code)


def put_rows(be, args, x, ptr, ld=None, dtype=None):
    """Points args at the rows of the input x: args.<ptr>, its row stride
    (field ld, default ld_<ptr>) and kdl_dtype_t (field dtype, default
    <ptr>_dtype; "" for none).  Returns (rows, N, C); the caller keeps the
    rows alive until the call."""
    x2, N, C, ldx = be.rows(x)
    dtype = ptr + "_dtype" if dtype is None else dtype
    put(be, args, x2, ptr, ld or "ld_" + ptr, ldx, dtype or None,
        be.dtype_code(x) if dtype else None)
    return x2, N, C


def put_counters(be, dev, args, fields):
    """A new int64 array of len(fields) zeros on dev, args' counter fields
    pointed at its elements in order (a None field: an element left 0)."""
    counters = be.zeros(len(fields), be.I64, dev)
    base = be.addr(counters)
    for i, f in enumerate(fields):
        if f is not None:
            setattr(args, f, base + 8 * i)
    return counters


def put_student(be, dev, args, s, want_grad, per_row, grad_zeros=False):
    """The student's side of args: its rows, rows (N), a new gradient [N, C]
    (when wanted) and loss ([N] when per_row, else [1]) in be.results'
    dtypes, out_dtype.  Returns (rows, N, C, loss, grad, loss dtype)."""
    s2, N, C = put_rows(be, args, s, "student")
    out_dt, grad_dt = be.results(dev, s)
    loss = be.zeros(N if per_row else 1, out_dt, dev)
    grad = None
    if want_grad:
        grad = (be.zeros if grad_zeros else be.empty)((N, C), grad_dt, dev)
        put(be, args, grad, "grad", "ld_grad", C, "grad_dtype", be.code_of(grad_dt))
    args.rows = N
    args.out_dtype = be.code_of(out_dt)
    put(be, args, loss, "loss")
    return s2, N, C, loss, grad, out_dt


def _none(desc):
    return desc.reduction == _lib.REDUCTION_NONE


# ------------------------------------------------------------------ ops
def dense(be, dev, desc, s, t, lab, want_grad, want_stats, what="distill_loss"):
    """kdl_(ref_)loss_forward_backward.  Returns (loss [N] or [1], grad [N, V]
    or None, stats dict (float statistics and head_size, [N]) or None,
    counters int64 [2]: invalid, valid)."""
    a = _lib.new_args()
    kept = put_student(be, dev, a, s, want_grad, _none(desc))
    _, N, a.vocab, loss, grad, out_dt = kept
    kept += put_rows(be, a, t, "teacher")
    put(be, a, lab, "labels")
    stats = None
    if want_stats:
        stats = {k: be.zeros(N, out_dt, dev) for k in _lib.FLOAT_STATS}
        stats["head_size"] = be.zeros(N, be.I64, dev)
        for k, v in stats.items():
            put(be, a, v, "stat_" + k)
    counters = put_counters(be, dev, a, ("info", "valid_rows"))
    be.call("loss", dev, desc, a, what)
    return loss, grad, stats, counters


def sinkd(be, dev, desc, s, t, want_grad, want_plan):
    """kdl_(ref_)sinkd.  Returns (loss [1], grad [N, V] or None, stats:
    group_loss, iterations, marginal_error [G], plan [G, n, n] with
    want_plan; info int64 [1]; G)."""
    a = _lib.new_sinkd_args()
    kept = put_student(be, dev, a, s, want_grad, False, grad_zeros=True)
    _, N, a.vocab, loss, grad, out_dt = kept
    kept += put_rows(be, a, t, "teacher")
    n = desc.group_size if desc.group_size > 0 else N
    G = N // n if n > 0 and N % n == 0 else 0  # the library refuses a ragged split
    stats = {"group_loss": be.zeros(G, out_dt, dev), "iterations": be.zeros(G, be.I64, dev),
             "marginal_error": be.zeros(G, out_dt, dev)}
    if want_plan:
        stats["plan"] = be.zeros((G, n, n), out_dt, dev)
    for k, v in stats.items():
        put(be, a, v, k)
    info = put_counters(be, dev, a, ("info",))
    be.call("sinkd", dev, desc, a, "sinkd_loss")
    return loss, grad, stats, info, G


def sinkhorn(be, dev, desc, sizes, inputs, want, work, ragged=None):
    """kdl_(ref_)sinkhorn.  sizes (B, n, m, dim); inputs: cost, x, y, log_a,
    log_b, f_init, g_init, cost_xx, cost_yy, self_yy (contiguous arrays of
    dtype work, packed as kdloss_ot.h says, or None); want: the optional
    outputs among plan, potentials, grad_x; ragged: (sizes_n, sizes_m) of a
    ragged batch (host lists of B ints), None for a uniform one.  Returns
    the dict of outputs (value, iterations, marginal_error; plan, f, g,
    grad_x, self_yy as asked; info on a device), packed: [B, ...] for a
    uniform batch, flat over the problems for a ragged one."""
    B, n, m, dim = sizes
    if ragged is None:
        rows, cols, cells = (B, n), (B, m), (B, n, m)
    else:
        rows, cols = (sum(ragged[0]),), (sum(ragged[1]),)
        cells = (sum(a * b for a, b in zip(*ragged)),)
    shapes = {"value": (B,), "iterations": (B,), "marginal_error": (B,)}
    if "plan" in want:
        shapes["plan"] = cells
    if "potentials" in want:
        shapes.update(f=rows, g=cols)
    if "grad_x" in want:
        shapes["grad_x"] = rows + (dim,)
    if desc.debias:
        shapes["self_yy"] = (B,)
    out = {k: be.zeros(shp, be.I64 if k == "iterations" else work, dev)
           for k, shp in shapes.items()}
    syy = inputs.get("self_yy")
    if desc.debias and syy is not None:
        out["self_yy"][:] = syy
    a = _lib.new_sinkhorn_args()
    a.batch, a.n, a.m, a.dim = B, n, m, dim
    if ragged is not None:
        host = [(ctypes.c_int64 * B)(*(int(v) for v in sz)) for sz in ragged]
        a.sizes_n, a.sizes_m = (ctypes.cast(h, ctypes.c_void_p) for h in host)
    a.dtype = be.code_of(work)
    for k in ("cost", "x", "y", "log_a", "log_b", "f_init", "g_init", "cost_xx", "cost_yy"):
        put(be, a, inputs.get(k), k)
    a.self_yy_given = 1 if desc.debias and syy is not None else 0
    for k, v in out.items():
        put(be, a, v, k)
    if be.is_gpu(dev):  # the reference takes no info
        out["info"] = put_counters(be, dev, a, ("info",))
    be.call("sinkhorn", dev, desc, a, "sinkhorn")
    return out


def sinkhorn_ragged_checks(be, costs):
    """A ragged batch's costs: a non-empty list of non-empty [n_b, m_b] of one
    float dtype on one device; returns the device."""
    if not isinstance(costs, (list, tuple)) or not costs:
        raise TypeError(f"kdloss: costs must be a non-empty list of {be.kinds} [n_b, m_b]")
    for i, c in enumerate(costs):
        check_array(be, c, f"costs[{i}]")
        if be.dtype_code(c) is None:
            raise TypeError(f"kdloss: costs[{i}] has dtype {c.dtype}; expected {FLOAT_DTYPES}")
        if len(be.shape(c)) != 2 or 0 in be.shape(c):
            raise ValueError(f"kdloss: costs[{i}] must be a non-empty [n, m], got {be.shape(c)}")
        if c.dtype != costs[0].dtype:
            raise TypeError(f"kdloss: costs[{i}] has dtype {c.dtype}, costs[0] {costs[0].dtype}")
    return same_device(be, [(f"costs[{i}]", c) for i, c in enumerate(costs)])


def split_packed(packed, shapes):
    """The consecutive pieces of a flat array, one per shape."""
    parts, o = [], 0
    for shp in shapes:
        size = _numel(shp)
        parts.append(packed[o:o + size].reshape(shp))
        o += size
    return parts


def sinkhorn_ragged(be, desc, costs, want, work_for, split=True):
    """A ragged batch given as a list of costs [n_b, m_b] (one dtype, one
    device; work_for(dev) the dtype the solver works in there): packs them,
    runs sinkhorn() and splits the outputs per problem.  Returns (dev, the
    dtype of the costs, the outputs: value, iterations, marginal_error [B];
    plan, f, g as lists when wanted (packed flat arrays when not split);
    info on a device)."""
    dev = sinkhorn_ragged_checks(be, costs)
    work = work_for(dev)
    sn = [be.shape(c)[0] for c in costs]
    sm = [be.shape(c)[1] for c in costs]
    packed = be.pack(costs, work)
    out = sinkhorn(be, dev, desc, (len(costs), sn[0], sm[0], 0), {"cost": packed}, want, work,
                   ragged=(sn, sm))
    if split:
        for key, sizes in (("plan", list(zip(sn, sm))), ("f", [(k,) for k in sn]),
                           ("g", [(k,) for k in sm])):
            if key in out:
                out[key] = split_packed(out[key], sizes)
    return dev, costs[0].dtype, out


def sparse(be, dev, desc, mode, s, idx, lp, lab, want_grad):
    """kdl_(ref_)sparse_loss.  Returns (loss [N] or [1], grad [N, V] or None,
    counters int64 [3]: invalid, valid, bad index rows)."""
    a = _lib.new_sparse_args()
    kept = put_student(be, dev, a, s, want_grad, _none(desc))
    _, _, a.vocab, loss, grad, _ = kept
    kept += put_rows(be, a, idx, "teacher_indices", "ld_indices", "")
    kept += put_rows(be, a, lp, "teacher_logprobs", "ld_logprobs", "teacher_dtype")
    a.mode, a.k = mode, be.shape(idx)[-1]
    put(be, a, lab, "labels")
    counters = put_counters(be, dev, a, ("info", "valid_rows", "bad_index_rows"))
    be.call("sparse", dev, desc, a, "sparse_distill_loss")
    return loss, grad, counters


def fused_linear(be, dev, desc, h, w, t, lab, chunk_rows, want_h, want_w, grad_dt, bias=None,
                 want_b=False, grad_output=None, teacher_linear=None, teacher_sparse=None):
    """kdl_(ref_)fused_linear_loss: logits = h W^T (+ bias).  The teacher:
    its logits t; or (t None) teacher_linear = (H_t, W_t, b_t or None), the
    teacher logits H_t W_t^T (+ b_t) formed by the library; or (t None)
    teacher_sparse = (mode code, indices, log-probs), its top-k as
    sparse() takes it.  No gradient to the teacher.  grad_output: the
    upstream gradient of each row's loss (reduction none; [N] in a float
    dtype of the library), or None.  Returns (loss [N] or [1], dH [N, d],
    dW [V, d], db [V] (each None when not wanted), counters int64 [3]:
    invalid, valid, bad index rows (0 without the sparse teacher), the
    chunk the call used)."""
    a = _lib.new_fused_linear_args()
    h2, N, D = put_rows(be, a, h, "hidden_states", "ld_hidden", "hidden_dtype")
    w2, V, _ = put_rows(be, a, w, "weight")
    if teacher_linear is not None:
        th, tw, tb = teacher_linear
        kept = put_rows(be, a, th, "teacher_hidden", "ld_teacher_hidden", "teacher_linear_dtype")
        kept += put_rows(be, a, tw, "teacher_weight", "ld_teacher_weight", "")
        a.teacher_hidden_size = kept[2]
        kept += (None if tb is None else be.flat(tb, V),)
        put(be, a, kept[-1], "teacher_bias")
    elif teacher_sparse is not None:
        mode, ti, tlp = teacher_sparse
        kept = put_rows(be, a, ti, *_SPARSE_FIELDS["indices"])
        kept += put_rows(be, a, tlp, *_SPARSE_FIELDS["logprobs"])
        setattr(a, _SPARSE_FIELDS["mode"], mode)
        setattr(a, _SPARSE_FIELDS["k"], be.shape(ti)[-1])
    else:
        kept = put_rows(be, a, t, "teacher")
    a.rows, a.hidden, a.vocab = N, D, V
    loss = be.zeros(N if _none(desc) else 1, be.results(dev, h)[0], dev)
    gh = be.empty((N, D), grad_dt, dev) if want_h else None
    gw = be.empty((V, D), grad_dt, dev) if want_w else None
    gb = be.empty(V, grad_dt, dev) if want_b else None
    b1 = None if bias is None else be.flat(bias, V)
    put(be, a, lab, "labels")
    put(be, a, gh, "grad_hidden", "ld_grad_hidden", D)
    put(be, a, gw, "grad_weight", "ld_grad_weight", D, "grad_dtype", be.code_of(grad_dt))
    put(be, a, b1, "bias")
    put(be, a, gb, "grad_bias")
    if grad_output is not None:
        put(be, a, grad_output, "grad_output", None, None, "grad_output_dtype",
            be.dtype_code(grad_output))
    a.chunk_rows = _lib.as_int("chunk_rows", chunk_rows)
    a.out_dtype = be.code_of(be.dtype_of(loss))
    put(be, a, loss, "loss")
    counters = put_counters(be, dev, a, ("info", "valid_rows", None if teacher_sparse is None
                                         else _SPARSE_FIELDS["bad"]))
    be.call("fused_linear", dev, desc, a, "fused_linear_distill_loss")
    chunk = _lib.lib().kdl_fused_linear_chunk_rows(a)
    return loss, gh, gw, gb, counters, chunk


# kdl_fused_linear_args_t's fields of the sparse teacher (version 4)
_SPARSE_FIELDS = {"indices": ("teacher_indices", "ld_teacher_indices", ""),
                  "logprobs": ("teacher_logprobs", "ld_teacher_logprobs", "teacher_logprobs_dtype"),
                  "mode": "sparse_mode", "k": "k", "bad": "bad_index_rows"}


class Shard:
    """The buffers and ShardArgs of one shard of the vocabulary-parallel
    loss; step(s, handle) runs step s (the reference when handle is None)."""

    def __init__(self, be, dev, desc, s, t, lab, geometry, want_grad, want_head_size,
                 want_head_mask=False):
        a = _lib.new_shard_args()
        kept = put_student(be, dev, a, s, want_grad, _none(desc))
        _, N, W, self.loss, self.grad, _ = kept
        kept += put_rows(be, a, t, "teacher")
        offset, vocab, rank, world = geometry
        _lib._set_numbers(a, ints=(("vocab_offset", offset), ("vocab", vocab),
                                   ("shard_rank", rank), ("num_shards", world)))
        a.vocab_local = W
        put(be, a, lab, "labels")
        akl = desc.divergence == _lib.lib().kdl_divergence_from_name(b"akl")
        self.head_size = be.zeros(N, be.I64, dev) if akl and want_head_size else None
        self.head_mask = be.zeros((N, W), be.U8, dev) if akl and want_head_mask else None
        put(be, a, self.head_size, "stat_head_size")
        put(be, a, self.head_mask, "head_mask")
        self.counters = put_counters(be, dev, a, ("info", "valid_rows"))
        state_bytes, ex_count, self.num_steps = _lib.shard_sizes(desc, a)
        # the opaque per-shard state (float64 storage: its records hold
        # doubles and int64s) and the exchange buffer the all-reduces work on
        self.state = be.zeros((state_bytes + 7) // 8, be.F64, dev)
        self.exchange = be.zeros(max(ex_count, 1), be.F64, dev)
        put(be, a, self.state, "state")
        put(be, a, self.exchange, "exchange")
        self.desc, self.args, self.rows = desc, a, N
        self._inputs = (kept, lab)  # the args point into them until the last step

    def step(self, s, handle=None):
        """Runs step s: (op, count) with op "max" or "sum" (all-reduce
        exchange[:count] with it before the next step), or None after the
        last step (loss and gradient written)."""
        op, count = _lib.shard_step(handle, self.desc, self.args, s)
        return _SHARD_OPS[op], count


_SHARD_OPS = {_lib.SHARD_OP_DONE: None, _lib.SHARD_OP_MAX: "max", _lib.SHARD_OP_SUM: "sum"}


def raise_invalid(n_invalid, rows, **kw):
    if n_invalid:
        raise _lib.InvalidRowsError(n_invalid, rows, **kw)
