#!/usr/bin/env python3
"""Online distillation through the fused linear + loss: neither model's logits are stored.

The tiny teacher and student of examples/distill_tiny.py, each split into a
body (hidden states) and its output projection.  The loss takes the student's
hidden states and projection weight, and the teacher's hidden states and
projection weight (the teacher as a linear layer), so the [tokens, vocab]
logits of both exist only a chunk of rows at a time on CUDA
(kdl_fused_linear_loss); CPU tensors use the float64 reference.

At the first step the fused loss and its gradients are checked against the
same loss on materialised logits (kdloss.torch.distill_loss); on CUDA the
peak memory of the two is printed.  Then the student trains and the loss is
printed as it falls.

    cmake -S . -B build -G Ninja && ninja -C build
    KDLOSS_LIBRARY=build/libkdloss.so PYTHONPATH=python python3 examples/distill_fused_linear.py
    ... --steps 50 --divergence akl --temperature 2
"""

import os
import sys

import torch

try:
    import kdloss.torch as kt
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import kdloss.torch as kt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_tiny import VOCAB, TinyLM, arg_parser, make_teacher  # noqa: E402


def body(model, tokens):
    """Hidden states before the output projection (model.mlp[2])."""
    return model.mlp[1](model.mlp[0](model.embed(tokens)))


def fused_loss(student, teacher, tokens, labels, args):
    h = body(student, tokens)
    with torch.no_grad():  # the teacher is frozen
        th = body(teacher, tokens)
    head, thead = student.mlp[2], teacher.mlp[2]
    return kt.fused_linear_distill_loss(
        h, head.weight, bias=head.bias, teacher_hidden=th, teacher_weight=thead.weight,
        teacher_bias=thead.bias, divergence=args.divergence, temperature=args.temperature,
        scale=args.temperature ** 2, labels=labels)


def materialised_loss(student, teacher, tokens, labels, args):
    with torch.no_grad():
        t_logits = teacher(tokens)
    return kt.distill_loss(student(tokens), t_logits, divergence=args.divergence,
                           temperature=args.temperature, scale=args.temperature ** 2, labels=labels)


def grads(student, loss):
    student.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in student.parameters()]


def peak_bytes(fn, device):
    """Peak CUDA memory above the memory in use before fn (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--divergence", default="jsd")
    args = ap.parse_args()
    device = torch.device(args.device)
    teacher = make_teacher(device)
    torch.manual_seed(1)
    student = TinyLM(hidden=64).to(device)
    print(f"kdloss distill_fused_linear: vocab {VOCAB}, {args.batch}x{args.seq} tokens/step, "
          f"{args.divergence}, temperature {args.temperature}, device {device}")

    def batch():
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
        labels = tokens.clone()
        labels[:, -2:] = -100  # e.g. padding positions: ignored by the loss
        return tokens, labels

    # the fused loss is the loss on materialised logits, gradients included
    tokens, labels = batch()
    out = {}

    def step(name, loss_fn):  # forward and backward, kept in out[name]
        loss = loss_fn(student, teacher, tokens, labels, args)
        out[name] = (loss.detach(), grads(student, loss))

    peaks = [peak_bytes(lambda: step("m", materialised_loss), device),
             peak_bytes(lambda: step("f", fused_loss), device)]
    (lm, gm), (lf, gf) = out["m"], out["f"]
    # the materialised path rounds the logits to float32 (the model's dtype)
    # where the CPU reference forms them in float64 from the same H and W;
    # on CUDA both are float32 GEMMs with different summation orders
    tol = 1e-4 if device.type == "cuda" else 1e-5
    dl = abs(lf.item() - lm.item())
    dg = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(gf, gm))
    same = dl <= tol * max(1.0, abs(lm.item())) and dg <= tol
    print(f"first step: fused {lf.item():.6f}, materialised {lm.item():.6f} "
          f"(|diff| {dl:.2e}; largest relative gradient difference {dg:.2e}): "
          f"{'same' if same else 'DIFFERENT'}")
    if peaks[0] is not None:
        print(f"peak extra memory of loss and backward: materialised {peaks[0] / 2**20:.1f} MiB, "
              f"fused {peaks[1] / 2**20:.1f} MiB")

    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    losses = []
    for _ in range(args.steps):
        tokens, labels = batch()
        loss = fused_loss(student, teacher, tokens, labels, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    marks = sorted({0, len(losses) // 3, 2 * len(losses) // 3, len(losses) - 1})
    ratio = losses[-1] / losses[0] if losses[0] > 0 else 0.0
    print("loss: " + "  ".join(f"{losses[i]:.4f}" for i in marks) + f"   (final/first {ratio:.2f})")
    sys.exit(0 if same and ratio < 1.0 else 1)  # exit status: same as materialised, and the loss fell


if __name__ == "__main__":
    main()
