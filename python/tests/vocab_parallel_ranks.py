#!/usr/bin/env python3
"""Helper of test_ext_torch.py (not a test module): spawns --world ranks over
torch.distributed (gloo, CPU), each holding an uneven vocabulary slice, and
checks kdloss.torch.vocab_parallel_distill_loss on every rank against
kdloss.torch.distill_loss on the whole logits (loss, and the gradient of the
slice through autograd) for several divergences, reductions, labels, dtypes,
the explicit and the exchanged slice geometry, a process group that is
not the default one, and compiled steps (torch.compile fullgraph=True,
aot_eager and Inductor: the step operators with functional all-reduces).
Exit status 0 when every case matches on every rank."""

import argparse
import os
import sys


def split(V, world):
    # uneven, the first slice one token wide
    if world == 1:
        return [V]
    rest = V - 1
    w = [1] + [rest // (world - 1) + (r < rest % (world - 1)) for r in range(world - 1)]
    return w


def check_case(kt, torch, S, T, off, w, kw, up, group=None, explicit=False, backend=None):
    local = S[:, off:off + w].clone().requires_grad_()
    extra = dict(vocab_offset=off, vocab=S.shape[1]) if explicit or backend else {}

    def f(s, t):
        return kt.vocab_parallel_distill_loss(s, t, group=group, **extra, **kw)
    if backend:  # one graph: step operators and functional all-reduces
        torch._dynamo.reset()
        f = torch.compile(f, backend=backend, fullgraph=True)
    loss = f(local, T[:, off:off + w])
    (loss * up.reshape(loss.shape).to(loss.dtype)).sum().backward()
    s0 = S.clone().requires_grad_()
    ref = kt.distill_loss(s0, T, **kw)
    (ref * up.reshape(ref.shape).to(ref.dtype)).sum().backward()
    tol = 1e-12 if S.dtype == torch.float64 else 1e-6
    loss, ref = loss.detach(), ref.detach()
    dl = float((loss.double() - ref.double()).abs().max())
    g_ref = s0.grad[:, off:off + w].double()
    dg = float((local.grad.double() - g_ref).abs().max())
    scale = max(float(s0.grad.double().abs().max()), 1e-300)
    ok = dl <= tol * max(1.0, float(ref.double().abs().max())) and dg <= tol * scale
    return ok, dl, dg


def worker(rank, world, port):
    import torch
    import torch.distributed as dist

    import kdloss.torch as kt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    g = torch.Generator().manual_seed(0)
    N, V = 6, 37
    S = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    T = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    T[:, 1::9] = T[:, :1]  # ties across slice boundaries
    labels = torch.tensor([0, 3, -100, 5, 1, 2])
    widths = split(V, world)
    off, w = sum(widths[:rank]), widths[rank]
    up_rows = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    cases = []
    for div in ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]:
        cases.append(dict(divergence=div, temperature=1.5, alpha=0.2, beta=0.3))
    cases += [dict(divergence="akl", head_rule="topk", top_k=4, reduction="none", labels=labels),
              dict(divergence="akl", head_rule="mass", mu=0.6, reduction="sum", scale=2.0),
              dict(divergence="jsd", reduction="none", labels=labels)]
    failures = []
    for n, kw in enumerate(cases):
        up = up_rows if kw.get("reduction") == "none" else torch.tensor(1.3, dtype=torch.float64)
        ok, dl, dg = check_case(kt, torch, S, T, off, w, kw, up, explicit=n % 2 == 1)
        if not ok:
            failures.append(f"{kw}: |dloss| {dl:.3g}, |dgrad| {dg:.3g}")
    # float32 logits, float32 gradient
    ok, dl, dg = check_case(kt, torch, S.float(), T.float(), off, w, dict(divergence="fkl"),
                            torch.tensor(1.0))
    if not ok:
        failures.append(f"float32: |dloss| {dl:.3g}, |dgrad| {dg:.3g}")
    # compiled with fullgraph=True (functional collectives over gloo)
    compiled = 0
    if kt._VP_TRACEABLE:
        for kw, backend in [(dict(divergence="akl", temperature=1.5, reduction="none",
                                  labels=labels), "aot_eager"),
                            (dict(divergence="jsd", beta=0.3), "aot_eager"),
                            (dict(divergence="akl", head_rule="topk", top_k=4, reduction="sum"),
                             "inductor")]:
            up = up_rows if kw.get("reduction") == "none" else torch.tensor(1.3, dtype=S.dtype)
            ok, dl, dg = check_case(kt, torch, S, T, off, w, kw, up, backend=backend)
            compiled += 1
            if not ok:
                failures.append(f"compiled {backend} {kw}: |dloss| {dl:.3g}, |dgrad| {dg:.3g}")
    # a group of the ranks 1.. (group rank = rank - 1): its own split of the vocabulary
    if world >= 3:
        sub = dist.new_group(list(range(1, world)))
        if rank >= 1:
            ws = split(V, world - 1)
            r = rank - 1
            for backend in [None] + (["aot_eager"] if kt._VP_TRACEABLE else []):
                ok, dl, dg = check_case(kt, torch, S, T, sum(ws[:r]), ws[r],
                                        dict(divergence="akl", reduction="none"), up_rows,
                                        group=sub, backend=backend)
                if not ok:
                    failures.append(f"sub-group {backend}: |dloss| {dl:.3g}, |dgrad| {dg:.3g}")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}/{world} slice [{off}, {off + w}): {len(cases) + 2} cases, "
          f"{compiled} compiled, {len(failures)} mismatches", flush=True)
    for f in failures:
        print(f"  rank {rank}: {f}", flush=True)
    if failures:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=3)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(args.world, args.port), nprocs=args.world, join=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "..")))
    main()
