#!/usr/bin/env bash
# Line and branch coverage of the C code (host/, the CPU build) by the whole
# CPU test suite: builds build-cov with gcov instrumentation and CUDA off,
# runs ctest there (Criterion suites, CLI end to end, the Python binding over
# the instrumented library), and prints one row per host/*.c file, worst
# first, plus the total.  Per-file annotated sources (*.gcov, lines never run
# marked #####) are left in build-cov/gcov/ for finding what no test reaches.
#
#   bash scripts/coverage.sh            # build, test, report
#   KDL_COV_NO_TEST=1 bash scripts/coverage.sh   # report the counts already there
#
# A report, not a gate: no threshold.  A failing test still gets the table
# (from what ran) and exit status 1.
#
# The GPU wrappers (host/gpu_*.c) are not in this build (CUDA off: the stub
# answers NO_DEVICE), so they are not in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
B=${BUILD_DIR:-build-cov}
if [ "${KDL_COV_NO_TEST:-0}" != 1 ]; then
  BUILD_DIR=$B bash scripts/build.sh -DKDL_COVERAGE=ON -DKDL_ENABLE_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug
  find "$B" -name '*.gcda' -delete
  # A failing suite still leaves its counts: the table is printed anyway
  # (the failures named first), and the script exits 1 after it.
  ctest --test-dir "$B" -j "$(nproc)" -E "install_consumer" >"$B/coverage-ctest.log" 2>&1 ||
    { failed=$(grep -E '^[[:space:]]+[0-9]+ - ' "$B/coverage-ctest.log" | tr -s ' ' | tr '\n' ';');
      echo "coverage: ctest failed:${failed:- see the log} (log: $B/coverage-ctest.log); the table below counts what ran" >&2; }
fi
failed=${failed:-}
mkdir -p "$B/gcov"
cd "$B/gcov"
rm -f ./*.gcov
objdir=$(find "$root/$B" -path '*kdloss_objects.dir*' -name 'common.c.gcda' -printf '%h\n' | head -1)
clidir=$(find "$root/$B" -path '*kdloss_cli.dir*' -name '*.gcda' -printf '%h\n' | head -1)
[ -n "$objdir" ] || { echo "coverage: no .gcda under $B (run without KDL_COV_NO_TEST)" >&2; exit 1; }
for src in "$root"/host/*.c; do
  base=$(basename "$src")
  case "$base" in gpu_*.c) [ "$base" = gpu_stub.c ] || continue ;; esac
  dir=$objdir; case "$base" in cli_*) dir=$clidir ;; esac
  [ -f "$dir/$base.gcda" ] || { echo "$base: never run" >>summary.txt; continue; }
  gcov -b -l -p -o "$dir/$base.gcda" "$src" >/dev/null 2>&1 || true
done
python3 - "$root" <<'EOF'
# One .gcov per (translation unit, source): a header's lines are merged over
# the units that include it (a line ran if it ran in any of them).
import glob, os, sys
from collections import defaultdict
root = sys.argv[1]
lines = defaultdict(dict)      # src -> lineno -> ran
branches = defaultdict(dict)   # src -> (lineno, k) -> taken
for f in glob.glob("*.gcov"):
    src = None; lineno = 0; k = 0
    with open(f, errors="replace") as fh:
        for ln in fh:
            if src is None and ":Source:" in ln:
                src = os.path.normpath(os.path.join(root, ln.split("Source:", 1)[1].strip()))
                continue
            if ln.startswith("branch "):
                taken = "taken 0%" not in ln and "never executed" not in ln
                key = (lineno, k); k += 1
                branches[src][key] = branches[src].get(key, False) or taken
                continue
            parts = ln.split(":", 2)
            if len(parts) < 3 or not parts[1].strip().isdigit():
                continue
            lineno = int(parts[1]); k = 0
            c = parts[0].strip()
            if c == "-" or lineno == 0:
                continue
            ran = not c.startswith("#####") and not c.startswith("=====")
            lines[src][lineno] = lines[src].get(lineno, False) or ran
host = os.path.join(root, "host") + os.sep
rows, tl, tr, tb, tbr = [], 0, 0, 0, 0
for src, d in lines.items():
    if not src or not src.startswith(host):
        continue
    n, r = len(d), sum(d.values())
    b = branches.get(src, {}); nb, rb = len(b), sum(b.values())
    rows.append((r / n if n else 1.0, os.path.relpath(src, root), n, r, nb, rb))
    tl += n; tr += r; tb += nb; tbr += rb
rows.sort()
print(f"{'file':28s} {'lines':>6s} {'run':>6s} {'line%':>6s} {'branch%':>8s}")
for pct, name, n, r, nb, rb in rows:
    bp = f"{100*rb/nb:8.1f}" if nb else "       -"
    print(f"{name:28s} {n:6d} {r:6d} {100*pct:6.1f} {bp}")
print(f"{'total':28s} {tl:6d} {tr:6d} {100*tr/max(tl,1):6.1f} {100*tbr/max(tb,1):8.1f}")
EOF
echo "annotated sources: $B/gcov/*.gcov (lines marked ##### never ran)"
[ -z "$failed" ] || { echo "coverage: some tests failed (see above)" >&2; exit 1; }
