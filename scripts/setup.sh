#!/usr/bin/env bash
# Installs what kdloss needs to build and test on a fresh Debian/Ubuntu
# machine (idempotent: skips what is already there).  The CUDA toolkit is
# not installed here: without nvcc the build is the CPU reference only.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v ninja >/dev/null 2>&1 || need_apt+=(ninja-build)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
pkg-config --exists criterion 2>/dev/null || need_apt+=(libcriterion-dev)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
if ((${#need_apt[@]})); then
  echo "setup: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Fuzzing (scripts/fuzz.sh, run by scripts/test.sh): clang with its libFuzzer
# runtime, ~45 MB to download, ~260 MB installed, ~15-30 s.  KDL_WITH_FUZZ=0
# skips it; a failed install only means test.sh skips the fuzzing.
if [ "${KDL_WITH_FUZZ:-1}" = 1 ] && ! bash "$(dirname "$0")/fuzz.sh" --check; then
  fuzz_pkgs=(clang)
  apt-cache show libclang-rt-dev >/dev/null 2>&1 && fuzz_pkgs+=(libclang-rt-dev)
  echo "setup: apt-get install ${fuzz_pkgs[*]} (libFuzzer)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${fuzz_pkgs[@]}" >/dev/null; } ||
    echo "setup: clang/libFuzzer not installed; scripts/test.sh will skip fuzzing"
fi

# Python side (binding tests): numpy, pytest, ml_dtypes (bfloat16 arrays),
# scikit-build-core (the wheel, scripts/check-wheel.sh);
# torch when KDL_WITH_TORCH=1 (scripts/test.sh asks for it): PyPI's wheel
# brings the CUDA libraries, measured at ~75 s and 5.3 GB on a 2-core
# machine.  A failed torch install is reported and the torch tests skip.
if command -v python3 >/dev/null 2>&1; then
  if ! python3 -c "import numpy, pytest, ml_dtypes, scikit_build_core" >/dev/null 2>&1; then
    echo "setup: pip install numpy pytest ml_dtypes scikit-build-core"
    python3 -m pip install -q numpy pytest ml_dtypes scikit-build-core
  fi
  if [ "${KDL_WITH_TORCH:-0}" = 1 ] && ! python3 -c "import torch" >/dev/null 2>&1; then
    echo "setup: pip install torch"
    t0=$(date +%s)
    if python3 -m pip install -q torch; then
      echo "setup: torch installed in $(( $(date +%s) - t0 )) s"
    else
      echo "setup: WARNING: torch could not be installed; the torch tests will skip" >&2
    fi
  fi
  # The peers themselves, for python/tests/test_peers_*.py (kdloss against
  # their own code on CPU; each skips with the reason when its peer is
  # missing): TRL (with transformers, accelerate, datasets), Liger-Kernel
  # (its Triton kernels run by Triton's interpreter; Triton comes with
  # torch), POT (with scipy), flash-sinkhorn.  KDL_WITH_PEERS=1 (test.sh
  # asks for it); pinned to the versions the tests were written against.
  if [ "${KDL_WITH_PEERS:-0}" = 1 ] && python3 -c "import torch" >/dev/null 2>&1; then
    if ! python3 -c "import trl, liger_kernel, ot, flash_sinkhorn" >/dev/null 2>&1; then
      echo "setup: pip install trl liger-kernel pot flash-sinkhorn (peers for test_peers_*)"
      t0=$(date +%s)
      { python3 -m pip install -q trl==1.16.0 pot==0.9.7.post1 &&
        python3 -m pip install -q --no-deps liger-kernel==0.8.5 flash-sinkhorn==0.4.1; } ||
        echo "setup: WARNING: a peer could not be installed; its tests will skip" >&2
      echo "setup: peers installed in $(( $(date +%s) - t0 )) s"
    fi
  fi
fi
