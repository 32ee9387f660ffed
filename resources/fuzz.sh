#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a bounded time each: the balloon's queue
# handling (devices/fuzz: balloon_queue), virtio-mem's request queue
# (devices/fuzz: virtio_mem_queue), the virtio-mmio transport's registers
# (devices/fuzz: mmio_transport), the device state loader of snapshots
# (devices/fuzz: device_state), the control API's request parser and
# router (vmm/fuzz: api_request) and the snapshot state file loader
# (vmm/fuzz: snapshot_state). Installs cargo-fuzz when it is
# missing. Fuzzing needs nightly-only compiler flags; on a stable toolchain
# they are enabled with RUSTC_BOOTSTRAP=1, for these fuzz builds only.
# Corpora are kept in build/fuzz/<target> so later runs start where the
# last one stopped; a crash leaves its input in <crate>/fuzz/artifacts/ and
# makes this script fail.
#
# Usage: resources/fuzz.sh [--seconds N] [TARGET...]
#   --seconds N  time per target (default 60)
#   TARGET       balloon_queue, virtio_mem_queue, mmio_transport, device_state,
#                api_request, snapshot_state (default: all six)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

seconds=60
targets=()
while (($#)); do
    case "$1" in
        --seconds) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--seconds needs a number"; seconds="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        balloon_queue | virtio_mem_queue | mmio_transport | device_state | api_request | snapshot_state) targets+=("$1"); shift ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
((${#targets[@]})) || targets=(balloon_queue virtio_mem_queue mmio_transport device_state api_request snapshot_state)

need_cmd cargo "install Rust with rustup"
need_cmd c++ "libFuzzer is built from source: Debian package g++"
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (cargo install --locked cargo-fuzz)"
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

crate_of() {
    case "$1" in
        balloon_queue | virtio_mem_queue | mmio_transport | device_state) echo devices ;;
        api_request | snapshot_state) echo vmm ;;
    esac
}

for t in "${targets[@]}"; do
    crate="$(crate_of "$t")"
    corpus="$GUEST_CACHE/fuzz/$t"
    mkdir -p "$corpus"
    log "fuzzing $t ($crate/fuzz) for ${seconds}s; corpus $corpus"
    if ! (cd "$REPO_ROOT/$crate" &&
        cargo fuzz run --fuzz-dir fuzz --features libfuzzer "$t" "$corpus" -- \
            -max_total_time="$seconds" -max_len=8192 -print_final_stats=1); then
        die "$t failed; the input is in $crate/fuzz/artifacts/$t/"
    fi
    log "$t: no failure in ${seconds}s ($(find "$corpus" -type f | wc -l) corpus inputs)"
done
