#!/usr/bin/env bash
# The project's test command: installs what a fresh machine lacks, then runs
# every test of the workspace (host-only guest-mem races and model checks,
# device and boot unit tests, KVM payload guests on this machine's /dev/kvm,
# and Linux guests booted under the VMM inside the nested L1).
set -euo pipefail
cd "$(dirname "$0")/.."
resources/install-host-deps.sh
echo "[test] cargo test --workspace" >&2
REQUIRE_L1=1 cargo test --workspace --release --no-fail-fast
