#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/, CMake option KDL_FUZZ) with clang
# into ${BUILD_DIR:-build-fuzz}, replays every seed corpus, then fuzzes each
# target for a bounded time.  Fails (exit 1) on any crash, leak, UB report,
# oracle violation or hang (> 10 s on one input); the input that failed is
# saved under BUILD_DIR/fuzz-artifacts/ and the command to replay it printed.
#
#   bash scripts/fuzz.sh               every target, for a bounded time each
#   bash scripts/fuzz.sh fuzz_npy      one target
#   bash scripts/fuzz.sh --check       exit 0 when clang with libFuzzer works
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default: fuzz_cli_args 20,
#                  fuzz_ref_ext 14, fuzz_ref_loss 12, fuzz_ref_ot 10,
#                  fuzz_npy 6, others 20: 62 s of fuzzing; the whole step
#                  stays under 100 s, build and replay included)
#   FUZZ_RUNS      stop each target after this many executions instead
#                  (the long runs of docs/hardening.md: FUZZ_RUNS=1000000)
#   FUZZ_MERGE=1   afterwards, add the inputs that found new coverage to
#                  tests/fuzz/corpus/<target>/ (to be committed)
#   FUZZ_CC        the compiler (default clang)
#   BUILD_DIR      build directory (default build-fuzz)
# New inputs go to a scratch corpus under BUILD_DIR; the committed corpus
# only changes with FUZZ_MERGE=1.  A target's dictionary
# tests/fuzz/<target>.dict, when there is one, is passed with -dict.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CC_FUZZ=${FUZZ_CC:-clang}
BUILD_DIR=${BUILD_DIR:-build-fuzz}
SECONDS_PER=${FUZZ_SECONDS:-}
default_seconds() {
  case $1 in
    fuzz_cli_args) echo 20 ;; # eight subcommands, the slowest per execution
    fuzz_ref_loss) echo 12 ;;
    fuzz_ref_ot) echo 10 ;;   # Sinkhorn and SinKD references
    fuzz_ref_ext) echo 14 ;;  # sparse, shard protocol, fused linear references
    fuzz_npy) echo 6 ;;       # its coverage stops growing within seconds
    *) echo 20 ;;
  esac
}

have_libfuzzer() {
  command -v "$CC_FUZZ" >/dev/null 2>&1 || return 1
  local d
  d=$(mktemp -d)
  printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return 0; }\n' >"$d/t.c"
  local rc=0
  "$CC_FUZZ" -fsanitize=fuzzer,address,undefined "$d/t.c" -o "$d/t" >/dev/null 2>&1 || rc=1
  rm -rf "$d"
  return $rc
}

if [ "${1:-}" = --check ]; then
  if have_libfuzzer; then exit 0; else exit 1; fi
fi
if ! have_libfuzzer; then
  echo "fuzz: '$CC_FUZZ' cannot build with -fsanitize=fuzzer (Debian: apt-get install clang libclang-rt-dev)" >&2
  exit 2
fi

gen=(); command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
CC="$CC_FUZZ" cmake -S . -B "$BUILD_DIR" "${gen[@]}" -DCMAKE_BUILD_TYPE=Debug -DKDL_FUZZ=ON \
  -DKDL_ENABLE_CUDA=OFF -DKDL_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$f" .c)"); done
fi

echo "== fuzz: replaying the seed corpora =="
ctest --test-dir "$BUILD_DIR/tests/fuzz" --output-on-failure

ART="$ROOT/$BUILD_DIR/fuzz-artifacts"
mkdir -p "$ART"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
for t in "${targets[@]}"; do
  bin="$ROOT/$BUILD_DIR/tests/fuzz/$t"
  seeds="$ROOT/tests/fuzz/corpus/$t"
  work="$ROOT/$BUILD_DIR/fuzz-corpus/$t"
  log="$ROOT/$BUILD_DIR/fuzz-$t.log"
  mkdir -p "$work" "$seeds"
  dict=(); [ -f "$ROOT/tests/fuzz/$t.dict" ] && dict=(-dict="$ROOT/tests/fuzz/$t.dict")
  if [ -n "${FUZZ_RUNS:-}" ]; then
    limit=(-runs="$FUZZ_RUNS"); guard=$((24 * 3600)); what="$FUZZ_RUNS runs"
  else
    secs_t=${SECONDS_PER:-$(default_seconds "$t")}
    limit=(-max_total_time="$secs_t"); guard=$((secs_t + 300)); what="$secs_t s"
  fi
  echo "== fuzz: $t ($what) =="
  start=$(date +%s)
  set +e
  timeout "$guard" "$bin" "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
    -artifact_prefix="$ART/$t-" "$work" "$seeds" >"$log" 2>&1
  rc=$?
  set -e
  secs=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(sed -nE 's/^#[0-9]+[[:space:]]+DONE[[:space:]]+(cov: [0-9]+ ft: [0-9]+).*/\1/p' "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} executions, ${secs} s; log: $log" >&2
    grep -E 'check failed|ERROR|SUMMARY|Test unit written|fuzz_cli_args:' "$log" | head -20 >&2 || true
    echo "fuzz: replay with: $bin <the test unit above>" >&2
  else
    echo "fuzz: $t ok: ${execs:-?} executions in ${secs} s (${cov:-})"
  fi
  if [ "${FUZZ_MERGE:-0}" = 1 ] && [ $rc -eq 0 ]; then
    "$bin" -merge=1 "$seeds" "$work" >"$log.merge" 2>&1
    echo "fuzz: $t corpus: $(ls "$seeds" | wc -l) files in tests/fuzz/corpus/$t"
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all targets clean"
