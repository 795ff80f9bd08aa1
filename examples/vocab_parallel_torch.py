#!/usr/bin/env python3
"""Vocabulary-parallel distillation loss with torch.distributed (gloo, CPU).

Each of W processes holds a contiguous slice of the vocabulary of the student
and teacher logits [N, V] and calls kdloss.torch.vocab_parallel_distill_loss:
it runs kdloss's step protocol (kdl_ref_shard_step, the float64 CPU
reference, for CPU tensors) and after every step all-reduces the exchange
buffer over the process group with the operation the step names (MAX or
SUM).  Every rank gets the same loss and, from loss.backward(), the gradient
of its slice; rank 0 gathers the gradient and compares both with the
unsharded reference (kdloss.numpy.distill_loss).

    python3 examples/vocab_parallel_torch.py --world 4 --divergence akl
    python3 examples/vocab_parallel_torch.py --simulate --world 3   # no torch:
        the same ranks in one process (kdloss.numpy.VocabShard), the
        all-reduces done with numpy

The library is found through --lib, $KDLOSS_LIBRARY, or build*/libkdloss.so;
the kdloss package through PYTHONPATH or ../python.  With CUDA tensors and an
NCCL process group the same call runs the GPU steps (kdl_shard_step); see
docs/extensions.md and python/README.md.

Needs numpy; torch only without --simulate.  Both paths run in CI
(tests/CMakeLists.txt: example_vocab_parallel, when torch imports; the
Python tests run --simulate).
"""
import argparse
import glob
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DIVS = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]
RULES = ["reference", "mass", "topk"]


def use_library(path):
    """Points the kdloss package at the library (before its first use) and
    makes the package importable from the source tree."""
    if path:
        os.environ["KDLOSS_LIBRARY"] = os.path.abspath(path)
    elif not os.environ.get("KDLOSS_LIBRARY"):
        found = sorted(glob.glob(os.path.join(HERE, "..", "build*", "libkdloss.so")))
        if not found:
            sys.exit("vocab_parallel_torch.py: libkdloss.so not found (--lib PATH or KDLOSS_LIBRARY)")
        os.environ["KDLOSS_LIBRARY"] = os.path.abspath(found[0])
    try:
        import kdloss  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(HERE, "..", "python"))


def loss_options(args):
    return dict(divergence=args.divergence, head_rule=args.head_rule, top_k=args.top_k,
                temperature=args.temperature, reduction="mean")


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


def report(S, T, loss, grad, W, args):
    import kdloss.numpy as kn

    ref_loss, ref_grad, _ = kn.distill_loss(S, T, **loss_options(args))
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

    import kdloss.torch as kt

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    S, T = inputs(args)
    widths, offs = split(S.shape[1], W)
    lo, hi = offs[rank], offs[rank] + widths[rank]
    s_local = torch.from_numpy(np.ascontiguousarray(S[:, lo:hi])).requires_grad_()
    t_local = torch.from_numpy(np.ascontiguousarray(T[:, lo:hi]))
    # vocab_offset and vocab could be left out: the ranks then exchange their widths
    loss = kt.vocab_parallel_distill_loss(s_local, t_local, vocab_offset=lo, vocab=S.shape[1],
                                          **loss_options(args))
    loss.backward()  # d loss / d this rank's slice, computed in the forward steps
    # gloo's gather wants equal sizes: pad each slice to the widest, trim after
    wmax = max(widths)
    g = torch.zeros(S.shape[0], wmax, dtype=torch.float64)
    g[:, : widths[rank]] = s_local.grad
    if rank == 0:
        parts = [torch.zeros(S.shape[0], wmax, dtype=torch.float64) for _ in range(W)]
        dist.gather(g, gather_list=parts, dst=0)
        grad = torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)
        ok = report(S, T, loss.item(), grad.numpy(), W, args)
    else:
        dist.gather(g, dst=0)
        ok = True
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def simulate(args):
    """The same ranks in one process; the all-reduces done here with numpy."""
    import kdloss.numpy as kn

    S, T = inputs(args)
    widths, offs = split(S.shape[1], args.world)
    shards = [kn.VocabShard(np.ascontiguousarray(S[:, o:o + w]), np.ascontiguousarray(T[:, o:o + w]),
                            o, S.shape[1], r, args.world, **loss_options(args))
              for r, (o, w) in enumerate(zip(offs, widths))]
    for s in range(shards[0].num_steps):
        res = [sh.step(s) for sh in shards]
        op, count = res[0]
        assert all(x == res[0] for x in res), "ranks disagree on the step"
        if op is None:
            break
        stack = np.stack([sh.exchange[:count] for sh in shards])
        red = stack.max(axis=0) if op == "max" else stack.sum(axis=0)
        for sh in shards:
            sh.exchange[:count] = red
    results = [sh.result() for sh in shards]
    grad = np.concatenate([g for _, g, _ in results], axis=1)
    return report(S, T, results[0][0], grad, args.world, args)


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
    use_library(args.lib)  # before any kdloss import; inherited by the spawned ranks
    if args.simulate:
        sys.exit(0 if simulate(args) else 1)
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(args.world, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
