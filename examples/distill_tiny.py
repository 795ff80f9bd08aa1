#!/usr/bin/env python3
"""Distil a tiny teacher into a smaller student with every kdloss divergence.

A teacher MLP over a 512-token vocabulary (a fixed, random "language model":
next-token logits from the previous token) and a smaller student MLP; the
student is trained for a few steps on the teacher's logits with
kdloss.torch.distill_loss, once per divergence, and the loss is printed as it
falls.  CPU tensors use kdloss's float64 CPU reference, CUDA tensors the
fused GPU kernels (--device cuda, the default when a GPU is present).

    cmake -S . -B build -G Ninja && ninja -C build
    KDLOSS_LIBRARY=build/libkdloss.so PYTHONPATH=python python3 examples/distill_tiny.py
    ... --steps 50 --divergences akl,jsd --temperature 2
"""

import argparse
import os
import sys
import time

import torch

try:
    import kdloss.torch as kt
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import kdloss.torch as kt

VOCAB = 512
ALL = ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]


class TinyLM(torch.nn.Module):
    """Next-token logits from the current token: embedding -> MLP -> vocab."""

    def __init__(self, hidden, vocab=VOCAB):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, vocab))

    def forward(self, tokens):
        return self.mlp(self.embed(tokens))


def make_teacher(device, seed=0):
    torch.manual_seed(seed)
    teacher = TinyLM(hidden=256).to(device)
    with torch.no_grad():  # sharpen it: peaked next-token distributions, like a trained LM
        teacher.mlp[2].weight.mul_(6.0)
    return teacher.eval()


def distil(divergence, teacher, args, device):
    torch.manual_seed(1)
    student = TinyLM(hidden=64).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    crit = kt.DistillLoss(divergence, temperature=args.temperature,
                          scale=args.temperature ** 2, ignore_index=-100)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
        labels = tokens.clone()
        labels[:, -2:] = -100  # e.g. padding positions: ignored by the loss
        with torch.no_grad():
            t_logits = teacher(tokens)
        s_logits = student(tokens)  # [batch, seq, vocab]: flattened by the loss
        loss = crit(s_logits, t_logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dt = time.perf_counter() - t0
    return losses, dt


def arg_parser(doc):
    """The options of the examples' training loops."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--divergences", default=",".join(ALL))
    args = ap.parse_args()
    device = torch.device(args.device)
    teacher = make_teacher(device)
    print(f"kdloss distill_tiny: vocab {VOCAB}, {args.batch}x{args.seq} tokens/step, "
          f"{args.steps} steps, temperature {args.temperature}, device {device}")
    all_fell = True
    for div in args.divergences.split(","):
        losses, dt = distil(div, teacher, args, device)
        marks = sorted({0, len(losses) // 3, 2 * len(losses) // 3, len(losses) - 1})
        trail = "  ".join(f"{losses[i]:.4f}" for i in marks)
        ratio = losses[-1] / losses[0] if losses[0] > 0 else 0.0
        all_fell &= ratio < 1.0
        print(f"{div:>8}: {trail}   (final/first {ratio:.2f}, {dt:.2f} s)")
    sys.exit(0 if all_fell else 1)  # exit status: did every loss fall?


if __name__ == "__main__":
    main()
