#!/usr/bin/env python3
"""Vocabulary-parallel distillation loss with torch.distributed (gloo, CPU).

Each of W processes holds a contiguous slice of the vocabulary of the student
and teacher logits [N, V] and runs kdloss's step protocol
(kdl_ref_shard_step, the float64 CPU reference, through ctypes): after every
step it all-reduces the exchange buffer with the operation the step names
(MAX or SUM).  At the end every rank holds the same loss and the gradient of
its slice; rank 0 gathers the gradient and compares both with the unsharded
reference (kdl_ref_loss_forward_backward).

    python3 examples/vocab_parallel_torch.py --world 4 --divergence akl
    python3 examples/vocab_parallel_torch.py --simulate --world 3   # no torch:
        the same ranks in one process, the all-reduces done with numpy

The library is found through --lib, $KDLOSS_LIBRARY, or build*/libkdloss.so.
With the GPU entry point (kdl_shard_step) the same loop runs with device
buffers and NCCL; see docs/extensions.md.

Needs numpy; torch only without --simulate.  Both paths run in CI
(tests/CMakeLists.txt: example_vocab_parallel, when torch imports).
"""
import argparse
import ctypes as C
import glob
import os
import sys

import numpy as np

F64 = 3  # KDL_DTYPE_F64
OP_DONE, OP_MAX, OP_SUM = 0, 1, 2
DIVS = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]
RULES = ["reference", "mass", "topk"]


class LossDesc(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("divergence", C.c_int), ("temperature", C.c_double),
                ("alpha", C.c_double), ("beta", C.c_double), ("head_rule", C.c_int), ("mu", C.c_double),
                ("top_k", C.c_int64), ("reduction", C.c_int), ("scale", C.c_double),
                ("ignore_index", C.c_int64)]


class LossArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("rows", C.c_int64), ("vocab", C.c_int64),
                ("student", C.c_void_p), ("ld_student", C.c_int64), ("student_dtype", C.c_int),
                ("teacher", C.c_void_p), ("ld_teacher", C.c_int64), ("teacher_dtype", C.c_int),
                ("labels", C.c_void_p), ("grad", C.c_void_p), ("ld_grad", C.c_int64), ("grad_dtype", C.c_int),
                ("out_dtype", C.c_int), ("loss", C.c_void_p),
                ("stat_fkl", C.c_void_p), ("stat_rkl", C.c_void_p), ("stat_g_head", C.c_void_p),
                ("stat_g_tail", C.c_void_p), ("stat_w_head", C.c_void_p), ("stat_w_tail", C.c_void_p),
                ("stat_head_size", C.c_void_p), ("info", C.c_void_p), ("valid_rows", C.c_void_p)]


class ShardArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("rows", C.c_int64), ("vocab", C.c_int64),
                ("vocab_offset", C.c_int64), ("vocab_local", C.c_int64), ("shard_rank", C.c_int32),
                ("num_shards", C.c_int32), ("student", C.c_void_p), ("ld_student", C.c_int64),
                ("student_dtype", C.c_int), ("teacher", C.c_void_p), ("ld_teacher", C.c_int64),
                ("teacher_dtype", C.c_int), ("labels", C.c_void_p), ("grad", C.c_void_p),
                ("ld_grad", C.c_int64), ("grad_dtype", C.c_int), ("out_dtype", C.c_int), ("loss", C.c_void_p),
                ("info", C.c_void_p), ("valid_rows", C.c_void_p), ("stat_head_size", C.c_void_p),
                ("head_mask", C.c_void_p), ("state", C.c_void_p), ("exchange", C.c_void_p)]


def load_library(path):
    cands = [path] if path else []
    if os.environ.get("KDLOSS_LIBRARY"):
        cands.append(os.environ["KDLOSS_LIBRARY"])
    here = os.path.dirname(os.path.abspath(__file__))
    cands += sorted(glob.glob(os.path.join(here, "..", "build*", "libkdloss.so")))
    for c in cands:
        if c and os.path.exists(c):
            lib = C.CDLL(c)
            lib.kdl_status_string.restype = C.c_char_p
            lib.kdl_get_last_error.restype = C.c_char_p
            return lib
    sys.exit("vocab_parallel_torch.py: libkdloss.so not found (--lib PATH or KDLOSS_LIBRARY)")


def check(lib, st, what):
    if st != 0:
        raise RuntimeError("%s: %s (%s)" % (what, lib.kdl_status_string(st).decode(),
                                            lib.kdl_get_last_error().decode()))


def ptr(a):
    return a.ctypes.data_as(C.c_void_p) if a is not None else None


def make_desc(lib, args):
    d = LossDesc()
    lib.kdl_loss_desc_init(C.byref(d))
    assert d.struct_size == C.sizeof(d), "kdl_loss_desc_t layout differs from this script"
    d.divergence = DIVS.index(args.divergence)
    d.head_rule = RULES.index(args.head_rule)
    d.top_k = args.top_k
    d.temperature = args.temperature
    d.reduction = 2  # mean
    return d


def inputs(args):
    rng = np.random.default_rng(args.seed)  # the same on every rank
    S = rng.normal(0, 2, (args.rows, args.vocab))
    T = rng.normal(0, 2, (args.rows, args.vocab))
    T[:, ::97] = T[:, :1]  # ties across slice boundaries (AKL orders them by index)
    return S, T


def split(V, W):
    w = [V // W + (r < V % W) for r in range(W)]
    off = [sum(w[:r]) for r in range(W)]
    return w, off


class Shard:
    """One rank's buffers and arguments for the step protocol."""

    def __init__(self, lib, desc, S, T, rank, W):
        N, V = S.shape
        w, off = split(V, W)
        self.lib, self.desc = lib, desc
        self.S = np.ascontiguousarray(S[:, off[rank]:off[rank] + w[rank]])
        self.T = np.ascontiguousarray(T[:, off[rank]:off[rank] + w[rank]])
        self.grad = np.zeros_like(self.S)
        self.loss = np.zeros(1)
        a = ShardArgs()
        lib.kdl_shard_args_init(C.byref(a))
        assert a.struct_size == C.sizeof(a), "kdl_shard_args_t layout differs from this script"
        a.rows, a.vocab, a.vocab_offset, a.vocab_local = N, V, off[rank], w[rank]
        a.shard_rank, a.num_shards = rank, W
        a.student, a.ld_student, a.student_dtype = ptr(self.S), w[rank], F64
        a.teacher, a.ld_teacher, a.teacher_dtype = ptr(self.T), w[rank], F64
        a.grad, a.ld_grad, a.grad_dtype = ptr(self.grad), w[rank], F64
        a.out_dtype, a.loss = F64, ptr(self.loss)
        sb, ec, ns = C.c_size_t(), C.c_size_t(), C.c_int()
        check(lib, lib.kdl_shard_sizes(C.byref(desc), C.byref(a), C.byref(sb), C.byref(ec), C.byref(ns)),
              "kdl_shard_sizes")
        self.state = np.zeros(sb.value, dtype=np.uint8)
        self.exchange = np.zeros(max(ec.value, 1))
        a.state, a.exchange = ptr(self.state), ptr(self.exchange)
        self.args, self.steps = a, ns.value

    def step(self, s):
        op, count = C.c_int(), C.c_int64()
        check(self.lib, self.lib.kdl_ref_shard_step(C.byref(self.desc), C.byref(self.args), s, C.byref(op),
                                                    C.byref(count)), "kdl_ref_shard_step")
        return op.value, count.value


def unsharded(lib, desc, S, T):
    N, V = S.shape
    grad, loss = np.zeros_like(S), np.zeros(1)
    a = LossArgs()
    lib.kdl_loss_args_init(C.byref(a))
    assert a.struct_size == C.sizeof(a), "kdl_loss_args_t layout differs from this script"
    a.rows, a.vocab = N, V
    a.student, a.ld_student, a.student_dtype = ptr(S), V, F64
    a.teacher, a.ld_teacher, a.teacher_dtype = ptr(T), V, F64
    a.grad, a.ld_grad, a.grad_dtype = ptr(grad), V, F64
    a.out_dtype, a.loss = F64, ptr(loss)
    check(lib, lib.kdl_ref_loss_forward_backward(C.byref(desc), C.byref(a)), "kdl_ref_loss_forward_backward")
    return loss[0], grad


def report(lib, desc, S, T, loss, grad, W):
    ref_loss, ref_grad = unsharded(lib, desc, S, T)
    dl = abs(loss - ref_loss)
    dg = float(np.max(np.abs(grad - ref_grad)))
    print("world %d: loss %.17g, unsharded %.17g, |diff| %.3g, max |grad diff| %.3g (max |grad| %.3g)"
          % (W, loss, ref_loss, dl, dg, float(np.max(np.abs(ref_grad)))))
    ok = dl <= 1e-12 * abs(ref_loss) + 1e-300 and dg <= 1e-12 * float(np.max(np.abs(ref_grad)))
    print("OK" if ok else "MISMATCH")
    return ok


def worker(rank, W, args):
    import torch
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    lib = load_library(args.lib)
    desc = make_desc(lib, args)
    S, T = inputs(args)
    sh = Shard(lib, desc, S, T, rank, W)
    ex = torch.from_numpy(sh.exchange)  # shares memory with the buffer the library writes
    for s in range(sh.steps):
        op, count = sh.step(s)
        if op == OP_DONE:
            break
        dist.all_reduce(ex[:count], op=dist.ReduceOp.MAX if op == OP_MAX else dist.ReduceOp.SUM)
    # gloo's gather wants equal sizes: pad each slice to the widest, trim after
    widths = split(S.shape[1], W)[0]
    wmax = max(widths)
    g = torch.zeros(S.shape[0], wmax, dtype=torch.float64)
    g[:, : sh.grad.shape[1]] = torch.from_numpy(sh.grad)
    if rank == 0:
        parts = [torch.zeros(S.shape[0], wmax, dtype=torch.float64) for _ in range(W)]
        dist.gather(g, gather_list=parts, dst=0)
        grad = torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)
        ok = report(lib, desc, S, T, sh.loss[0], grad.numpy(), W)
    else:
        dist.gather(g, dst=0)
        ok = True
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def simulate(args):
    """The same ranks in one process; the all-reduces done here with numpy."""
    lib = load_library(args.lib)
    desc = make_desc(lib, args)
    S, T = inputs(args)
    shards = [Shard(lib, desc, S, T, r, args.world) for r in range(args.world)]
    for s in range(shards[0].steps):
        res = [sh.step(s) for sh in shards]
        op, count = res[0]
        assert all(x == res[0] for x in res), "ranks disagree on the step"
        if op == OP_DONE:
            break
        stack = np.stack([sh.exchange[:count] for sh in shards])
        red = stack.max(axis=0) if op == OP_MAX else stack.sum(axis=0)
        for sh in shards:
            sh.exchange[:count] = red
    grad = np.concatenate([sh.grad for sh in shards], axis=1)
    return report(lib, desc, S, T, shards[0].loss[0], grad, args.world)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes (ranks), 2-4 typical")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--divergence", choices=DIVS, default="akl")
    p.add_argument("--head-rule", choices=RULES, default="reference")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--lib", default=None, help="path of libkdloss.so")
    p.add_argument("--simulate", action="store_true", help="no torch: ranks in one process")
    args = p.parse_args()
    if args.simulate:
        sys.exit(0 if simulate(args) else 1)
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(args.world, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
