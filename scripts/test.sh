#!/usr/bin/env bash
# Runs Strata's whole test suite: installs the external NBD clients the interop tests
# drive, then builds, tests, checks formatting and lints. CI runs this (.ci/run) with
# CI=true on a fresh Debian 12 machine as root.
#
#   scripts/test.sh                 # from any directory
#   STRATA_TEST_SERVER=nbdkit scripts/test.sh   # interop tests against nbdkit instead
#
# Under CI=true a tool still missing after installation is a hard failure. Elsewhere
# the tests that need it skip, loudly.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CI="${CI:-false}"
export CI

log() { printf '\n==> %s\n' "$*"; }
warn() { printf '\n!!!! %s\n' "$*" >&2; }

# --- external tools --------------------------------------------------------------------

# nbdsh runs `python3 -m nbd`; the first python3 on PATH may be a pyenv/venv one without
# the module, so check Debian's interpreter too (the tests do the same).
have_python_libnbd() {
    local py
    for py in python3 /usr/bin/python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import nbd' >/dev/null 2>&1; then
            return 0
        fi
    done
    return 1
}

# Prints the Debian packages whose tools are missing, one per line.
missing_packages() {
    # qemu-utils: install only when qemu-img is absent, so a newer qemu (e.g. from
    # backports) is never replaced.
    command -v qemu-img >/dev/null 2>&1 || echo qemu-utils
    if ! command -v qemu-io >/dev/null 2>&1 && command -v qemu-img >/dev/null 2>&1; then
        warn "qemu-img is installed but qemu-io is not; not touching the qemu installation"
    fi
    local t
    for t in nbdinfo nbdcopy nbdsh; do
        if ! command -v "$t" >/dev/null 2>&1; then
            echo libnbd-bin
            break
        fi
    done
    have_python_libnbd || echo python3-libnbd
    command -v nbdkit >/dev/null 2>&1 || echo nbdkit
    command -v fio >/dev/null 2>&1 || echo fio
}

install_packages() {
    local -a pkgs=("$@")
    local -a sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            warn "not root and no sudo: cannot install ${pkgs[*]}"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        warn "no apt-get: cannot install ${pkgs[*]}"
        return 1
    fi
    log "installing ${pkgs[*]}"
    "${sudo[@]}" apt-get update &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}"
}

mapfile -t need < <(missing_packages | sort -u)
if [ "${#need[@]}" -gt 0 ]; then
    if ! install_packages "${need[@]}"; then
        warn "installing ${need[*]} failed"
    fi
fi

mapfile -t still < <(missing_packages | sort -u)
if [ "${#still[@]}" -gt 0 ]; then
    if [ "$CI" = "true" ]; then
        warn "CI=true and these packages are still missing: ${still[*]}"
        warn "the interop tests need them; refusing to run with tests skipped"
        exit 1
    fi
    warn "MISSING TOOLS (${still[*]}): the interop tests that need them will be SKIPPED"
fi

log "tool versions"
for t in qemu-img nbdinfo nbdkit fio; do
    if command -v "$t" >/dev/null 2>&1; then
        "$t" --version 2>&1 | head -n 1 || true
    fi
done
cargo --version
rustc --version

# --- a block device for the raw backend's device paths ---------------------------------
# When we may create loop devices (root, losetup, loop support in the kernel), the backend
# conformance suite also runs on a scratch loop device (BLKGETSIZE64, BLKDISCARD,
# BLKZEROOUT). Its contents are destroyed, so only a device made here is ever used.
loop_dev=""
loop_img=""
cleanup_loop() {
    [ -n "$loop_dev" ] && losetup -d "$loop_dev" 2>/dev/null || true
    [ -n "$loop_img" ] && rm -f "$loop_img" || true
}
trap cleanup_loop EXIT
if [ -z "${STRATA_TEST_BLOCK_DEVICE:-}" ] && [ "$(id -u)" -eq 0 ] && command -v losetup >/dev/null 2>&1; then
    loop_img="$(mktemp "${TMPDIR:-/tmp}/strata-loop.XXXXXX")"
    truncate -s 64M "$loop_img"
    if loop_dev="$(losetup --find --show "$loop_img" 2>/dev/null)"; then
        export STRATA_TEST_BLOCK_DEVICE="$loop_dev"
        log "block device tests use $loop_dev"
    else
        loop_dev=""
        warn "no loop device available: block-device cases of the backend suite are skipped"
    fi
fi

# --- build, test, lint -----------------------------------------------------------------

failed=()
step() {
    local name="$1"
    shift
    log "$name: $*"
    if ! "$@"; then
        failed+=("$name")
        warn "$name FAILED"
    fi
}

step build cargo build
# The launcher's VM boots (tests/it/vm_e2e/) run in their own step at the end, once their
# packages are installed; here they say so and return.
step test env STRATA_TEST_VM=later cargo test --all-targets
step fmt cargo fmt --check
step clippy cargo clippy --all-targets -- -D warnings
step doc env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

# --- the qemu tests again with Debian 12's qemu-img 7.2 ---------------------------------
# Users run both the distribution's qemu 7.2 and newer ones (10.0 here, which negotiates
# extended headers). When the installed qemu-img is not 7.2, the 7.2 tools are unpacked
# (not installed) under target/ and the qemu interop tests (plain exports, Strata
# images, TLS) run once more with them.
qemu72() {
    local dir="target/qemu-7.2"
    if [ ! -x "$dir/root/usr/bin/qemu-img" ]; then
        local ver
        find_ver() {
            apt-cache madison qemu-utils 2>/dev/null |
                awk -F'|' '$2 ~ /7\.2/ {gsub(/ /, "", $2); print $2; exit}'
        }
        ver="$(find_ver)"
        if [ -z "$ver" ] && [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq >/dev/null 2>&1 || true
            ver="$(find_ver)"
        fi
        if [ -z "$ver" ]; then
            warn "no qemu-utils 7.2 package known to apt"
            return 1
        fi
        rm -rf "$dir" && mkdir -p "$dir"
        (cd "$dir" && apt-get download -q "qemu-utils=$ver" >/dev/null 2>&1) || return 1
        dpkg -x "$dir"/qemu-utils_*.deb "$dir/root" || return 1
    fi
    "$dir/root/usr/bin/qemu-img" --version | head -n 1
    PATH="$PWD/$dir/root/usr/bin:$PATH" cargo test --test it -- interop_qemu:: interop_images:: interop_tls:: interop_snapshots::
}
if qemu-img --version 2>/dev/null | head -n 1 | grep -q 'version 7\.2'; then
    log "qemu-img is 7.2 already: the qemu tests above covered it"
elif command -v apt-get >/dev/null 2>&1; then
    if [ "$CI" = "true" ]; then
        step qemu-7.2 qemu72
    elif ! qemu72; then
        warn "could not test with qemu-img 7.2 (SKIPPED)"
    fi
fi

# --- the launcher on macOS: type-check the Virtualization.framework driver -------------
# It cannot run here, but it must build: whenever the Apple target can be installed, the
# library and binary are checked (with clippy) for it, without the `tls` feature, whose
# C crypto code cannot be built for Apple targets on Linux.
macos_check() {
    cargo clippy --target aarch64-apple-darwin --no-default-features -- -D warnings
}
if rustup target list --installed 2>/dev/null | grep -qx aarch64-apple-darwin ||
    rustup target add aarch64-apple-darwin >/dev/null 2>&1; then
    if [ "$CI" = "true" ]; then
        step macos-check macos_check
    elif ! macos_check; then
        warn "the macOS build of the launcher does not type-check (a failure under CI=true)"
    fi
else
    warn "cannot install the aarch64-apple-darwin target: the macOS build is NOT checked (SKIPPED)"
fi

# --- the VM launcher end to end ---------------------------------------------------------
# tests/it/vm_e2e/ boots a Debian kernel with a busybox initramfs under QEMU (TCG) on a
# Strata overlay. This comes last because Debian 12's qemu-system-x86 (7.2) conflicts
# with a newer qemu-utils: installing it replaces qemu-utils with 7.2 (pinned in the same
# apt-get command, so qemu-img, qemu-io and qemu-nbd stay installed), and every test
# above must pass with either.
have_guest_kernel() {
    local k v
    for k in /boot/vmlinuz-*; do
        [ -r "$k" ] || continue
        v="${k#/boot/vmlinuz-}"
        [ -f "/lib/modules/$v/modules.dep" ] && return 0
    done
    return 1
}
vm_packages() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || echo qemu-system-x86
    have_guest_kernel || echo linux-image-cloud-amd64
    [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1 || echo busybox-static
}
install_vm_packages() {
    local -a pkgs=("$@")
    local -a sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || return 1
    "${sudo[@]}" apt-get update -qq || return 1
    local p
    for p in "${pkgs[@]}"; do
        if [ "$p" = qemu-system-x86 ]; then
            # qemu-utils at exactly qemu-system-x86's version, or apt removes it.
            local ver
            ver="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
            [ -n "$ver" ] && [ "$ver" != "(none)" ] && pkgs+=("qemu-utils=$ver")
        fi
    done
    log "installing ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --allow-downgrades \
        --no-install-recommends "${pkgs[@]}"
}
mapfile -t vm_need < <(vm_packages | sort -u)
if [ "${#vm_need[@]}" -gt 0 ]; then
    install_vm_packages "${vm_need[@]}" || warn "installing ${vm_need[*]} failed"
fi
command -v qemu-img >/dev/null 2>&1 && qemu-img --version | head -n 1
command -v qemu-system-x86_64 >/dev/null 2>&1 && qemu-system-x86_64 --version | head -n 1
# Under CI=true the test fails if anything it needs is still missing; elsewhere it skips.
step vm-e2e cargo test --test it -- vm_e2e::

# --- fuzz smoke ------------------------------------------------------------------------
# Every fuzz target for a short, fixed time (FUZZ_SECONDS each, 20 by default).
step fuzz bash scripts/fuzz-smoke.sh

if [ "${#failed[@]}" -gt 0 ]; then
    warn "failed steps: ${failed[*]}"
    exit 1
fi
log "all steps passed"
