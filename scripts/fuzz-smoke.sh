#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a short time and fails if any crashes.
#
# Usage: scripts/fuzz-smoke.sh [SECONDS]   (default: $FUZZ_SECONDS, else 20 per target)
#
# Needs a nightly toolchain (cargo-fuzz builds with sanitizers); installs cargo-fuzz if it
# is missing. Set FUZZ_SKIP_IF_UNAVAILABLE=1 to skip (exit 0) instead of failing when the
# nightly toolchain or cargo-fuzz cannot be had. New inputs the fuzzer finds go to a
# temporary directory, so the checked-in seed corpus (fuzz/corpus/<target>) stays as is;
# crash reproducers land in fuzz/artifacts/<target>/ (git-ignored).
set -euo pipefail

secs="${1:-${FUZZ_SECONDS:-20}}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

unavailable() {
    echo "fuzz-smoke: $*" >&2
    if [[ "${FUZZ_SKIP_IF_UNAVAILABLE:-0}" == 1 ]]; then
        echo "fuzz-smoke: skipped" >&2
        exit 0
    fi
    exit 1
}

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    unavailable "the $toolchain toolchain is not installed (rustup toolchain install $toolchain)"
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz || unavailable "could not install cargo-fuzz"
fi

cd "$fuzz_dir"
mapfile -t targets < <(cargo "+$toolchain" fuzz list)
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "fuzz-smoke: no fuzz targets found in $fuzz_dir" >&2
    exit 1
fi

echo "fuzz-smoke: building ${targets[*]}"
cargo "+$toolchain" fuzz build

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "corpus/$t"
    log="$work/$t.log"
    echo "fuzz-smoke: $t for ${secs}s"
    # First corpus dir receives new inputs; the seeds are read from the second.
    if cargo "+$toolchain" fuzz run "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n1)"
        echo "fuzz-smoke: $t ok (${execs:-?} executions)"
    else
        echo "fuzz-smoke: $t FAILED; last lines of its log:" >&2
        tail -n 60 "$log" >&2
        failed+=("$t")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz-smoke: crashed: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz-smoke: all ${#targets[@]} targets ran ${secs}s without a crash"
