#!/usr/bin/env bash
# The main job: set up, build, and run `kdloss demo` (every divergence on an
# embedded 32k-vocabulary example; on the GPU when one is present, else on
# the float64 CPU reference, and it says which).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
./build/kdloss demo "$@"
