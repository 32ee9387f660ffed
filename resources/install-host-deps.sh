#!/usr/bin/env bash
# Installs the Debian host packages needed to fetch the guest kernel, build
# the initramfs images, boot the nested QEMU-TCG L1 VM, and build the Rust
# crates (libclang-dev for bindgen).
#
# Usage: resources/install-host-deps.sh [EXTRA_PACKAGE ...]
#   e.g. resources/install-host-deps.sh shellcheck
#
# Packages already installed (dpkg -s) are skipped; `apt-get update` runs only
# when a missing package has no install candidate in the current lists (or the
# lists are absent), and at most once per invocation.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

PACKAGES=(
    qemu-system-x86 # the L1 VM (TCG with emulated SVM)
    cpio            # initramfs packing
    gzip            # initramfs compression
    lz4             # vmlinux extraction from the bzImage
    xz-utils        # decompressing .ko.xz modules if a kernel has them
    zstd            # decompressing .ko.zst modules if a kernel has them
    file            # sanity checks on extracted files
    curl
    ca-certificates
    libclang-dev    # bindgen (userfaultfd crate)
    g++             # libFuzzer, built by the fuzz crates (CI checks them)
    coreutils       # timeout, sha256sum
    findutils
)
PACKAGES+=("$@")

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
    log "host packages: all ${#PACKAGES[@]} already installed"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    die "need root to install: ${missing[*]}"
fi
export DEBIAN_FRONTEND=noninteractive

has_candidate() {
    local c
    c="$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
    [[ -n "$c" && "$c" != "(none)" ]]
}

updated=0
apt_update() {
    ((updated)) && return 0
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    updated=1
}

for p in "${missing[@]}"; do
    if ! has_candidate "$p"; then
        apt_update
        break
    fi
done
for p in "${missing[@]}"; do
    has_candidate "$p" || die "package '$p' is not available from the configured apt sources"
done

log "installing: ${missing[*]}"
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
    # Stale lists (e.g. a package version removed from the mirror): refresh once and retry.
    if ((updated == 0)); then
        log "install failed; refreshing package lists and retrying"
        apt_update
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
            die "apt-get install failed for: ${missing[*]}"
    else
        die "apt-get install failed for: ${missing[*]}"
    fi
fi
log "host packages installed"
