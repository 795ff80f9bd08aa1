#!/usr/bin/env bash
# scripts/fetch-device-deps.sh - on a machine with network (this Debian
# bookworm one), downloads into .deb/ (ignored by git) the Debian packages the
# test suite needs on the GPU machine, whose image has no Criterion and no
# network: libcriterion and the shared libraries it links.  About 1.6 MB.
# scripts/device-env.sh unpacks them there into a private prefix (never into
# /) and keeps only the libraries the machine lacks.  Carry the folder with
# the call: the device tool's carry [".deb"] (and ".whl" for the benchmark,
# scripts/fetch-bench-wheels.sh).
#
#   bash scripts/fetch-device-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(libcriterion3 libcriterion-dev libnanomsg5 libgit2-1.5 libmbedtls14 libmbedx509-1
      libmbedcrypto7 libhttp-parser2.9 libssh2-1 libffi8)
mkdir -p .deb
rm -f .deb/*.deb
# apt's sandbox user cannot write into the checkout: download in a scratch
# folder it owns, then move.
tmp=$(mktemp -d)
chmod 777 "$tmp"
(cd "$tmp" && apt-get download "${pkgs[@]}")
mv "$tmp"/*.deb .deb/
rmdir "$tmp"
ls -l .deb
du -sh .deb
