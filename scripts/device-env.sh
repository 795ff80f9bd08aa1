# scripts/device-env.sh - sourced (". scripts/device-env.sh") by
# scripts/gpu-check.sh on the GPU machine before it configures the build.
#
# The device image has CUDA, CMake and PyTorch but no Criterion, and no
# network.  When Criterion is missing and .deb/ (scripts/fetch-device-deps.sh,
# carried with the call) is there, the packages are unpacked into
# ${KDL_DEPS_ROOT:-/tmp/kdl-deps} (dpkg -x, never into /), every shared
# library the machine already has (ldconfig knows its soname) is dropped so
# the system's own stays in use, and this sets:
#   KDL_DEVICE_CMAKE_ARGS  -DKDL_CRITERION_ROOT=<root>/usr (tests/CMakeLists.txt)
#   LD_LIBRARY_PATH        + the unpacked library folder (link and run time)
# When Criterion is missing and there is no .deb/, KDL_DEVICE_CMAKE_ARGS is
# -DKDL_BUILD_TESTS=OFF and KDL_DEVICE_NO_TESTS=1: the caller says so loudly.
# Prints one line saying which case it was.  KDL_FORCE_CARRIED_DEPS=1 takes
# the .deb/ path even where Criterion is installed (to test this script).

KDL_DEVICE_CMAKE_ARGS=""
KDL_DEVICE_NO_TESTS=0
kdl__root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "${KDL_FORCE_CARRIED_DEPS:-0}" != 1 ] &&
    { [ -f /usr/include/criterion/criterion.h ] || pkg-config --exists criterion 2>/dev/null; }; then
    echo "device-env: Criterion found on the machine"
elif compgen -G "$kdl__root/.deb/*.deb" >/dev/null; then
    kdl__deps=${KDL_DEPS_ROOT:-/tmp/kdl-deps}
    rm -rf "$kdl__deps"
    mkdir -p "$kdl__deps"
    for kdl__f in "$kdl__root"/.deb/*.deb; do
        dpkg -x "$kdl__f" "$kdl__deps"
    done
    kdl__lib=$kdl__deps/usr/lib/x86_64-linux-gnu
    kdl__known=$(ldconfig -p 2>/dev/null)
    for kdl__so in "$kdl__lib"/*.so.*; do
        [ -e "$kdl__so" ] || [ -L "$kdl__so" ] || continue   # gone with an earlier link
        case $(basename "$kdl__so") in libcriterion*) continue ;; esac
        if printf '%s\n' "$kdl__known" | grep -q "^[[:space:]]*$(basename "$kdl__so") "; then
            # the soname the machine has: drop it and the file it names
            rm -f "$(readlink -f "$kdl__so")" "$kdl__so"
        fi
    done
    export LD_LIBRARY_PATH=$kdl__lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    KDL_DEVICE_CMAKE_ARGS="-DKDL_CRITERION_ROOT=$kdl__deps/usr"
    echo "device-env: Criterion unpacked from .deb/ into $kdl__deps (kept: $(cd "$kdl__lib" && ls | tr '\n' ' '))"
else
    KDL_DEVICE_CMAKE_ARGS="-DKDL_BUILD_TESTS=OFF"
    KDL_DEVICE_NO_TESTS=1
    echo "device-env: NO Criterion and no .deb/ (run scripts/fetch-device-deps.sh and carry .deb): tests not built"
fi
unset kdl__root kdl__deps kdl__f kdl__lib kdl__known kdl__so
