"""Cases that test_peers_kd.py runs through Liger-Kernel itself and through
kdloss.compat, and the worker that runs the Liger side.

Liger's losses are Triton kernels.  On a machine without a GPU, Triton's
interpreter (TRITON_INTERPRET=1, read when Triton's modules are imported
and again when its kernels run) executes them on CPU tensors: the same
kernel source, each program instance run with NumPy.  The variable cannot
be set and unset inside the pytest process (Triton's lazy imports assert
on it, and it would turn any later Triton kernel into an interpreted one),
so the worker below runs in a subprocess of its own:

    TRITON_INTERPRET=1 python peer_liger_cases.py OUT.pt

It builds every case, runs it through Liger, and saves {case id: (loss,
{name: gradient}) or an error string}.  The test builds the same cases
(same seeds) and runs them through kdloss.compat with `run`: one function
for both sides, so the two differ only in the table of functions.

Inputs are float32 (Liger computes in float32; the interpreter has no
bfloat16 arithmetic of its own).  Every gradient is taken with respect to
LOGITS upstream of the log_softmax / softmax that makes Liger's inputs: the
quantity training uses, and the one both must agree on (kdloss.compat's
docstring says why the gradient to a log-probability leaf differs).
"""

import os
import sys

import torch

ROWS, VOCAB, HIDDEN, T_HIDDEN = 7, 301, 24, 20  # VOCAB odd: no vector width divides it
KINDS = ("jsd", "kl_div", "tvd", "fused_linear_jsd")  # kdloss.compat's names of the functions run
IGNORE = -100


def _labels(g, rows, ignore_index=IGNORE):
    lab = torch.randint(0, VOCAB, (rows,), generator=g)
    lab[1] = ignore_index
    lab[4] = ignore_index
    return lab


def cases():
    """[(case id, kind, options)]: every reduction, beta end and interior,
    labels or not, the options that change a divisor or a convention."""
    out = []
    for beta in (0.0, 0.3, 0.5, 1.0):
        for lab in (False, True):
            out.append((f"jsd-b{beta}-lab{int(lab)}", "jsd", dict(beta=beta, labels=lab)))
    for red in ("batchmean", "sum", "mean"):
        for log_target in (False, True):
            out.append((f"kl_div-{red}-log{int(log_target)}", "kl_div",
                        dict(reduction=red, log_target=log_target)))
    for red in ("batchmean", "sum", "mean"):
        for lab in (False, True):
            out.append((f"tvd-{red}-lab{int(lab)}", "tvd", dict(reduction=red, labels=lab)))
    for beta in (0.0, 0.5, 0.7, 1.0):
        for temp in (1.0, 2.5):
            for lab in (False, True):
                out.append((f"fused-b{beta}-T{temp}-lab{int(lab)}", "fused_linear_jsd",
                            dict(beta=beta, temperature=temp, labels=lab)))
    # a masked vocabulary: the last MASKED tokens at -inf in both models'
    # logits ("inf"), and the same rows without those columns ("drop")
    for base, kind, opt in (("jsd-b0.0", "jsd", dict(beta=0.0)), ("jsd-b0.5", "jsd", dict(beta=0.5)),
                            ("jsd-b1.0", "jsd", dict(beta=1.0)),
                            ("kl_div-log1", "kl_div", dict(reduction="batchmean", log_target=True)),
                            ("tvd", "tvd", dict(reduction="batchmean"))):
        for mask in ("inf", "drop"):
            out.append((f"masked-{base}-{mask}", kind, dict(opt, mask=mask)))
    return out


MASKED = 40


def _masked(x, mask):
    """Mask the last MASKED vocabulary entries of the [rows, VOCAB] logits."""
    if mask == "drop":
        return x[:, :-MASKED].contiguous()
    x = x.clone()
    x[:, -MASKED:] = float("-inf")
    return x


def inputs(case_id):
    """The tensors of one case, from a seed of its own (the same on both
    sides, and for the two halves of a masked pair).  Logits of scale ~3
    give peaked and flat rows alike."""
    case_id = case_id.removesuffix("-inf").removesuffix("-drop")
    g = torch.Generator().manual_seed(sum(map(ord, case_id)) * 7919)
    return dict(
        zs=3 * torch.randn(ROWS, VOCAB, generator=g),
        zt=3 * torch.randn(ROWS, VOCAB, generator=g),
        H=torch.randn(ROWS, HIDDEN, generator=g),
        W=0.3 * torch.randn(VOCAB, HIDDEN, generator=g),
        Ht=torch.randn(ROWS, T_HIDDEN, generator=g),
        Wt=0.3 * torch.randn(VOCAB, T_HIDDEN, generator=g),
        labels=_labels(g, ROWS),
    )


def run(fns, case_id, kind, opt):
    """Loss and gradients of one case through fns (Liger's functions or
    kdloss.compat's, by the peer's names): (loss as float64, {leaf name:
    gradient as float64})."""
    x = inputs(case_id)
    lab = x["labels"] if opt.get("labels") else None
    if kind == "fused_linear_jsd":
        H = x["H"].requires_grad_()
        W = x["W"].requires_grad_()
        loss = fns[kind](H, W, x["Ht"], x["Wt"], lab, jsd_beta=opt["beta"],
                         temperature=opt["temperature"])
        leaves = dict(H=H, W=W)
    else:
        if opt.get("mask"):
            x["zs"], x["zt"] = _masked(x["zs"], opt["mask"]), _masked(x["zt"], opt["mask"])
        zs = x["zs"].requires_grad_()
        leaves = dict(zs=zs)
        if kind == "jsd":
            loss = fns[kind](torch.log_softmax(zs, -1), torch.log_softmax(x["zt"], -1), lab,
                             beta=opt["beta"])
        elif kind == "kl_div":
            target = (torch.log_softmax if opt["log_target"] else torch.softmax)(x["zt"], -1)
            loss = fns[kind](torch.log_softmax(zs, -1), target, reduction=opt["reduction"],
                             log_target=opt["log_target"])
        else:
            loss = fns[kind](torch.softmax(zs, -1), torch.softmax(x["zt"], -1), lab,
                             reduction=opt["reduction"])
    if not torch.isfinite(loss):  # a NaN loss: record it (its backward may raise)
        return loss.detach().to(torch.float64), {}
    loss.backward()
    return (loss.detach().to(torch.float64),
            {k: v.grad.detach().to(torch.float64) for k, v in leaves.items()})


# kdloss.compat's name -> Liger's (functions, and modules' __init__ and forward)
LIGER_NAMES = dict(jsd="liger_jsd", kl_div="liger_kl_div", tvd="liger_tvd",
                   fused_linear_jsd="liger_fused_linear_jsd", JSD="LigerJSD",
                   KLDivLoss="LigerKLDIVLoss", TVDLoss="LigerTVDLoss",
                   FusedLinearJSD="LigerFusedLinearJSD")


def parameters(fn, parent_init=None):
    """[(name, kind, repr(default) or None)] of fn, self left out; *args and
    **kwargs that a module's __init__ hands to its parent class are replaced
    by the parent's parameters (LigerKLDIVLoss passes them to nn.KLDivLoss)."""
    import inspect

    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and parent_init is not None:
            if p.kind == p.VAR_POSITIONAL:
                out += parameters(parent_init)
            continue
        out.append((p.name, p.kind.name, None if p.default is p.empty else repr(p.default)))
    return out


def liger_signatures():
    import liger_kernel.transformers as lt
    import liger_kernel.transformers.functional as lf

    sigs = {}
    for ours, theirs in LIGER_NAMES.items():
        obj = getattr(lf, theirs, None) or getattr(lt, theirs)
        if isinstance(obj, type):
            parent = obj.__mro__[1].__init__
            sigs[ours + ".__init__"] = parameters(obj.__init__, parent)
            sigs[ours + ".forward"] = parameters(obj.forward)
        else:
            sigs[ours] = parameters(obj)
    return sigs


def main(out_path):
    # Triton's interpreter passes float arguments as bare floats; Liger's
    # kl_div and tvd kernels need compiled Triton's float32 scalars
    # (bench/peers.py's triton_interpreter_floats, shared with its dry run)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
    from peers import triton_interpreter_floats

    triton_interpreter_floats()
    import liger_kernel.transformers.functional as lf

    fns = {kind: getattr(lf, LIGER_NAMES[kind]) for kind in KINDS}
    results = {}
    for case_id, kind, opt in cases():
        try:
            results[case_id] = run(fns, case_id, kind, opt)
        except Exception as e:  # recorded: the test reports it as that case's failure
            results[case_id] = f"{type(e).__name__}: {e}"
    results["__signatures__"] = liger_signatures()
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
