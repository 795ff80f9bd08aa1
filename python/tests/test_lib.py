"""The ctypes layer: library lookup, struct layout, versions, name tables,
status to exception mapping."""

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import sys

import pytest

import kdloss
from kdloss import _lib

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.normpath(os.path.join(HERE, "..", "..", "include"))
TYPES_H = os.path.join(INCLUDE, "kdloss", "kdloss_types.h")


def test_struct_sizes_match_library():
    L = _lib.lib()
    for ctype, init in ((_lib.LossDesc, L.kdl_loss_desc_init), (_lib.LossArgs, L.kdl_loss_args_init)):
        buf = (ctypes.c_char * 4096)()
        init(ctypes.cast(buf, ctypes.c_void_p))
        assert ctypes.c_size_t.from_buffer(buf).value == ctypes.sizeof(ctype)


def test_ext_struct_sizes_and_defaults():
    if not _lib.ext_available():
        pytest.skip("the loaded libkdloss has no kdloss_ext.h API")
    L = _lib.lib()
    for ctype, init in ((_lib.SparseArgs, L.kdl_sparse_args_init),
                        (_lib.ShardArgs, L.kdl_shard_args_init),
                        (_lib.FusedLinearArgs, L.kdl_fused_linear_args_init)):
        buf = (ctypes.c_char * 4096)()
        init(ctypes.cast(buf, ctypes.c_void_p))
        assert ctypes.c_size_t.from_buffer(buf).value == ctypes.sizeof(ctype)
    assert _lib.new_shard_args().num_shards == 1
    assert _lib.sparse_mode_names() == ["renormalised", "tail"]
    assert [_lib.parse_sparse_mode(m) for m in ("renormalised", "Renormalized", "tail",
                                                "tail_bucket")] == [0, 0, 1, 1]


def test_desc_defaults_read_through_mirror():
    d = _lib.new_desc(divergence="fkl")
    assert (d.temperature, d.alpha, d.beta, d.mu, d.top_k, d.scale, d.ignore_index) == (
        1.0, 0.1, 0.5, 0.5, 1, 1.0, -100)
    assert d.struct_size == ctypes.sizeof(_lib.LossDesc)


@pytest.mark.skipif(not os.path.exists(TYPES_H) or not shutil.which("cc"),
                    reason="needs the source tree's headers and a C compiler")
def test_field_offsets_match_c(tmp_path):
    """Every field's offset and the struct sizes, as the C compiler sees
    them, against the ctypes mirrors."""
    lines = []
    structs = [(_lib.LossDesc, "kdl_loss_desc_t"), (_lib.LossArgs, "kdl_loss_args_t")]
    if _lib.ot_available():
        structs += [(_lib.SinkhornDesc, "kdl_sinkhorn_desc_t"),
                    (_lib.SinkhornArgs, "kdl_sinkhorn_args_t"),
                    (_lib.SinkdDesc, "kdl_sinkd_desc_t"), (_lib.SinkdArgs, "kdl_sinkd_args_t")]
    if _lib.ext_available():
        structs += [(_lib.SparseArgs, "kdl_sparse_args_t"), (_lib.ShardArgs, "kdl_shard_args_t"),
                    (_lib.FusedLinearArgs, "kdl_fused_linear_args_t")]
    by_name = {cname: ctype for ctype, cname in structs}
    for ctype, cname in structs:
        lines.append(f'printf("{cname} sizeof %zu\\n", sizeof({cname}));')
        for f, _ in ctype._fields_:
            lines.append(f'printf("{cname} {f} %zu %zu\\n", offsetof({cname}, {f}), '
                         f'sizeof((({cname} *)0)->{f}));')
    src = tmp_path / "layout.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <kdloss/kdloss_types.h>\n"
                   "#include <kdloss/kdloss_ot.h>\n#include <kdloss/kdloss_ext.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-std=c11", "-I", INCLUDE, str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    seen = 0
    for ln in filter(None, out):
        parts = ln.split()
        ctype = by_name[parts[0]]
        if parts[1] == "sizeof":
            assert int(parts[2]) == ctypes.sizeof(ctype), ln
        else:
            field = getattr(ctype, parts[1])
            assert (field.offset, field.size) == (int(parts[2]), int(parts[3])), ln
            seen += 1
    assert seen == sum(len(ctype._fields_) for ctype, _ in structs)


@pytest.mark.skipif(not os.path.exists(TYPES_H), reason="needs the source tree's headers")
def test_version_matches_header_and_package():
    text = open(TYPES_H).read()
    want = tuple(int(re.search(rf"#define KDL_VERSION_{k} (\d+)", text).group(1))
                 for k in ("MAJOR", "MINOR", "PATCH"))
    assert kdloss.version() == want
    assert kdloss.__version__ == "%d.%d.%d" % want


@pytest.mark.skipif(not os.path.exists(TYPES_H), reason="needs the source tree's headers")
def test_status_values_match_header():
    text = open(TYPES_H).read()
    for name, value in _lib.STATUS.items():
        m = re.search(rf"KDL_STATUS_{name}\s*=\s*(\d+)", text)
        assert m and int(m.group(1)) == value, name
        assert _lib.lib().kdl_status_string(value).decode().startswith(f"KDL_STATUS_{name}")


def test_name_tables():
    assert kdloss.divergence_names() == ["fkl", "rkl", "fkl_rkl", "akl", "jsd", "tvd", "skl", "srkl"]
    assert kdloss.head_rule_names() == ["reference", "mass", "topk"]
    assert kdloss.reduction_names() == ["none", "sum", "mean"]
    d = _lib.new_desc(divergence=" JSD ", head_rule="TopK", reduction="None")
    assert (d.divergence, d.head_rule, d.reduction) == (4, 2, 0)


def test_bad_names_and_types():
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*fkl, rkl"):
        _lib.new_desc(divergence="kl")
    with pytest.raises(ValueError, match="unknown head_rule"):
        _lib.new_desc(head_rule="top")
    with pytest.raises(ValueError, match="unknown reduction"):
        _lib.new_desc(reduction="avg")
    with pytest.raises(TypeError, match="divergence must be a string"):
        _lib.new_desc(divergence=3)
    with pytest.raises(TypeError, match="top_k must be an integer"):
        _lib.new_desc(top_k=2.5)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        _lib.new_desc(temperature="hot")


def test_check_maps_status_to_exceptions():
    _lib.check(0, "x")
    with pytest.raises(kdloss.KdlossValueError) as e:
        _lib.check(_lib.STATUS["BAD_STRIDE"], "kdl_something")
    assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)
    assert e.value.status_name == "KDL_STATUS_BAD_STRIDE"
    assert str(e.value).startswith("kdl_something: KDL_STATUS_BAD_STRIDE")
    with pytest.raises(kdloss.KdlossError) as e:
        _lib.check(_lib.STATUS["NOT_IMPLEMENTED"], "f")
    assert not isinstance(e.value, ValueError)


def test_gpu_api_without_device():
    if kdloss.device_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(kdloss.KdlossError, match="NO_DEVICE"):
        _lib.handle_for_current_device(0)


def _lookup(env, code):
    # `python -c` puts the working directory first on sys.path: run it in an
    # empty one, so a kdloss/ beside the caller (python/ itself) is not found
    # before the package under test
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd)


def test_lookup_env_path_missing_is_an_error():
    env = dict(os.environ, KDLOSS_LIBRARY="/nonexistent/libkdloss.so",
               PYTHONPATH=os.path.dirname(os.path.dirname(kdloss.__file__)))
    r = _lookup(env, "import kdloss; kdloss.library_path()")
    assert r.returncode != 0 and "KDLOSS_LIBRARY='/nonexistent/libkdloss.so' does not exist" in r.stderr


def test_lookup_next_to_package(tmp_path):
    """Without KDLOSS_LIBRARY, a libkdloss.so inside the package is found."""
    pkg_src = os.path.dirname(kdloss.__file__)
    pkg = tmp_path / "kdloss"
    shutil.copytree(pkg_src, pkg, ignore=shutil.ignore_patterns("__pycache__", "libkdloss.so*"))
    shutil.copy(_lib.library_path(), pkg / "libkdloss.so")
    env = {k: v for k, v in os.environ.items() if k != "KDLOSS_LIBRARY"}
    env["PYTHONPATH"] = str(tmp_path)
    r = _lookup(env, "import kdloss; print(kdloss.library_path())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(pkg / "libkdloss.so")


def test_lookup_not_found_message(tmp_path):
    pkg_src = os.path.dirname(kdloss.__file__)
    shutil.copytree(pkg_src, tmp_path / "kdloss",
                    ignore=shutil.ignore_patterns("__pycache__", "libkdloss.so*"))
    env = {k: v for k, v in os.environ.items() if k not in ("KDLOSS_LIBRARY", "LD_LIBRARY_PATH")}
    env["PYTHONPATH"] = str(tmp_path)
    code = ("import ctypes.util, kdloss\n"
            "ctypes.util.find_library = lambda name: None\n"
            "import kdloss._lib as L\n"
            "L._candidates = (lambda f: (lambda: ([n for n in f()[0] if '/' in n] + "
            "['libkdloss_nonexistent.so'], False)))(L._candidates)\n"
            "kdloss.library_path()\n")
    r = _lookup(env, code)
    assert r.returncode != 0 and "libkdloss.so not found" in r.stderr
