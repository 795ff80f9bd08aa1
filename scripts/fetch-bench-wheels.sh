#!/usr/bin/env bash
# scripts/fetch-bench-wheels.sh - downloads, on a machine with network, the
# wheels bench/peers.py needs on the GPU machine (which has none) into .whl/
# (ignored by git).  bench/run_all.sh installs whatever .whl/ holds; carry
# the folder with the call (the device tool's carry [".whl"]).
#
#   scripts/fetch-bench-wheels.sh                     liger-kernel, POT, flash-sinkhorn
#   scripts/fetch-bench-wheels.sh --with-matplotlib   + matplotlib (the device image
#                                                     already has one; its needs too)
#
# For CPython 3.12 on x86-64 manylinux, without dependencies: torch, triton,
# numpy and scipy come from the machine's image.  About 34 MB (POT is 33):
# the working tree plus .whl/ must stay under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pkgs=(liger-kernel==0.8.5 pot==0.9.7.post1 flash-sinkhorn==0.4.1)
if [ "${1:-}" = --with-matplotlib ]; then
  pkgs+=(matplotlib==3.11.2)
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/fetch-bench-wheels.sh [--with-matplotlib]" >&2
  exit 2
fi
mkdir -p .whl
# one version of each package only (two stop the whole install there)
for spec in "${pkgs[@]}"; do
  name=${spec%%==*}
  version=${spec#*==}
  file_name=${name//-/_}
  for f in .whl/"$file_name"-*.whl; do
    [ -e "$f" ] || continue
    case "$f" in .whl/"$file_name-$version"-*) ;; *) echo "removing $f" >&2; rm -f "$f" ;; esac
  done
done
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}"
ls -l .whl
du -sh .whl
