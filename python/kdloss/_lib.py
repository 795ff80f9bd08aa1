"""ctypes binding of libkdloss.so: library lookup, struct mirrors, prototypes.

The structs below mirror include/kdloss/kdloss_types.h field for field; the
library is checked at load time (struct_size written by kdl_loss_desc_init and
kdl_loss_args_init against ctypes.sizeof, and the default values read back
through the ctypes fields) so a layout drift fails loudly instead of corrupting
memory.

Library lookup order:
  1. the environment variable KDLOSS_LIBRARY (a path to libkdloss.so);
  2. a libkdloss.so* next to this package (kdloss/ or kdloss/lib/);
  3. the system loader (ctypes.util.find_library("kdloss"), then
     "libkdloss.so.<major>" and "libkdloss.so": LD_LIBRARY_PATH, ldconfig).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import threading
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_int,
    c_int64,
    c_size_t,
    c_void_p,
)

__all__ = [
    "LossDesc",
    "LossArgs",
    "KdlossError",
    "KdlossValueError",
    "InvalidRowsError",
    "lib",
    "library_path",
    "check",
    "DTYPE",
    "STATUS",
]

# ------------------------------------------------------------------ enums
# Values of kdloss_types.h (never renumbered there).
DTYPE = {"f32": 0, "f16": 1, "bf16": 2, "f64": 3}
DIV_COUNT = 8
HEAD_COUNT = 3
REDUCTION_COUNT = 3
REDUCTION_NONE, REDUCTION_SUM, REDUCTION_MEAN = 0, 1, 2

STATUS = {
    "SUCCESS": 0,
    "BAD_PARAM": 1000,
    "NULL_POINTER": 1001,
    "BAD_SIZE": 1002,
    "BAD_STRIDE": 1003,
    "BAD_TEMPERATURE": 1004,
    "BAD_ALPHA": 1005,
    "BAD_BETA": 1006,
    "BAD_MU": 1007,
    "BAD_TOP_K": 1008,
    "BAD_SCALE": 1009,
    "BAD_ENUM": 1010,
    "SIZE_OVERFLOW": 1011,
    "WORKSPACE_TOO_SMALL": 1012,
    "BAD_STRUCT_SIZE": 1013,
    "BAD_EPSILON": 1014,
    "BAD_ITERATIONS": 1015,
    "BAD_TOLERANCE": 1016,
    "BAD_GROUP": 1017,
    "BAD_SCHEDULE": 1018,
    "MISALIGNED": 1019,
    "NOT_SUPPORTED": 2000,
    "NOT_IMPLEMENTED": 2001,
    "ARCH_MISMATCH": 2002,
    "NO_DEVICE": 3000,
    "CUDA_ERROR": 3001,
    "CUBLAS_ERROR": 3002,
    "ALLOC_FAILED": 3003,
    "INTERNAL_ERROR": 3004,
    "WRONG_DEVICE": 3005,
    "NONFINITE_INPUT": 4000,
}


# ---------------------------------------------------------------- structs
class LossDesc(Structure):
    """kdl_loss_desc_t: what to compute.  Build with new_desc()."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("divergence", c_int),  # kdl_divergence_t
        ("temperature", c_double),
        ("alpha", c_double),
        ("beta", c_double),
        ("head_rule", c_int),  # kdl_head_rule_t
        ("mu", c_double),
        ("top_k", c_int64),
        ("reduction", c_int),  # kdl_reduction_t
        ("scale", c_double),
        ("ignore_index", c_int64),
    ]


def _rows_fields(name, ld=None, dtype=None):
    """The fields of an input or output read as rows: its pointer, its row
    stride in elements (ld_<name>) and its kdl_dtype_t (<name>_dtype)."""
    return [(name, c_void_p), (ld or "ld_" + name, c_int64), (dtype or name + "_dtype", c_int)]


# Float statistics, in the order of the struct, and their key in the stats dict.
FLOAT_STATS = ("fkl", "rkl", "g_head", "g_tail", "w_head", "w_tail")


class LossArgs(Structure):
    """kdl_loss_args_t: where the data is.  Build with new_args()."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("rows", c_int64),
        ("vocab", c_int64),
        *_rows_fields("student"),
        *_rows_fields("teacher"),
        ("labels", c_void_p),  # const int64_t *
        *_rows_fields("grad"),
        ("out_dtype", c_int),
        ("loss", c_void_p),
        *[("stat_" + k, c_void_p) for k in FLOAT_STATS],
        ("stat_head_size", c_void_p),  # int64_t *
        ("info", c_void_p),  # int64_t *
        ("valid_rows", c_void_p),  # int64_t *
    ]


# kdloss_ot.h: batched log-domain Sinkhorn and SinKD.
OT_METRIC_COUNT = 2
OT_VALUE_COUNT = 2


class SinkhornDesc(Structure):
    """kdl_sinkhorn_desc_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("epsilon", c_double),
        ("max_iter", c_int64),
        ("tol", c_double),
        ("check_every", c_int64),
        ("eps_scaling", c_int),
        ("eps_scaling_factor", c_double),
        ("eps_stage_iter", c_int64),
        ("value", c_int),  # kdl_ot_value_t
        ("debias", c_int),
        ("metric", c_int),  # kdl_ot_metric_t
    ]


class SinkhornArgs(Structure):
    """kdl_sinkhorn_args_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("batch", c_int64),
        ("n", c_int64),
        ("m", c_int64),
        ("sizes_n", c_void_p),  # const int64_t * (host)
        ("sizes_m", c_void_p),
        ("dtype", c_int),
        ("cost", c_void_p),
        ("x", c_void_p),
        ("y", c_void_p),
        ("dim", c_int64),
        ("log_a", c_void_p),
        ("log_b", c_void_p),
        ("f_init", c_void_p),
        ("g_init", c_void_p),
        ("cost_xx", c_void_p),
        ("cost_yy", c_void_p),
        ("self_yy", c_void_p),
        ("self_yy_given", c_int),
        ("value", c_void_p),
        ("iterations", c_void_p),  # int64_t *
        ("marginal_error", c_void_p),
        ("f", c_void_p),
        ("g", c_void_p),
        ("plan", c_void_p),
        ("grad_x", c_void_p),
        ("info", c_void_p),  # int64_t *
    ]


class SinkdDesc(Structure):
    """kdl_sinkd_desc_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("group_size", c_int64),
        ("temperature", c_double),
        ("epsilon", c_double),
        ("max_iter", c_int64),
        ("tol", c_double),
        ("check_every", c_int64),
        ("metric", c_int),  # kdl_ot_metric_t
        ("scale", c_double),
    ]


class SinkdArgs(Structure):
    """kdl_sinkd_args_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("rows", c_int64),
        ("vocab", c_int64),
        *_rows_fields("student"),
        *_rows_fields("teacher"),
        *_rows_fields("grad"),
        ("out_dtype", c_int),
        ("loss", c_void_p),
        ("group_loss", c_void_p),
        ("plan", c_void_p),
        ("iterations", c_void_p),  # int64_t *
        ("marginal_error", c_void_p),
        ("info", c_void_p),  # int64_t *
    ]


# kdloss_ext.h: sparse teacher, vocabulary-parallel shard steps, fused linear + loss.
SPARSE_MODE_COUNT = 2
SPARSE_MAX_K = 1024
SHARD_OP_DONE, SHARD_OP_MAX, SHARD_OP_SUM = 0, 1, 2


class SparseArgs(Structure):
    """kdl_sparse_args_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("mode", c_int),  # kdl_sparse_mode_t
        ("rows", c_int64),
        ("vocab", c_int64),
        ("k", c_int64),
        *_rows_fields("student"),
        ("teacher_indices", c_void_p),  # const int64_t *
        ("ld_indices", c_int64),
        *_rows_fields("teacher_logprobs", "ld_logprobs", "teacher_dtype"),
        ("labels", c_void_p),  # const int64_t *
        *_rows_fields("grad"),
        ("out_dtype", c_int),
        ("loss", c_void_p),
        ("info", c_void_p),  # int64_t *
        ("valid_rows", c_void_p),  # int64_t *
        ("bad_index_rows", c_void_p),  # int64_t *
    ]


class ShardArgs(Structure):
    """kdl_shard_args_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("rows", c_int64),
        ("vocab", c_int64),
        ("vocab_offset", c_int64),
        ("vocab_local", c_int64),
        ("shard_rank", ctypes.c_int32),
        ("num_shards", ctypes.c_int32),
        *_rows_fields("student"),
        *_rows_fields("teacher"),
        ("labels", c_void_p),  # const int64_t *
        *_rows_fields("grad"),
        ("out_dtype", c_int),
        ("loss", c_void_p),
        ("info", c_void_p),  # int64_t *
        ("valid_rows", c_void_p),  # int64_t *
        ("stat_head_size", c_void_p),  # int64_t *
        ("head_mask", c_void_p),  # unsigned char *
        ("state", c_void_p),
        ("exchange", c_void_p),  # double *
    ]


class FusedLinearArgs(Structure):
    """kdl_fused_linear_args_t."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("rows", c_int64),
        ("hidden", c_int64),
        ("vocab", c_int64),
        *_rows_fields("hidden_states", "ld_hidden", "hidden_dtype"),
        *_rows_fields("weight"),
        *_rows_fields("teacher"),
        ("labels", c_void_p),  # const int64_t *
        ("grad_hidden", c_void_p),
        ("ld_grad_hidden", c_int64),
        ("grad_weight", c_void_p),
        ("ld_grad_weight", c_int64),
        ("grad_dtype", c_int),
        ("chunk_rows", c_int64),
        ("out_dtype", c_int),
        ("loss", c_void_p),
        ("info", c_void_p),  # int64_t *
        ("valid_rows", c_void_p),  # int64_t *
        # version 2
        ("grad_output", c_void_p),  # [N], reduction none only
        ("grad_output_dtype", c_int),
        ("bias", c_void_p),  # [V] in weight_dtype
        ("grad_bias", c_void_p),  # [V] in grad_dtype
        # version 3: teacher logits = H_t W_t^T (+ b_t), chunk by chunk
        ("teacher_hidden", c_void_p),  # [N, ld_teacher_hidden]
        ("teacher_hidden_size", c_int64),
        ("ld_teacher_hidden", c_int64),
        ("teacher_weight", c_void_p),  # [V, ld_teacher_weight]
        ("ld_teacher_weight", c_int64),
        ("teacher_bias", c_void_p),  # [V]
        ("teacher_linear_dtype", c_int),
        # version 4: a sparse (top-k) teacher, as SparseArgs has it
        ("teacher_indices", c_void_p),  # const int64_t * [N, ld_teacher_indices]
        ("ld_teacher_indices", c_int64),
        ("teacher_logprobs", c_void_p),  # [N, ld_teacher_logprobs]
        ("ld_teacher_logprobs", c_int64),
        ("teacher_logprobs_dtype", c_int),
        ("sparse_mode", c_int),  # kdl_sparse_mode_t
        ("k", c_int64),  # 0: no sparse teacher
        ("bad_index_rows", c_void_p),  # int64_t *
    ]


# ------------------------------------------------------------- exceptions
class KdlossError(RuntimeError):
    """A kdloss call returned a status other than KDL_STATUS_SUCCESS.

    Attributes: status (int), status_name ("KDL_STATUS_BAD_STRIDE"),
    detail (kdl_get_last_error(): which argument, which value), call.
    """

    def __init__(self, call, status, status_string, detail):
        self.call = call
        self.status = int(status)
        self.status_string = status_string
        self.status_name = status_string.split(":", 1)[0]
        self.detail = detail
        msg = f"{call}: {status_string}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class KdlossValueError(KdlossError, ValueError):
    """A bad-parameter status (the 1000s): also a ValueError."""


class InvalidRowsError(ValueError):
    """Rows with a NaN or +inf logit, or all logits -inf (in student or
    teacher), were found and raise_on_invalid was set (the sparse teacher
    adds its own reasons: see `reason`).  Attributes: invalid_rows, rows."""

    _REASON = ("a NaN or +inf logit, or every logit -inf, in the student or the teacher")

    def __init__(self, invalid_rows, rows, unit="rows", reason=None):
        self.invalid_rows = int(invalid_rows)
        self.rows = int(rows)
        self.reason = reason or self._REASON
        what = "rows are invalid" if unit == "rows" else "groups hold an invalid row"
        super().__init__(
            f"kdloss: {self.invalid_rows} of {self.rows} {what} ({self.reason}); they get loss "
            "NaN, a zero gradient and are left out of the reduction. Pass raise_on_invalid=False "
            "to accept that."
        )


# ---------------------------------------------------------------- loading
_lock = threading.Lock()
_lib = None
_lib_path = None

_HERE = os.path.dirname(os.path.abspath(__file__))


def _candidates():
    env = os.environ.get("KDLOSS_LIBRARY")
    if env:
        # An explicit choice: no fallback when it is wrong.
        return [env], True
    out = []
    for d in (_HERE, os.path.join(_HERE, "lib")):
        out += sorted(glob.glob(os.path.join(d, "libkdloss.so*")), key=len)
    found = ctypes.util.find_library("kdloss")
    if found:
        out.append(found)
    out += ["libkdloss.so.0", "libkdloss.so"]
    return out, False


def _bind(L, protos):
    """Sets restype and argtypes of every entry of protos (name -> (restype,
    argtypes)); AttributeError when the library lacks one."""
    for name, (restype, argtypes) in protos.items():
        fn = getattr(L, name)
        fn.restype = restype
        fn.argtypes = argtypes


def _name_protos(*kinds):
    """kdl_<kind>_name (code -> name, NULL when out of range) and
    kdl_<kind>_from_name (name -> code, < 0 when unknown)."""
    out = {}
    for k in kinds:
        out[f"kdl_{k}_name"] = (c_char_p, [c_int])
        out[f"kdl_{k}_from_name"] = (c_int, [c_char_p])
    return out


def _init_protos(*names):
    """The struct init functions (they take the struct by pointer)."""
    return {name: (None, [c_void_p]) for name in names}


_PROTOS = {
    "kdl_get_version": (c_int, []),
    "kdl_status_string": (c_char_p, [c_int]),
    "kdl_get_last_error": (c_char_p, []),
    **_init_protos("kdl_loss_desc_init", "kdl_loss_args_init"),
    "kdl_loss_validate": (c_int, [POINTER(LossDesc), POINTER(LossArgs), c_int]),
    **_name_protos("divergence", "head_rule", "reduction"),
    "kdl_dtype_name": (c_char_p, [c_int]),
    "kdl_dtype_size": (c_size_t, [c_int]),
    "kdl_ref_loss_forward_backward": (c_int, [POINTER(LossDesc), POINTER(LossArgs)]),
    "kdl_device_available": (c_int, []),
    "kdl_create": (c_int, [POINTER(c_void_p)]),
    "kdl_destroy": (c_int, [c_void_p]),
    "kdl_set_stream": (c_int, [c_void_p, c_void_p]),
    "kdl_get_stream": (c_int, [c_void_p, POINTER(c_void_p)]),
    "kdl_loss_workspace_size": (
        c_int, [c_void_p, POINTER(LossDesc), POINTER(LossArgs), POINTER(c_size_t)]),
    "kdl_loss_forward_backward": (
        c_int, [c_void_p, POINTER(LossDesc), POINTER(LossArgs), c_void_p, c_size_t]),
}


def _gpu_protos(**structs):
    """The workspace-size and run prototypes of GPU entry points that take
    (handle, desc, args[, workspace, bytes]): name -> (desc, args) types."""
    out = {}
    for name, (D, A) in structs.items():
        size_name = name[:-len("_loss")] if name.endswith("_loss") else name
        out[size_name + "_workspace_size"] = (
            c_int, [c_void_p, POINTER(D), POINTER(A), POINTER(c_size_t)])
        out[name] = (c_int, [c_void_p, POINTER(D), POINTER(A), c_void_p, c_size_t])
    return out


_OT_PROTOS = {
    **_name_protos("ot_metric", "ot_value"),
    **_init_protos("kdl_sinkhorn_desc_init", "kdl_sinkhorn_args_init", "kdl_sinkd_desc_init",
                   "kdl_sinkd_args_init"),
    "kdl_ref_sinkhorn": (c_int, [POINTER(SinkhornDesc), POINTER(SinkhornArgs)]),
    "kdl_ref_sinkd": (c_int, [POINTER(SinkdDesc), POINTER(SinkdArgs)]),
}
# The GPU entry points: bound when present (needed only for CUDA tensors).
_OT_GPU_PROTOS = _gpu_protos(kdl_sinkhorn=(SinkhornDesc, SinkhornArgs),
                             kdl_sinkd=(SinkdDesc, SinkdArgs))

_EXT_PROTOS = {
    **_name_protos("sparse_mode"),
    **_init_protos("kdl_sparse_args_init", "kdl_shard_args_init", "kdl_fused_linear_args_init"),
    "kdl_sparse_validate": (c_int, [POINTER(LossDesc), POINTER(SparseArgs), c_int]),
    "kdl_sparse_supports": (c_int, [c_int, c_int]),
    "kdl_sparse_check_indices": (c_int, [c_int64, c_int64, c_int64, c_void_p, c_int64]),
    "kdl_ref_sparse_loss": (c_int, [POINTER(LossDesc), POINTER(SparseArgs)]),
    "kdl_shard_sizes": (c_int, [POINTER(LossDesc), POINTER(ShardArgs), POINTER(c_size_t),
                                POINTER(c_size_t), POINTER(c_int)]),
    "kdl_ref_shard_step": (c_int, [POINTER(LossDesc), POINTER(ShardArgs), c_int, POINTER(c_int),
                                   POINTER(c_int64)]),
    "kdl_fused_linear_chunk_rows": (c_int64, [POINTER(FusedLinearArgs)]),
    "kdl_fused_linear_validate": (c_int, [POINTER(LossDesc), POINTER(FusedLinearArgs), c_int]),
    "kdl_ref_fused_linear_loss": (c_int, [POINTER(LossDesc), POINTER(FusedLinearArgs)]),
}
# The GPU entry points of kdloss_ext.h: bound when present (CUDA tensors only).
_EXT_GPU_PROTOS = dict(
    _gpu_protos(kdl_sparse_loss=(LossDesc, SparseArgs),
                kdl_fused_linear_loss=(LossDesc, FusedLinearArgs)),
    kdl_shard_step=(c_int, [c_void_p, POINTER(LossDesc), POINTER(ShardArgs), c_int,
                            POINTER(c_int), POINTER(c_int64)]))

# Per optional API: why it is unavailable (None: usable) and which of its GPU
# entry points the library lacks.
_api_error = {"ot": None, "ext": None}
_gpu_missing = {"ot": [], "ext": []}
_API_HEADER = {"ot": "the Sinkhorn / SinKD API of kdloss_ot.h",
               "ext": "the extension API of kdloss_ext.h"}


def _bind_optional(L, api, protos, gpu_protos):
    """An optional API (a library built before it landed lacks it): binds it
    and its GPU entry points that are present; returns None, or the reason
    it cannot be used."""
    missing = [name for name in protos if not hasattr(L, name)]
    if missing:
        return f"the library lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    _bind(L, protos)
    _gpu_missing[api][:] = [name for name in gpu_protos if not hasattr(L, name)]
    _bind(L, {k: v for k, v in gpu_protos.items() if hasattr(L, k)})
    return None


def _check_struct(L, init_name, ctype, cname, defaults):
    """A mirror against the library: its size, and the defaults the init
    function writes read back through the mirrored fields."""
    init = getattr(L, init_name)
    _check_struct_size(init, ctype)
    obj = ctype()
    init(ctypes.byref(obj))
    _check_defaults(cname, obj, defaults)


def _prototype_ot(L):
    err = _bind_optional(L, "ot", _OT_PROTOS, _OT_GPU_PROTOS)
    if err:
        return err
    _check_struct(L, "kdl_sinkhorn_desc_init", SinkhornDesc, "kdl_sinkhorn_desc_t", dict(
        epsilon=0.1, max_iter=1000, tol=1e-6, check_every=10, eps_scaling=0,
        eps_scaling_factor=0.8, eps_stage_iter=1, value=0, debias=0, metric=0))
    _check_struct(L, "kdl_sinkhorn_args_init", SinkhornArgs, "kdl_sinkhorn_args_t", dict(
        batch=0, n=0, m=0, cost=None, value=None, info=None))
    _check_struct(L, "kdl_sinkd_desc_init", SinkdDesc, "kdl_sinkd_desc_t", dict(
        group_size=0, temperature=2.0, epsilon=0.1, max_iter=20, tol=0.0, check_every=10,
        metric=1, scale=1.0))
    _check_struct(L, "kdl_sinkd_args_init", SinkdArgs, "kdl_sinkd_args_t", dict(
        rows=0, vocab=0, student=None, grad=None, loss=None, info=None))
    return None


def _prototype_ext(L):
    """The extension API (kdloss_ext.h) is optional like the Sinkhorn one;
    its struct mirrors are checked against the library as the dense ones."""
    err = _bind_optional(L, "ext", _EXT_PROTOS, _EXT_GPU_PROTOS)
    if err:
        return err
    zeros = dict(rows=0, vocab=0, student_dtype=DTYPE["f32"], grad_dtype=DTYPE["f32"],
                 out_dtype=DTYPE["f32"], student=None, grad=None, loss=None, info=None,
                 valid_rows=None)
    _check_struct(L, "kdl_sparse_args_init", SparseArgs, "kdl_sparse_args_t", dict(
        zeros, mode=0, k=0, teacher_dtype=DTYPE["f32"], teacher_indices=None,
        teacher_logprobs=None, labels=None, bad_index_rows=None))
    _check_struct(L, "kdl_shard_args_init", ShardArgs, "kdl_shard_args_t", dict(
        zeros, vocab_offset=0, vocab_local=0, shard_rank=0, num_shards=1,
        teacher_dtype=DTYPE["f32"], teacher=None, labels=None, stat_head_size=None,
        head_mask=None, state=None, exchange=None))
    _check_struct(L, "kdl_fused_linear_args_init", FusedLinearArgs, "kdl_fused_linear_args_t", dict(
        rows=0, hidden=0, vocab=0, hidden_dtype=DTYPE["f32"], weight_dtype=DTYPE["f32"],
        teacher_dtype=DTYPE["f32"], grad_dtype=DTYPE["f32"], out_dtype=DTYPE["f32"],
        chunk_rows=0, hidden_states=None, weight=None, teacher=None, grad_hidden=None,
        grad_weight=None, loss=None, info=None, valid_rows=None, grad_output=None,
        grad_output_dtype=DTYPE["f32"], bias=None, grad_bias=None, teacher_hidden=None,
        teacher_hidden_size=0, ld_teacher_hidden=0, teacher_weight=None, ld_teacher_weight=0,
        teacher_bias=None, teacher_linear_dtype=DTYPE["f32"], teacher_indices=None, ld_teacher_indices=0,
        teacher_logprobs=None, ld_teacher_logprobs=0, teacher_logprobs_dtype=DTYPE["f32"], sparse_mode=0,
        k=0, bad_index_rows=None))
    return None


def _check_struct_size(init, ctype):
    # A buffer larger than any plausible struct, so a C struct bigger than
    # the mirror cannot overflow it.
    buf = (ctypes.c_char * 4096)()
    init(ctypes.cast(buf, c_void_p))
    c_size = c_size_t.from_buffer(buf).value
    if c_size != ctypes.sizeof(ctype):
        raise ImportError(
            f"kdloss: {ctype.__name__} has size {ctypes.sizeof(ctype)} in the Python "
            f"binding but {c_size} in the library {_lib_path}: the binding does not match "
            "this libkdloss (rebuild the library or update the package)"
        )


def _check_defaults(cname, obj, want):
    for k, v in want.items():
        if getattr(obj, k) != v:
            raise ImportError(
                f"kdloss: field {k} of {cname} reads {getattr(obj, k)!r}, expected its "
                f"default {v!r}: the struct layout does not match {_lib_path}"
            )


def _check_layout(L):
    """Compare the ctypes mirrors with what the C init functions write."""
    _check_struct(L, "kdl_loss_desc_init", LossDesc, "kdl_loss_desc_t", dict(
        temperature=1.0, alpha=0.1, beta=0.5, mu=0.5, top_k=1, scale=1.0, ignore_index=-100,
        divergence=0, head_rule=0, reduction=REDUCTION_MEAN))
    _check_struct(L, "kdl_loss_args_init", LossArgs, "kdl_loss_args_t", dict(
        rows=0, vocab=0, student=None, grad=None, loss=None, valid_rows=None))


def lib():
    """The loaded library (loaded and checked on first use)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        names, explicit = _candidates()
        errors = []
        for name in names:
            if explicit and not os.path.exists(name):
                raise OSError(f"kdloss: KDLOSS_LIBRARY={name!r} does not exist")
            try:
                L = ctypes.CDLL(name)
            except OSError as e:
                errors.append(f"{name}: {e}")
                continue
            _lib_path = getattr(L, "_name", name)
            try:
                _bind(L, _PROTOS)
            except AttributeError as e:
                raise ImportError(f"kdloss: {name} is not a usable libkdloss ({e})") from None
            _check_layout(L)
            _api_error["ot"] = _prototype_ot(L)
            _api_error["ext"] = _prototype_ext(L)
            _lib = L
            return L
        raise OSError(
            "kdloss: libkdloss.so not found; build it (cmake + ninja) and set "
            "KDLOSS_LIBRARY=/path/to/libkdloss.so, or install it where the loader finds it.\n"
            "tried:\n  " + "\n  ".join(errors)
        )


def library_path():
    """Path (or soname) of the loaded library."""
    lib()
    return _lib_path


def _decode(b):
    return b.decode("utf-8", "replace") if b else ""


def check(status, call):
    """Raise KdlossError (KdlossValueError for bad parameters) on failure."""
    if status == 0:
        return
    L = lib()
    text = _decode(L.kdl_status_string(status))
    detail = _decode(L.kdl_get_last_error())
    cls = KdlossValueError if 1000 <= status < 2000 else KdlossError
    raise cls(call, status, text, detail)


# ------------------------------------------------------------ name tables
def _names(fn, count):
    return [_decode(fn(i)) for i in range(count)]


def divergence_names():
    return _names(lib().kdl_divergence_name, DIV_COUNT)


def head_rule_names():
    return _names(lib().kdl_head_rule_name, HEAD_COUNT)


def reduction_names():
    return _names(lib().kdl_reduction_name, REDUCTION_COUNT)


def _parse(kind, value, from_name, names):
    if not isinstance(value, str):
        raise TypeError(f"kdloss: {kind} must be a string (one of {', '.join(names())}), "
                        f"got {type(value).__name__}")
    code = from_name(value.strip().lower().encode())
    if code < 0:
        raise ValueError(f"kdloss: unknown {kind} {value!r}; expected one of {', '.join(names())}")
    return code


def _set_numbers(obj, floats=(), ints=(), flags=()):
    """Sets float, integer and flag fields from Python values: TypeError for
    a value that is not a real number / an integer (the library checks the
    ranges)."""
    for name, val in floats:
        try:
            setattr(obj, name, float(val))
        except (TypeError, ValueError):
            raise TypeError(f"kdloss: {name} must be a real number, got {val!r}") from None
    for name, val in ints:
        setattr(obj, name, as_int(name, val))
    for name, val in flags:
        setattr(obj, name, 1 if val else 0)


def as_int(name, val):
    """val as a Python int; TypeError for a bool or a non-integer."""
    if isinstance(val, bool) or not isinstance(val, int) and not hasattr(val, "__index__"):
        raise TypeError(f"kdloss: {name} must be an integer, got {val!r}")
    return int(val)


def _new(ctype, init_name):
    obj = ctype()
    getattr(lib(), init_name)(ctypes.byref(obj))
    return obj


def new_desc(divergence="akl", temperature=1.0, alpha=0.1, beta=0.5, head_rule="reference",
             mu=0.5, top_k=1, reduction="mean", scale=1.0, ignore_index=-100):
    """A LossDesc from Python values; names are checked here, numbers by the
    library (kdl_loss_validate) when the loss is computed."""
    L = lib()
    d = _new(LossDesc, "kdl_loss_desc_init")
    d.divergence = _parse("divergence", divergence, L.kdl_divergence_from_name, divergence_names)
    d.head_rule = _parse("head_rule", head_rule, L.kdl_head_rule_from_name, head_rule_names)
    d.reduction = _parse("reduction", reduction, L.kdl_reduction_from_name, reduction_names)
    _set_numbers(d, floats=(("temperature", temperature), ("alpha", alpha), ("beta", beta),
                            ("mu", mu), ("scale", scale)),
                 ints=(("top_k", top_k), ("ignore_index", ignore_index)))
    return d


def new_args():
    return _new(LossArgs, "kdl_loss_args_init")


def version():
    """(major, minor, patch) of the loaded library."""
    v = lib().kdl_get_version()
    return v // 10000, v // 100 % 100, v % 100


def device_available():
    """True when the library was built with CUDA and sees a device."""
    return bool(lib().kdl_device_available())


# ------------------------------------------------------ Sinkhorn helpers
def _require(api, what, gpu=False):
    lib()
    if _api_error[api] is not None:
        raise NotImplementedError(
            f"kdloss: {what} needs {_API_HEADER[api]}, which the loaded library {_lib_path} "
            f"does not have ({_api_error[api]}); rebuild libkdloss"
        )
    if gpu and _gpu_missing[api]:
        raise NotImplementedError(
            f"kdloss: {what} on CUDA tensors needs {', '.join(_gpu_missing[api])}, which the "
            f"loaded library {_lib_path} does not have; use CPU tensors (the reference)"
        )


def ot_available():
    """True when the loaded library has the Sinkhorn / SinKD API."""
    lib()
    return _api_error["ot"] is None


require_ot = functools.partial(_require, "ot")
require_ot_gpu = functools.partial(_require, "ot", gpu=True)


def metric_names():
    return _names(lib().kdl_ot_metric_name, OT_METRIC_COUNT)


def value_names():
    return _names(lib().kdl_ot_value_name, OT_VALUE_COUNT)


def new_sinkhorn_desc(epsilon=0.1, max_iter=1000, tol=1e-6, check_every=10, eps_scaling=False,
                      eps_scaling_factor=0.8, eps_stage_iter=1, value="transport", debias=False,
                      metric="sqeuclidean"):
    require_ot("sinkhorn")
    L = lib()
    d = _new(SinkhornDesc, "kdl_sinkhorn_desc_init")
    d.value = _parse("value", value, L.kdl_ot_value_from_name, value_names)
    d.metric = _parse("metric", metric, L.kdl_ot_metric_from_name, metric_names)
    _set_numbers(d,
                 floats=(("epsilon", epsilon), ("tol", tol),
                         ("eps_scaling_factor", eps_scaling_factor)),
                 ints=(("max_iter", max_iter), ("check_every", check_every),
                       ("eps_stage_iter", eps_stage_iter)),
                 flags=(("eps_scaling", eps_scaling), ("debias", debias)))
    return d


def new_sinkhorn_args():
    return _new(SinkhornArgs, "kdl_sinkhorn_args_init")


def new_sinkd_desc(group_size=0, temperature=2.0, epsilon=0.1, max_iter=20, tol=0.0,
                   check_every=10, metric="l1", scale=1.0):
    require_ot("sinkd_loss")
    L = lib()
    d = _new(SinkdDesc, "kdl_sinkd_desc_init")
    d.metric = _parse("metric", metric, L.kdl_ot_metric_from_name, metric_names)
    _set_numbers(d,
                 floats=(("temperature", temperature), ("epsilon", epsilon), ("tol", tol),
                         ("scale", scale)),
                 ints=(("group_size", group_size), ("max_iter", max_iter),
                       ("check_every", check_every)))
    return d


def new_sinkd_args():
    return _new(SinkdArgs, "kdl_sinkd_args_init")


# ----------------------------------------------- extension (kdloss_ext.h)
def ext_available():
    """True when the loaded library has the kdloss_ext.h API (sparse
    teacher, vocabulary-parallel steps, fused linear + loss)."""
    lib()
    return _api_error["ext"] is None


require_ext = functools.partial(_require, "ext")
require_ext_gpu = functools.partial(_require, "ext", gpu=True)


def sparse_mode_names():
    return _names(lib().kdl_sparse_mode_name, SPARSE_MODE_COUNT)


# Spellings accepted besides the library's own names ("renormalised", "tail").
_SPARSE_MODE_ALIASES = {"renormalized": "renormalised", "tail_bucket": "tail"}


def parse_sparse_mode(mode):
    require_ext("the sparse teacher")
    if isinstance(mode, str):
        key = mode.strip().lower()
        mode = _SPARSE_MODE_ALIASES.get(key, key)
    return _parse("mode", mode, lib().kdl_sparse_mode_from_name,
                  lambda: sparse_mode_names() + sorted(_SPARSE_MODE_ALIASES))


def new_sparse_args():
    require_ext("the sparse teacher")
    return _new(SparseArgs, "kdl_sparse_args_init")


def new_shard_args():
    require_ext("the vocabulary-parallel loss")
    return _new(ShardArgs, "kdl_shard_args_init")


def new_fused_linear_args():
    require_ext("the fused linear + loss")
    return _new(FusedLinearArgs, "kdl_fused_linear_args_init")


def shard_sizes(desc, args):
    """(state bytes, exchange length in doubles, number of steps)."""
    sb, ec, ns = c_size_t(0), c_size_t(0), c_int(0)
    check(lib().kdl_shard_sizes(ctypes.byref(desc), ctypes.byref(args), ctypes.byref(sb),
                                ctypes.byref(ec), ctypes.byref(ns)), "kdl_shard_sizes")
    return sb.value, ec.value, ns.value


# ------------------------------------------------------ the entry points
# Per op: (the float64 reference, the GPU workspace query, the GPU call);
# each takes (desc, args) and the GPU ones a handle first.
ENTRY_POINTS = {
    "loss": ("kdl_ref_loss_forward_backward", "kdl_loss_workspace_size",
             "kdl_loss_forward_backward"),
    "sinkhorn": ("kdl_ref_sinkhorn", "kdl_sinkhorn_workspace_size", "kdl_sinkhorn"),
    "sinkd": ("kdl_ref_sinkd", "kdl_sinkd_workspace_size", "kdl_sinkd"),
    "sparse": ("kdl_ref_sparse_loss", "kdl_sparse_workspace_size", "kdl_sparse_loss"),
    "fused_linear": ("kdl_ref_fused_linear_loss", "kdl_fused_linear_workspace_size",
                     "kdl_fused_linear_loss"),
}


# The optional API (see _require) each op's GPU entry point belongs to.
_OP_API = {"sinkhorn": "ot", "sinkd": "ot", "sparse": "ext", "fused_linear": "ext",
           "shard": "ext"}


def require_gpu(op, what):
    """NotImplementedError unless the library has op's GPU entry points."""
    if op in _OP_API:
        _require(_OP_API[op], what, gpu=True)


def call_ref(op, desc, args):
    """The float64 CPU reference of op on host buffers."""
    name = ENTRY_POINTS[op][0]
    check(getattr(lib(), name)(ctypes.byref(desc), ctypes.byref(args)), name)


# The library needs a 16-byte aligned workspace and lays its pieces out at
# 256-byte offsets from the start; the binding hands it a 256-byte aligned one
# whatever the allocator gives.
WORKSPACE_ALIGN = 256


def call_gpu(op, handle, stream, desc, args, alloc):
    """The GPU entry point of op on `stream` (set on the handle first): asks
    for the workspace size, gets the workspace from alloc(nbytes) (an object
    with data_ptr(); kept alive until the call has been enqueued; nbytes
    includes the slack for the alignment) and runs."""
    _, size_name, name = ENTRY_POINTS[op]
    L = lib()
    check(L.kdl_set_stream(handle, c_void_p(stream)), "kdl_set_stream")
    nbytes = c_size_t(0)
    check(getattr(L, size_name)(handle, ctypes.byref(desc), ctypes.byref(args),
                                ctypes.byref(nbytes)), size_name)
    ws = ptr = None
    if nbytes.value:
        ws = alloc(nbytes.value + WORKSPACE_ALIGN - 1)
        ptr = -(-ws.data_ptr() // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
    check(getattr(L, name)(handle, ctypes.byref(desc), ctypes.byref(args), c_void_p(ptr),
                           nbytes.value), name)


def shard_step(handle, desc, args, step):
    """One step of the vocabulary-parallel protocol (the reference when
    handle is None): (op code, count of exchange doubles)."""
    L = lib()
    op, count = c_int(0), c_int64(0)
    if handle is None:
        check(L.kdl_ref_shard_step(ctypes.byref(desc), ctypes.byref(args), int(step),
                                   ctypes.byref(op), ctypes.byref(count)), "kdl_ref_shard_step")
    else:
        check(L.kdl_shard_step(handle, ctypes.byref(desc), ctypes.byref(args), int(step),
                               ctypes.byref(op), ctypes.byref(count)), "kdl_shard_step")
    return op.value, int(count.value)


# ----------------------------------------------------------- GPU handles
_tls = threading.local()


def handle_for_current_device(device_index):
    """A kdl_handle_t for device_index, created on first use, one per thread
    and device (a handle binds the current CUDA device at creation; its
    stream is set before every call).  The caller makes device_index current
    before calling."""
    handles = getattr(_tls, "handles", None)
    if handles is None:
        handles = _tls.handles = {}
    h = handles.get(device_index)
    if h is None:
        hp = c_void_p()
        check(lib().kdl_create(ctypes.byref(hp)), "kdl_create")
        h = handles[device_index] = hp
    return h
