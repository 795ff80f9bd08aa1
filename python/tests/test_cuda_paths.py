"""The binding's CUDA code paths: what the binding hands the library and the
stream it runs on, checked on any machine by standing in for the library's
GPU entry points and torch.cuda's device and stream calls (the tests marked
`cuda` run the real thing and are skipped without a device)."""

import contextlib
import ctypes
import types

import pytest

torch = pytest.importorskip("torch")

import kdloss  # noqa: E402
import kdloss.numpy as kn  # noqa: E402
import kdloss.torch as kt  # noqa: E402
from kdloss import _lib, _ops  # noqa: E402


class _FakeGpuLib:
    """The three GPU calls call_gpu makes, recorded; the workspace query
    answers `need` bytes."""

    def __init__(self, need):
        self.need, self.calls = need, []

    def kdl_set_stream(self, handle, stream):
        self.calls.append(("set_stream", handle, stream.value))
        return 0

    def kdl_loss_workspace_size(self, handle, desc, args, nbytes):
        self.calls.append(("size", handle))
        nbytes._obj.value = self.need
        return 0

    def kdl_loss_forward_backward(self, handle, desc, args, ws, nbytes):
        self.calls.append(("call", handle, ws.value, nbytes))
        return 0


class _Block:
    def __init__(self, addr, n):
        self.addr, self.n = addr, n

    def data_ptr(self):
        return self.addr


@pytest.mark.parametrize("base", [0x10000, 0x10000 + 16, 0x10000 + 48, 0x10000 + 256])
def test_call_gpu_sets_the_stream_first_and_aligns_the_workspace(monkeypatch, base):
    fake = _FakeGpuLib(1000)
    monkeypatch.setattr(_lib, "lib", lambda: fake)
    blocks = []

    def alloc(n):
        blocks.append(_Block(base, n))
        return blocks[-1]

    _lib.call_gpu("loss", 7, 0xBEEF00, _lib.LossDesc(), _lib.LossArgs(), alloc)
    assert [c[0] for c in fake.calls] == ["set_stream", "size", "call"]
    assert fake.calls[0] == ("set_stream", 7, 0xBEEF00)
    (_, _, ptr, nbytes), (blk,) = fake.calls[2], blocks
    assert nbytes == 1000
    assert ptr % _lib.WORKSPACE_ALIGN == 0
    assert blk.addr <= ptr and ptr + nbytes <= blk.addr + blk.n  # inside the allocation


def test_call_gpu_without_workspace_passes_null(monkeypatch):
    fake = _FakeGpuLib(0)
    monkeypatch.setattr(_lib, "lib", lambda: fake)

    def alloc(n):
        raise AssertionError("no workspace wanted")

    _lib.call_gpu("loss", 1, 0, _lib.LossDesc(), _lib.LossArgs(), alloc)
    assert fake.calls[-1] == ("call", 1, None, 0)


class _FakeCuda:
    """torch.cuda's device context and per-device current streams, recorded."""

    def __init__(self):
        self.current, self.log = None, []

    @contextlib.contextmanager
    def device(self, dev):
        prev, self.current = self.current, torch.device(dev)
        try:
            yield
        finally:
            self.current = prev

    def current_stream(self, dev=None):
        dev = self.current if dev is None else torch.device(dev)
        return types.SimpleNamespace(cuda_stream=0x5000 + 0x100 * dev.index)


def test_torch_call_runs_on_the_tensors_device_and_its_current_stream(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(_lib, "require_gpu", lambda op, what: None)

    def handle(index):
        cuda.log.append(("handle", index, cuda.current))
        return 40 + index

    def call_gpu(op, h, stream, desc, args, alloc):
        cuda.log.append(("call", op, h, stream, cuda.current))

    monkeypatch.setattr(_lib, "handle_for_current_device", handle)
    monkeypatch.setattr(_lib, "call_gpu", call_gpu)
    dev = torch.device("cuda", 1)
    kt._T.call("loss", dev, None, None, "distill_loss")
    assert cuda.log == [("handle", 1, dev), ("call", "loss", 41, 0x5100, dev)]
    assert cuda.current is None  # the device context is left


def test_torch_handle_sets_the_current_stream(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(_lib, "handle_for_current_device", lambda index: 40 + index)
    fake = _FakeGpuLib(0)
    monkeypatch.setattr(_lib, "lib", lambda: fake)
    monkeypatch.setattr(fake, "kdl_set_stream",
                        lambda h, s: fake.calls.append(("set_stream", h, s)) or 0)
    assert kt._T.handle(torch.device("cuda", 2)) == 42
    assert fake.calls == [("set_stream", 42, 0x5200)]


def test_host_reads_are_refused_during_graph_capture(monkeypatch):
    monkeypatch.setattr(kt, "_capturing", lambda dev: True)
    dev = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="raise_on_invalid=True.*CUDA graph"):
        kt._no_host_read(dev, raise_on_invalid=True)
    with pytest.raises(RuntimeError, match="raise_on_invalid=True and check_indices=True"):
        kt._no_host_read(dev, raise_on_invalid=True, check_indices=True)
    kt._no_host_read(dev, raise_on_invalid=False, check_indices=False)  # nothing read back
    kt._no_host_read(torch.device("cpu"), raise_on_invalid=True)  # the host: no capture


def test_rows_are_passed_with_their_stride(monkeypatch):
    """The row stride (ld) and first element the library gets for strided,
    sliced and non-viewable inputs: the same code serves CUDA tensors."""
    seen = []

    def call(op, dev, desc, args, what):
        seen.append((args.student, args.ld_student, args.teacher, args.ld_teacher))
        _lib.call_ref(op, desc, args)

    monkeypatch.setattr(kt._T, "call", call)
    wide = torch.randn(5, 12)
    s = wide[:, 2:9]  # rows 12 apart, starting at column 2
    t = torch.randn(5, 7)
    kt.distill_loss(s, t, divergence="fkl")
    assert seen[-1] == (s.data_ptr(), 12, t.data_ptr(), 7)
    s3 = torch.randn(2, 6, 7).transpose(0, 1)  # [6, 2, 7]: no [12, 7] view, copied to plain rows
    kt.distill_loss(s3, torch.randn(6, 2, 7), divergence="fkl")
    assert seen[-1][1] == 7 and seen[-1][0] != s3.data_ptr()


def _meta(outs):
    return [(tuple(o.shape), o.dtype) for o in outs]


@pytest.mark.parametrize("want_grad", [False, True])
@pytest.mark.parametrize("want_stats", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distill_fake_matches_impl(want_grad, want_stats, dtype):
    s, t = torch.randn(3, 2, 5, dtype=dtype), torch.randn(3, 2, 5, dtype=dtype)
    args = (s, t, None, *kt._opt_args(dict(zip(kt._OPT_NAMES, (
        "akl", 1.0, 0.1, 0.5, "reference", 0.5, 1, "none", 1.0, -100)))), want_grad, want_stats,
        True)
    assert _meta(kt._distill_fake(*args)) == _meta(kt._distill_impl(*args))


def _fused_args(h, w, t, want, reduction="mean", raise_on_invalid=True, tl=(None,) * 3,
                ts=(None,) * 2, mode=None, check_indices=False):
    """kdloss::fused_linear_fwd's arguments; tl: the teacher as a linear
    layer (teacher_hidden, teacher_weight, teacher_bias), ts the sparse
    teacher (teacher_indices, teacher_logprobs; mode), with t None."""
    opts = kt._opt_args(dict(zip(kt._OPT_NAMES, (
        "fkl", 1.0, 0.1, 0.5, "reference", 0.5, 1, reduction, 1.0, -100))))
    return (h, w, t, None, None, *tl, *ts, *opts, 0, want, want, False, None, mode,
            raise_on_invalid, check_indices)


def _bwd_rest(args):
    """fused_linear_bwd's arguments after grad_output, from _fused_args'."""
    return args[kt._FUSED_NT:-2]


@pytest.mark.parametrize("kind", ["logits", "linear", "sparse"])
@pytest.mark.parametrize("want", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_fake_matches_impl(want, reduction, kind):
    h, w, t = torch.randn(4, 3), torch.randn(6, 3), torch.randn(4, 6)
    tl = (torch.randn(4, 2, dtype=torch.bfloat16), torch.randn(6, 2, dtype=torch.bfloat16),
          None) if kind == "linear" else (None,) * 3
    ts = _sparse_teacher(4, 6, 3) if kind == "sparse" else (None,) * 2
    args = _fused_args(h, w, t if kind == "logits" else None, want, reduction, tl=tl, ts=ts,
                       mode="tail" if kind == "sparse" else None)
    assert _meta(kt._fused_fake(*args)) == _meta(kt._fused_impl(*args))


def _sparse_teacher(n, v, k, seed=0):
    """A top-k teacher (teacher_indices, teacher_logprobs) of n rows over v
    tokens, in no particular order within each row."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    return idx, lp.gather(-1, idx)


@pytest.mark.parametrize("kind", ["logits", "linear", "sparse"])
def test_fused_bwd_checks_grad_output(kind):
    h, w, t = torch.randn(4, 3), torch.randn(6, 3), torch.randn(4, 6)
    ht, wt = torch.randn(4, 2), torch.randn(6, 2)
    tl, ts, mode = (None,) * 3, (None,) * 2, None
    go = torch.rand(4, dtype=torch.float64)
    h64, w64 = h.double().numpy(), w.double().numpy()
    if kind == "sparse":  # the reference: the sparse loss's dL on h @ w.T, chained
        t, ts, mode = None, _sparse_teacher(4, 6, 3), "tail"
        _, dl, _ = kn.sparse_distill_loss(h64 @ w64.T, ts[0].numpy(), ts[1].numpy(), mode="tail",
                                          reduction="none")
        want = (dl * go.numpy()[:, None]) @ w64, (dl * go.numpy()[:, None]).T @ h64
    else:
        if kind == "linear":  # the logits the layer stands for, for the reference
            t, tl = None, (ht, wt, None)
            tk = (ht.double() @ wt.double().T).numpy()
        else:
            tk = t.double().numpy()
        want = kn.fused_linear_distill_loss(h64, w64, tk, divergence="fkl", reduction="none",
                                            grad_output=go.numpy())[1:3]
    rest = _bwd_rest(_fused_args(h, w, t, True, "none", tl=tl, ts=ts, mode=mode))
    head = (h, w, t, None, None, *tl, *ts)
    gh, gw, _ = kt._fused_bwd_impl(*head, go, *rest)
    assert torch.allclose(gh, torch.from_numpy(want[0])) and torch.allclose(
        gw, torch.from_numpy(want[1]))
    gs = torch.rand(8, dtype=torch.float64)[::2]  # strided: read as its own 4 values
    assert torch.allclose(kt._fused_bwd_impl(*head, gs, *rest)[0],
                          kt._fused_bwd_impl(*head, gs.contiguous(), *rest)[0])
    for bad, err in ((go[:3], ValueError), (go.long(), ValueError),
                     (torch.empty(4, device="meta"), ValueError)):
        with pytest.raises(err):
            kt._fused_bwd_impl(*head, bad, *rest)
        with pytest.raises(err):
            kt._fused_bwd_fake(*head, bad, *rest)


def test_teacher_linear_fields_are_passed(monkeypatch):
    """What the library gets for the teacher as a linear layer (the same
    code serves CUDA tensors): teacher NULL, H_t and W_t with their row
    strides and d_t, b_t, their common dtype; version 3 of the struct."""
    seen = []

    def call(op, dev, desc, args, what):
        seen.append({k: getattr(args, k) for k in (
            "teacher", "teacher_hidden", "ld_teacher_hidden", "teacher_hidden_size",
            "teacher_weight", "ld_teacher_weight", "teacher_bias", "teacher_linear_dtype")})
        seen[-1]["size"] = args.struct_size
        _lib.call_ref(op, desc, args)

    monkeypatch.setattr(kt._T, "call", call)
    h, w = torch.randn(5, 4), torch.randn(7, 4)
    hw = torch.randn(5, 9, dtype=torch.bfloat16)
    ww = torch.randn(7, 6, dtype=torch.bfloat16)
    ht, wt, bt = hw[:, 1:4], ww[:, 2:5], torch.randn(7, dtype=torch.bfloat16)
    kt.fused_linear_distill_loss(h, w, teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt)
    assert seen[-1] == dict(teacher=None, teacher_hidden=ht.data_ptr(), ld_teacher_hidden=9,
                            teacher_hidden_size=3, teacher_weight=wt.data_ptr(),
                            ld_teacher_weight=6, teacher_bias=bt.data_ptr(),
                            teacher_linear_dtype=_lib.DTYPE["bf16"],
                            size=ctypes.sizeof(_lib.FusedLinearArgs))
    kt.fused_linear_distill_loss(h, w, torch.randn(5, 7))
    assert seen[-1]["teacher"] and not seen[-1]["teacher_hidden"] and not seen[-1]["teacher_bias"]


def test_sparse_teacher_fields_are_passed(monkeypatch):
    """What the library gets for the sparse teacher (the same code serves
    CUDA tensors): teacher and teacher_hidden NULL, the indices and
    log-probs with their row strides, k, the mode, the log-probs' dtype and
    the bad-index counter; none of these without the sparse teacher.  The
    fields are the ctypes mirror's own (a misspelt one would be a Python
    attribute the library never sees)."""
    f = _ops._SPARSE_FIELDS
    names = ([f["indices"][0], f["indices"][1], f["logprobs"][0], f["logprobs"][1],
              f["logprobs"][2], f["mode"], f["k"], f["bad"]])
    assert set(names) <= {n for n, _ in _lib.FusedLinearArgs._fields_}
    seen = []

    def call(op, dev, desc, args, what):
        seen.append({k: getattr(args, k) for k in ["teacher", "teacher_hidden"] + names})
        _lib.call_ref(op, desc, args)

    monkeypatch.setattr(kt._T, "call", call)
    h, w = torch.randn(5, 4), torch.randn(7, 4)
    iw = torch.stack([torch.randperm(7)[:3] for _ in range(5)])
    iw = torch.cat([iw, torch.zeros(5, 2, dtype=torch.int64)], 1)  # rows 5 apart
    lw = torch.log_softmax(torch.randn(5, 9), -1).to(torch.bfloat16)
    ti, tlp = iw[:, :3], lw[:, 1:4]
    loss, st = kt.fused_linear_distill_loss(h, w, teacher_indices=ti, teacher_logprobs=tlp,
                                            mode="tail", raise_on_invalid=False,
                                            return_stats=True)
    got = seen[-1]
    assert got["teacher"] is None and got["teacher_hidden"] is None
    assert got[f["bad"]] == st["bad_index_rows"].data_ptr()  # the third counter
    assert [got[n] for n in names[:7]] == [ti.data_ptr(), 5, tlp.data_ptr(), 9,
                                           _lib.DTYPE["bf16"], _lib.parse_sparse_mode("tail"), 3]
    kt.fused_linear_distill_loss(h, w, teacher_indices=ti, teacher_logprobs=tlp)
    assert seen[-1][f["mode"]] == _lib.parse_sparse_mode("renormalised")
    kt.fused_linear_distill_loss(h, w, torch.randn(5, 7))
    assert seen[-1]["teacher"] and not seen[-1][f["indices"][0]] and not seen[-1][f["bad"]]


# ------------------------------------------------------------------ CUDA
def _cuda_ready():
    return torch.cuda.is_available() and kdloss.device_available()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs torch.cuda and a CUDA build of kdloss")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fake_matches_impl(dtype):
    s, t = (torch.randn(3, 2, 5, device="cuda").to(dtype) for _ in range(2))
    for want_grad in (False, True):
        for want_stats in (False, True):
            args = (s, t, None, *kt._opt_args(dict(zip(kt._OPT_NAMES, (
                "akl", 1.0, 0.1, 0.5, "reference", 0.5, 1, "none", 1.0, -100)))), want_grad,
                want_stats, True)
            assert _meta(kt._distill_fake(*args)) == _meta(kt._distill_impl(*args))
    if dtype != torch.float32:  # fused linear with 16-bit gradients
        h, w = (torch.randn(n, 4, device="cuda").to(dtype) for n in (8, 6))
        tt = torch.randn(8, 6, device="cuda")
        for reduction in ("mean", "none"):
            args = _fused_args(h, w, tt, True, reduction)
            out = kt._fused_impl(*args)
            assert _meta(kt._fused_fake(*args)) == _meta(out)
            if reduction == "mean":
                assert out[1].dtype == dtype and out[2].dtype == dtype


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("sdt,tdt", [(torch.float32, torch.float32),
                                     (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.bfloat16),
                                     (torch.float16, torch.float32)])
@pytest.mark.parametrize("reduction,div", [("mean", "akl"), ("none", "jsd")])
def test_cuda_fused_teacher_linear_matches_cpu_reference(sdt, tdt, reduction, div):
    """The teacher as a linear layer on the GPU (its chunk H_t,c W_t^T + b_t
    a cuBLAS GEMM into float32, the teacher's dtype independent of the
    student's): loss and dH, dW, db against the float64 reference on the
    same rounded values, an upstream gradient per row for reduction none
    (the grad_output call, which forms the teacher chunk again); the teacher
    tensors require grad and get none; fake = impl on the device."""
    g = torch.Generator().manual_seed(51)
    h, w = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g) * 0.3
    b = torch.randn(500, generator=g) * 0.5
    ht, wt = torch.randn(64, 24, generator=g), torch.randn(500, 24, generator=g) * 0.4
    bt = torch.randn(500, generator=g) * 0.5
    x, tl = [v.to(sdt) for v in (h, w, b)], [v.to(tdt) for v in (ht, wt, bt)]
    labels = torch.arange(64) % 500
    labels[5] = -100
    kw = dict(divergence=div, reduction=reduction, temperature=1.5)
    xc = [v.cuda().requires_grad_() for v in x]
    tc = [v.cuda().requires_grad_() for v in tl]
    loss = kt.fused_linear_distill_loss(xc[0], xc[1], bias=xc[2], teacher_hidden=tc[0],
                                        teacher_weight=tc[1], teacher_bias=tc[2], chunk_rows=16,
                                        labels=labels.cuda(), **kw)
    up = torch.rand(loss.shape, generator=g) + 0.5
    (loss * up.cuda()).sum().backward()
    x0 = [v.double().requires_grad_() for v in x]
    ref = kt.fused_linear_distill_loss(x0[0], x0[1], bias=x0[2], teacher_hidden=tl[0].double(),
                                       teacher_weight=tl[1].double(),
                                       teacher_bias=tl[2].double(), labels=labels, **kw)
    (ref * up.double()).sum().backward()
    assert all(v.grad is None for v in tc)
    tol = dict(rtol=1e-4, atol=1e-5) if sdt == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=2e-3, atol=1e-4)
    for gc, g0 in zip(xc, x0):
        assert gc.grad.dtype == sdt
        torch.testing.assert_close(gc.grad.cpu().double(), g0.grad, **tol)
    args = _fused_args(xc[0].detach(), xc[1].detach(), None, True, reduction,
                       tl=tuple(v.detach() for v in tc))
    assert _meta(kt._fused_fake(*args)) == _meta(kt._fused_impl(*args))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("sdt,ldt", [(torch.float32, torch.float32),
                                     (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32)])
@pytest.mark.parametrize("mode,div,reduction", [("renormalised", "fkl", "mean"),
                                                ("renormalised", "jsd", "none"),
                                                ("tail", "akl", "mean"), ("tail", "rkl", "none")])
def test_cuda_fused_sparse_matches_cpu_reference(sdt, ldt, mode, div, reduction):
    """The sparse teacher on the GPU (per chunk the sparse row kernel on the
    chunk's logits): loss and dH, dW, db against the float64 reference on
    the same rounded values, an upstream gradient per row for reduction
    none, a row with a repeated index (invalid, counted in bad_index_rows);
    the log-probs require grad and get none; fake = impl on the device."""
    g = torch.Generator().manual_seed(52)
    h, w = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g) * 0.3
    b = torch.randn(500, generator=g) * 0.5
    idx, lp = _sparse_teacher(64, 500, 32, seed=53)
    idx[9, 3] = idx[9, 0]
    x, lp = [v.to(sdt) for v in (h, w, b)], lp.to(ldt)
    labels = torch.arange(64) % 500
    labels[5] = -100
    kw = dict(divergence=div, reduction=reduction, temperature=1.5, mode=mode,
              raise_on_invalid=False, return_stats=True)
    xc = [v.cuda().requires_grad_() for v in x]
    lc = lp.cuda().requires_grad_()
    loss, st = kt.fused_linear_distill_loss(xc[0], xc[1], bias=xc[2], teacher_indices=idx.cuda(),
                                            teacher_logprobs=lc, chunk_rows=16,
                                            labels=labels.cuda(), **kw)
    up = torch.rand(loss.shape, generator=g) + 0.5
    (loss.nan_to_num() * up.cuda()).sum().backward()
    x0 = [v.double().requires_grad_() for v in x]
    ref, rst = kt.fused_linear_distill_loss(x0[0], x0[1], bias=x0[2], teacher_indices=idx,
                                            teacher_logprobs=lp.double(), labels=labels, **kw)
    (ref.nan_to_num() * up.double()).sum().backward()
    assert lc.grad is None
    assert {k: int(v) for k, v in st.items()} == {k: int(v) for k, v in rst.items()}
    assert int(st["bad_index_rows"]) == 1
    tol = dict(rtol=1e-4, atol=1e-5) if sdt == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=2e-3, atol=1e-4,
                               equal_nan=True)
    for gc, g0 in zip(xc, x0):
        assert gc.grad.dtype == sdt
        torch.testing.assert_close(gc.grad.cpu().double(), g0.grad, **tol)
    args = _fused_args(xc[0].detach(), xc[1].detach(), None, True, reduction, False,
                       ts=(idx.cuda(), lc.detach()), mode=mode)
    assert _meta(kt._fused_fake(*args)) == _meta(kt._fused_impl(*args))


@pytest.mark.cuda
@cuda
def test_cuda_side_stream_matches_default_stream():
    torch.manual_seed(3)
    s = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randn(64, 1000, device="cuda")
    ref = kt.distill_loss(s, t, divergence="akl")
    (g_ref,) = torch.autograd.grad(ref, s)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss = kt.distill_loss(s, t, divergence="akl", raise_on_invalid=False)
        (g,) = torch.autograd.grad(loss, s)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(loss, ref) and torch.equal(g, g_ref)


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_and_replay():
    torch.manual_seed(4)
    s = torch.randn(32, 512, device="cuda")
    t = torch.randn(32, 512, device="cuda")
    eager = kt.distill_loss(s, t, divergence="jsd", raise_on_invalid=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (handle, allocator) outside the capture
        kt.distill_loss(s, t, divergence="jsd", raise_on_invalid=False)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = kt.distill_loss(s, t, divergence="jsd", raise_on_invalid=False)
    s.copy_(torch.randn_like(s))
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(captured, kt.distill_loss(s, t, divergence="jsd"), rtol=1e-5)
    assert not torch.equal(captured, eager)
    g2 = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="raise_on_invalid=True.*CUDA graph"):
        with torch.cuda.graph(g2):
            kt.distill_loss(s, t, divergence="jsd")


@pytest.mark.cuda
@cuda
def test_cuda_strided_and_mixed_dtypes_match_the_reference():
    torch.manual_seed(5)
    wide = torch.randn(16, 300, device="cuda")
    s = wide.to(torch.bfloat16)[:, 7:263]  # rows 300 apart, first element at an odd offset
    t = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    loss = kt.distill_loss(s, t, divergence="fkl")
    ref = kt.distill_loss(s.double().cpu(), t.double().cpu(), divergence="fkl")
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-3


@pytest.mark.cuda
@cuda
def test_cuda_tensors_on_different_devices_are_refused():
    s = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="on cuda:0"):
        kt.distill_loss(s, s.cpu())
    with pytest.raises(ValueError, match="labels are on"):
        kt.distill_loss(s, s, labels=torch.zeros(4, dtype=torch.int64))
    h, w = torch.randn(4, 3, device="cuda"), torch.randn(8, 3, device="cuda")
    rest = _bwd_rest(_fused_args(h, w, s, True, "none"))
    with pytest.raises(ValueError, match="grad_output on cpu"):
        kt._fused_bwd_impl(h, w, s, None, None, None, None, None, None, None, torch.ones(4),
                             *rest)
    ht, wt = torch.randn(4, 2, device="cuda"), torch.randn(8, 2, device="cuda")
    with pytest.raises(ValueError, match="teacher_hidden on cpu"):
        kt.fused_linear_distill_loss(h, w, teacher_hidden=ht.cpu(), teacher_weight=wt)
    with pytest.raises(ValueError, match="teacher_bias on cpu"):
        kt.fused_linear_distill_loss(h, w, teacher_hidden=ht, teacher_weight=wt,
                                     teacher_bias=torch.zeros(8))
    with pytest.raises(TypeError, match="float64 CUDA tensors"):
        kt.fused_linear_distill_loss(h, w, teacher_hidden=ht.double(), teacher_weight=wt.double())


def test_loss_options_picks_the_loss_options_in_order():
    values = {"x": 0, **{k: i for i, k in enumerate(reversed(_ops.LOSS_OPTIONS))}}
    picked = _ops.loss_options(values)
    assert tuple(picked) == _ops.LOSS_OPTIONS and all(picked[k] == values[k] for k in picked)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upstream_factor_is_not_rounded_before_the_product(per_row, dtype):
    """A 16-bit gradient (what the GPU writes) times a float32 upstream
    gradient is one rounding of the float32 product, not the product with
    the upstream factor rounded to 16 bits first."""
    from kdloss.torch import _scaled_grad
    g = torch.Generator().manual_seed(7)
    grad = (torch.randn(5, 64, generator=g) * 3).to(dtype)
    go = torch.tensor([1.0 + 2.0 ** -12, 0.3, -1.7, 1e-3, 5.5]) if per_row else torch.tensor(1.0 + 2.0 ** -12)
    got = _scaled_grad(grad, go, per_row, dtype, grad.shape)
    factor = go.reshape(-1, 1) if per_row else go
    want = (grad.double() * factor.double()).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want)
