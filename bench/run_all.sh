#!/usr/bin/env bash
# bench/run_all.sh - the full comparison in one command, on a machine with a
# CUDA GPU (Hopper: built for sm_90a).  Builds kdloss, runs `kdloss bench`,
# then the peers (bench/peers.py: torch eager, torch.compile, Liger-Kernel,
# POT, flash-sinkhorn), and writes
#     bench/results/<date>-<device>-<commit>.json   (+ .png, the bar chart)
# merging into that file if an earlier call of the same day, device and
# commit wrote it (so a long matrix can be split over several calls).
# Copies both to $OUT when OUT is set.
#
#   bench/run_all.sh                        the whole matrix (see README.md: it
#                                           takes longer than one 10-minute call)
#   bench/run_all.sh --quick                4096 x 32000 bf16, a few minutes
#   bench/run_all.sh --shapes 8192:151936 --dtypes bf16
#   PEERS_ARGS="--impls torch_eager,liger --budget-s 300" bench/run_all.sh --quick
#
# Options are those of `kdloss bench` (--ops --shapes --dtypes --divergences
# --head-rules --repeats --warmup --mu --top-k --sinkhorn --sinkhorn-iters
# --sparse-shapes --sparse-k --fused-shapes --ragged-sizes --sinkd --no-check
# --quick); they are given to peers.py too.  Without --ops all six ops run:
# loss, sinkhorn, sparse, fused_linear, sinkhorn_ragged, sinkd.  Environment:
# KDL_BENCH_ARCH (CMAKE_CUDA_ARCHITECTURES, default 90a-real),
# KDL_BENCH_BUILD_DIR (default build-bench-sm90a), PYTHON (default python3),
# PEERS_ARGS (extra peers.py options), KDL_COMMIT (the commit to record),
# KDL_BENCH_BUDGET_S (default 560: the whole script's wall-clock budget,
# under the device tool's 600 s a call; see below).
#
# Time: the kdloss rows are merged into the results file and copied to $OUT
# as soon as `kdloss bench` returns; peers.py then runs under `timeout` with
# what is left of KDL_BENCH_BUDGET_S (less 20 s for the copies), stops
# starting rows 30 s before that (KDL_PEERS_STOP_AT, on top of any
# --budget-s in PEERS_ARGS), and writes the results file after every op, so
# a run cut short still brings back what it measured.
# Wheels in .whl/ (made by scripts/fetch-bench-wheels.sh, carried to the
# machine) are installed into /tmp/kdl-bench-site first: the device machine
# has no network.
#
# Exit codes: 0 done; 2 bad options or no CUDA device (from kdloss bench);
# otherwise the code of the step that failed.  If peers.py fails, the kdloss
# rows are still written.
set -euo pipefail
t_start=$(date +%s)
budget=${KDL_BENCH_BUDGET_S:-560}
t_end=$((t_start + budget))
cd "$(dirname "$0")/.."
root=$(pwd)
build=${KDL_BENCH_BUILD_DIR:-build-bench-sm90a}
arch=${KDL_BENCH_ARCH:-90a-real}
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "run_all.sh: installing the wheels of .whl/ into /tmp/kdl-bench-site" >&2
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kdl-bench-site .whl/*.whl
  export PYTHONPATH=/tmp/kdl-bench-site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "run_all.sh: building kdloss for CUDA architectures $arch in $build" >&2
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DKDL_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target kdloss_cli kdloss

# KDL_COMMIT names the commit where git cannot (the device machine gets the
# working tree without .git): KDL_COMMIT=$(git rev-parse --short HEAD) here.
commit=${KDL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -z "${KDL_COMMIT:-}" ] && [ "$commit" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
  commit="$commit-dirty"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
# the table on stdout is kept: `kdloss bench` writes no JSON when a CUDA
# failure stops it, but the table holds the rows done before it
"$build/kdloss" bench --commit "$commit" --json-out "$tmp/" "$@" >"$tmp/kdloss-bench.txt" || rc=$?
cat "$tmp/kdloss-bench.txt"
if [ "$rc" -ne 0 ]; then
  echo "run_all.sh: kdloss bench exited $rc" >&2
  if [ -n "${OUT:-}" ]; then cp "$tmp/kdloss-bench.txt" "$OUT/kdloss-bench-failed.txt"; fi
  exit "$rc"
fi
src=$(ls "$tmp"/*.json 2>/dev/null | head -1 || true)
if [ -z "$src" ]; then  # --help
  exit 0
fi
mkdir -p bench/results
out=bench/results/$(basename "$src")
png=${out%.json}.png

# the kdloss rows first (merged into an earlier call's file of the same
# name), in $OUT at once: whatever happens to the peers, these come back
"$py" bench/peers.py --merge-only --json "$src" --out "$out" || cp "$src" "$out"
if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi

export KDLOSS_LIBRARY="$root/$build/libkdloss.so"
left=$((t_end - $(date +%s) - 20))
if [ "$left" -lt 60 ]; then
  echo "run_all.sh: ${left}s left of KDL_BENCH_BUDGET_S=$budget: peers not run (kdloss rows only)" >&2
else
  export KDL_PEERS_STOP_AT=$((t_end - 50))
  # shellcheck disable=SC2086  # PEERS_ARGS is a list of words
  if ! PYTHONUNBUFFERED=1 timeout --kill-after=5 "$left" "$py" bench/peers.py --json "$src" --out "$out" \
      --png "$png" --commit "$commit" ${PEERS_ARGS:-} "$@"; then
    echo "run_all.sh: peers.py failed or ran past ${left}s; keeping the rows written so far" >&2
    "$py" bench/peers.py --merge-only --json "$src" --out "$out" || cp "$src" "$out"
  fi
fi
echo "run_all.sh: wrote $out" >&2

if [ -n "${OUT:-}" ]; then
  cp "$out" "$OUT/"
  if [ -f "$png" ]; then cp "$png" "$OUT/"; fi
  echo "run_all.sh: copied to $OUT" >&2
fi
