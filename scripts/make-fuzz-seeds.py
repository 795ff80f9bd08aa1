#!/usr/bin/env python3
"""Writes the seed corpora of the libFuzzer targets (tests/fuzz/corpus/<target>/).

Pure Python (no numpy): the .npy seeds are built byte by byte, so invalid
variants (truncated, bad magic, big-endian, fortran order, overflowing
shapes) are as easy as valid ones.  Re-running rewrites the same files
(names are fixed; the content is deterministic); also the libFuzzer
dictionary tests/fuzz/fuzz_cli_args.dict.  The seeds of fuzz_ref_ot and
fuzz_ref_ext reach each call's computation (every divergence, mode and
value kind, ragged batches, debias, dense-form sparse rows, 1 to 4 shards),
each deliberate bad argument, and the extreme eps / tau of findings F7-F10.  Inputs found by fuzzing are
added to the same directories by scripts/fuzz.sh (-merge) and kept in git.

    python3 scripts/make-fuzz-seeds.py [CORPUS_ROOT]   (default tests/fuzz/corpus)
"""
import os
import struct
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fuzz", "corpus")


def npy(descr, shape, data=b"", version=(1, 0), fortran=False, header=None, pad=True):
    """A .npy file: magic, version, header length, dict, data."""
    if header is None:
        dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
        header = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (
            descr, "True" if fortran else "False", dims)
    h = header.encode("latin-1")
    lenfmt = "<H" if version[0] == 1 else "<I"
    pre = 6 + 2 + struct.calcsize(lenfmt)
    if pad:
        total = pre + len(h) + 1
        h += b" " * ((64 - total % 64) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(lenfmt, len(h)) + h + data


def f16(values):
    return b"".join(struct.pack("<e", v) for v in values)


def f32(values):
    return b"".join(struct.pack("<f", v) for v in values)


def f64(values):
    return b"".join(struct.pack("<d", v) for v in values)


def i64(values):
    return b"".join(struct.pack("<q", v) for v in values)


def npy_seeds():
    inf, nan = float("inf"), float("nan")
    s = {}
    s["valid_f32_2x3"] = npy("<f4", (2, 3), f32([1, 2, 3, 4, 5, 6]))
    s["valid_f16_5"] = npy("<f2", (5,), f16([1, -2, 0.5, inf, nan]))
    s["valid_f64_scalar"] = npy("<f8", (), f64([3.25]))
    s["valid_i64_labels"] = npy("<i8", (3,), i64([-100, 0, 7]))
    s["valid_empty_0x5"] = npy("<f4", (0, 5))
    s["valid_v2"] = npy("<f4", (1, 2), f32([1, 2]), version=(2, 0))
    s["valid_v3"] = npy("<f8", (2,), f64([-inf, 0]), version=(3, 0))
    s["valid_eq_descr"] = npy("=f4", (1,), f32([1]))
    s["valid_dq_unpadded"] = npy(None, None, f32([7]), pad=False,
                                 header='{"descr":"<f4","fortran_order":False,"shape":(1,)}\n')
    s["valid_py2_long"] = npy(None, None, f64([1, 2]),
                              header="{'descr': '<f8', 'fortran_order': False, 'shape': (2L,), }")
    s["valid_3d"] = npy("<f2", (1, 2, 2), f16([1, 2, 3, 4]))
    s["bad_magic"] = b"\x93NUMPX\x01\x00" + s["valid_f32_2x3"][8:]
    s["bad_version"] = b"\x93NUMPY\x04\x00" + s["valid_f32_2x3"][8:]
    s["bad_truncated_data"] = s["valid_f32_2x3"][:-3]
    s["bad_truncated_header"] = s["valid_f32_2x3"][:30]
    s["bad_trailing"] = s["valid_f32_2x3"] + b"\x00\x00\x00\x00"
    s["bad_big_endian"] = npy(">f4", (1,), b"\x3f\x80\x00\x00")
    s["bad_i4"] = npy("<i4", (1,), b"\x01\x00\x00\x00")
    s["bad_fortran"] = npy("<f4", (1, 1), f32([1]), fortran=True)
    s["bad_negative_dim"] = npy("<f4", (-1, 2))
    s["bad_overflow_shape"] = npy("<f8", (2**40, 2**40, 2**40))
    s["bad_zero_times_huge"] = npy("<f8", (2**62, 2**62, 0))
    s["bad_header_len"] = b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{'descr'"
    s["bad_header_syntax"] = npy(None, None, f32([1]), header="{'descr': '<f4', 'shape': (1,}")
    s["bad_missing_key"] = npy(None, None, f32([1]), header="{'descr': '<f4', 'shape': (1,), }")
    s["bad_dup_key"] = npy(None, None, f32([1]),
                           header="{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (1,), }")
    s["bad_nul_in_header"] = npy(None, None, f32([1]),
                                 header="{'descr': '<f4\0', 'fortran_order': False, 'shape': (1,), }")
    s["bad_many_dims"] = npy("<f4", tuple([1] * 40), f32([1]))
    s["bad_empty"] = b""
    return s


def cli_seeds():
    def argv(*words):
        return "\n".join(words).encode()
    s = {}
    s["fkl_mean"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy")
    s["akl_stats_grad"] = argv("--divergence", "akl", "--student", "s.npy", "--teacher", "t.npy",
                               "--stats", "--grad-out", "g.npy", "--head-rule", "topk", "--top-k", "3")
    s["jsd_none_labels"] = argv("--divergence=jsd", "--beta=0.25", "--reduction", "none", "--student", "s.npy",
                                "--teacher", "t.npy", "--labels", "l.npy", "--ignore-index", "-100")
    s["skl_f16"] = argv("--divergence", "skl", "--alpha", "0", "--student", "h.npy", "--teacher", "h.npy",
                        "--temperature", "2.5", "--scale", "4")
    s["srkl_f64_cpu"] = argv("--divergence", "srkl", "--student", "d.npy", "--teacher", "d.npy", "--backend", "cpu",
                             "--grad-out", "o.npy")
    s["nan_rows"] = argv("--divergence", "rkl", "--student", "n.npy", "--teacher", "s.npy", "--reduction", "sum")
    s["tvd_mass"] = argv("--divergence", "tvd", "--student", "s.npy", "--teacher", "t.npy", "--head-rule", "mass",
                         "--mu", "0.9", "--stats")
    s["help"] = argv("--help")
    s["bad_shape"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "x.npy")
    s["bad_empty_file"] = argv("--divergence", "fkl", "--student", "e.npy", "--teacher", "t.npy")
    s["bad_not_npy"] = argv("--divergence", "fkl", "--student", "b.npy", "--teacher", "t.npy")
    s["bad_directory"] = argv("--divergence", "fkl", "--student", "dir", "--teacher", "t.npy")
    s["bad_grad_out_dir"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy",
                                 "--grad-out", "dir")
    s["bad_grad_out_missing_dir"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy",
                                         "--grad-out", "nodir/g.npy")
    s["bad_missing"] = argv("--divergence", "fkl", "--student", "none.npy", "--teacher", "t.npy")
    s["bad_labels_dtype"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy",
                                 "--labels", "t.npy")
    s["bad_tau"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy", "--temperature", "nan")
    s["bad_tau_zero"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy", "--temperature", "0")
    s["bad_topk_big"] = argv("--divergence", "akl", "--student", "s.npy", "--teacher", "t.npy", "--top-k", "99",
                             "--head-rule", "topk")
    s["bad_int_overflow"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy",
                                 "--ignore-index", "99999999999999999999")
    s["bad_twice"] = argv("--divergence", "fkl", "--divergence", "rkl")
    s["bad_unknown"] = argv("--divergence", "kl", "--student", "s.npy", "--teacher", "t.npy")
    s["bad_positional"] = argv("s.npy")
    s["bad_no_value"] = argv("--divergence")
    s["bad_switch_value"] = argv("--stats=1", "--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy")
    s["bad_cuda"] = argv("--divergence", "fkl", "--student", "s.npy", "--teacher", "t.npy", "--backend", "cuda")
    s["bad_f64_cuda"] = argv("--divergence", "fkl", "--student", "d.npy", "--teacher", "d.npy", "--backend", "cuda")
    s["empty"] = b""
    s.update(subcommand_seeds())
    return s


def subcommand_seeds():
    """Argument vectors of the other subcommands: the first word names it.
    Fixture files: the header comment of tests/fuzz/fuzz_cli_args.c."""
    def argv(*words):
        return "\n".join(words).encode()
    s = {}
    # loss, named explicitly
    s["loss_named"] = argv("loss", "--divergence", "jsd", "--student", "d.npy", "--teacher", "d.npy", "--backend",
                           "cpu")
    # sinkhorn: costs, points, batches, weights, debiasing, annealing, plan
    s["sinkhorn_cost"] = argv("sinkhorn", "--cost", "c.npy", "--epsilon", "0.1")
    s["sinkhorn_cost_plan_dual"] = argv("sinkhorn", "--cost", "c.npy", "--epsilon", "0.5", "--value", "dual",
                                        "--plan-out", "p.npy", "--log-a", "la.npy", "--log-b", "lb.npy",
                                        "--tol", "0", "--max-iter", "7")
    s["sinkhorn_batched_debias"] = argv("sinkhorn", "--cost", "cb.npy", "--cost-xx", "cxx.npy", "--cost-yy",
                                        "cyy.npy", "--debias", "--epsilon", "0.2", "--backend", "cpu")
    s["sinkhorn_points_l1_scaling"] = argv("sinkhorn", "--x", "px.npy", "--y", "py.npy", "--metric", "l1",
                                           "--epsilon=0.01", "--eps-scaling", "--eps-factor", "0.5",
                                           "--check-every", "3")
    s["sinkhorn_points_batched_debias"] = argv("sinkhorn", "--x", "pbx.npy", "--y", "pby.npy", "--debias",
                                               "--epsilon", "1", "--plan-out", "pl.npy")
    s["sinkhorn_bad_shape_log_a"] = argv("sinkhorn", "--cost", "c.npy", "--epsilon", "1", "--log-a", "lb.npy")
    s["sinkhorn_bad_nan_cost"] = argv("sinkhorn", "--cost", "n.npy", "--epsilon", "1")
    s["sinkhorn_bad_plan_dir"] = argv("sinkhorn", "--cost", "c.npy", "--epsilon", "1", "--plan-out", "dir")
    s["sinkhorn_bad_both"] = argv("sinkhorn", "--cost", "c.npy", "--x", "px.npy", "--epsilon", "1")
    s["sinkhorn_bad_cuda"] = argv("sinkhorn", "--cost", "c.npy", "--epsilon", "1", "--backend", "cuda")
    s["sinkhorn_help"] = argv("sinkhorn", "--help")
    s["sinkhorn_empty_batch"] = argv("sinkhorn", "--cost", "zc.npy", "--epsilon", "1", "--plan-out", "p.npy")
    s["sinkhorn_scalar"] = argv("sinkhorn", "--cost", "sc.npy", "--epsilon", "1")
    # sinkd
    s["sinkd_one_group"] = argv("sinkd", "--student", "s.npy", "--teacher", "t.npy")
    s["sinkd_groups_grad"] = argv("sinkd", "--student", "d.npy", "--teacher", "s.npy", "--group-size", "1",
                                  "--metric", "sqeuclidean", "--temperature", "0.5", "--epsilon", "0.05",
                                  "--max-iter", "5", "--tol", "1e-9", "--scale", "-2", "--grad-out", "sg.npy")
    s["sinkd_nan_rows"] = argv("sinkd", "--student", "n.npy", "--teacher", "t.npy", "--group-size", "2")
    s["sinkd_bad_group"] = argv("sinkd", "--student", "s.npy", "--teacher", "t.npy", "--group-size", "3")
    s["sinkd_bad_shape"] = argv("sinkd", "--student", "s.npy", "--teacher", "x.npy")
    s["sinkd_no_rows"] = argv("sinkd", "--student", "z.npy", "--teacher", "z.npy", "--grad-out", "o.npy")
    # sparse-loss
    s["sparse_renorm"] = argv("sparse-loss", "--student", "s.npy", "--teacher-indices", "i.npy",
                              "--teacher-logprobs", "g.npy", "--mode", "renormalised")
    s["sparse_tail_akl_grad"] = argv("sparse-loss", "--student", "d.npy", "--teacher-indices", "i.npy",
                                     "--teacher-logprobs", "g.npy", "--mode", "tail", "--divergence", "akl",
                                     "--head-rule", "topk", "--top-k", "2", "--reduction", "none",
                                     "--labels", "l.npy", "--grad-out", "sp.npy")
    s["sparse_bad_indices"] = argv("sparse-loss", "--student", "s.npy", "--teacher-indices", "j.npy",
                                   "--teacher-logprobs", "g.npy", "--mode", "tail")
    s["sparse_bad_mode_div"] = argv("sparse-loss", "--student", "s.npy", "--teacher-indices", "i.npy",
                                    "--teacher-logprobs", "g.npy", "--mode", "renormalised", "--divergence", "rkl")
    # shard-check
    s["shard_even"] = argv("shard-check", "--student", "s.npy", "--teacher", "t.npy", "--shards", "2")
    s["shard_split_akl_grad"] = argv("shard-check", "--student", "s.npy", "--teacher", "d.npy", "--shards", "3",
                                     "--split", "1,3,1", "--divergence", "akl", "--head-rule", "mass",
                                     "--reduction", "sum", "--grad-out", "sh.npy")
    s["shard_vector_labels"] = argv("shard-check", "--student", "h.npy", "--teacher", "h.npy", "--shards", "5",
                                    "--divergence", "skl", "--reduction", "none")
    s["shard_no_rows"] = argv("shard-check", "--student", "z.npy", "--teacher", "z.npy", "--shards", "1",
                              "--grad-out", "o.npy")
    s["shard_bad_split"] = argv("shard-check", "--student", "s.npy", "--teacher", "t.npy", "--shards", "2",
                                "--split", "2,2")
    s["shard_bad_split_huge"] = argv("shard-check", "--student", "s.npy", "--teacher", "t.npy", "--shards", "2",
                                     "--split", "9223372036854775807,9223372036854775807")
    # fused-linear
    s["fused_basic"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy", "--teacher", "t.npy")
    s["fused_grads"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy", "--teacher", "d.npy",
                            "--divergence", "tvd", "--chunk-rows", "1", "--reduction", "none",
                            "--grad-hidden-out", "gh.npy", "--grad-weight-out", "gw.npy")
    s["fused_bad_second_output"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy", "--teacher",
                                        "t.npy", "--grad-hidden-out", "gh.npy", "--grad-weight-out", "dir")
    s["sparse_no_rows"] = argv("sparse-loss", "--student", "z.npy", "--teacher-indices", "i.npy",
                               "--teacher-logprobs", "g.npy", "--mode", "tail")
    s["fused_bad_shapes"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "s.npy", "--teacher", "t.npy")
    # fused-linear, the teacher as a linear layer (H_t, W_t, b_t) and as top-k
    s["fused_teacher_layer"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy",
                                    "--teacher-hidden", "hs.npy", "--teacher-weight", "wt.npy",
                                    "--teacher-bias", "bv.npy", "--bias", "bv.npy", "--divergence", "jsd",
                                    "--grad-hidden-out", "gh.npy", "--grad-weight-out", "gw.npy",
                                    "--grad-bias-out", "gb.npy")
    s["fused_teacher_layer_bad_bias"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy",
                                             "--teacher-hidden", "hs.npy", "--teacher-weight", "wt.npy",
                                             "--teacher-bias", "h.npy")
    s["fused_sparse_teacher"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy",
                                     "--teacher-indices", "i.npy", "--teacher-logprobs", "g.npy", "--mode",
                                     "tail", "--divergence", "akl",
                                     "--reduction", "none", "--chunk-rows", "1", "--grad-hidden-out", "gh.npy")
    s["fused_sparse_bad_indices"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy",
                                         "--teacher-indices", "j.npy", "--teacher-logprobs", "g.npy", "--mode",
                                         "renormalised")
    s["fused_two_teachers"] = argv("fused-linear", "--hidden", "hs.npy", "--weight", "wt.npy", "--teacher",
                                   "t.npy", "--teacher-hidden", "hs.npy", "--teacher-weight", "wt.npy")
    # bench and demo (options only: no device here)
    s["bench_options"] = argv("bench", "--quick", "--shapes", "8:32,16:64", "--dtypes", "bf16,f32",
                              "--divergences", "fkl,akl", "--head-rules", "mass,topk", "--repeats", "2",
                              "--warmup=0", "--mu", "0.25", "--top-k", "4", "--sinkhorn", "2:8:8",
                              "--sinkhorn-iters", "3", "--no-check", "--commit", "abc-1.2", "--json-out", "r.json")
    s["bench_bad_shape"] = argv("bench", "--shapes", "8:0")
    s["bench_help"] = argv("bench", "--help")
    s["demo_cpu"] = argv("demo", "--backend", "cpu")
    s["demo_bad"] = argv("demo", "--backend", "gpu")
    s["demo_help"] = argv("demo", "-h")
    return s


def cli_dict():
    """libFuzzer dictionary of fuzz_cli_args: subcommands, flags, fixture
    names and values, each as a whole word."""
    words = ["loss", "sinkhorn", "sinkd", "sparse-loss", "shard-check", "fused-linear", "bench", "demo",
             "--help", "--divergence", "--student", "--teacher", "--labels", "--ignore-index", "--temperature",
             "--alpha", "--beta", "--head-rule", "--mu", "--top-k", "--reduction", "--scale", "--backend",
             "--stats", "--grad-out", "--cost", "--x", "--y", "--metric", "--log-a", "--log-b", "--cost-xx",
             "--cost-yy", "--epsilon", "--max-iter", "--tol", "--check-every", "--eps-scaling", "--eps-factor",
             "--value", "--debias", "--plan-out", "--group-size", "--teacher-indices", "--teacher-logprobs",
             "--mode", "--shards", "--split", "--hidden", "--weight", "--chunk-rows", "--grad-hidden-out",
             "--grad-weight-out", "--grad-bias-out", "--bias", "--grad-output", "--teacher-hidden",
             "--teacher-weight", "--teacher-bias", "bv.npy", "gh.npy", "gw.npy", "gb.npy", "--quick", "--no-check", "--shapes", "--dtypes", "--divergences",
             "--head-rules", "--repeats", "--warmup", "--sinkhorn", "--sinkhorn-iters", "--json-out", "--commit",
             "s.npy", "t.npy", "h.npy", "d.npy", "n.npy", "l.npy", "x.npy", "c.npy", "cb.npy", "cxx.npy",
             "cyy.npy", "px.npy", "py.npy", "pbx.npy", "pby.npy", "la.npy", "lb.npy", "i.npy", "j.npy", "g.npy",
             "hs.npy", "wt.npy", "z.npy", "zc.npy", "sc.npy", "e.npy", "b.npy", "dir", "o.npy",
             "fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl", "reference", "mass", "topk", "none",
             "sum", "mean", "auto", "cpu", "cuda", "l1", "sqeuclidean", "transport", "dual", "renormalised",
             "tail", "bf16", "f16", "f32", "0", "1", "2", "3", "5", "-1", "0.5", "1e-300", "1e308", "-0",
             "9223372036854775807", "-9223372036854775808", "nan", "inf"]
    lines = ['"\\x0a%s"' % w for w in words]
    return "# libFuzzer dictionary of fuzz_cli_args (scripts/make-fuzz-seeds.py writes it)\n" + \
        "\n".join(lines) + "\n"


# fuzz_ref_loss: header bytes as documented in tests/fuzz/fuzz_ref_loss.c.
def ref_case(div, red, rule, sd, td, gd, od, n, v, ld_extra, flags, params, top_k, ign, labels, body):
    hdr = bytes([div, red | (rule << 2), sd, td, gd, od, n, v - 1, ld_extra, flags])
    return hdr + bytes(params) + bytes([top_k, ign]) + bytes(labels) + body


def ref_seeds():
    # pick_param table indices: 0 -> 1.0, 1 -> 0.5, 3 -> 0.1, 15 -> NaN, 16 -> inf, 5 -> 0
    ordinary = [0, 0, 3, 1, 1]  # tau 1, scale 1, alpha 0.1, beta 0.5, mu 0.5
    coded = bytes((137 + 8 * k) % 256 for k in range(64))  # logits -0..+7 (table-coded)
    specials = bytes([0, 3, 3, 140, 1, 2, 150, 160] * 8)  # -inf, 0, NaN, +inf, ...
    s = {}
    for div in range(8):
        s["div%d_mean" % div] = ref_case(div, 2, 0, 0, 0, 0, 0, 2, 8, 0, 1 | 8 | 16 | 128, ordinary, 1, 0, [],
                                         coded)
    s["akl_topk_none_stats"] = ref_case(3, 0, 2, 0, 1, 0, 3, 3, 16, 0x15, 1 | 2 | 4 | 8 | 16 | 128, ordinary, 4, 0,
                                        [0, 5, 9], coded * 2)
    s["jsd_bf16_f64"] = ref_case(4, 1, 1, 2, 3, 2, 3, 4, 7, 0x3f, 1 | 4 | 8 | 128, [2, 7, 1, 4, 23], 2, 0, [],
                                 coded * 2)
    s["srkl_alpha0"] = ref_case(7, 0, 0, 0, 0, 0, 0, 2, 6, 0, 1 | 128, [0, 0, 5, 1, 1], 1, 0, [],
                                bytes([150, 140, 137, 137, 137, 137, 0, 10, 5, 137, 137, 137]) * 2)
    s["specials"] = ref_case(1, 0, 0, 0, 0, 0, 0, 4, 8, 0, 1 | 8 | 16 | 128, ordinary, 1, 0, [], specials)
    s["raw_f16"] = ref_case(0, 2, 0, 1, 1, 1, 0, 2, 4, 0, 1 | 8, ordinary, 1, 0, [],
                            f16([1, 2, 3, float("-inf"), 0, 0, 0, 0]) + f16([0.5, 1, 1, 1, 2, 2, 2, 2]))
    s["bad_tau_nan"] = ref_case(0, 2, 0, 0, 0, 0, 0, 1, 4, 0, 1 | 128, [15, 0, 3, 1, 1], 1, 0, [], coded)
    s["bad_null_loss"] = ref_case(0, 2, 0, 0, 0, 0, 0, 1, 4, 0, 1 | 32 | 128, ordinary, 1, 0, [], coded)
    s["bad_dtype"] = ref_case(0, 2, 0, 4, 0, 0, 0, 1, 4, 0, 1 | 128, ordinary, 1, 0, [], coded)
    s["empty_batch_none"] = ref_case(0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1 | 32 | 64, ordinary, 1, 0, [], b"")
    return s


# fuzz_ref_ot and fuzz_ref_ext: layouts in the header comments of
# tests/fuzz/fuzz_ref_ot.c and tests/fuzz/fuzz_ref_ext.c.  Parameter bytes
# index fz_param's table (tests/fuzz/fuzz_util.h); data bytes are fz_coded.
P = {"1": 0, "0.5": 1, "2": 2, "0.1": 3, "0.9": 4, "0": 5, "-1": 7, "1e-300": 8, "1e300": 9, "4.9e-324": 10,
     "DBL_MAX": 11, "nan": 15, "inf": 16, "1e-7": 18, "100": 19, "1e-30": 21, "1e30": 22, "0.25": 23,
     "1e-3": 24, "1e-12": 25, "1e-6": 26, "1e-200": 27}
NAN_B, PINF_B, NINF_B = 2, 1, 0  # fz_coded table: NaN, +inf, -inf


def coded(x):
    """The fz_coded byte of an ordinary value on the 1/16 grid (-7.5 .. 7.4)."""
    b = int(round(x * 16)) + 137
    assert 24 <= b <= 255, x
    return b


def ramp(count, lo=-2.0, step=0.4375):
    return bytes(coded(lo + ((k * 7) % 11) * step) for k in range(count))


def sinkhorn_case(f1, f2, f3, f4, batch, n, m, dim, eps, tol, factor, max_iter, check, stage, mutation, ragged=(),
                  data=b"", dtype_byte=None):
    hdr = bytes([0, f1, f2, f3, f4]) + (bytes([dtype_byte]) if dtype_byte is not None else b"")
    hdr += bytes([batch, n, m, dim]) + bytes(ragged)
    return hdr + bytes([eps, tol, factor, max_iter - 1, check - 1, stage - 1, mutation]) + data


def ot_seeds():
    s = {}
    F64, F32 = 0 << 5, 1 << 5
    out_all = 1 | 2 | 4 | 8 | 16 | 64
    # n, m bytes: 1 + byte % 5
    s["sinkhorn_cost_f64"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 2, 0, P["0.1"], P["1e-6"], P["0.9"], 20, 1, 1, 255,
                                           data=ramp(6, 0.0, 0.25))
    s["sinkhorn_points_dual_debias_f32"] = sinkhorn_case(2 | 64, out_all | 32 | 128, F32 | (1 << 1), 0, 2, 2, 1, 1,
                                                         P["0.5"], P["1e-3"], P["0.9"], 24, 2, 1, 255,
                                                         data=ramp(8 * 2 + 6 * 2))
    s["sinkhorn_points_l1"] = sinkhorn_case(2, out_all | 32, F64 | (1 << 3), 0, 1, 3, 3, 2, P["0.25"], P["1e-6"],
                                            P["0.9"], 24, 3, 1, 255, data=ramp(4 * 3 + 4 * 3))
    s["sinkhorn_ragged_logw_warm_scaling"] = sinkhorn_case(1 | 4 | 8 | 32, out_all, F64 | 1, 1 | 2, 3, 0, 0, 0,
                                                           P["1e-3"], P["1e-6"], P["0.5"], 24, 2, 2, 255,
                                                           ragged=[1, 2, 3, 0, 0, 4], data=ramp(60))
    s["sinkhorn_debias_cost_cached"] = sinkhorn_case(64 | 128, out_all | 128, F64, 0, 2, 1, 1, 0, P["0.1"], P["0"],
                                                     P["0.9"], 8, 1, 1, 255, data=ramp(40, 0.0, 0.125))
    s["sinkhorn_f_init"] = sinkhorn_case(16, out_all, F64 | (1 << 1), 0, 1, 2, 2, 0, P["2"], P["1e-12"], P["0.9"], 24,
                                         1, 1, 255, data=ramp(9 + 3))
    s["sinkhorn_empty_batch"] = sinkhorn_case(0, out_all, F64, 0, 0, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1, 1,
                                              255)
    for mut in range(10):
        s["sinkhorn_bad_mutation%d" % mut] = sinkhorn_case(2 * (mut in (4, 6)) | 64 * (mut in (4, 7, 9)), out_all,
                                                           F64, 0, 1, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1, 1,
                                                           mut, data=ramp(30))
    s["sinkhorn_bad_eps0"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 1, 0, P["0"], P["1e-6"], P["0.9"], 5, 1, 1, 255,
                                           data=ramp(6))
    s["sinkhorn_bad_eps_nan"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 1, 0, P["nan"], P["1e-6"], P["0.9"], 5, 1, 1,
                                              255, data=ramp(6))
    s["sinkhorn_bad_tol_nan"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 1, 0, P["0.1"], P["nan"], P["0.9"], 5, 1, 1,
                                              255, data=ramp(6))
    s["sinkhorn_bad_factor1"] = sinkhorn_case(0, out_all, F64 | 1, 0, 1, 1, 1, 0, P["0.1"], P["1e-6"], P["1"], 5, 1,
                                              1, 255, data=ramp(6))
    s["sinkhorn_bad_max_iter0"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 251,
                                                1, 1, 255, data=ramp(6))
    s["sinkhorn_bad_f16"] = sinkhorn_case(0, out_all, 2 << 5, 0, 1, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1, 1,
                                          255, data=ramp(6))
    s["sinkhorn_bad_dtype5"] = sinkhorn_case(0, out_all, 3 << 5, 0, 1, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1,
                                             1, 255, data=ramp(6), dtype_byte=5)
    s["sinkhorn_bad_batch_neg"] = sinkhorn_case(0, out_all, F64, 0, 250, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1,
                                                1, 255)
    s["sinkhorn_bad_n0"] = sinkhorn_case(0, out_all, F64, 0, 1, 255, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1, 1, 255)
    s["sinkhorn_nonfinite_cost"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 1, 0, P["0.1"], P["1e-6"], P["0.9"], 5, 1,
                                                 1, 255, data=bytes([137, NAN_B, 140, 141, PINF_B, 137]))
    s["sinkhorn_tiny_eps"] = sinkhorn_case(0, out_all, F64, 0, 1, 1, 1, 0, P["1e-300"], P["0"], P["0.9"], 24, 1, 1,
                                           255, data=ramp(4, 0.0, 0.5))
    s["sinkhorn_huge_eps"] = sinkhorn_case(0, out_all, F64, 0, 1, 2, 1, 0, P["1e300"], P["0"], P["0.9"], 3, 1, 1, 255,
                                           data=ramp(6))

    def sinkd_case(fl, sdt, tdt, gdt, odt, n, v, group, ld, metric, tau, eps, tol, scale, max_iter, check, data):
        return bytes([1, fl, sdt, tdt, gdt, odt, n, v - 1, group + 1, ld, metric, tau, eps, tol, scale,
                      max_iter - 1, check - 1]) + data
    all_out = 1 | 2 | 4 | 8 | 16 | 32
    s["sinkd_default_f64"] = sinkd_case(all_out, 3, 3, 3, 3, 4, 6, 2, 0, 1, P["2"], P["0.1"], P["0"], P["1"], 20, 6,
                                        ramp(48))
    s["sinkd_one_group_sq_f32"] = sinkd_case(all_out, 0, 0, 0, 0, 3, 5, 0, 0x15, 0, P["1"], P["0.5"], P["1e-6"],
                                             P["2"], 24, 1, ramp(40))
    s["sinkd_16bit"] = sinkd_case(all_out, 1, 2, 0, 3, 2, 4, 1, 0, 1, P["0.5"], P["0.1"], P["0"], P["0.25"], 10, 6,
                                  ramp(16))
    s["sinkd_invalid_rows"] = sinkd_case(all_out, 3, 3, 3, 3, 4, 3, 2, 0, 1, P["2"], P["0.1"], P["0"], P["1"], 5, 6,
                                         bytes([137, NAN_B, 140, 141, 142, 143, PINF_B, 137, 138,
                                                NINF_B, NINF_B, NINF_B]) + ramp(12))
    s["sinkd_tiny_tau"] = sinkd_case(all_out, 3, 3, 3, 3, 3, 4, 0, 0, 1, P["4.9e-324"], P["0.1"], P["0"], P["1"], 20, 6,
                                     ramp(24, -3.0, 0.75))
    s["sinkd_tiny_eps"] = sinkd_case(all_out, 3, 3, 3, 3, 3, 4, 0, 0, 1, P["1"], P["4.9e-324"], P["0"], P["1"], 3, 6,
                                     ramp(24))
    s["sinkd_empty"] = sinkd_case(all_out, 3, 3, 3, 3, 0, 4, 0, 0, 1, P["2"], P["0.1"], P["0"], P["1"], 3, 6, b"")
    s["sinkd_bad_group"] = sinkd_case(all_out, 3, 3, 3, 3, 5, 4, 2, 0, 1, P["2"], P["0.1"], P["0"], P["1"], 3, 6,
                                      ramp(40))
    s["sinkd_bad_tau0"] = sinkd_case(all_out, 3, 3, 3, 3, 2, 4, 0, 0, 1, P["0"], P["0.1"], P["0"], P["1"], 3, 6,
                                     ramp(16))
    s["sinkd_bad_scale_inf"] = sinkd_case(all_out, 3, 3, 3, 3, 2, 4, 0, 0, 1, P["2"], P["0.1"], P["0"], P["inf"], 3,
                                          6, ramp(16))
    s["sinkd_bad_out_f16"] = sinkd_case(all_out, 3, 3, 3, 1, 2, 4, 0, 0, 1, P["2"], P["0.1"], P["0"], P["1"], 3, 6,
                                        ramp(16))
    s["sinkd_bad_null_loss"] = sinkd_case(all_out | 64, 3, 3, 3, 3, 2, 4, 0, 0, 1, P["2"], P["0.1"], P["0"], P["1"], 3,
                                          6, ramp(16))
    return s


def ext_desc(div, red=2, rule=0, tau="1", scale="1", alpha="0.1", beta="0.5", mu="0.5", top_k=2, ign=0):
    return bytes([div, red | (rule << 2), P[tau], P[scale], {"0.1": 3, "0": 5, "0.5": 1, "0.25": 23}[alpha], P[beta],
                  P[mu], top_k + 1, ign])


def ext_seeds():
    s = {}
    # sparse: mode, N, V-1, k byte, sdt, tdt, gdt, odt, ld, flags, [labels], indices, log-probs, student
    outs = 1 | 4 | 8 | 16

    def sparse(desc, mode, n, v, k, sdt, tdt, gdt, odt, fl, body):
        return bytes([0]) + desc + bytes([mode, n, v - 1, k, sdt, tdt, gdt, odt, 0, fl]) + body
    idx = bytes([0, 3, 5, 6, 1, 2, 4, 7, 7, 6, 0, 2])
    logp = bytes(coded(-x) for x in (0.5, 1.25, 2.0, 3.0, 0.25, 1.5, 2.5, 4.0, 1.0, 1.0, 2.0, 3.0))
    for div in (0, 4, 5, 6, 7):
        s["sparse_renorm_div%d" % div] = sparse(ext_desc(div), 0, 3, 8, 4, 3, 3, 3, 3, outs, idx + logp + ramp(24))
    for div in range(8):
        s["sparse_tail_div%d" % div] = sparse(ext_desc(div, red=0, rule=2), 1, 3, 8, 4, 0, 0, 0, 3, outs | 2,
                                              bytes([1, 4, 9]) + idx + logp + ramp(24))
    for mode in (0, 1):
        for div in (0, 3, 4):
            s["sparse_dense_form_mode%d_div%d" % (mode, div)] = sparse(ext_desc(div, red=0, rule=2, top_k=1), mode,
                                                                       3, 6, 0, 3, 3, 3, 3, outs | 128,
                                                                       bytes([0, 2, 5]) + ramp(18) + ramp(18, -1.0))
    s["sparse_bad_indices"] = sparse(ext_desc(0), 1, 2, 5, 3, 3, 3, 3, 3, outs,
                                     bytes([0, 0, 3, 201, 200, 4]) + logp[:6] + ramp(10))
    s["sparse_bad_logprobs"] = sparse(ext_desc(0), 1, 2, 5, 3, 3, 3, 3, 3, outs,
                                      bytes([0, 1, 2, 0, 1, 2, NAN_B, coded(-1), coded(-1), coded(1), coded(-1),
                                             NINF_B]) + ramp(10))
    s["sparse_bad_k0"] = sparse(ext_desc(0), 0, 1, 4, 0, 3, 3, 3, 3, outs, ramp(8))
    s["sparse_bad_rkl_renorm"] = sparse(ext_desc(1), 0, 1, 4, 2, 3, 3, 3, 3, outs, bytes([0, 1]) + ramp(6))
    s["sparse_bad_mode"] = sparse(ext_desc(0), 2, 1, 4, 2, 3, 3, 3, 3, outs, bytes([0, 1]) + ramp(6))
    s["sparse_bad_tau_nan"] = sparse(ext_desc(0, tau="nan"), 0, 1, 4, 2, 3, 3, 3, 3, outs, bytes([0, 1]) + ramp(6))

    # shard: K-1, V-K, widths, N, sdt, tdt, gb, ld, flags, mutation, shard, [labels], S, T
    def shard(desc, k, v, widths, n, sdt, tdt, gb, fl, mut, msh, body):
        return bytes([1]) + desc + bytes([k - 1, v - k]) + bytes(widths) + bytes([n, sdt, tdt, gb, 0x15, fl, mut, msh]) \
            + body
    sh_out = 1 | 4 | 8 | 16 | 32
    for div in range(8):
        s["shard_div%d_3shards" % div] = shard(ext_desc(div, red=div % 3, rule=div % 3, top_k=3), 3, 9,
                                               [0, 1, 1, 2, 2, 2], 3, 3, 3, 0, sh_out, 255, 0, ramp(27) + ramp(27, -1.5))
    s["shard_akl_ties_f32"] = shard(ext_desc(3, red=0, rule=2, top_k=4), 4, 10, [0, 1, 2, 3, 3, 2], 2, 0, 0, 1,
                                    sh_out | 2, 255, 0, bytes([1, 4]) + bytes([137, 153, 153, 153, 140] * 4) * 2)
    s["shard_bf16_f16"] = shard(ext_desc(0, red=1), 2, 6, [0, 1, 0, 1], 2, 2, 1, 2, sh_out, 255, 0, ramp(12) * 2)
    s["shard_tiny_tau_f64"] = shard(ext_desc(0, red=0, tau="1e-30"), 2, 6, [0, 1, 1, 0], 2, 3, 3, 0, sh_out, 255, 0,
                                    bytes([15, 5, 137, 16, 6, 21, 5, 15, 137, 22, 20, 6]) * 2)
    for mut in range(13):
        s["shard_bad_mutation%d" % mut] = shard(ext_desc(0), 3, 8, [0, 1, 1, 2, 2], 1, 3, 3, 0, sh_out, mut, mut % 3,
                                                ramp(16))
    s["shard_bad_tau0"] = shard(ext_desc(0, tau="0"), 2, 4, [0, 1], 1, 3, 3, 0, sh_out, 255, 0, ramp(8))
    s["shard_bad_divergence"] = shard(ext_desc(8), 2, 4, [0, 1], 1, 3, 3, 0, sh_out, 255, 0, ramp(8))

    # fused: N, d-1, V-1, hdt, wdt, tdt, gdt, ld, flags, [chunk], [labels], H, W, T
    def fused(desc, n, d, v, hdt, wdt, tdt, gdt, ld, fl, body):
        return bytes([2]) + desc + bytes([n, d - 1, v - 1, hdt, wdt, tdt, gdt, ld, fl]) + body
    for div in range(8):
        s["fused_div%d" % div] = fused(ext_desc(div, red=div % 3, rule=2, top_k=2), 3, 3, 6, 3, 3, 3, 3, 0x3f,
                                       1 | 2 | 8 | 16 | 64, bytes([2]) + ramp(9) + ramp(18, -1.0) + ramp(18))
    s["fused_f32_labels"] = fused(ext_desc(4, red=0), 2, 2, 4, 0, 0, 0, 0, 0, 1 | 2 | 4 | 8,
                                  bytes([0, 5]) + ramp(4) + ramp(8) + ramp(8))
    s["fused_nonfinite_hidden"] = fused(ext_desc(0), 2, 2, 3, 3, 3, 3, 3, 0, 1 | 2 | 8 | 16,
                                        bytes([NAN_B, 137, 140, 150]) + ramp(6) + ramp(6))
    s["fused_bad_dtype"] = fused(ext_desc(0), 1, 2, 3, 4, 3, 3, 3, 0, 3, ramp(12))
    s["fused_bad_chunk"] = fused(ext_desc(0), 1, 2, 3, 3, 3, 3, 3, 0, 3 | 64, bytes([0]) + ramp(12))
    # the teacher as a linear layer (flag 128): d_t - 1, its dtype, strides/bias byte, H_t, W_t, b_t
    for div in range(8):
        layer = bytes([1, 3, 7 if div % 2 else 3]) + ramp(8, -1.5) + ramp(17) + ramp(6, 0.5)
        s["fused_layer_div%d" % div] = fused(ext_desc(div, red=div % 3, rule=div % 3, top_k=2), 3, 3, 6, 3, 3, 3, 3,
                                             0x3f, 1 | 2 | 8 | 16 | 64 | 128, bytes([2]) + ramp(11) + ramp(23, -1.0) + layer)
    s["fused_layer_bf16"] = fused(ext_desc(0, red=2), 2, 2, 4, 3, 3, 3, 3, 0, 1 | 2 | 128,
                                  ramp(4) + ramp(8) + bytes([2, 2, 4]) + ramp(6) + ramp(12) + ramp(4))
    # the sparse teacher (flag 128, then the flags byte with 8): d_t (unused), the log-probs' dtype,
    # flags (8 sparse, 16 bad_index_rows, 1/2 ld extras), k, mode, indices [N, k], log-probs [N, k]
    for div in range(8):
        mode = 1 if div in (0, 2) and div % 2 == 0 else 0  # tail bucket for FKL and FKL+RKL
        sp = bytes([0, 3, 8 | 16 | (div % 4)]) + bytes([3, mode]) + bytes([0, 2, 5, 1, 4, 200 + 1, 3, 3, 0])
        sp += ramp(12, -2.5, 0.25)
        s["fused_sparse_div%d" % div] = fused(ext_desc(div, red=div % 3, rule=div % 3, top_k=2), 3, 3, 6, 3, 3, 3, 3,
                                              0x3f, 1 | 2 | 8 | 16 | 64 | 128, bytes([2]) + ramp(11) + ramp(23, -1.0) + sp)
    s["fused_layer_bad_dtype"] = fused(ext_desc(0), 1, 2, 3, 3, 3, 3, 3, 0, 3 | 128, ramp(2) + ramp(6) + bytes([0, 4, 0]))
    return s


def write_all():
    for target, seeds in (("fuzz_npy", npy_seeds()), ("fuzz_cli_args", cli_seeds()), ("fuzz_ref_loss", ref_seeds()),
                          ("fuzz_ref_ot", ot_seeds()), ("fuzz_ref_ext", ext_seeds())):
        d = os.path.join(ROOT, target)
        os.makedirs(d, exist_ok=True)
        for name, data in sorted(seeds.items()):
            with open(os.path.join(d, "seed_" + name), "wb") as f:
                f.write(data)
        print("%s: %d seeds in %s" % (target, len(seeds), os.path.relpath(d)))
    dict_path = os.path.join(ROOT, "..", "fuzz_cli_args.dict")
    with open(dict_path, "w") as f:
        f.write(cli_dict())
    print("fuzz_cli_args dictionary: %s" % os.path.relpath(dict_path))


if __name__ == "__main__":
    write_all()
