#!/usr/bin/env bash
# scripts/check-wheel.sh WORK_DIR - builds the Python wheel from the
# repository root (pyproject.toml: scikit-build-core runs CMake; CPU-only
# here to keep it short), installs it into WORK_DIR/site with nothing else
# on the path, and checks that the installed package finds the library it
# carries (no KDLOSS_LIBRARY, no PYTHONPATH to the checkout) and computes the
# forward KL of textbook NumPy, and that the `kdloss` command it installs
# runs.  CTest entry `python_wheel`; exit 77 (skip) when scikit-build-core is
# missing (scripts/setup.sh installs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:?usage: scripts/check-wheel.sh WORK_DIR}
py=${PYTHON:-python3}
if ! "$py" -c "import scikit_build_core" >/dev/null 2>&1; then
  echo "check-wheel: SKIP: scikit-build-core not installed (pip install scikit-build-core)"
  exit 77
fi
rm -rf "$work"
mkdir -p "$work"
"$py" -m pip wheel "$root" --no-build-isolation --no-deps -q -w "$work/dist" \
  -C cmake.define.KDL_ENABLE_CUDA=OFF -C build-dir="$work/build"
"$py" -m pip install -q --no-deps --target "$work/site" "$work"/dist/kdloss-*.whl
cd "$work"
env -u KDLOSS_LIBRARY PYTHONPATH="$work/site" "$py" - "$work/site" <<'EOF'
import os
import sys

import numpy as np

import kdloss
import kdloss.numpy as kn

site = os.path.realpath(sys.argv[1])
lib = os.path.realpath(kdloss.library_path())
assert lib.startswith(site + os.sep), f"library loaded from {lib}, not from the wheel in {site}"
assert os.path.realpath(kdloss.__file__).startswith(site + os.sep), kdloss.__file__
rng = np.random.default_rng(7)
s, t = 3 * rng.standard_normal((5, 333)), 3 * rng.standard_normal((5, 333))
loss, grad, _ = kn.distill_loss(s, t, divergence="fkl", temperature=2.0, reduction="sum")


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


lp, lq = log_softmax(t / 2), log_softmax(s / 2)
want = float((np.exp(lp) * (lp - lq)).sum())
want_grad = (np.exp(lq) - np.exp(lp)) / 2
assert abs(float(loss) - want) <= 1e-12 * abs(want), (float(loss), want)
assert np.allclose(grad, want_grad, rtol=1e-10, atol=1e-14)
print(f"check-wheel: kdloss {kdloss.__version__ if hasattr(kdloss, '__version__') else ''} from {lib}: "
      f"FKL {float(loss):.12g} = textbook {want:.12g}")
EOF
out=$("$work/site/bin/kdloss" demo)
grep -q "^backend: cpu" <<<"$out" || { echo "check-wheel: unexpected demo output:"; echo "$out"; exit 1; }
echo "check-wheel: the installed kdloss command runs (${out%%$'\n'*})"
