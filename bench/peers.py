#!/usr/bin/env python3
"""bench/peers.py - the peers of kdloss, timed the same way on the same GPU,
merged into the same JSON results file as `kdloss bench`.

Loss peers (forward + backward to the student logits, reduction mean,
temperature 1, on the shapes / dtypes / divergences / head rules of the
kdloss rows of --json, or of the options):
  torch_eager    textbook PyTorch forms written here in the manner of the
                 reference codes: FKL / RKL / SKL / SRKL / TVD as DistiLLM's
                 losses.py writes them (softmax / log_softmax in float32, inf
                 masks, mixtures as log of mixed probabilities), FKL_RKL as
                 the two summed, AKL as the AKL authors' get_ratio (sort the
                 teacher, cumulative mass, gaps, detached weights), JSD as
                 TRL's generalized_jsd_loss (logsumexp mixture, kl_div with
                 log_target).  Differences kept small on purpose so losses
                 agree with kdloss: FKL / SKL are true KLs (DistiLLM's code
                 computes the cross-entropy, which differs by H(p), same
                 gradient); FKL_RKL weighs both by 1 (DistiLLM's symmetric_kl
                 uses 1 - lam and lam); sorts are stable (kdloss breaks ties by
                 index; the AKL code does not say).
  torch_compile  torch.compile(dynamic=False) of the same functions.
  liger          Liger-Kernel's kl_div (FKL), JSD (beta=1: RKL; JSD), TVD,
                 if importable.  Its kernels take log-probabilities (TVD:
                 probabilities), so the timed step includes the float32
                 log_softmax / softmax a user runs first.
Other ops (bench/README.md): sparse top-k teacher (torch_eager, torch_compile
of the textbook gather-after-log_softmax renormalised KL), fused linear +
JSD (in the dtype of each kdloss fused_linear row, or of --dtypes: H, W, T,
H_t, W_t and the autograd gradients in bf16 / f16 / f32; teacher "logits":
torch_eager materialising H W^T against the given T; teacher "linear", the
teacher as (H_t, W_t): torch_eager materialising H W^T and H_t W_t^T, liger =
liger_fused_linear_jsd(H, W, H_t, W_t)), ragged
Sinkhorn (torch_eager and pot: Python loops over the problems), SinKD
(torch_eager).  kdloss's side through the Python package.  Written without a
GPU: only --self-test and --cpu-dry-run ran (the latter with Liger-Kernel's
kernels in Triton's interpreter, TRITON_INTERPRET=1).
Sinkhorn peers (B problems of n x m, f32, eps 0.1, a fixed number of
iterations, ms per iteration; cost from points x, y [B, n, 64] as squared
Euclidean distances, built outside the timing):
  torch_eager    a hand-batched log-domain loop (f then g update, logsumexp)
  torch_compile  the same with the iteration body compiled
  pot            POT's ot.batch.solve_batch(method="log_sinkhorn", tol=0)
                 (it tests convergence every 10 iterations: part of its cost)
  flash_sinkhorn flash-sinkhorn's SamplesLoss(backend="alternating",
                 potentials=True, no eps-scaling, allow_tf32=False), on the
                 points (it never builds C; it loops over the batch itself)

Correctness first: every peer's loss and gradient are compared with a
float64 reference (chunked over rows, written here from the definitions of
DESIGN section 1) and, when the kdloss Python package (python/kdloss) or
libkdloss.so via ctypes runs on this GPU, its loss with kdloss's loss.
Rows over tolerance get status "mismatch" (still timed).

Timing: CUDA events around each step, a buffer of max(4 x L2, 256 MiB)
zeroed before each timed run (L2 flushed), warm-up first (it absorbs
torch.compile's compilation), median and 20th / 80th percentiles.
peak_extra_bytes: torch.cuda.max_memory_allocated during one step minus what
was allocated before it minus the gradient it returns (what the step needs
beyond its inputs and its output).

Usage (bench/run_all.sh runs it):
  python3 bench/peers.py --json KDLOSS.json --out RESULTS.json [--png RESULTS.png]
  python3 bench/peers.py --merge-only --json KDLOSS.json --out RESULTS.json
Options --shapes, --dtypes, --divergences, --head-rules, --repeats, --warmup,
--quick, --sinkhorn, --sinkhorn-iters as `kdloss bench`; --impls to choose
peers; --budget-s to stop starting new configurations after that many
seconds (the rest are recorded as "skipped").  KDL_PEERS_STOP_AT (epoch
seconds, set by bench/run_all.sh from its own budget) caps that deadline; a
torch_compile row is not started with under COMPILE_RESERVE_S left (its
first call compiles).  The output is written after every op, and an op that
raises is logged and left out: the other ops still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DIVERGENCES = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]
HEAD_RULES = ["reference", "mass", "topk"]
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}
LOSS_IMPLS = ["torch_eager", "torch_compile", "liger"]
SINKHORN_IMPLS = ["torch_eager", "torch_compile", "pot", "flash_sinkhorn"]
OPS = ["loss", "sinkhorn", "sparse", "fused_linear", "sinkhorn_ragged", "sinkd"]
# The fixed problem lists of the ragged Sinkhorn row (bench/bench_lib.c's).
RAGGED_DEFAULT = ([64, 2048, 128, 1024, 256, 512, 96, 1536, 192, 768, 384, 640,
                   80, 1792, 160, 896, 320, 448, 112, 1280, 224, 960, 576, 1152],
                  [64, 2048, 256, 512, 1024, 128, 96, 768, 384, 1536, 192, 640,
                   2048, 64, 896, 160, 448, 320, 1280, 112, 960, 224, 1152, 576])
RAGGED_QUICK = ([64, 512, 96, 384, 128, 256, 192, 320], [64, 128, 384, 96, 256, 512, 320, 192])
ALPHA, BETA, TEMPERATURE = 0.1, 0.5, 1.0
SINKHORN_EPS = 0.1
SINKHORN_DIM = 64
LIGER_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
TOL = {"f32": 1e-4, "bf16": 1e-2, "f16": 1e-2}
SCHEMA = "kdloss-bench/1"
# A torch_compile row's first call compiles forward and backward (Inductor,
# dynamic=False: a new shape or dtype compiles again); at 8192 x 151936 that
# can take a minute or more, which the deadline check before a row cannot
# see.  So such a row is skipped when less than this is left.
COMPILE_RESERVE_S = 90.0
# POT picks a backend by trying its registered ones in order, and JAX comes
# before PyTorch: ot.batch.solve_batch on torch tensors instantiates POT's
# JaxBackend, which (jax-cuda installed, as on the device image) puts arrays
# on the GPU, and JAX then takes 75% of the device memory for itself; every
# later peer in the process would run in what is left.  So POT is told to
# skip JAX, TensorFlow and CuPy before it is imported, and JAX (if anything
# imports it anyway) not to preallocate.
POT_QUIET_ENV = {"POT_BACKEND_DISABLE_JAX": "1", "POT_BACKEND_DISABLE_TENSORFLOW": "1",
                 "POT_BACKEND_DISABLE_CUPY": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def quiet_other_frameworks(environ=None):
    """Sets POT_QUIET_ENV where unset (before POT is imported)."""
    environ = os.environ if environ is None else environ
    for k, v in POT_QUIET_ENV.items():
        environ.setdefault(k, v)


# ------------------------------------------------------------ byte model
# The same model as bench/bench_lib.c (README.md in this folder).
def loss_bytes(rows, vocab, dtype):
    return rows * vocab * 3 * DTYPE_BYTES[dtype]


def sinkhorn_iter_bytes(batch, n, m):
    return 2 * batch * n * m * 4


def sparse_bytes(rows, vocab, k, dtype):
    """read S, read the top-k (int64 indices + log-probs), write dS."""
    return rows * vocab * 2 * DTYPE_BYTES[dtype] + rows * k * (8 + DTYPE_BYTES[dtype])


def fused_linear_bytes(rows, hidden, vocab, dtype):
    """read H, W, T, write dH, dW, all in dtype (kdloss's gradient dtype for
    16-bit inputs is theirs, f32 for f32; autograd's is the parameter's)."""
    return (rows + vocab) * hidden * 2 * DTYPE_BYTES[dtype] + rows * vocab * DTYPE_BYTES[dtype]


def fused_linear_tl_bytes(rows, hidden, teacher_hidden, vocab, dtype):
    """The teacher as a linear layer: read H, W, H_t, W_t, write dH, dW, all
    in dtype (no teacher logits read)."""
    return ((rows + vocab) * hidden * 2 + (rows + vocab) * teacher_hidden) * DTYPE_BYTES[dtype]


def gb_per_s(nbytes, ms):
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def fraction(gbps, copy_gbps):
    if gbps is None or not copy_gbps or not math.isfinite(copy_gbps) or copy_gbps <= 0:
        return None
    return gbps / copy_gbps


def percentile(xs, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = p / 100.0 * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------- options
def _list(value, allowed, what):
    items = value.split(",")
    if value == "all":
        return list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad or len(set(items)) != len(items) or not value:
        raise argparse.ArgumentTypeError(f"{what}: bad list '{value}' (choose from {','.join(allowed)})")
    return items


def _sizes(value, what, arity, expected, single=False):
    """A comma list of colon-separated positive sizes (N:V, N:d:V, ...);
    single: exactly one item, or "none" for ()."""
    if single and value == "none":
        return ()
    out = []
    for item in value.split(","):
        m = re.fullmatch(":".join([r"(\d+)"] * arity), item)
        if not m or min(int(g) for g in m.groups()) < 1 or (single and "," in value):
            noun = "value" if single else "shape"  # the words of `kdloss bench`
            raise argparse.ArgumentTypeError(f"{what}: bad {noun} '{item}' (expected {expected})")
        out.append(tuple(int(g) for g in m.groups()))
    return out[0] if single else out


def _shapes(value, what="--shapes"):
    return _sizes(value, what, 2, "N:V")


def _sinkhorn(value):
    return _sizes(value, "--sinkhorn", 3, "B:n:m or none", single=True)


def _ints(value, what, lo=1, hi=None):
    try:
        out = [int(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: bad list '{value}'") from None
    if any(x < lo or (hi and x > hi) for x in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{what}: bad list '{value}'")
    return out


def _fused_shapes(value):
    return _sizes(value, "--fused-shapes", 3, "N:d:V")


def _ragged(value):
    ns, ms = [], []
    for item in value.split(","):
        m = re.fullmatch(r"(\d+)(?::(\d+))?", item)
        if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
            raise argparse.ArgumentTypeError(f"--ragged-sizes: bad problem '{item}' (n:m or n)")
        ns.append(int(m.group(1)))
        ms.append(int(m.group(2) or m.group(1)))
    return ns, ms


def _sinkd(value):
    out = _sizes(value, "--sinkd", 3, "N:V:G, G dividing N, or none", single=True)
    if out and out[0] % out[2]:
        raise argparse.ArgumentTypeError(f"--sinkd: bad value '{value}' (N:V:G, G dividing N, or none)")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description="Time kdloss's peers; merge into the kdloss bench JSON.")
    p.add_argument("--json", help="kdloss bench JSON to merge (its meta and shapes are used)")
    p.add_argument("--out", help="results file to write / merge into (default: --json)")
    p.add_argument("--png", help="bar chart of GB/s by implementation (default: OUT with .png)")
    p.add_argument("--merge-only", action="store_true", help="merge --json into --out, time nothing")
    p.add_argument("--shapes", type=_shapes)
    p.add_argument("--dtypes", type=lambda v: _list(v, ["bf16", "f16", "f32"], "--dtypes"))
    p.add_argument("--divergences", type=lambda v: _list(v, DIVERGENCES, "--divergences"))
    p.add_argument("--head-rules", type=lambda v: _list(v, HEAD_RULES, "--head-rules"))
    p.add_argument("--impls", type=lambda v: _list(v, sorted(set(LOSS_IMPLS + SINKHORN_IMPLS)), "--impls"))
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--mu", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--sinkhorn", type=_sinkhorn, default=None, help="B:n:m or none (default 64:1024:1024)")
    p.add_argument("--sinkhorn-iters", type=int, default=100)
    p.add_argument("--ops", type=lambda v: _list(v, OPS, "--ops"))
    p.add_argument("--sparse-shapes", type=lambda v: _shapes(v, "--sparse-shapes"))
    p.add_argument("--sparse-k", type=lambda v: _ints(v, "--sparse-k", 1, 1024))
    p.add_argument("--fused-shapes", type=_fused_shapes)
    p.add_argument("--ragged-sizes", type=_ragged)
    p.add_argument("--sinkd", type=_sinkd)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--kdloss-lib", default=os.environ.get("KDLOSS_LIBRARY"))
    p.add_argument("--commit")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the code paths on the CPU (tiny shapes; timings meaningless, no JSON meta device)")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 when a row ends in error or mismatch (the CPU dry run in CI)")
    p.add_argument("--self-test", action="store_true",
                   help="check the textbook forms and the float64 reference on the CPU, then exit")
    a = p.parse_args(argv)
    if a.self_test:
        return a
    if a.repeats is not None and a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.warmup is not None and a.warmup < 0:
        p.error("--warmup must be >= 0")
    if not a.out and not a.json:
        p.error("give --out (and usually --json), or --self-test")
    a.out = a.out or a.json
    a.png = a.png or (os.path.splitext(a.out)[0] + ".png")
    return a


# ------------------------------------------------------------ JSON merge
def row_key(r):
    op = r.get("op")
    if op == "sinkhorn":
        return (r.get("impl"), "sinkhorn", r.get("dtype"), r.get("batch"), r.get("n"), r.get("m"))
    if op == "sparse":
        return (r.get("impl"), op, r.get("divergence"), r.get("mode"), r.get("dtype"), r.get("rows"),
                r.get("vocab"), r.get("k"))
    if op == "fused_linear":  # rows written before the teacher key had the teacher's logits
        return (r.get("impl"), op, r.get("divergence"), r.get("dtype"), r.get("rows"), r.get("hidden"),
                r.get("vocab"), r.get("teacher") or "logits", r.get("teacher_hidden"))
    if op == "sinkhorn_ragged":
        return (r.get("impl"), op, r.get("dtype"), tuple(r.get("sizes_n") or ()), tuple(r.get("sizes_m") or ()))
    if op == "sinkd":
        return (r.get("impl"), op, r.get("metric"), r.get("dtype"), r.get("rows"), r.get("vocab"),
                r.get("group_size"))
    return (r.get("impl"), "loss", r.get("divergence"), r.get("dtype"), r.get("rows"), r.get("vocab"),
            r.get("head_rule"))


def load_doc(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"peers.py: {path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return doc


def merge_rows(doc, rows):
    """New rows replace rows of the same key; the others stay, in order."""
    index = {row_key(r): i for i, r in enumerate(doc["rows"])}
    for r in rows:
        k = row_key(r)
        if k in index:
            doc["rows"][index[k]] = r
        else:
            index[k] = len(doc["rows"])
            doc["rows"].append(r)


def write_doc(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("{\n")
        keys = [k for k in doc if k != "rows"]
        for k in keys:
            f.write(f"  {json.dumps(k)}: {json.dumps(doc[k], allow_nan=False)},\n")
        f.write('  "rows": [\n')
        for i, r in enumerate(doc["rows"]):
            f.write("    " + json.dumps(r, allow_nan=False) + ("," if i + 1 < len(doc["rows"]) else "") + "\n")
        f.write("  ]\n}\n")
    os.replace(tmp, path)


def clean(x):
    """JSON has no NaN / inf: those become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------- targets
TARGET_SHAPE = (8192, 151936)


def summarize_targets(rows):
    """The issue's targets, bf16, N=8192, V=151936, forward + backward."""
    def ok(r):
        return r.get("status") in ("ok", "mismatch") and r.get("ms")

    sel = [r for r in rows if r.get("op") == "loss" and r.get("dtype") == "bf16"
           and (r.get("rows"), r.get("vocab")) == TARGET_SHAPE and ok(r)]
    kd = {(r["divergence"], r.get("head_rule")): r for r in sel if r["impl"] == "kdloss"}
    out = {}
    fkl = kd.get(("fkl", None))
    out["fkl_fraction_of_copy_bandwidth"] = {
        "target": ">= 0.90", "value": fkl.get("fraction_of_copy_bandwidth") if fkl else None}
    akl = [r for (d, _), r in kd.items() if d == "akl"]
    ratio = max((r["ms"] / fkl["ms"] for r in akl), default=None) if fkl else None
    out["akl_time_over_fkl"] = {"target": "<= 1.15", "value": ratio}
    for impl, want in (("torch_eager", 5.0), ("torch_compile", 1.5), ("liger", 2.0)):
        speed = []
        for r in sel:
            if r["impl"] != impl:
                continue
            k = kd.get((r["divergence"], r.get("head_rule")))
            if k:
                speed.append(r["ms"] / k["ms"])
        out[f"speedup_vs_{impl}_min"] = {"target": f">= {want}", "value": min(speed) if speed else None}
    # the other ops (bench/README.md): sparse top-k at bf16 8192 x 151936,
    # every k; fused linear's peak extra memory over the logits it avoids,
    # in float32 and in the row's own dtype (bf16 / f16 rows: N V 2), at
    # V = 151936
    sp = [r for r in rows if r.get("op") == "sparse" and r.get("impl") == "kdloss" and ok(r)
          and r.get("dtype") == "bf16" and (r.get("rows"), r.get("vocab")) == TARGET_SHAPE]
    out["sparse_fraction_of_copy_bandwidth_min"] = {
        "target": ">= 0.85",
        "value": min((r["fraction_of_copy_bandwidth"] for r in sp if r.get("fraction_of_copy_bandwidth")),
                     default=None)}
    fl = [r for r in rows if r.get("op") == "fused_linear" and r.get("impl") == "kdloss" and ok(r)
          and r.get("vocab") == TARGET_SHAPE[1] and r.get("peak_extra_bytes") is not None and r.get("logits_bytes")]
    out["fused_linear_peak_over_logits_max"] = {
        "target": "<= 0.125",
        "value": max((r["peak_extra_bytes"] / r["logits_bytes"] for r in fl), default=None)}
    out["fused_linear_peak_over_dtype_logits_max"] = {
        "target": "<= 0.125",
        "value": max((r["peak_extra_bytes"] / r["logits_dtype_bytes"] for r in fl if r.get("logits_dtype_bytes")),
                     default=None)}
    for name, t in out.items():
        v = t["value"]
        if v is None:
            t["met"] = None
        elif t["target"].startswith(">="):
            t["met"] = v >= float(t["target"][3:])
        else:
            t["met"] = v <= float(t["target"][3:])
    return out


# ----------------------------------------------------------------- plot
def plot(doc, png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"peers.py: matplotlib not importable ({e}); no chart", file=sys.stderr)
        return False
    copy = doc.get("meta", {}).get("copy_gb_per_s")
    rows = [r for r in doc["rows"] if r.get("gb_per_s") and r.get("status") in ("ok", "mismatch")]
    groups = {}
    for r in rows:
        if r["op"] == "loss":
            g = f"{r['dtype']} N={r['rows']} V={r['vocab']}"
            x = r["divergence"] + ("/" + r["head_rule"] if r.get("head_rule") else "")
        elif r["op"] == "sparse":
            g = f"sparse top-k {r['dtype']} N={r['rows']} V={r['vocab']}"
            x = f"k={r['k']}"
        elif r["op"] == "fused_linear":
            g = "fused linear + JSD (GEMM-bound: GB/s of the byte model)"
            x = f"{r['dtype']} {r['rows']}x{r['hidden']}x{r['vocab']}" + (
                " HtWt" if r.get("teacher") == "linear" else "")
        elif r["op"] == "sinkhorn_ragged":
            g = "sinkhorn ragged f32 (per iteration)"
            x = f"{r['batch']} problems"
        elif r["op"] == "sinkd":
            g = f"SinKD {r['dtype']} N={r['rows']} V={r['vocab']} groups of {r['group_size']}"
            x = r["metric"]
        else:
            g = f"sinkhorn f32 B={r['batch']} n={r['n']} m={r['m']} (per iteration)"
            x = "sinkhorn"
        groups.setdefault(g, []).append((x, r["impl"], r["gb_per_s"]))
    if not groups:
        print("peers.py: no timed rows; no chart", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(15, 3.6 * len(groups)), squeeze=False)
    for ax, (g, items) in zip(axes[:, 0], sorted(groups.items())):
        xs = list(dict.fromkeys(x for x, _, _ in items))
        impls = list(dict.fromkeys(i for _, i, _ in items))
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            vals = {x: v for x, i, v in items if i == impl}
            pos = [j + (k - (len(impls) - 1) / 2) * width for j in range(len(xs))]
            ax.bar(pos, [vals.get(x, 0.0) for x in xs], width, label=impl)
        if copy:
            ax.axhline(copy, color="k", linestyle="--", linewidth=1, label=f"D2D copy {copy:.0f} GB/s")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=20, fontsize=8)
        top = max([v for _, _, v in items] + ([copy] if copy else []))
        ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
        ax.set_ylabel("GB/s (byte model)")
        ax.set_title(g, fontsize=10)
        ax.legend(fontsize=7, ncol=min(6, len(impls) + 1), loc="upper right")
    meta = doc.get("meta", {})
    fig.suptitle(f"kdloss and peers, {meta.get('device', {}).get('name', '?')}, "
                 f"commit {meta.get('commit', '?')}, {meta.get('date', '?')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# =============================================================== torch
class Env:
    """torch, the device, the L2 flush buffer, the kdloss binding."""

    def __init__(self, args):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.cpu = bool(args.cpu_dry_run)
        if self.cpu:
            self.dev = torch.device("cpu")
            self.props = None
            self.l2 = 2**20
            self.flush = torch.empty(4 * self.l2, dtype=torch.uint8)
        else:
            if not torch.cuda.is_available():
                raise SystemExit("peers.py: no CUDA device found")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            # 16-bit GEMMs (the bf16 / f16 fused_linear peers) accumulate in
            # FP32 throughout, as kdloss's cublasGemmEx with CUBLAS_COMPUTE_32F
            for flag in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
                if hasattr(torch.backends.cuda.matmul, flag):
                    setattr(torch.backends.cuda.matmul, flag, False)
            self.dev = torch.device("cuda")
            props = torch.cuda.get_device_properties(self.dev)
            self.props = props
            self.l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
            self.flush = torch.empty(max(4 * self.l2, 256 * 2**20), dtype=torch.uint8, device=self.dev)
        self.dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
        self.args = args
        self.kdloss = KdlossBinding(args.kdloss_lib)

    # -------------------------------------------------------- timing
    def time_steps(self, step, n_sets, repeats, warmup):
        torch = self.torch
        for i in range(warmup):
            step(i % n_sets)
        if self.cpu:  # dry run: host clock
            out = []
            for i in range(repeats):
                t0 = time.perf_counter()
                step(i % n_sets)
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        stops = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            self.flush.zero_()
            starts[i].record()
            step(i % n_sets)
            stops[i].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(starts, stops)]

    def peak_extra(self, step, out_bytes):
        torch = self.torch
        if self.cpu:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(0)
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base - out_bytes)

    def n_sets(self, footprint):
        if footprint >= 4 * self.l2:
            return 1
        return max(1, min(8, -(-4 * self.l2 // footprint)))

    def logits(self, n, v, dtype, seed):
        """N(0, 4) logits plus 4 outliers of +11 per row (peaked softmax,
        never zeros), as kdloss bench's inputs."""
        torch = self.torch
        g = torch.Generator(device=self.dev)
        g.manual_seed(seed)
        x = torch.randn(n, v, device=self.dev, dtype=torch.float32, generator=g).mul_(2.0)
        idx = torch.randint(0, v, (n, 4), device=self.dev, generator=g)
        x.scatter_add_(1, idx, torch.full((n, 4), 11.0, device=self.dev))
        return x.to(self.dtype[dtype])


# ------------------------------------------------ the textbook forms
def akl_tail(torch, p_sorted, mu, rule, k):
    """The AKL tail mask over the teacher's probabilities sorted descending
    (ties by lower index), by kdloss's head rules: "reference" (the head is
    the prefix of cumulative mass <= mu, at least the top token), "mass"
    (the shortest prefix reaching mu), "topk" (the top k)."""
    if rule == "reference":
        tail = p_sorted.cumsum(dim=-1) > mu
        tail[:, 0] = False
        return tail
    if rule == "mass":
        return (p_sorted.cumsum(dim=-1) - p_sorted) >= mu
    return (torch.arange(p_sorted.shape[-1], device=p_sorted.device) >= k).expand_as(p_sorted)


def jsd_mean(F, torch, s, t, beta=BETA):
    """TRL's generalized_jsd_loss: the mixture by logsumexp, kl_div with log
    targets, mean over rows; in float32 (float64 for float64 logits)."""
    dt = torch.float32 if s.dtype != torch.float64 else torch.float64
    slp = F.log_softmax(s, dim=-1, dtype=dt)
    tlp = F.log_softmax(t, dim=-1, dtype=dt)
    mix = torch.logsumexp(torch.stack([tlp + math.log(beta), slp + math.log(1 - beta)]), dim=0)
    kl_t = F.kl_div(mix, tlp, reduction="none", log_target=True)
    kl_s = F.kl_div(mix, slp, reduction="none", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s).sum() / s.shape[0]


def fused_tl_textbook(F, torch, H, W, Ht, Wt):
    """The teacher as a linear layer, as a user writes it: both logits
    materialised (the frozen teacher's without autograd), then TRL's JSD."""
    with torch.no_grad():
        T = Ht @ Wt.t()
    return jsd_mean(F, torch, H @ W.t(), T)


def textbook(env):
    """The eager peers, keyed by divergence; akl takes (mu, rule, k)."""
    torch, F = env.torch, env.F
    f32 = torch.float32

    def kl_rows(a, b):
        # DistiLLM's forward_kl / reverse_kl: KL(softmax a || softmax b) per
        # row, inf positions masked; as a true KL (forward_kl omits a's log p)
        ap = F.softmax(a, dim=-1, dtype=f32)
        alp = F.log_softmax(a, dim=-1, dtype=f32)
        blp = F.log_softmax(b, dim=-1, dtype=f32)
        inf_mask = torch.isinf(a) | torch.isinf(b)
        return torch.masked_fill(ap * (alp - blp), inf_mask, 0).sum(dim=-1)

    def fkl_rows(s, t):
        return kl_rows(t, s)

    def rkl_rows(s, t):
        return kl_rows(s, t)

    def fkl(s, t):
        return fkl_rows(s, t).mean()

    def rkl(s, t):
        return rkl_rows(s, t).mean()

    def fkl_rkl(s, t):
        return fkl(s, t) + rkl(s, t)

    def akl_weights(s, t, mu, rule, k):
        # the AKL authors' get_ratio, with kdloss's three head rules
        with torch.no_grad():
            tp = F.softmax(t, dim=-1, dtype=f32)
            sp = F.softmax(s, dim=-1, dtype=f32)
            stp, idx = tp.sort(dim=-1, descending=True, stable=True)
            ssp = sp.gather(dim=-1, index=idx)
            errors = (stp - ssp).abs()
            tail = akl_tail(torch, stp, mu, rule, k)
            s1 = errors.masked_fill(tail, 0.0).sum(dim=-1)
            s2 = errors.masked_fill(~tail, 0.0).sum(dim=-1)
            tot = s1 + s2
            half = torch.full_like(tot, 0.5)
            wh = torch.where(tot > 0, s1 / tot.clamp_min(1e-30), half)
            wt = torch.where(tot > 0, s2 / tot.clamp_min(1e-30), half)
        return wh, wt

    def akl(s, t, mu, rule, k):
        wh, wt = akl_weights(s, t, mu, rule, k)
        return (wh * fkl_rows(s, t) + wt * rkl_rows(s, t)).mean()

    def jsd(s, t, beta=BETA):
        return jsd_mean(F, torch, s, t, beta)

    def tvd(s, t):
        # DistiLLM's tv_distance
        sp = F.softmax(s, dim=-1, dtype=f32)
        tp = F.softmax(t, dim=-1, dtype=f32)
        return (0.5 * (sp - tp).abs().sum(dim=-1)).mean()

    def skew_kl(a, b, alpha):
        # DistiLLM's skewed_forward_kl / skewed_reverse_kl: KL(pa || alpha pa
        # + (1 - alpha) pb), the log of the mixed probabilities; true KL
        ap = F.softmax(a, dim=-1, dtype=f32)
        alp = F.log_softmax(a, dim=-1, dtype=f32)
        bp = F.softmax(b, dim=-1, dtype=f32)
        mlp = torch.log(alpha * ap + (1 - alpha) * bp)
        inf_mask = torch.isinf(a) | torch.isinf(b)
        return torch.masked_fill(ap * (alp - mlp), inf_mask, 0).sum(dim=-1).mean()

    def skl(s, t, alpha=ALPHA):
        return skew_kl(t, s, alpha)

    def srkl(s, t, alpha=ALPHA):
        return skew_kl(s, t, alpha)

    return {"fkl": fkl, "rkl": rkl, "fkl_rkl": fkl_rkl, "akl": akl, "jsd": jsd, "tvd": tvd,
            "skl": skl, "srkl": srkl}


def triton_interpreter_floats():
    """Under TRITON_INTERPRET=1 (Triton's interpreter: Triton kernels run on
    CPU tensors with NumPy), give a Python float kernel argument the type
    compiled Triton gives it, a float32 scalar: Triton 3.9's interpreter
    passes a bare float, on which Liger's kl_div and tvd kernels call .to().
    The kernels are left as they are; without the variable this does
    nothing.  Used by --cpu-dry-run and by python/tests/peer_liger_cases.py."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti

    cvt = ti._implicit_cvt
    if getattr(cvt, "kdloss_floats", False):
        return

    def cvt_float(arg):
        if isinstance(arg, float):
            return tl.tensor(ti.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return cvt(arg)

    cvt_float.kdloss_floats = True
    ti._implicit_cvt = cvt_float


def liger_forms(env):
    try:
        from liger_kernel.transformers.functional import liger_jsd, liger_kl_div, liger_tvd
    except Exception as e:  # noqa: BLE001
        print(f"peers.py: Liger-Kernel not importable ({type(e).__name__}: {e}); no liger rows",
              file=sys.stderr)
        return None
    F, f32 = env.F, env.torch.float32

    def fkl(s, t):
        return liger_kl_div(F.log_softmax(s, dim=-1, dtype=f32), F.log_softmax(t, dim=-1, dtype=f32),
                            reduction="batchmean", log_target=True)

    def rkl(s, t):
        return liger_jsd(F.log_softmax(s, dim=-1, dtype=f32), F.log_softmax(t, dim=-1, dtype=f32), beta=1.0)

    def jsd(s, t):
        return liger_jsd(F.log_softmax(s, dim=-1, dtype=f32), F.log_softmax(t, dim=-1, dtype=f32), beta=BETA)

    def tvd(s, t):
        return liger_tvd(F.softmax(s, dim=-1, dtype=f32), F.softmax(t, dim=-1, dtype=f32),
                         reduction="batchmean")

    return {"fkl": fkl, "rkl": rkl, "jsd": jsd, "tvd": tvd}


# ------------------------------------------------ float64 reference
def reference(env, s, t, div, mu, rule, k, chunk=256):
    """Loss (mean over rows) and gradient (float32 [N, V]) from the
    definitions, in float64, chunk by chunk (log-space mixtures, stable
    sort for the AKL head: ties by lower index)."""
    torch, F = env.torch, env.F
    n = s.shape[0]
    grad = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    total = 0.0
    for i in range(0, n, chunk):
        sc = s[i:i + chunk].detach().double().requires_grad_()
        tc = t[i:i + chunk].detach().double()
        lq, lp = F.log_softmax(sc, -1), F.log_softmax(tc, -1)
        q, p = lq.exp(), lp.exp()

        def kl(la, lb, pa):
            return torch.where(pa > 0, pa * (la - lb), torch.zeros_like(pa)).sum(-1)

        if div in ("fkl", "rkl", "fkl_rkl", "akl"):
            f, r = kl(lp, lq, p), kl(lq, lp, q)
        if div == "fkl":
            rows = f
        elif div == "rkl":
            rows = r
        elif div == "fkl_rkl":
            rows = f + r
        elif div == "jsd":
            lm = torch.logaddexp(math.log(BETA) + lp, math.log(1 - BETA) + lq)
            rows = BETA * kl(lp, lm, p) + (1 - BETA) * kl(lq, lm, q)
        elif div == "tvd":
            rows = 0.5 * (p - q).abs().sum(-1)
        elif div == "skl":
            lm = torch.logaddexp(math.log(ALPHA) + lp, math.log(1 - ALPHA) + lq)
            rows = kl(lp, lm, p)
        elif div == "srkl":
            lm = torch.logaddexp(math.log(ALPHA) + lq, math.log(1 - ALPHA) + lp)
            rows = kl(lq, lm, q)
        else:  # akl
            with torch.no_grad():
                sp_, idx = p.sort(dim=-1, descending=True, stable=True)
                err = (sp_ - q.detach().gather(-1, idx)).abs()
                tail = akl_tail(torch, sp_, mu, rule, k)
                gh = err.masked_fill(tail, 0).sum(-1)
                gt = err.masked_fill(~tail, 0).sum(-1)
                tot = gh + gt
                wh = torch.where(tot > 0, gh / tot.clamp_min(1e-300), torch.full_like(tot, 0.5))
                wt = torch.where(tot > 0, gt / tot.clamp_min(1e-300), torch.full_like(tot, 0.5))
            rows = wh * f + wt * r
        part = rows.sum() / n
        part.backward()
        total += float(part.detach())
        grad[i:i + chunk] = sc.grad.float()
        del sc, tc, lq, lp, q, p, rows, part
    return total, grad


def rel_errs(env, loss, grad, ref_loss, ref_grad, chunk=1024):
    """max(|loss - ref| / max(|ref|, 1e-6), ||grad - ref|| / ||ref||)."""
    num = den = 0.0
    for i in range(0, ref_grad.shape[0], chunk):
        r = ref_grad[i:i + chunk].double()
        g = grad[i:i + chunk].double()
        num += float(((g - r) ** 2).sum())
        den += float((r ** 2).sum())
    eg = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    el = abs(loss - ref_loss) / max(abs(ref_loss), 1e-6)
    e = max(eg, el)
    return e if math.isfinite(e) else float("inf")


# --------------------------------------------------- kdloss binding
def load_kdloss(lib_path=None):
    """kdloss.torch from the package in python/ next to this folder, with
    the library of --kdloss-lib (else KDLOSS_LIBRARY, else the package's
    lookup): (module, None), or (None, why it is not usable)."""
    if lib_path:
        os.environ.setdefault("KDLOSS_LIBRARY", lib_path)
    pkg = os.path.join(ROOT, "python")
    if pkg not in sys.path:
        sys.path.insert(0, pkg)
    try:
        import kdloss
        import kdloss.torch as kt

        kdloss.library_path()  # loads libkdloss.so now, not at the first call
        return kt, None
    except Exception as e:  # noqa: BLE001
        return None, f"python/kdloss: {type(e).__name__}: {e}"


class KdlossBinding:
    """kdloss's side of the comparisons, through the Python package
    (python/kdloss, which checks its ctypes mirrors against the library).
    The tensors' device picks the path: CUDA tensors run the GPU entry
    points on the current stream, CPU tensors the float64 references (the
    self-test).  Each call returns (loss as a float, gradients) or raises."""

    def __init__(self, lib_path=None):
        self.kt, self.why = load_kdloss(lib_path)

    def available(self):
        return self.kt is not None

    def ext_available(self):
        """The package has the extension ops and the library their API."""
        if self.kt is None:
            return False
        import kdloss

        return kdloss.ext_available() and kdloss._lib.ot_available()

    @staticmethod
    def _backward(loss, *leaves):
        loss.backward()
        return (float(loss.detach()),) + tuple(x.grad for x in leaves)

    def call(self, s, t, div, rule, mu, k):
        """The dense loss, mean: (loss, d loss / d s)."""
        leaf = s.detach().requires_grad_()
        return self._backward(
            self.kt.distill_loss(leaf, t, divergence=div, head_rule=rule or "reference", mu=mu,
                                 top_k=k, reduction="mean", alpha=ALPHA, beta=BETA,
                                 temperature=TEMPERATURE), leaf)

    def sparse(self, s, idx, lp):
        """RENORMALISED FKL, mean: (loss, grad in s's dtype)."""
        leaf = s.detach().requires_grad_()
        return self._backward(self.kt.sparse_distill_loss(leaf, idx, lp, mode="renormalised",
                                                          divergence="fkl"), leaf)

    def fused_linear(self, H, W, T):
        """JSD (beta 0.5), mean: (loss, dH, dW)."""
        h, w = H.detach().requires_grad_(), W.detach().requires_grad_()
        return self._backward(self.kt.fused_linear_distill_loss(h, w, T, divergence="jsd",
                                                                beta=BETA), h, w)

    def sinkhorn_ragged(self, costs, iters):
        """Values <P, C> per problem [n_b, m_b] (eps 0.1, exactly iters
        iterations)."""
        r = self.kt.sinkhorn_ragged(costs, epsilon=SINKHORN_EPS, max_iter=iters, tol=0.0)
        return [float(v) for v in r["value"].cpu()]

    def sinkd(self, s, t, group, metric, iters):
        """SinKD loss (tau 2, eps 0.1, exactly iters iterations) and gradient."""
        leaf = s.detach().requires_grad_()
        return self._backward(self.kt.sinkd_loss(leaf, t, group_size=group, metric=metric,
                                                 max_iter=iters, tol=0.0, temperature=2.0,
                                                 epsilon=SINKHORN_EPS), leaf)


# ------------------------------------------------------- loss peers
def base_row(impl, div, dtype, n, v, rule):
    return {"impl": impl, "op": "loss", "divergence": div, "dtype": dtype, "rows": n, "vocab": v,
            "head_rule": rule, "status": "error", "ms": None, "ms_p20": None, "ms_p80": None,
            "repeats": 0, "bytes": loss_bytes(n, v, dtype), "gb_per_s": None,
            "fraction_of_copy_bandwidth": None, "peak_extra_bytes": None, "check_rel_err": None,
            "check_vs_kdloss": None, "note": None}


def finish_row(row, times, copy_gbps):
    row["ms"] = percentile(times, 50)
    row["ms_p20"] = percentile(times, 20)
    row["ms_p80"] = percentile(times, 80)
    row["repeats"] = len(times)
    row["gb_per_s"] = gb_per_s(row["bytes"], row["ms"])
    row["fraction_of_copy_bandwidth"] = fraction(row["gb_per_s"], copy_gbps)


def run_loss(env, cfg, copy_gbps, deadline, log):
    torch = env.torch
    eager = textbook(env)
    liger = liger_forms(env) if "liger" in cfg.impls else None
    for name in ("recompile_limit", "cache_size_limit"):  # shapes x dtypes recompiles
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    compiled = {}
    rows = []
    for (n, v) in cfg.shapes:
        for dtype in cfg.dtypes:
            cases = [(d, r) for d in cfg.divergences for r in (cfg.head_rules if d == "akl" else [None])]
            todo = [(d, r, impl) for d, r in cases for impl in cfg.impls if impl in LOSS_IMPLS
                    and not (impl == "liger" and (liger is None or d not in LIGER_DIVERGENCES))]
            if not todo:
                continue
            if deadline and time.monotonic() > deadline:
                for d, r, impl in todo:
                    row = base_row(impl, d, dtype, n, v, r)
                    row["status"], row["note"] = "skipped", "time budget (--budget-s) spent"
                    rows.append(row)
                continue
            try:
                footprint = loss_bytes(n, v, dtype)
                n_sets = env.n_sets(footprint)
                sets = []
                for i in range(n_sets):
                    s = env.logits(n, v, dtype, 1000 + 2 * i).requires_grad_()
                    t = env.logits(n, v, dtype, 1001 + 2 * i)
                    sets.append((s, t))
            except torch.cuda.OutOfMemoryError:
                sets = None
                torch.cuda.empty_cache()
            k = min(cfg.top_k, v)
            for d, r in cases:
                impls = [impl for dd, rr, impl in todo if (dd, rr) == (d, r)]
                if not impls:
                    continue
                if sets is None:
                    for impl in impls:
                        row = base_row(impl, d, dtype, n, v, r)
                        row["status"], row["note"] = "oom", "inputs do not fit"
                        rows.append(row)
                    continue
                s0, t0 = sets[0]
                ref_loss = ref_grad = kd_loss = None
                if not cfg.no_check:
                    try:
                        ref_loss, ref_grad = reference(env, s0, t0, d, cfg.mu, r, k)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                    if env.kdloss.available():
                        try:
                            kd_loss, kd_grad = env.kdloss.call(s0, t0, d, r, cfg.mu, k)
                            if ref_grad is not None:
                                e = rel_errs(env, kd_loss, kd_grad, ref_loss, ref_grad)
                                log(f"  kdloss {d}{'/' + r if r else ''} {dtype} {n}x{v}: "
                                    f"rel. error vs float64 {e:.3g}")
                            del kd_grad
                        except Exception as e:  # noqa: BLE001
                            kd_loss = None
                            log(f"  kdloss not usable for the check ({type(e).__name__}: {str(e)[:120]})")
                for impl in impls:
                    row = base_row(impl, d, dtype, n, v, r)
                    rows.append(row)
                    if deadline and time.monotonic() > deadline:
                        row["status"], row["note"] = "skipped", "time budget (--budget-s) spent"
                        continue
                    if impl == "torch_compile" and not compile_fits(deadline):
                        row["status"], row["note"] = "skipped", COMPILE_SKIP_NOTE
                        continue
                    log(f"peers {impl} {d}{'/' + r if r else ''} {dtype} {n}x{v}")
                    if impl == "torch_eager":
                        fn = eager[d]
                    elif impl == "torch_compile":
                        key = (d, r)  # one compiled function per head rule: fewer recompiles
                        if key not in compiled:
                            compiled[key] = torch.compile(eager[d], dynamic=False)
                        fn = compiled[key]
                    else:
                        fn = liger[d]
                    call = (lambda s, t, fn=fn: fn(s, t, cfg.mu, r, k)) if d == "akl" else fn

                    def step(i, call=call):
                        s, t = sets[i]
                        s.grad = None
                        call(s, t).backward()

                    try:
                        s0.grad = None
                        loss = call(s0, t0)
                        loss.backward()
                        lv = float(loss.detach())
                        if ref_grad is not None:
                            row["check_rel_err"] = clean(rel_errs(env, lv, s0.grad, ref_loss, ref_grad))
                        if kd_loss is not None:
                            row["check_vs_kdloss"] = clean(abs(lv - kd_loss) / max(abs(kd_loss), 1e-6))
                        s0.grad = None
                        del loss
                        grad_bytes = s0.numel() * s0.element_size()
                        row["peak_extra_bytes"] = env.peak_extra(step, grad_bytes)
                        times = env.time_steps(step, len(sets), cfg.repeats, cfg.warmup)
                        finish_row(row, times, copy_gbps)
                        row["status"] = "ok"
                        err = row["check_rel_err"]
                        if err is None and ref_grad is not None:
                            err = float("inf")
                        if err is not None and not err <= TOL[dtype]:
                            row["status"] = "mismatch"
                            row["note"] = f"relative error {err:.3g} vs float64 (tolerance {TOL[dtype]})"
                    except torch.cuda.OutOfMemoryError:
                        row["status"], row["note"] = "oom", "out of device memory"
                    except Exception as e:  # noqa: BLE001
                        row["status"], row["note"] = "error", f"{type(e).__name__}: {str(e)[:200]}"
                    finally:
                        for s, _ in sets:
                            s.grad = None
                        torch.cuda.empty_cache()
                del ref_grad
                torch.cuda.empty_cache()
            del sets
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------- Sinkhorn peers
def run_sinkhorn(env, cfg, copy_gbps, deadline, log):
    torch = env.torch
    B, n, m = cfg.sinkhorn
    K = cfg.sinkhorn_iters
    eps = SINKHORN_EPS
    g = torch.Generator(device=env.dev)
    g.manual_seed(7)
    x = torch.randn(B, n, SINKHORN_DIM, device=env.dev, generator=g) / math.sqrt(SINKHORN_DIM)
    y = torch.randn(B, m, SINKHORN_DIM, device=env.dev, generator=g) / math.sqrt(SINKHORN_DIM)
    C = ((x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
         - 2 * torch.bmm(x, y.transpose(1, 2))).clamp_min_(0)
    la = torch.full((B, n), -math.log(n), device=env.dev)
    lb = torch.full((B, m), -math.log(m), device=env.dev)

    def iteration(C, la, lb, f, g):
        f = -eps * torch.logsumexp(lb[:, None, :] + (g[:, None, :] - C) / eps, dim=2)
        g = -eps * torch.logsumexp(la[:, :, None] + (f[:, :, None] - C) / eps, dim=1)
        return f, g

    def loop(step_fn):
        f = torch.zeros(B, n, device=env.dev)
        gg = torch.zeros(B, m, device=env.dev)
        for _ in range(K):
            f, gg = step_fn(C, la, lb, f, gg)
        return f, gg

    def value0(C0, f0, g0):
        """<P, C> of problem 0 from potentials (P = a b exp((f + g - C)/eps))."""
        C0 = C0.double()
        lp = -math.log(n) - math.log(m) + (f0.double()[:, None] + g0.double()[None, :] - C0) / eps
        return float((lp.exp() * C0).sum())

    ref = None
    if not cfg.no_check:
        C0 = C[0:1].double()
        f = torch.zeros(1, n, device=env.dev, dtype=torch.float64)
        gg = torch.zeros(1, m, device=env.dev, dtype=torch.float64)
        la0, lb0 = la[0:1].double(), lb[0:1].double()
        for _ in range(K):
            f = -eps * torch.logsumexp(lb0[:, None, :] + (gg[:, None, :] - C0) / eps, dim=2)
            gg = -eps * torch.logsumexp(la0[:, :, None] + (f[:, :, None] - C0) / eps, dim=1)
        ref = value0(C[0], f[0], gg[0])

    impls = {}
    if "torch_eager" in cfg.impls:
        impls["torch_eager"] = lambda: loop(iteration)
    if "torch_compile" in cfg.impls:
        it_c = torch.compile(iteration, dynamic=False)
        impls["torch_compile"] = lambda: loop(it_c)
    if "pot" in cfg.impls:
        try:
            import ot.batch as otb

            def pot_run():
                res = otb.solve_batch(M=C, reg=eps, max_iter=K, tol=0.0, method="log_sinkhorn", grad="detach")
                u, v = res.potentials  # log-scalings: P = exp(u + v - C/eps)
                return eps * (u - la), eps * (v - lb)

            impls["pot"] = pot_run
        except Exception as e:  # noqa: BLE001
            log(f"peers.py: POT's ot.batch not importable ({type(e).__name__}: {e}); no pot row")
    if "flash_sinkhorn" in cfg.impls:
        try:
            from flash_sinkhorn import SamplesLoss

            fs = SamplesLoss(loss="sinkhorn", backend="alternating", use_epsilon_scaling=False, eps=eps,
                             n_iters=K, potentials=True, debias=False, allow_tf32=False, half_cost=False)
            impls["flash_sinkhorn"] = None if env.cpu else (lambda: fs(x, y))
        except Exception as e:  # noqa: BLE001
            log(f"peers.py: flash-sinkhorn not importable ({type(e).__name__}: {e}); no flash_sinkhorn row")

    rows = []
    for impl, run in impls.items():
        row = {"impl": impl, "op": "sinkhorn", "dtype": "f32", "batch": B, "n": n, "m": m, "iterations": K,
               "status": "error", "ms": None, "ms_p20": None, "ms_p80": None, "repeats": 0,
               "bytes": sinkhorn_iter_bytes(B, n, m), "gb_per_s": None, "fraction_of_copy_bandwidth": None,
               "peak_extra_bytes": None, "check_rel_err": None, "check_vs_kdloss": None, "note": None}
        if impl == "flash_sinkhorn":
            row["note"] = "cost from points, never materialised: GB/s is against the byte model"
        rows.append(row)
        if run is None:
            row["status"], row["note"] = "skipped", "flash-sinkhorn takes CUDA tensors only (CPU dry run)"
            continue
        if deadline and time.monotonic() > deadline:
            row["status"], row["note"] = "skipped", "time budget (--budget-s) spent"
            continue
        if impl == "torch_compile" and not compile_fits(deadline):
            row["status"], row["note"] = "skipped", COMPILE_SKIP_NOTE
            continue
        log(f"peers {impl} sinkhorn f32 {B}x{n}x{m}")
        try:
            f, gg = run()
            if ref is not None:
                v0 = value0(C[0], f[0], gg[0])
                row["check_rel_err"] = clean(abs(v0 - ref) / max(abs(ref), 1e-12))
            row["peak_extra_bytes"] = env.peak_extra(lambda i: run(), 0)
            times = env.time_steps(lambda i: run(), 1, cfg.repeats, max(1, cfg.warmup))
            finish_row(row, [t / K for t in times], copy_gbps)
            row["status"] = "ok"
            if row["check_rel_err"] is not None and not row["check_rel_err"] <= 1e-2:
                row["status"] = "mismatch"
                row["note"] = (f"value relative error {row['check_rel_err']:.3g} vs float64 after {K} "
                               "iterations (tolerance 1e-2; update orders differ)")
        except torch.cuda.OutOfMemoryError:
            row["status"], row["note"] = "oom", "out of device memory"
        except Exception as e:  # noqa: BLE001
            row["status"], row["note"] = "error", f"{type(e).__name__}: {str(e)[:200]}"
        torch.cuda.empty_cache()
    return rows


# ================================================ the other ops (extensions)
# Sparse top-k teacher, fused linear + loss, ragged Sinkhorn, SinKD: the
# kdloss side runs through KdlossBinding (the Python package), on the GPU
# for the comparison and in the float64 CPU references for the self-test.
# Written without a GPU: the timing paths below ran only in --cpu-dry-run.
def ext_binding(env, log=None):
    """env.kdloss when it has the extension ops, else None (logged)."""
    if env.kdloss.ext_available():
        return env.kdloss
    if log:
        why = env.kdloss.why or "the library lacks the kdloss_ext.h / kdloss_ot.h API"
        log(f"peers.py: kdloss's extension ops not usable ({why}); the other ops' peers are "
            "checked against float64 only")
    return None


# ---------------------------------------------------- the textbook forms
def ext_forms(F, torch):
    """Textbook torch forms of the other ops (eager; torch.compile of the
    same functions for sparse)."""
    f32 = torch.float32

    def sparse_fkl(s, idx, lp):
        # the usual top-k distillation code: full-vocabulary log_softmax of the
        # student, gather at the teacher's top-k, teacher renormalised on them
        lq = F.log_softmax(s, dim=-1, dtype=f32).gather(1, idx)
        lpf = lp.to(f32)
        lph = lpf - torch.logsumexp(lpf, dim=-1, keepdim=True)
        return (lph.exp() * (lph - lq)).sum(dim=-1).mean()

    def sinkd(s, t, group, metric, iters, tau=2.0, eps=SINKHORN_EPS):
        # SinKD: softmaxes at tau, cost between the group's student and teacher
        # rows, log-domain Sinkhorn (f then g update) with the plan detached,
        # loss <P, C> averaged over groups
        n = group
        ps = F.softmax(s.to(f32 if s.dtype != torch.float64 else s.dtype) / tau, dim=-1)
        pt = F.softmax(t.to(ps.dtype) / tau, dim=-1)
        G, V = s.shape[0] // n, s.shape[1]
        ps, pt = ps.reshape(G, n, V), pt.reshape(G, n, V)
        if metric == "l1":
            C = torch.cdist(ps, pt, p=1)
        else:
            C = torch.cdist(ps, pt, p=2, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        with torch.no_grad():
            Cd = C.detach()
            la = -math.log(n)
            f = torch.zeros(G, n, dtype=C.dtype, device=C.device)
            g = torch.zeros(G, n, dtype=C.dtype, device=C.device)
            for _ in range(iters):
                f = -eps * torch.logsumexp(la + (g[:, None, :] - Cd) / eps, dim=2)
                g = -eps * torch.logsumexp(la + (f[:, :, None] - Cd) / eps, dim=1)
            P = torch.exp(2 * la + (f[:, :, None] + g[:, None, :] - Cd) / eps)
        return (P * C).sum(dim=(1, 2)).mean()

    def sinkhorn_one(C, iters, eps=SINKHORN_EPS):
        """The hand-batched iteration on one problem [1, n, m]; <P, C>."""
        n, m = C.shape[1], C.shape[2]
        la = torch.full((1, n), -math.log(n), dtype=C.dtype, device=C.device)
        lb = torch.full((1, m), -math.log(m), dtype=C.dtype, device=C.device)
        f = torch.zeros(1, n, dtype=C.dtype, device=C.device)
        g = torch.zeros(1, m, dtype=C.dtype, device=C.device)
        for _ in range(iters):
            f = -eps * torch.logsumexp(lb[:, None, :] + (g[:, None, :] - C) / eps, dim=2)
            g = -eps * torch.logsumexp(la[:, :, None] + (f[:, :, None] - C) / eps, dim=1)
        return f, g

    def transport_value(C, f, g, eps=SINKHORN_EPS):
        C = C.double()
        n, m = C.shape[-2], C.shape[-1]
        lp = -math.log(n) - math.log(m) + (f.double()[..., :, None] + g.double()[..., None, :] - C) / eps
        return float((lp.exp() * C).sum())

    return {"sparse_fkl": sparse_fkl, "sinkd": sinkd, "sinkhorn_one": sinkhorn_one,
            "transport_value": transport_value}


# ------------------------------------------------------------ rows
def ext_row(impl, op, dtype, **keys):
    row = {"impl": impl, "op": op}
    row.update(keys)
    row["dtype"] = dtype
    row.update({"status": "error", "ms": None, "ms_p20": None, "ms_p80": None, "repeats": 0, "bytes": None,
                "gb_per_s": None, "fraction_of_copy_bandwidth": None, "peak_extra_bytes": None,
                "check_rel_err": None, "check_vs_kdloss": None, "note": None})
    return row


def _time_ext(env, cfg, row, step, out_bytes, copy_gbps, per_unit=1.0):
    row["peak_extra_bytes"] = env.peak_extra(step, out_bytes)
    times = env.time_steps(step, 1, cfg.repeats, max(1, cfg.warmup))
    finish_row(row, [t / per_unit for t in times], copy_gbps)
    row["status"] = "ok"


def _check_and_time(env, cfg, row, lv, ref, kd, step, out_bytes, copy_gbps, tol):
    """The peer's loss lv against the float64 evaluation ref and kdloss's
    loss kd (each when it ran), then the timing and the verdict."""
    if ref is not None:
        row["check_rel_err"] = _rel(lv, ref)
    if kd is not None:
        row["check_vs_kdloss"] = _rel(lv, kd)
    _time_ext(env, cfg, row, step, out_bytes, copy_gbps)
    _judge(row, tol)


def _judge(row, tol):
    """Mismatch when the loss disagrees with kdloss's (when it ran) or with
    the float64 evaluation (tolerance as the dense rows)."""
    for key, what in (("check_vs_kdloss", "kdloss"), ("check_rel_err", "float64")):
        e = row.get(key)
        if e is not None and not e <= tol:
            row["status"] = "mismatch"
            row["note"] = (row["note"] + "; " if row["note"] else "") + \
                f"loss relative difference {e:.3g} vs {what} (tolerance {tol})"
            return


def _rel(a, b):
    return clean(abs(a - b) / max(abs(b), 1e-6))


def _guard(row, fn, torch, log):
    try:
        fn()
    except torch.cuda.OutOfMemoryError:
        row["status"], row["note"] = "oom", "out of device memory"
    except Exception as e:  # noqa: BLE001
        row["status"], row["note"] = "error", f"{type(e).__name__}: {str(e)[:200]}"
        log(f"  {row['impl']} {row['op']}: {row['note']}")
    finally:
        if not env_is_cpu(torch):
            torch.cuda.empty_cache()


def env_is_cpu(torch):
    return not torch.cuda.is_available()


def peers_deadline(budget_s, environ=None, now=None, wall=None):
    """The monotonic deadline: now + --budget-s, capped by KDL_PEERS_STOP_AT
    (epoch seconds, wall clock); None when neither is given.  A malformed
    KDL_PEERS_STOP_AT is ignored with a message."""
    environ = os.environ if environ is None else environ
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    ends = [now + budget_s] if budget_s else []
    stop = environ.get("KDL_PEERS_STOP_AT")
    if stop:
        try:
            ends.append(now + (float(stop) - wall))
        except ValueError:
            print(f"peers.py: KDL_PEERS_STOP_AT={stop!r} is not a number; ignored", file=sys.stderr)
    return min(ends) if ends else None


def compile_fits(deadline, now=None):
    """Whether a torch_compile row may start: no deadline, or at least
    COMPILE_RESERVE_S left."""
    now = time.monotonic() if now is None else now
    return deadline is None or deadline - now >= COMPILE_RESERVE_S


COMPILE_SKIP_NOTE = f"under {COMPILE_RESERVE_S:.0f} s of the time budget left for a torch.compile"


def run_ops(ops, doc, out, log, after=None):
    """Runs each (name, fn) of ops in order (fn() returns rows), merging
    the rows into doc and writing it to out after each one, so a run killed
    at the call's time limit leaves what was done.  An op that raises is
    logged and left out; the others still run.  after() (if given) runs
    after each op, e.g. to free cached device memory.  Returns the names of
    the ops that raised."""
    failed = []
    for name, fn in ops:
        try:
            rows = fn()
        except Exception as e:  # noqa: BLE001
            failed.append(name)
            log(f"peers.py: op {name} stopped ({type(e).__name__}: {str(e)[:200]}); "
                "no peer rows for it, the other ops go on")
            rows = []
        finally:
            if after is not None:
                try:
                    after()
                except Exception:  # noqa: BLE001
                    pass
        merge_rows(doc, rows)
        doc["summary"] = summarize_targets(doc["rows"])
        write_doc(out, doc)
    return failed


def _skip(rows, deadline):
    if deadline and time.monotonic() > deadline:
        for r in rows:
            r["status"], r["note"] = "skipped", "time budget (--budget-s) spent"
        return True
    return False


# --------------------------------------------------------- sparse peers
def topk_inputs(env, n, v, k, dtype, seed):
    """Student logits as the dense rows; the teacher's top-k of its own
    logits (indices int64, log-probs in dtype)."""
    torch = env.torch
    s = env.logits(n, v, dtype, seed)
    t = env.logits(n, v, "f32", seed + 1)
    lp_full = env.F.log_softmax(t, dim=-1)
    lp, idx = lp_full.topk(k, dim=-1)
    del t, lp_full
    return s, idx.contiguous(), lp.to(env.dtype[dtype]).contiguous(), torch


def run_sparse(env, cfg, copy_gbps, deadline, log):
    torch, F = env.torch, env.F
    forms = ext_forms(F, torch)
    rows = []
    impls = [i for i in ("torch_eager", "torch_compile") if i in cfg.impls]
    dtype = "bf16"
    compiled = torch.compile(forms["sparse_fkl"], dynamic=False) if "torch_compile" in impls else None
    for (n, v) in cfg.sparse_shapes:
        for k in cfg.sparse_k:
            if k > min(v, 1024):
                continue
            todo = [ext_row(i, "sparse", dtype, divergence="fkl", mode="renormalised", rows=n, vocab=v, k=k)
                    for i in impls]
            for r in todo:
                r["bytes"] = sparse_bytes(n, v, k, dtype)
            rows += todo
            if not todo or _skip(todo, deadline):
                continue
            try:
                s, idx, lp, _ = topk_inputs(env, n, v, k, dtype, 3000 + k)
            except torch.cuda.OutOfMemoryError:
                for r in todo:
                    r["status"], r["note"] = "oom", "inputs do not fit"
                continue
            s.requires_grad_()
            ref = kd = None
            if not cfg.no_check:
                ref = 0.0
                for i in range(0, n, 512):  # float64, chunked
                    ref += float(forms["sparse_fkl"](s[i:i + 512].detach().double(), idx[i:i + 512],
                                                     lp[i:i + 512].double())) * min(512, n - i)
                ref /= n
                if env.ext is not None and not env.cpu:
                    try:
                        kd, _ = env.ext.sparse(s, idx, lp)
                    except Exception as e:  # noqa: BLE001
                        log(f"  kdloss sparse not usable for the check ({str(e)[:120]})")
            for row in todo:
                fn = forms["sparse_fkl"] if row["impl"] == "torch_eager" else compiled
                if row["impl"] == "torch_compile" and not compile_fits(deadline):
                    row["status"], row["note"] = "skipped", COMPILE_SKIP_NOTE
                    continue
                log(f"peers {row['impl']} sparse k={k} {dtype} {n}x{v}")

                def step(i, fn=fn):
                    s.grad = None
                    fn(s, idx, lp).backward()

                def go(row=row, fn=fn, step=step):
                    s.grad = None
                    _check_and_time(env, cfg, row, float(fn(s, idx, lp).detach()), ref, kd, step,
                                    s.numel() * s.element_size(), copy_gbps, TOL[dtype])

                _guard(row, go, torch, log)
                s.grad = None
            del s, idx, lp
    return rows


# --------------------------------------------------- fused linear peers
def run_fused(env, cfg, copy_gbps, deadline, log):
    torch, F = env.torch, env.F
    rows = []
    impls = [i for i in ("torch_eager", "liger") if i in cfg.impls]
    liger = None
    if "liger" in impls:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_jsd as liger
        except Exception as e:  # noqa: BLE001
            log(f"peers.py: Liger-Kernel's fused linear JSD not importable ({type(e).__name__}: {e}); "
                "no liger fused_linear rows")
            impls.remove("liger")
    # (impl, teacher): torch_eager for both teachers; liger, whose API takes the
    # teacher's hidden states and weights, beside kdloss's teacher-linear row
    pairs = [(i, t) for t in ("logits", "linear") for i in impls if not (i == "liger" and t == "logits")]
    for (n, d, v), dtype in ((shape, dt) for shape in cfg.fused_shapes for dt in cfg.fused_dtypes):
        # in the kdloss row's dtype: H, W, the teacher's H_t, W_t (d_t = d) and T;
        # the gradients autograd returns are in it too (kdloss's grad_dtype)
        todo = []
        for impl, teacher in pairs:
            tl = teacher == "linear"
            r = ext_row(impl, "fused_linear", dtype, divergence="jsd", grad_dtype=dtype, rows=n, hidden=d,
                        vocab=v, chunk_rows=None, logits_bytes=n * v * 4 * (1 + tl),
                        logits_dtype_bytes=n * v * DTYPE_BYTES[dtype] * (1 + tl), teacher=teacher,
                        teacher_hidden=d if tl else None)
            r["bytes"] = fused_linear_tl_bytes(n, d, d, v, dtype) if tl else fused_linear_bytes(n, d, v, dtype)
            todo.append(r)
        rows += todo
        if not todo or _skip(todo, deadline):
            continue
        g = torch.Generator(device=env.dev)
        g.manual_seed(4000 + n)
        dt = env.dtype[dtype]
        try:
            H = torch.randn(n, d, device=env.dev, generator=g, dtype=dt).requires_grad_()
            W = (torch.randn(v, d, device=env.dev, generator=g, dtype=dt) * (2.0 / math.sqrt(d))).requires_grad_()
            Ht = torch.randn(n, d, device=env.dev, generator=g, dtype=dt)
            Wt = torch.randn(v, d, device=env.dev, generator=g, dtype=dt) * (2.0 / math.sqrt(d))
            T = Ht @ Wt.t()  # the teacher's logits: given to the "logits" rows, and kdloss's check
        except torch.cuda.OutOfMemoryError:
            for r in todo:
                r["status"], r["note"] = "oom", "inputs do not fit"
            continue
        kd = None
        if not cfg.no_check and env.ext is not None and not env.cpu:
            try:
                kd, _, _ = env.ext.fused_linear(H, W, T)
            except Exception as e:  # noqa: BLE001
                log(f"  kdloss fused_linear not usable for the check ({str(e)[:120]})")
        out_bytes = (n + v) * d * H.element_size()
        for row in todo:
            log(f"peers {row['impl']} fused_linear jsd {dtype} {n}x{d}x{v} teacher={row['teacher']}")
            if row["impl"] == "liger":
                row["note"] = "liger_fused_linear_jsd(H, W, H_t, W_t): the teacher's logits formed in its chunks"

                def loss_fn():
                    return liger(H, W, Ht, Wt, None, jsd_beta=BETA, ignore_index=-100, temperature=1.0)
            elif row["teacher"] == "linear":
                row["note"] = "materialises both logits, H W^T and H_t W_t^T (and autograd keeps what JSD needs)"

                def loss_fn():
                    return fused_tl_textbook(F, torch, H, W, Ht, Wt)
            else:
                row["note"] = "materialises the logits H W^T (and autograd keeps what JSD needs)"

                def loss_fn():
                    return jsd_mean(F, torch, H @ W.t(), T)

            def step(i, loss_fn=loss_fn):
                H.grad = W.grad = None
                loss_fn().backward()

            def go(row=row, loss_fn=loss_fn, step=step):
                H.grad = W.grad = None
                # Liger's chunks round differently from the T given to kdloss's check:
                # at least 1e-3 (the textbook forms form T as it was formed)
                _check_and_time(env, cfg, row, float(loss_fn().detach()), None, kd, step, out_bytes,
                                copy_gbps, TOL[dtype] if row["impl"] == "torch_eager" else max(TOL[dtype], 1e-3))

            _guard(row, go, torch, log)
            H.grad = W.grad = None
        del H, W, Ht, Wt, T
    return rows


# ------------------------------------------------ ragged Sinkhorn peers
def ragged_costs(env, sizes_n, sizes_m, seed=11):
    torch = env.torch
    g = torch.Generator(device=env.dev)
    g.manual_seed(seed)
    costs = []
    for n, m in zip(sizes_n, sizes_m):
        x = torch.randn(1, n, SINKHORN_DIM, device=env.dev, generator=g) / math.sqrt(SINKHORN_DIM)
        y = torch.randn(1, m, SINKHORN_DIM, device=env.dev, generator=g) / math.sqrt(SINKHORN_DIM)
        costs.append(((x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
                      - 2 * torch.bmm(x, y.transpose(1, 2))).clamp_min_(0))
    return costs


def run_ragged(env, cfg, copy_gbps, deadline, log):
    torch = env.torch
    forms = ext_forms(env.F, torch)
    sn, sm = list(cfg.ragged[0]), list(cfg.ragged[1])
    K = cfg.sinkhorn_iters
    keys = dict(batch=len(sn), n=sum(sn), m=sum(sm), iterations=K, sizes_n=sn, sizes_m=sm)
    impls = [i for i in ("torch_eager", "pot") if i in cfg.impls]
    todo = [ext_row(i, "sinkhorn_ragged", "f32", **keys) for i in impls]
    for r in todo:
        r["bytes"] = sum(sinkhorn_iter_bytes(1, n, m) for n, m in zip(sn, sm))
    if not todo or _skip(todo, deadline):
        return todo
    costs = ragged_costs(env, sn, sm)
    ref = kd = None
    if not cfg.no_check:
        ref = []
        for C in costs[:3]:  # float64, the first problems
            f, g = forms["sinkhorn_one"](C.double(), K)
            ref.append(forms["transport_value"](C[0], f[0], g[0]))
        if env.ext is not None and not env.cpu:
            try:
                kd = env.ext.sinkhorn_ragged([C[0] for C in costs], K)
            except Exception as e:  # noqa: BLE001
                log(f"  kdloss ragged Sinkhorn not usable for the check ({str(e)[:120]})")
    runs = {}
    if "torch_eager" in impls:
        runs["torch_eager"] = lambda: [forms["sinkhorn_one"](C, K) for C in costs]
    if "pot" in impls:
        try:
            import ot.batch as otb

            def pot_run():
                out = []
                for C in costs:
                    res = otb.solve_batch(M=C, reg=SINKHORN_EPS, max_iter=K, tol=0.0, method="log_sinkhorn",
                                          grad="detach")
                    u, w = res.potentials
                    n, m = C.shape[1], C.shape[2]
                    out.append((SINKHORN_EPS * (u + math.log(n)), SINKHORN_EPS * (w + math.log(m))))
                return out

            runs["pot"] = pot_run
        except Exception as e:  # noqa: BLE001
            log(f"peers.py: POT's ot.batch not importable ({type(e).__name__}: {e}); no pot ragged row")
    todo = [row for row in todo if row["impl"] in runs]  # a peer that does not import: no row
    for row in todo:
        run = runs[row["impl"]]
        row["note"] = ("a Python loop over the problems (POT's ot.batch.solve_batch takes one [B, n, m] "
                       "array, no list of ragged problems)" if row["impl"] == "pot"
                       else "a Python loop over the problems, the hand-batched iteration on each")
        log(f"peers {row['impl']} sinkhorn_ragged f32 {len(sn)} problems")

        def go(row=row, run=run):
            out = run()
            vals = [forms["transport_value"](C[0], f[0], g[0]) for C, (f, g) in zip(costs, out)]
            if ref is not None:
                row["check_rel_err"] = clean(max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(vals, ref)))
            if kd is not None:
                row["check_vs_kdloss"] = clean(max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(vals, kd)))
            _time_ext(env, cfg, row, lambda i: run(), 0, copy_gbps, per_unit=K)
            _judge(row, 1e-2)

        _guard(row, go, torch, log)
    return todo


# ----------------------------------------------------------- SinKD peer
def run_sinkd(env, cfg, copy_gbps, deadline, log):
    torch = env.torch
    forms = ext_forms(env.F, torch)
    if not cfg.sinkd or "torch_eager" not in cfg.impls:
        return []
    n, v, grp = cfg.sinkd
    dtype, iters = "bf16", 20
    rows = []
    s = env.logits(n, v, dtype, 5000).requires_grad_()
    t = env.logits(n, v, dtype, 5001)
    for metric in ("l1", "sqeuclidean"):
        row = ext_row("torch_eager", "sinkd", dtype, metric=metric, rows=n, vocab=v, group_size=grp,
                      iterations=iters)
        row["bytes"] = loss_bytes(n, v, dtype)
        rows.append(row)
        if _skip([row], deadline):
            continue
        log(f"peers torch_eager sinkd {metric} {dtype} {n}x{v}/{grp}")
        ref = kd = None
        if not cfg.no_check:
            ref = float(forms["sinkd"](s[:grp].detach().double(), t[:grp].double(), grp, metric, iters))
            if env.ext is not None and not env.cpu:
                try:
                    kd, _ = env.ext.sinkd(s, t, grp, metric, iters)
                except Exception as e:  # noqa: BLE001
                    log(f"  kdloss sinkd not usable for the check ({str(e)[:120]})")

        def fn(x, y, metric=metric):
            return forms["sinkd"](x, y, grp, metric, iters)

        def step(i, fn=fn):
            s.grad = None
            fn(s, t).backward()

        def go(row=row, fn=fn, step=step):
            s.grad = None
            if ref is not None:  # the first group, against float64
                row["check_rel_err"] = _rel(float(fn(s[:grp], t[:grp]).detach()), ref)
            _check_and_time(env, cfg, row, float(fn(s, t).detach()), None, kd, step,
                            s.numel() * s.element_size(), copy_gbps, TOL[dtype])

        _guard(row, go, torch, log)
        s.grad = None
    return rows


# ------------------------------------------------------------ self-test
def self_test_ext(torch, F, expect, gen, kd):
    """The other ops' torch forms against kdloss's float64 references
    (through the Python package, which checks its ctypes layouts) on small shapes,
    and against this script's own float64 evaluation."""
    forms = ext_forms(F, torch)
    ext = kd if kd.ext_available() else None
    if ext is None:
        print("self-test: kdloss's extension ops not loaded (set KDLOSS_LIBRARY): the other ops' "
              "forms are checked in float32 against float64 only", file=sys.stderr)
    # sparse: textbook f32 and bf16 against f64, and against kdl_ref_sparse_loss
    for n, v, k in ((5, 301, 7), (3, 64, 64), (2, 1100, 1024)):
        s = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
        t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
        lp, idx = F.log_softmax(t, -1).topk(k, dim=-1)
        s64 = s.clone().requires_grad_()
        ref = forms["sparse_fkl"](s64, idx, lp)
        ref.backward()
        for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            leaf = s.to(dt).requires_grad_()
            loss = forms["sparse_fkl"](leaf, idx, lp.to(dt))
            loss.backward()
            e = max(abs(float(loss.detach()) - float(ref.detach())) / abs(float(ref.detach())),
                    float((leaf.grad.double() - s64.grad).norm() / s64.grad.norm()))
            # bf16 inputs differ from the f64 ones by their rounding: compare
            # with f64 evaluated on the rounded values
            if dt == torch.bfloat16:
                r2 = s.to(dt).double().requires_grad_()
                l2 = forms["sparse_fkl"](r2, idx, lp.to(dt).double())
                l2.backward()
                e = max(abs(float(loss.detach()) - float(l2.detach())) / abs(float(l2.detach())),
                        float((leaf.grad.double() - r2.grad).norm() / r2.grad.norm()))
            expect(e <= tol, f"sparse torch {dt} {n}x{v} k={k}: rel. error {e:.3g} > {tol}")
        if ext is not None:
            kl, kg = ext.sparse(s, idx, lp)
            e = max(abs(kl - float(ref.detach())) / abs(float(ref.detach())), float((kg - s64.grad).norm() / s64.grad.norm()))
            expect(e <= 1e-6, f"sparse kdl_ref vs torch f64 {n}x{v} k={k}: rel. error {e:.3g}")
    # fused linear: materialised JSD (f64) against kdl_ref_fused_linear_loss
    for n, d, v in ((4, 6, 50), (3, 16, 301)):
        H = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
        W = (torch.randn(v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).requires_grad_()
        T = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
        loss = jsd_mean(F, torch, H @ W.t(), T)
        loss.backward()
        H32, W32 = H.detach().float().requires_grad_(), W.detach().float().requires_grad_()
        l32 = jsd_mean(F, torch, H32 @ W32.t(), T.float())
        l32.backward()
        e = max(abs(float(l32.detach()) - float(loss.detach())) / abs(float(loss.detach())),
                float((H32.grad.double() - H.grad).norm() / H.grad.norm()),
                float((W32.grad.double() - W.grad).norm() / W.grad.norm()))
        expect(e <= 1e-4, f"fused_linear torch f32 {n}x{d}x{v}: rel. error {e:.3g}")
        # the 16-bit peer rows: H, W, T in bf16 / f16, logits H W^T and the
        # gradients autograd returns in that dtype, against float64 on the same
        # rounded values (tolerance as the 16-bit rows, TOL)
        for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
            H16, W16 = H.detach().to(dt).requires_grad_(), W.detach().to(dt).requires_grad_()
            T16 = T.to(dt)
            l16 = jsd_mean(F, torch, H16 @ W16.t(), T16)
            l16.backward()
            H64, W64 = H16.detach().double().requires_grad_(), W16.detach().double().requires_grad_()
            l64 = jsd_mean(F, torch, H64 @ W64.t(), T16.double())
            l64.backward()
            expect(H16.grad.dtype == dt and W16.grad.dtype == dt, f"fused_linear torch {name}: gradient dtype")
            e = max(abs(float(l16.detach()) - float(l64.detach())) / abs(float(l64.detach())),
                    float((H16.grad.double() - H64.grad).norm() / H64.grad.norm()),
                    float((W16.grad.double() - W64.grad).norm() / W64.grad.norm()))
            expect(e <= TOL[name], f"fused_linear torch {name} {n}x{d}x{v}: rel. error {e:.3g} > {TOL[name]}")
        if ext is not None:
            kl, dH, dW = ext.fused_linear(H, W, T)
            e = max(abs(kl - float(loss.detach())) / abs(float(loss.detach())), float((dH - H.grad).norm() / H.grad.norm()),
                    float((dW - W.grad).norm() / W.grad.norm()))
            expect(e <= 1e-10, f"fused_linear kdl_ref vs torch f64 {n}x{d}x{v}: rel. error {e:.3g}")
    # fused linear with the teacher as a linear layer (d_t != d here): the timed
    # textbook form (both logits materialised) in f32 / bf16 against float64 on
    # the same values; no gradient reaches the teacher; kdloss's reference on
    # the teacher's float64 logits; the byte model (bench_lib.c's hand values)
    for n, d, dt_, v in ((4, 6, 9, 50), (3, 16, 5, 301)):
        H = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
        W = (torch.randn(v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).requires_grad_()
        Ht = torch.randn(n, dt_, generator=gen, dtype=torch.float64)
        Wt = torch.randn(v, dt_, generator=gen, dtype=torch.float64) * (2 / math.sqrt(dt_))
        loss = fused_tl_textbook(F, torch, H, W, Ht, Wt)
        loss.backward()
        ref = jsd_mean(F, torch, H.detach() @ W.detach().t(), torch.einsum("ik,vk->iv", Ht, Wt))
        expect(abs(float(loss.detach()) - float(ref)) <= 1e-13 * abs(float(ref)),
               f"fused_linear teacher-linear torch f64 {n}x{d}x{v}: {float(loss.detach())} vs {float(ref)}")
        for dt, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            Hx, Wx = H.detach().to(dt).requires_grad_(), W.detach().to(dt).requires_grad_()
            Htx, Wtx = Ht.to(dt).requires_grad_(), Wt.to(dt).requires_grad_()
            lx = fused_tl_textbook(F, torch, Hx, Wx, Htx, Wtx)
            lx.backward()
            H64, W64 = Hx.detach().double().requires_grad_(), Wx.detach().double().requires_grad_()
            l64 = jsd_mean(F, torch, H64 @ W64.t(), (Htx.detach() @ Wtx.detach().t()).double())
            l64.backward()
            expect(Htx.grad is None and Wtx.grad is None, f"fused_linear teacher-linear torch {name}: no teacher grad")
            e = max(abs(float(lx.detach()) - float(l64.detach())) / abs(float(l64.detach())),
                    float((Hx.grad.double() - H64.grad).norm() / H64.grad.norm()),
                    float((Wx.grad.double() - W64.grad).norm() / W64.grad.norm()))
            expect(e <= TOL[name], f"fused_linear teacher-linear torch {name} {n}x{d}x{v}: rel. error {e:.3g}")
        if ext is not None:
            kl, dH, dW = ext.fused_linear(H, W, Ht @ Wt.t())
            e = max(abs(kl - float(loss.detach())) / abs(float(loss.detach())), float((dH - H.grad).norm() / H.grad.norm()),
                    float((dW - W.grad).norm() / W.grad.norm()))
            expect(e <= 1e-10, f"fused_linear teacher-linear kdl_ref vs torch f64 {n}x{d}x{v}: rel. error {e:.3g}")
    for args, want in (((4096, 4096, 4096, 151936, "bf16"), 3834642432), ((4096, 4096, 4096, 151936, "f32"), 7669284864),
                       ((1, 2, 3, 5, "f16"), 6 * 2 * 4 + 6 * 3 * 2)):
        expect(fused_linear_tl_bytes(*args) == want, f"fused_linear_tl_bytes{args} = {fused_linear_tl_bytes(*args)}")
    keys = {row_key({"impl": "kdloss", "op": "fused_linear", "teacher": t}) for t in (None, "logits", "linear")}
    expect(len(keys) == 2, "row_key: the teacher-linear row is its own; an older row had the teacher's logits")
    # ragged Sinkhorn: the per-problem loop against kdl_ref_sinkhorn
    sn, sm = [5, 9, 3], [7, 4, 3]
    costs = [torch.rand(1, a, b, generator=gen, dtype=torch.float64) for a, b in zip(sn, sm)]
    vals = []
    for C in costs:
        f, g = forms["sinkhorn_one"](C, 30)
        vals.append(forms["transport_value"](C[0], f[0], g[0]))
        f32, g32 = forms["sinkhorn_one"](C.float(), 30)
        v32 = forms["transport_value"](C[0], f32[0], g32[0])
        expect(abs(v32 - vals[-1]) / abs(vals[-1]) < 1e-4, "sinkhorn_ragged loop f32 vs f64")
    if ext is not None:
        kv = ext.sinkhorn_ragged([C[0] for C in costs], 30)
        e = max(abs(a - b) / abs(b) for a, b in zip(kv, vals))
        expect(e <= 1e-10, f"sinkhorn_ragged kdl_ref vs torch loop: rel. error {e:.3g}")
    # SinKD: the eager form against kdl_ref_sinkd, both metrics
    n, v, grp = 8, 37, 4
    s = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    for metric in ("l1", "sqeuclidean"):
        s64 = s.clone().requires_grad_()
        ref = forms["sinkd"](s64, t, grp, metric, 20)
        ref.backward()
        leaf = s.float().requires_grad_()
        l32 = forms["sinkd"](leaf, t.float(), grp, metric, 20)
        l32.backward()
        e = max(abs(float(l32.detach()) - float(ref.detach())) / abs(float(ref.detach())),
                float((leaf.grad.double() - s64.grad).norm() / s64.grad.norm()))
        expect(e <= 1e-4, f"sinkd torch f32 {metric}: rel. error {e:.3g}")
        if ext is not None:
            kl, kg = ext.sinkd(s, t, grp, metric, 20)
            e = max(abs(kl - float(ref.detach())) / abs(float(ref.detach())), float((kg - s64.grad).norm() / s64.grad.norm()))
            expect(e <= 1e-8, f"sinkd kdl_ref vs torch f64 {metric}: rel. error {e:.3g}")


# ------------------------------------------------------------- config
def config_from(args, doc):
    """The matrix: options first, else what the kdloss rows cover, else the
    defaults of `kdloss bench`."""
    kd = [r for r in (doc or {}).get("rows", []) if r.get("impl") == "kdloss" and r.get("op") == "loss"]
    params = (doc or {}).get("meta", {}).get("params") or {}

    def seen(key):
        return list(dict.fromkeys(r[key] for r in kd if r.get(key) is not None))

    cfg = argparse.Namespace()
    if args.quick:
        dflt_shapes, dflt_dtypes, dflt_rules, dflt_rep, dflt_warm = [(4096, 32000)], ["bf16"], ["reference"], 5, 2
    else:
        dflt_shapes = [(4096, 32000), (8192, 128256), (8192, 151936)]
        dflt_dtypes, dflt_rules, dflt_rep, dflt_warm = ["bf16", "f32"], HEAD_RULES, 20, 5
    cfg.shapes = args.shapes or list(dict.fromkeys((r["rows"], r["vocab"]) for r in kd)) or dflt_shapes
    cfg.dtypes = args.dtypes or seen("dtype") or dflt_dtypes
    cfg.divergences = args.divergences or seen("divergence") or DIVERGENCES
    cfg.head_rules = args.head_rules or seen("head_rule") or dflt_rules
    cfg.repeats = args.repeats or params.get("repeats") or dflt_rep
    cfg.warmup = args.warmup if args.warmup is not None else params.get("warmup", dflt_warm)
    cfg.mu = args.mu or params.get("mu") or 0.5
    cfg.top_k = args.top_k or params.get("top_k") or 64
    cfg.impls = args.impls or (LOSS_IMPLS + [i for i in SINKHORN_IMPLS if i not in LOSS_IMPLS])
    if args.sinkhorn is None:  # not given: the default, none with --quick (as kdloss bench)
        cfg.sinkhorn = None if args.quick else (64, 1024, 1024)
    else:
        cfg.sinkhorn = args.sinkhorn or None
    cfg.sinkhorn_iters = args.sinkhorn_iters
    cfg.no_check = args.no_check
    cfg.ops = args.ops or OPS
    if args.sinkhorn is None and "sinkhorn" not in cfg.ops:
        cfg.sinkhorn = None
    q = args.quick
    cfg.sparse_shapes = args.sparse_shapes or ([(4096, 32000)] if q else [(8192, 151936)])
    cfg.sparse_k = args.sparse_k or [8, 64, 1024]
    cfg.fused_shapes = args.fused_shapes or ([(1024, 1024, 32000)] if q else [(4096, 4096, 151936)])
    # the fused rows' dtypes: --dtypes, else those of kdloss's fused_linear rows, else the default
    kf = [r for r in (doc or {}).get("rows", []) if r.get("impl") == "kdloss" and r.get("op") == "fused_linear"]
    cfg.fused_dtypes = args.dtypes or list(dict.fromkeys(r["dtype"] for r in kf if r.get("dtype"))) or dflt_dtypes
    cfg.ragged = args.ragged_sizes or (RAGGED_QUICK if q else RAGGED_DEFAULT)
    cfg.sinkd = args.sinkd if args.sinkd is not None else ((256, 8192, 64) if q else (512, 32000, 64))
    return cfg


def new_doc(args):
    return {"schema": SCHEMA,
            "meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "commit": args.commit or "unknown", "device": {}, "copy_gb_per_s": None,
                     "params": None},
            "rows": []}


# ------------------------------------------------------------ self-test
def self_test_driver(expect):
    """The run's driver without a GPU: deadlines, the torch.compile reserve,
    and run_ops (an op that raises is left out, the others' rows are
    written after each op)."""
    import tempfile

    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    quiet_other_frameworks(env)
    expect(env["POT_BACKEND_DISABLE_JAX"] == "1" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true",
           f"quiet_other_frameworks sets what is unset, keeps what is set: {env}")
    if "ot" not in sys.modules:  # POT only where it is installed (the device's carried wheel)
        try:
            import ot.backend as otbk
        except Exception:  # noqa: BLE001
            otbk = None
        if otbk is not None:
            import torch

            kind = type(otbk.get_backend(torch.zeros(2))).__name__
            expect(otbk.jax is False and kind == "TorchBackend",
                   f"POT with JAX disabled picks {kind} for torch tensors (jax: {bool(otbk.jax)})")

    d = peers_deadline(100.0, environ={}, now=1000.0, wall=5e9)
    expect(d == 1100.0, f"peers_deadline(--budget-s 100) = {d}")
    d = peers_deadline(100.0, environ={"KDL_PEERS_STOP_AT": str(5e9 + 40)}, now=1000.0, wall=5e9)
    expect(d == 1040.0, f"KDL_PEERS_STOP_AT 40 s ahead caps --budget-s 100: {d}")
    d = peers_deadline(None, environ={"KDL_PEERS_STOP_AT": str(5e9 + 300)}, now=1000.0, wall=5e9)
    expect(d == 1300.0, f"KDL_PEERS_STOP_AT alone: {d}")
    expect(peers_deadline(None, environ={}) is None, "no budget: no deadline")
    expect(peers_deadline(None, environ={"KDL_PEERS_STOP_AT": "soon"}) is None, "a malformed stop is ignored")
    expect(compile_fits(None) and compile_fits(1000.0 + COMPILE_RESERVE_S, now=1000.0)
           and not compile_fits(1000.0 + COMPILE_RESERVE_S - 1, now=1000.0), "compile_fits at the reserve")

    def row(impl):
        return {"impl": impl, "op": "loss", "divergence": "fkl", "dtype": "bf16", "rows": 8, "vocab": 32,
                "status": "ok", "ms": 1.0}

    def boom():
        raise RuntimeError("peer import or kernel failed")

    seen, logs, freed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        doc = {"schema": SCHEMA, "meta": {}, "rows": [row("kdloss")]}

        def first():
            return [row("torch_eager")]

        def last():
            seen.append(json.load(open(out))["rows"])  # written after the op before
            return [row("liger")]

        failed_ops = run_ops([("loss", first), ("sinkhorn", boom), ("sparse", last)], doc, out, logs.append,
                             after=lambda: freed.append(1))
        got = [r["impl"] for r in json.load(open(out))["rows"]]
    expect(failed_ops == ["sinkhorn"], f"run_ops reports the op that raised: {failed_ops}")
    expect(got == ["kdloss", "torch_eager", "liger"], f"run_ops keeps the other ops' rows: {got}")
    expect(len(seen) == 1 and [r["impl"] for r in seen[0]] == ["kdloss", "torch_eager"],
           "run_ops writes the output after each op")
    expect(any("sinkhorn" in m and "RuntimeError" in m for m in logs), f"run_ops logs the failure: {logs}")
    expect(len(freed) == 3, "run_ops calls after() after every op, the failed one too")


def self_test():
    quiet_other_frameworks()
    return _self_test()


def _self_test():
    """CPU check of the maths this script relies on: every textbook form
    against the float64 reference (small odd shapes, f32 and bf16), the
    reference against kdloss's own float64 reference when python/kdloss and
    libkdloss.so load, and the Sinkhorn loop in f32 against f64."""
    import types

    import torch
    import torch.nn.functional as F

    env = types.SimpleNamespace(torch=torch, F=F, dev=torch.device("cpu"))
    eager = textbook(env)
    kd = KdlossBinding()
    if not kd.available():
        print(f"self-test: kdloss's reference not loaded ({kd.why}); textbook forms checked "
              "against this script's reference only", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    passed = failed = 0

    def expect(ok, what):
        nonlocal passed, failed
        passed += bool(ok)
        failed += not ok
        if not ok:
            print(f"FAIL {what}", file=sys.stderr)

    # a library named explicitly must load: the comparisons are the point
    expect(kd.available() or not os.environ.get("KDLOSS_LIBRARY"),
           f"KDLOSS_LIBRARY is set but kdloss does not load: {kd.why}")

    for n, v in ((5, 1271), (3, 64), (1, 7)):
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            s = torch.randn(n, v, generator=gen) * 2
            t = torch.randn(n, v, generator=gen) * 2
            # peaked rows, not saturated ones (a softmax at 1 - 1e-5 leaves f32
            # gradients to cancellation, in every implementation)
            bump = 11.0 if v >= 64 else 3.0
            s[:, 0] += bump
            t[:, v // 2] += bump
            s, t = s.to(dtype), t.to(dtype)
            for d in DIVERGENCES:
                for r in (HEAD_RULES if d == "akl" else [None]):
                    k = min(7, v)
                    ref_loss, ref_grad = reference(env, s, t, d, 0.5, r, k)
                    leaf = s.clone().requires_grad_()
                    loss = eager[d](leaf, t, 0.5, r, k) if d == "akl" else eager[d](leaf, t)
                    loss.backward()
                    e = rel_errs(env, float(loss.detach()), leaf.grad, ref_loss, ref_grad)
                    expect(e <= tol, f"torch_eager {d}/{r} {dtype} {n}x{v}: rel. error {e:.3g} > {tol}")
                    if kd.available() and dtype == torch.float32:
                        kl, kg = kd.call(s.double(), t.double(), d, r, 0.5, k)
                        e = rel_errs(env, kl, kg.float(), ref_loss, ref_grad)
                        expect(e <= 1e-6, f"reference vs kdloss {d}/{r} {n}x{v}: rel. error {e:.3g}")
    # Sinkhorn loop: f32 against f64, small problems
    B, n, m, eps = 2, 5, 7, SINKHORN_EPS
    x, y = torch.randn(B, n, 3, generator=gen), torch.randn(B, m, 3, generator=gen)
    C = torch.cdist(x.double(), y.double()) ** 2
    vals = []
    for dt in (torch.float32, torch.float64):
        Cd = C.to(dt)
        la, lb = torch.full((B, n), -math.log(n), dtype=dt), torch.full((B, m), -math.log(m), dtype=dt)
        f, g = torch.zeros(B, n, dtype=dt), torch.zeros(B, m, dtype=dt)
        for _ in range(50):
            f = -eps * torch.logsumexp(lb[:, None, :] + (g[:, None, :] - Cd) / eps, dim=2)
            g = -eps * torch.logsumexp(la[:, :, None] + (f[:, :, None] - Cd) / eps, dim=1)
        P = torch.exp(la[:, :, None] + lb[:, None, :] + (f[:, :, None] + g[:, None, :] - Cd) / eps)
        vals.append((P * Cd).sum((1, 2)).double())
        expect(float((P.sum(1) - lb.exp()).abs().max()) < 1e-5, f"sinkhorn {dt}: column marginals")
    e = float(((vals[0] - vals[1]).abs() / vals[1].abs()).max())
    expect(e < 1e-4, f"sinkhorn f32 vs f64 value: rel. error {e:.3g}")
    self_test_ext(torch, F, expect, gen, kd)
    self_test_driver(expect)
    print(f"peers self-test: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def main(argv=None):
    quiet_other_frameworks()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.self_test:
        return self_test()
    src = load_doc(args.json)
    dst = load_doc(args.out) if os.path.abspath(args.out) != os.path.abspath(args.json or "") else None
    doc = dst or src or new_doc(args)
    if src is not None and dst is not None:
        doc["meta"] = src["meta"]  # the latest kdloss run's
        merge_rows(doc, src["rows"])
    if args.merge_only:
        doc["summary"] = summarize_targets(doc["rows"])
        write_doc(args.out, doc)
        print(f"peers.py: wrote {args.out} ({len(doc['rows'])} rows)", file=sys.stderr)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cfg = config_from(args, src)
    env = Env(args)
    if env.cpu:
        triton_interpreter_floats()
        cfg.shapes = [(n, v) for n, v in cfg.shapes if n * v <= 2**16] or [(7, 1271)]
    if env.cpu:
        pass
    elif not doc["meta"].get("device"):
        doc["meta"]["device"] = {"name": env.props.name,
                                 "compute_capability": f"{env.props.major}.{env.props.minor}",
                                 "sm_count": env.props.multi_processor_count, "l2_bytes": env.l2,
                                 "memory_bytes": env.props.total_memory}
    copy = doc["meta"].get("copy_gb_per_s")
    if not copy and not env.cpu:  # no kdloss run to take it from: measure it here, the same way
        nbytes = max(16 * env.l2, 2**30)
        a = env.torch.empty(nbytes, dtype=env.torch.uint8, device=env.dev).random_(1, 255)
        b = env.torch.empty_like(a)
        times = env.time_steps(lambda i: b.copy_(a), 1, max(10, cfg.repeats), 3)
        copy = 2 * nbytes / (percentile(times, 50) * 1e-3) / 1e9
        doc["meta"]["copy_gb_per_s"], doc["meta"]["copy_bytes"] = copy, nbytes
        del a, b
    doc["meta"]["peers"] = {"torch": env.torch.__version__, "kdloss_check":
                            "python/kdloss" if env.kdloss.available() else None,
                            "kdloss_unavailable_because": None if env.kdloss.available() else env.kdloss.why}
    for mod in ("liger_kernel", "ot", "flash_sinkhorn", "triton"):
        try:
            import importlib.metadata as md

            name = {"liger_kernel": "liger-kernel", "ot": "pot", "flash_sinkhorn": "flash-sinkhorn"}.get(mod, mod)
            doc["meta"]["peers"][mod] = md.version(name)
        except Exception:  # noqa: BLE001
            doc["meta"]["peers"][mod] = None

    deadline = peers_deadline(args.budget_s)
    env.ext = None
    if set(cfg.ops) - {"loss", "sinkhorn"}:
        env.ext = ext_binding(env, log)
    if env.cpu:  # tiny shapes for the dry run
        cfg.sparse_shapes = [(6, 1100)]
        cfg.fused_shapes = [(4, 8, 300)]
        cfg.ragged = ([5, 9, 3], [7, 4, 3])
        cfg.sinkd = (8, 37, 4) if cfg.sinkd else ()
    ops = []
    if "loss" in cfg.ops:
        ops.append(("loss", lambda: run_loss(env, cfg, copy, deadline, log)))
    if cfg.sinkhorn:
        ops.append(("sinkhorn", lambda: run_sinkhorn(env, cfg, copy, deadline, log)))
    if "sparse" in cfg.ops:
        ops.append(("sparse", lambda: run_sparse(env, cfg, copy, deadline, log)))
    if "fused_linear" in cfg.ops:
        ops.append(("fused_linear", lambda: run_fused(env, cfg, copy, deadline, log)))
    if "sinkhorn_ragged" in cfg.ops and cfg.ragged[0]:
        ops.append(("sinkhorn_ragged", lambda: run_ragged(env, cfg, copy, deadline, log)))
    if "sinkd" in cfg.ops:
        ops.append(("sinkd", lambda: run_sinkd(env, cfg, copy, deadline, log)))
    free = None if env.cpu else env.torch.cuda.empty_cache
    run_ops(ops, doc, args.out, log, after=free)
    # table
    print(f"{'impl':<15} {'op':<15} {'head/k':<9} {'dtype':<5} {'shape':<18} {'ms':>10} {'GB/s':>9} "
          f"{'%copy':>7}  status")
    for r in doc["rows"]:
        op, sub = r.get("divergence") or r["op"], r.get("head_rule") or "-"
        if r["op"] == "sinkhorn":
            shape, op = f"{r['batch']}x{r['n']}x{r['m']}", "sinkhorn"
        elif r["op"] == "sinkhorn_ragged":
            shape, op = f"{r['batch']} problems", "sinkhorn_ragged"
        elif r["op"] == "fused_linear":
            shape, op = f"{r['rows']}x{r['hidden']}x{r['vocab']}", "fused_linear"
            sub = r.get("divergence") + ("+HtWt" if r.get("teacher") == "linear" else "")
        elif r["op"] == "sinkd":
            shape, op, sub = f"{r['rows']}x{r['vocab']}/{r['group_size']}", "sinkd", r.get("metric")
        else:
            shape = f"{r['rows']}x{r['vocab']}"
            if r["op"] == "sparse":
                op, sub = "sparse", f"k={r['k']}"
        ms = f"{r['ms']:.4f}" if r.get("ms") else "-"
        gbs = f"{r['gb_per_s']:.1f}" if r.get("gb_per_s") else "-"
        fr = f"{100 * r['fraction_of_copy_bandwidth']:.1f}" if r.get("fraction_of_copy_bandwidth") else "-"
        print(f"{r['impl']:<15} {op:<15} {sub:<9} {r['dtype']:<5} {shape:<18} "
              f"{ms:>10} {gbs:>9} {fr:>7}  {r['status']}" + (f": {r['note']}" if r.get("note") else ""))
    print("targets (bf16, N=8192, V=151936, forward+backward; fused linear at V=151936):")
    for name, t in doc["summary"].items():
        v = t["value"]
        print(f"  {name:<40} {t['target']:<8} " + (f"{v:.3f}" if v is not None else "n/a")
              + ("" if t["met"] is None else ("  met" if t["met"] else "  NOT met")))
    plot(doc, args.png)
    print(f"peers.py: wrote {args.out}" + (f" and {args.png}" if os.path.exists(args.png) else ""),
          file=sys.stderr)
    bad = [r for r in doc["rows"] if r["status"] in ("error", "mismatch")]
    if args.fail_on_error and bad:
        print(f"peers.py: {len(bad)} rows in error or mismatch (--fail-on-error)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
