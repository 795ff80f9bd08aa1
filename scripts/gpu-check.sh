#!/usr/bin/env bash
# scripts/gpu-check.sh - one command for the GPU machine: build for sm_90a,
# run the whole ctest suite, then compute-sanitizer (memcheck, racecheck,
# initcheck, synccheck) on a small subset of tests/test_gpu_loss.  Logs go
# to $OUT (if set, else ./gpu-check-out); a summary table is printed last
# and written to summary.txt.  Meant to finish inside 10 minutes: every step
# has its own time limit, and the sanitizers run bounded subsets (gpu_small
# of test_gpu_loss; test_gpu_sinkhorn and test_gpu_ext without their large
# cases, KDL_SAN_FILTER_SINKHORN / KDL_SAN_FILTER_EXT).
#
# Steps, in order: configure, build, demo, ctest (every suite but the three
# below, ctest -j 4), hardening (test_gpu_hardening alone, --jobs 1: it takes
# every byte of device memory in one case and needs ~20 GiB in another, so it
# must not share the GPU with other suites), memcheck, memcheck:sinkhorn,
# memcheck:ext, racecheck, initcheck, synccheck, python (the pytest suite,
# the vocabulary-parallel example and the peers self-test through ctest,
# last: on a machine with torch and a GPU it runs what skips on CPU CI and
# can take minutes).
#
#   scripts/gpu-check.sh            # from the repository root
#   BUILD_DIR=/tmp/b scripts/gpu-check.sh
#   KDL_SAN_FILTER='gpu_loss/odd*' scripts/gpu-check.sh   # another subset
#   KDL_COMMIT=<sha> scripts/gpu-check.sh   # the commit, for the logs (the device
#                                           # machine gets the tree without .git)
#
# The device image has no Criterion: run scripts/fetch-device-deps.sh here
# first and carry .deb (scripts/device-env.sh unpacks it there).  Without it
# the tests are not built; the step "tests" then fails, and only
# `kdloss demo --backend cuda` (GPU against the float64 reference) runs.
#
# At most 7 files are written to the output folder (the device tool brings
# back 8): build.log, ctest.log, memcheck.log, racecheck.log, initcheck.log,
# synccheck.log, summary.txt.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${OUT:-$PWD/gpu-check-out}
BUILD=${BUILD_DIR:-$ROOT/build-gpu-check}
FILTER=${KDL_SAN_FILTER:-gpu_small/*}
# memcheck over the Sinkhorn and extension suites leaves out the cases that
# are large for a sanitizer (10-100x slower): 2^20-column rows, the 151936
# vocabularies, the shared-memory-limit vocabulary, run-to-convergence.
FILTER_SINKHORN=${KDL_SAN_FILTER_SINKHORN:-*/!(long_rows_*|small_eps_large_*|max_iter_int64_max_*|large_vocab_*|f32_sqeuclidean_chunked_gemm_*)}
FILTER_EXT=${KDL_SAN_FILTER_EXT:-*/!(full_k_and_large_vocabulary|vocabulary_at_the_shared_memory_limit_*|tail_mass_thresholds_*)}
# ctest leaves these to steps of their own (see above)
CTEST_OWN='^(test_gpu_hardening|python_tests|example_vocab_parallel|bench_peers_selftest)$'
JOBS=$(nproc 2>/dev/null || echo 4)
mkdir -p "$OUTDIR"

names=()
codes=()
secs=()
notes=()

# The whole script stays inside KDL_CHECK_BUDGET seconds (default 560, under
# the device tool's 600 s a call) so that summary.txt is always written: a
# step gets min(its own limit, what is left - 20 s), and is skipped (rc 125,
# "no time left") when under 30 s are left.  A later call on the still-warm
# machine rebuilds incrementally; KDL_CHECK_SKIP (a regex of step names, e.g.
# 'ctest|memcheck') leaves steps out, to split the work over two calls.
DEADLINE=$(($(date +%s) + ${KDL_CHECK_BUDGET:-560}))
SKIP=${KDL_CHECK_SKIP:-}

# run NAME LIMIT_S LOG cmd...   (appends to LOG)
run() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0 t1 rc left
    t0=$(date +%s)
    left=$((DEADLINE - t0 - 20))
    if [ -n "$SKIP" ] && [[ $name =~ ^($SKIP)$ ]]; then
        names+=("$name"); codes+=(0); secs+=(0); notes+=("left out (KDL_CHECK_SKIP)")
        return 0
    fi
    if [ "$left" -lt 30 ]; then
        names+=("$name"); codes+=(125); secs+=(0); notes+=("skipped: no time left in KDL_CHECK_BUDGET")
        return 125
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "### $name: $*" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    t1=$(date +%s)
    names+=("$name")
    codes+=("$rc")
    secs+=("$((t1 - t0))")
    local note=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${limit}s"; fi
    # this step's part of LOG (several steps append to one log): from its
    # own last "### NAME: " line on
    local part
    part=$(awk -v m="### $name: " 'index($0, m) == 1 { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' "$log")
    case $name in
    memcheck* | racecheck | initcheck | synccheck)
        local s
        s=$(printf '%s' "$part" | grep -h "ERROR SUMMARY" | tail -n 1)
        [ -n "$s" ] && note="${note:+$note; }${s#========= }"
        ;;
    hardening)
        local s
        s=$(printf '%s' "$part" | grep -h "Synthesis:" | tail -n 1)
        [ -n "$s" ] && note="${note:+$note; }${s#*Synthesis: }"
        ;;
    ctest | python)
        local s
        s=$(printf '%s' "$part" | grep -h "tests passed" | tail -n 1)
        [ -n "$s" ] && note="${note:+$note; }$s"
        ;;
    build)
        local sp
        sp=$(grep -c "bytes spill stores" "$log" 2>/dev/null)
        local nz
        nz=$(grep "bytes spill stores" "$log" | grep -vc " 0 bytes spill stores")
        note="${note:+$note; }ptxas reports: $sp, with spills: $nz"
        ;;
    esac
    notes+=("$note")
    return "$rc"
}

: >"$OUTDIR/build.log"
# Criterion: the machine's, or unpacked from the carried .deb/ (see
# scripts/device-env.sh and scripts/fetch-device-deps.sh).
# shellcheck source=scripts/device-env.sh
. "$ROOT/scripts/device-env.sh" >>"$OUTDIR/build.log" 2>&1
tail -n 1 "$OUTDIR/build.log"
echo "commit: ${KDL_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}" >>"$OUTDIR/build.log"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
if run configure 120 "$OUTDIR/build.log" cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DKDL_PTXAS_VERBOSE=ON \
    $KDL_DEVICE_CMAKE_ARGS; then
    run build 360 "$OUTDIR/build.log" cmake --build "$BUILD" -j "$JOBS"
fi
BUILD_RC=${codes[${#codes[@]} - 1]}

if [ "$BUILD_RC" = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUTDIR/ctest.log" 2>&1 || true
    # Without tests (no Criterion): the command's own GPU-vs-reference check.
    run demo 120 "$OUTDIR/ctest.log" "$BUILD/kdloss" demo --backend cuda
    if [ "$KDL_DEVICE_NO_TESTS" = 1 ]; then
        names+=(tests); codes+=(1); secs+=(0); notes+=("NOT BUILT: no Criterion (carry .deb from scripts/fetch-device-deps.sh)")
    else
        run ctest 300 "$OUTDIR/ctest.log" ctest --test-dir "$BUILD" --output-on-failure --timeout 240 -j 4 \
            -E "$CTEST_OWN"
        # alone on the GPU: the memory-exhaustion case and the N*V > 2^31 case
        # (~20 GiB) would make concurrent suites fail with out-of-memory
        [ -x "$BUILD/tests/test_gpu_hardening" ] &&
            run hardening 150 "$OUTDIR/ctest.log" "$BUILD/tests/test_gpu_hardening" --jobs 1 --verbose

        SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        TEST="$BUILD/tests/test_gpu_loss"
        # Criterion forks one process per test: follow every process.
        SARGS=(--target-processes all --error-exitcode 99 --print-limit 20)
        CARGS=(--jobs 1 "--filter=$FILTER" --verbose)
        : >"$OUTDIR/memcheck.log"
        run memcheck 100 "$OUTDIR/memcheck.log" "$SAN" --tool memcheck --leak-check no "${SARGS[@]}" "$TEST" "${CARGS[@]}"
        # memcheck also covers the Sinkhorn and extension kernels (whole suites,
        # bounded), appended to the same log.
        for extra in test_gpu_sinkhorn test_gpu_ext; do
            f=$FILTER_SINKHORN
            [ "$extra" = test_gpu_ext ] && f=$FILTER_EXT
            [ -x "$BUILD/tests/$extra" ] &&
                run "memcheck:${extra#test_gpu_}" 90 "$OUTDIR/memcheck.log" "$SAN" --tool memcheck --leak-check no \
                    "${SARGS[@]}" "$BUILD/tests/$extra" --jobs 1 "--filter=$f" --verbose
        done
        : >"$OUTDIR/racecheck.log"
        run racecheck 120 "$OUTDIR/racecheck.log" "$SAN" --tool racecheck --racecheck-report all "${SARGS[@]}" "$TEST" "${CARGS[@]}"
        : >"$OUTDIR/initcheck.log"
        run initcheck 80 "$OUTDIR/initcheck.log" "$SAN" --tool initcheck "${SARGS[@]}" "$TEST" "${CARGS[@]}"
        : >"$OUTDIR/synccheck.log"
        run synccheck 60 "$OUTDIR/synccheck.log" "$SAN" --tool synccheck "${SARGS[@]}" "$TEST" "${CARGS[@]}"
        # last: whatever time is left (appended to ctest.log)
        run python 240 "$OUTDIR/ctest.log" ctest --test-dir "$BUILD" --output-on-failure -R "$CTEST_OWN" \
            -E '^test_gpu_hardening$'
    fi
fi

{
    printf '%-18s %-5s %-6s %s\n' step rc secs note
    for i in "${!names[@]}"; do
        printf '%-18s %-5s %-6s %s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}" "${notes[$i]}"
    done
    echo "logs: $OUTDIR"
} | tee "$OUTDIR/summary.txt"

for c in "${codes[@]}"; do
    [ "$c" = 0 ] || exit 1
done
exit 0
