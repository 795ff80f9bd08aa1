"""Call conventions of TRL's GKD loss and Liger-Kernel's distillation losses,
computed by kdloss.torch (the fused gradient of kdloss, no other maths).

A team that calls one of the peer functions below switches to kdloss by
changing the import; arguments, defaults, argument order, reductions and
divisors are the peer's.  The peer versions these follow were read from
their source: TRL 1.10.0.dev0 (commit f2cd5771,
trl/experimental/gkd/gkd_trainer.py; legacy=True: the older
trl/trainer/gkd_trainer.py at commit a9fa292c) and Liger-Kernel 0.8.2
(commit ead96b61).  python/tests/test_peers_kd.py runs them against the
peers' own code, TRL 1.16.0 and Liger-Kernel 0.8.5 (its Triton kernels by
Triton's interpreter, on CPU): the same conventions.

| kdloss.compat | peer (version read) | kdloss call |
|---|---|---|
| trl_generalized_jsd_loss | GKDTrainer.generalized_jsd_loss, TRL 1.10.0.dev0 | distill_loss(fkl/jsd/rkl, "sum") / divisor |
| trl_gold_generalized_jsd_loss | GOLDTrainer.generalized_jsd_loss, TRL 1.16.0 | the same; logits_are_probs: of log(p) |
| trl_iw_opd_generalized_jsd_loss | IWOPDTrainer.generalized_jsd_loss, TRL 1.16.0 | top_k: sparse_distill_loss(tail) or distill_loss on the support |
| jsd, JSD | liger_jsd, LigerJSD, Liger 0.8.2 | distill_loss(fkl/jsd/rkl, "sum") / rows kept |
| kl_div, KLDivLoss | liger_kl_div, LigerKLDIVLoss, Liger 0.8.2 | distill_loss("fkl", "sum") / divisor |
| tvd, TVDLoss | liger_tvd, LigerTVDLoss, Liger 0.8.2 | distill_loss(log p, log q, "tvd", "sum") / divisor |
| fused_linear_jsd, FusedLinearJSD | liger_fused_linear_jsd, LigerFusedLinearJSD, 0.8.2 | fused_linear_distill_loss(teacher_hidden, teacher_weight, "sum") / rows kept |

Signatures and defaults are the peers' (each function's docstring); TRL's
legacy=True (keyword-only) follows trl/trainer/gkd_trainer.py at a9fa292c.

The conventions (p the teacher's distribution, q the student's):

- beta: both peers weight the TEACHER by beta, JSD_beta = beta KL(p||m) +
  (1 - beta) KL(q||m), m = beta p + (1 - beta) q, which is kdloss's "jsd"
  with the same beta.  beta = 0 is the forward KL(p||q) (kdloss "fkl") and
  beta = 1 the reverse KL(q||p) ("rkl"): special cases in both peers, not
  limits of the mixture formula.  beta outside [0, 1] raises ValueError.
- Temperature (TRL, fused Liger): both logits are divided by it; the loss
  is not multiplied by temperature ** 2.
- Liger's JSD and KL take LOG-PROBABILITIES; kdloss takes them as logits
  (softmax of log p is p, so the value is the same when they are
  normalised).  Liger's TVD takes PROBABILITIES; kdloss is given their log.
- Divisors: TRL (1.10.0.dev0, trl.experimental.gkd) "batchmean" divides by
  the number of labels != -100 clamped to at least 1, or, without labels,
  by student_logits.shape[0] (the BATCH, B of [B, T, V], not the tokens);
  with num_items_in_batch given, the sum is divided by it whatever the
  reduction.  The older trl/trainer/gkd_trainer.py (a9fa292c; legacy=True
  here) divides by the kept tokens unclamped (0/0 = NaN), or without labels
  by shape[0] * shape[1] (B*T for [B, T, V], but N*V for a 2-D [N, V]).
  "mean" (both) divides by the number of kept elements, tokens times V;
  "sum" does not divide.  Liger's JSD and fused JSD divide by the rows
  whose label is not ignore_index (all rows without labels); its TVD
  "batchmean" likewise, "mean" by those rows times V; its KLDivLoss
  "batchmean" by the rows (shape[0], no labels), "mean" by rows times V.
  With no row kept these peers (and TRL's "mean" and legacy "batchmean")
  divide 0 by 0 and so does this module (NaN), where kdloss's own "mean"
  gives 0.
- Returned dtype: TRL's and Liger's JSD return the loss in the student's
  dtype and so do these; KLDiv, TVD and the fused JSD return kdloss's
  float32 (float64 for float64 inputs), as the peers return float32.

Where kdloss cannot follow the peer, it raises or differs as documented
here, never silently:

- reduction "none": the peers return per-VOCABULARY-ELEMENT terms ([..., V]),
  which kdloss never forms (its per-row loss is fused).  ValueError; for
  per-token losses call kdloss.torch.distill_loss(reduction="none").
- The gradient with respect to a log-probability (or probability) input
  that is itself a leaf: Liger differentiates its formula as if exp(input)
  were free; kdloss differentiates through the normalisation.  The two
  differ, per row, by a multiple of exp(input) (of a constant for TVD),
  which the backward of log_softmax (softmax) removes exactly: gradients to
  everything upstream of a log_softmax / softmax (the logits, the model)
  are the same.  Zero probabilities given to TVD get a zero gradient; where
  input == target exactly Liger's TVD subgradient is -1/2, kdloss's 0.
- KLDivLoss with log_target=False: Liger clamps the target to eps inside the
  log; kdloss uses log(target) exactly (the two differ by at most
  V * eps / e in the loss, 0 for targets of 0 or >= eps).  Inputs must be
  2-D [BT, V] as in Liger (ValueError otherwise); size_average and reduce
  are accepted and ignored, as by Liger.
- FusedLinearJSD: accum_dtype is passed to kdloss as grad_dtype (the dtype
  of dH and dW); kdloss accumulates in float64 on CPU and float32 on CUDA.
- Not mapped: Liger's chunked LigerFusedLinearJSDLoss (liger_kernel.
  chunked_loss: a hard cross-entropy term weighted with the soft JSD, true
  labels, biases); use kdloss.torch.fused_linear_distill_loss for its soft
  part (divergence "jsd", reduction "mean"; beta 0 / 1: "fkl" / "rkl";
  biases as bias= and teacher_bias=) and add the cross-entropy.
- kdloss checks its inputs (NaN/+inf rows raise kdloss.InvalidRowsError by
  default) where the peers compute NaN silently.
"""

from __future__ import annotations

import torch

from . import torch as _kt

__all__ = [
    "trl_generalized_jsd_loss",
    "trl_gold_generalized_jsd_loss",
    "trl_iw_opd_generalized_jsd_loss",
    "jsd",
    "JSD",
    "kl_div",
    "KLDivLoss",
    "tvd",
    "TVDLoss",
    "fused_linear_jsd",
    "FusedLinearJSD",
]

_NO_NONE = ("kdloss.compat: reduction 'none' of {peer} returns per-vocabulary-element terms, "
            "which kdloss does not form; use kdloss.torch.distill_loss(..., reduction='none') "
            "for per-token losses")


def _divergence(beta, name="beta"):
    """(kdloss divergence, kdloss beta) of the peers' beta in [0, 1]."""
    b = float(beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"kdloss.compat: {name} must be in [0, 1], got {beta!r}")
    if b == 0.0:
        return "fkl", 0.5
    if b == 1.0:
        return "rkl", 0.5
    return "jsd", b


def _reduction(reduction, allowed, peer):
    if reduction == "none":
        raise ValueError(_NO_NONE.format(peer=peer))
    if reduction not in allowed:
        raise ValueError(f"kdloss.compat: reduction must be one of {allowed} ({peer}), "
                         f"got {reduction!r}")


def _labels(labels):
    return None if labels is None else labels.to(torch.int64)


def _rows_kept(labels, ignore_index, rows):
    """The number of rows whose label is not ignore_index, as a tensor (no
    host synchronisation), or all rows."""
    if labels is None:
        return rows
    return (labels != ignore_index).sum()


def _two_d(x, name, peer):
    if x.dim() != 2:
        raise ValueError(f"kdloss.compat: {name} must be 2-D [BT, V] as in {peer}, "
                         f"got shape {tuple(x.shape)}")


def _shift_labels(labels, rows, peer):
    if labels is not None and tuple(labels.shape) != (rows,):
        raise ValueError(f"kdloss.compat: shift_labels must have shape ({rows},) as in {peer}, "
                         f"got {tuple(labels.shape)}")


# ----------------------------------------------------------------------- TRL
def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                             temperature=1.0, reduction="batchmean", num_items_in_batch=None, *,
                             legacy=False):
    """TRL GKDTrainer.generalized_jsd_loss: the generalised JSD of
    softmax(student/T) and softmax(teacher/T), beta the teacher's weight (0:
    KL(teacher||student), 1: KL(student||teacher)), tokens with labels ==
    -100 left out; reduction "batchmean", "sum" or "mean", or the sum over
    num_items_in_batch when that is given, with the divisors of
    trl.experimental.gkd at TRL 1.10.0.dev0 (commit f2cd5771); legacy=True
    (keyword-only, kdloss's) those of trl/trainer/gkd_trainer.py at commit
    a9fa292c (module docstring).  "none" raises."""
    _reduction(reduction, ("batchmean", "sum", "mean"), "TRL generalized_jsd_loss")
    if legacy and num_items_in_batch is not None:
        raise ValueError("kdloss.compat: num_items_in_batch is not an argument of the legacy "
                         "TRL generalized_jsd_loss")
    div, b = _divergence(beta)
    labels = _labels(labels)
    total = _kt.distill_loss(student_logits, teacher_logits, divergence=div,
                             temperature=temperature, labels=labels, ignore_index=-100,
                             reduction="sum", beta=b)
    return _trl_divide(total, student_logits, labels, reduction, num_items_in_batch,
                       student_logits.shape[-1], legacy)


def _trl_divide(total, student_logits, labels, reduction, num_items_in_batch, cells, legacy=False):
    """TRL's divisors of the summed loss (module docstring): cells is the
    number of elements per token its "mean" counts (V, or a support's)."""
    kept = None if labels is None else _rows_kept(labels, -100, None)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    elif reduction == "sum":
        loss = total
    elif reduction == "mean":
        loss = total / ((student_logits[..., 0].numel() if kept is None else kept) * cells)
    elif kept is not None:
        loss = total / (kept if legacy else kept.clamp_min(1))
    elif legacy:
        if student_logits.dim() < 2:
            raise ValueError("kdloss.compat: TRL's legacy batchmean needs at least 2 dimensions")
        loss = total / (student_logits.shape[0] * student_logits.shape[1])
    else:
        loss = total / max(student_logits.shape[0], 1)
    return loss.to(student_logits.dtype)


def trl_gold_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                                  temperature=1.0, reduction="batchmean", logits_are_probs=False,
                                  num_items_in_batch=None):
    """TRL GOLDTrainer.generalized_jsd_loss (TRL 1.16.0, trl.experimental.gold):
    GKD's loss (trl_generalized_jsd_loss, the same divisors), or, with
    logits_are_probs, inputs that are PROBABILITIES (as GOLD's cross-tokenizer
    alignment gives them): log(max(p, 1e-8)) are the log-probabilities and
    temperature is not used.  kdloss normalises those rows (softmax of the
    log), TRL does not: the two agree where each row sums to 1 and has no
    entry below 1e-8 (otherwise by the renormalisation).  The gradient to a
    probability tensor that is itself a leaf differs from TRL's as the module
    docstring says for Liger's log-probabilities; gradients upstream of the
    softmax that made the probabilities are the same."""
    if logits_are_probs:
        student_logits = torch.log(student_logits.clamp_min(1e-8))
        teacher_logits = torch.log(teacher_logits.detach().clamp_min(1e-8))
        temperature = 1.0
    return trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                    reduction, num_items_in_batch)


def trl_iw_opd_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                                    temperature=1.0, reduction="batchmean", top_k=0, add_tail=True,
                                    num_items_in_batch=None):
    """TRL IWOPDTrainer.generalized_jsd_loss (TRL 1.16.0, trl.experimental.
    iw_opd): GKD's loss over the whole vocabulary when top_k is 0 or >= V;
    otherwise over a top-k support: the teacher's top-k (beta 0, forward
    KL), the student's (beta 1, reverse KL) or their union (0 < beta < 1).

    add_tail=True: the support's tokens plus one bucket of the remaining
    mass, the log-probabilities those of the full softmax: kdloss's sparse
    teacher in TAIL_BUCKET mode (sparse_distill_loss, reading the student's
    logits once, never forming the student's log_softmax).  TRL clamps each side's support
    mass to at most 1 - 1e-7; kdloss takes it exactly: the two agree unless a
    top-k holds more than 1 - 1e-7 of a model's mass.  With the union
    support (0 < beta < 1) the support has a different size per row, which
    kdloss's sparse teacher does not take: ValueError.
    add_tail=False: both models renormalised on the support: kdloss's dense
    loss on the gathered logits (a token in both top-k sets is counted once,
    its repeat at -inf in both, which kdloss counts as 0).
    Divisors as TRL's (batchmean, sum, num_items_in_batch as GKD's; "mean"
    divides by the kept tokens times the support's cells: top_k, top_k + 1
    with the bucket, 2 top_k for the union)."""
    peer = "TRL IWOPDTrainer.generalized_jsd_loss"
    V = student_logits.shape[-1]
    if top_k <= 0 or V <= top_k:
        return trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                        reduction, num_items_in_batch)
    _reduction(reduction, ("batchmean", "sum", "mean"), peer)
    div, b = _divergence(beta)
    labels = _labels(labels)
    t = teacher_logits.detach()
    s_sel = student_logits.detach()
    if div == "jsd" and add_tail:
        raise ValueError(f"kdloss.compat: {peer} with 0 < beta < 1, top_k and add_tail uses the "
                         "union of both top-k sets, a support of a different size per row, which "
                         "kdloss's sparse teacher does not take; use add_tail=False, or beta 0 / 1")
    if div == "jsd":
        idx = torch.cat([t.topk(top_k, dim=-1).indices, s_sel.topk(top_k, dim=-1).indices], dim=-1)
        earlier = torch.ones(2 * top_k, 2 * top_k, dtype=torch.bool, device=idx.device).tril(-1)
        repeat = ((idx.unsqueeze(-1) == idx.unsqueeze(-2)) & earlier).any(-1)  # seen before in the row
    else:
        idx = (t if div == "fkl" else s_sel).topk(top_k, dim=-1).indices
        repeat = None
    if add_tail:
        lp = torch.log_softmax(t / temperature, dim=-1).gather(-1, idx)
        total = _kt.sparse_distill_loss(student_logits, idx, lp, mode="tail", divergence=div,
                                        temperature=temperature, labels=labels, reduction="sum")
        cells = top_k + 1
    else:
        sg, tg = student_logits.gather(-1, idx), t.gather(-1, idx)
        if repeat is not None:
            sg = sg.masked_fill(repeat, float("-inf"))
            tg = tg.masked_fill(repeat, float("-inf"))
        total = _kt.distill_loss(sg, tg, divergence=div, temperature=temperature, labels=labels,
                                 reduction="sum", beta=b)
        cells = idx.shape[-1]
    return _trl_divide(total, student_logits, labels, reduction, num_items_in_batch, cells)


# ---------------------------------------------------------------- Liger JSD
def jsd(input, target, shift_labels=None, beta=0.5, ignore_index=-100):
    """liger_kernel.transformers.functional.liger_jsd (Liger 0.8.2): input
    the student's log-probabilities [BT, V], target the teacher's, beta the
    teacher's weight (0: forward KL, 1: reverse KL); the sum over the rows
    whose shift_label is not ignore_index, divided by their number."""
    peer = "Liger liger_jsd"
    _two_d(input, "input", peer)
    _shift_labels(shift_labels, input.shape[0], peer)
    div, b = _divergence(beta)
    labels = _labels(shift_labels)
    total = _kt.distill_loss(input, target, divergence=div, labels=labels,
                             ignore_index=ignore_index, reduction="sum", beta=b)
    return (total / _rows_kept(labels, ignore_index, input.shape[0])).to(input.dtype)


class JSD(torch.nn.Module):
    """LigerJSD (Liger 0.8.2): JSD(beta, ignore_index)(log_q, log_p,
    shift_labels=None), log_q the student's log-probabilities."""

    def __init__(self, beta=0.5, ignore_index=-100):
        super().__init__()
        _divergence(beta)
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, log_q, log_p, shift_labels=None):
        return jsd(log_q, log_p, shift_labels, self.beta, self.ignore_index)


# ------------------------------------------------------------- Liger KLDiv
def kl_div(input, target, size_average=True, reduce=True, reduction="mean", log_target=False,
           eps=1e-10):
    """liger_kernel.transformers.functional.liger_kl_div (Liger 0.8.2), the
    torch.nn.functional.kl_div convention: input the student's
    log-probabilities [BT, V], target the teacher's probabilities (its
    log-probabilities with log_target); KL(target||exp(input)) summed, then
    "batchmean" / BT, "sum", "mean" / (BT * V).  size_average and reduce
    are ignored (as by Liger); eps: see the module docstring."""
    peer = "Liger liger_kl_div"
    _reduction(reduction, ("batchmean", "sum", "mean"), peer)
    _two_d(input, "input", peer)
    t = target.detach()
    t = t if log_target else torch.log(t)
    total = _kt.distill_loss(input, t, divergence="fkl", reduction="sum")
    if reduction == "batchmean":
        return total / input.shape[0]
    if reduction == "mean":
        return total / input.numel()
    return total


class KLDivLoss(torch.nn.Module):
    """LigerKLDIVLoss (Liger 0.8.2), an nn.KLDivLoss: KLDivLoss(eps=1e-10,
    size_average=None, reduce=None, reduction="mean", log_target=False),
    forward(y_pred, y_true)."""

    def __init__(self, eps=1e-10, size_average=None, reduce=None, reduction="mean",
                 log_target=False):
        super().__init__()
        _reduction(reduction, ("batchmean", "sum", "mean"), "Liger LigerKLDIVLoss")
        self.eps, self.reduction, self.log_target = eps, reduction, log_target

    def forward(self, y_pred, y_true):
        return kl_div(y_pred, y_true, reduction=self.reduction, log_target=self.log_target,
                      eps=self.eps)


# --------------------------------------------------------------- Liger TVD
class _Log(torch.autograd.Function):
    """log of probabilities whose backward is grad / p where p > 0 and 0
    where p = 0 (kdloss's gradient there is 0: no 0/0)."""

    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return torch.log(p)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return torch.where(p > 0, g / torch.where(p > 0, p, torch.ones_like(p)),
                           torch.zeros_like(g))


def tvd(input, target, shift_labels=None, reduction="mean", ignore_index=-100):
    """liger_kernel.transformers.functional.liger_tvd (Liger 0.8.2): input
    and target PROBABILITIES [BT, V] (gradient to input), 0.5 * sum |input -
    target| per row, rows whose shift_label is ignore_index left out;
    "batchmean" / rows kept, "mean" / (rows kept * V), "sum".  The
    function's default reduction is "mean", the module's "batchmean" (as in
    Liger)."""
    peer = "Liger liger_tvd"
    _reduction(reduction, ("batchmean", "sum", "mean"), peer)
    _two_d(input, "input", peer)
    _shift_labels(shift_labels, input.shape[0], peer)
    labels = _labels(shift_labels)
    s = _Log.apply(input) if input.requires_grad else torch.log(input)
    total = _kt.distill_loss(s, torch.log(target.detach()), divergence="tvd", labels=labels,
                             ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    kept = _rows_kept(labels, ignore_index, input.shape[0])
    return total / (kept if reduction == "batchmean" else kept * input.shape[1])


class TVDLoss(torch.nn.Module):
    """LigerTVDLoss (Liger 0.8.2): TVDLoss(reduction="batchmean",
    ignore_index=-100), forward(p, q, shift_labels=None)."""

    def __init__(self, reduction="batchmean", ignore_index=-100):
        super().__init__()
        _reduction(reduction, ("batchmean", "sum", "mean"), "Liger LigerTVDLoss")
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, p, q, shift_labels=None):
        return tvd(p, q, shift_labels, self.reduction, self.ignore_index)


# ------------------------------------------------------- Liger fused JSD
def fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight,
                     shift_labels=None, jsd_beta=0.5, ignore_index=-100, temperature=1.0,
                     accum_dtype=None):
    """liger_kernel.transformers.functional.liger_fused_linear_jsd (Liger
    0.8.2): the JSD (beta jsd_beta, the teacher's weight) of the logits
    student_input @ student_weight.T and teacher_input @ teacher_weight.T,
    both divided by temperature, never holding the [BT, V] logits; summed
    over the rows kept and divided by their number.  The teacher is frozen
    (teacher_input and teacher_weight get no gradient), as in Liger."""
    peer = "Liger liger_fused_linear_jsd"
    _two_d(student_input, "student_input", peer)
    _shift_labels(shift_labels, student_input.shape[0], peer)
    if temperature == 0:
        raise ValueError("kdloss.compat: temperature cannot be 0")
    div, b = _divergence(jsd_beta, "jsd_beta")
    labels = _labels(shift_labels)
    total = _kt.fused_linear_distill_loss(
        student_input, student_weight, divergence=div, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction="sum", beta=b, grad_dtype=accum_dtype,
        teacher_hidden=teacher_input.detach(), teacher_weight=teacher_weight.detach())
    return total / _rows_kept(labels, ignore_index, student_input.shape[0])


class FusedLinearJSD(torch.nn.Module):
    """LigerFusedLinearJSD (Liger 0.8.2): FusedLinearJSD(jsd_beta=0.5,
    ignore_index=-100, temperature=1.0, accum_dtype=None), forward(
    student_input, student_weight, teacher_input, teacher_weight,
    shift_labels)."""

    def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None):
        super().__init__()
        if temperature == 0:
            raise ValueError("kdloss.compat: temperature cannot be 0")
        _divergence(jsd_beta, "jsd_beta")
        self.jsd_beta, self.ignore_index = jsd_beta, ignore_index
        self.temperature, self.accum_dtype = temperature, accum_dtype

    def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                shift_labels=None):
        return fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight,
                                shift_labels, self.jsd_beta, self.ignore_index, self.temperature,
                                self.accum_dtype)
