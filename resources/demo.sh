#!/usr/bin/env bash
# The main job: boots the stock Debian kernel under this VMM with guest RAM
# on a memfd whose faults are served by guest-mem's userfaultfd handler and
# a virtio-balloon, then shows the balloon working: the host's and the
# guest's view of memory before, after inflating to half the guest through
# the API, and after deflating.
#
# On a host whose CPU has vmx/svm the VMM runs directly; otherwise (as on
# these machines, whose /dev/kvm cannot run a stock kernel) it runs inside
# the nested QEMU-TCG L1, automatically.
#
# Usage: resources/demo.sh [--memory MiB] [--vcpus N]
set -euo pipefail
cd "$(dirname "$0")/.."
memory=512
vcpus=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --memory) memory="$2"; shift 2 ;;
        --vcpus) vcpus="$2"; shift 2 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "demo: unknown argument $1" >&2; exit 2 ;;
    esac
done

say() { echo "[demo] $*" >&2; }
# shellcheck source-path=SCRIPTDIR source=lib.sh
. resources/lib.sh # BIN_DIR: where cargo puts the release binaries

say "installing host packages (first run only)"
resources/install-host-deps.sh
say "fetching the guest kernel and busybox, building the guest initramfs"
resources/fetch-kernel.sh
resources/build-initramfs.sh --out build/guest-balloon.cpio.gz \
    --extra resources/guest/balloon-workload.sh:/guest-test.sh
say "building the VMM (release)"
cargo build --release -p vmm --bins

if grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
    say "hardware virtualization present: running the VMM directly"
    VMM="$BIN_DIR/vmm" VMMCTL="$BIN_DIR/vmmctl" KERNEL=build/kernel/vmlinux \
        INITRD=build/guest-balloon.cpio.gz MEMORY_MIB="$memory" VCPUS="$vcpus" \
        exec sh resources/balloon-demo.sh
fi

say "no vmx/svm on this CPU: running the VMM inside the nested L1 (QEMU-TCG with SVM)"
work=build/demo
mkdir -p "$work"
cat > "$work/l1-demo.sh" <<SCRIPT
#!/bin/sh
MEMORY_MIB=$memory VCPUS=$vcpus sh /guest/balloon-demo.sh
SCRIPT
resources/build-l1.sh --out "$work/l1-demo.cpio.gz" --script "$work/l1-demo.sh" \
    --add "$BIN_DIR/vmm:/bin/vmm" \
    --add "$BIN_DIR/vmmctl:/bin/vmmctl" \
    --add build/kernel/vmlinux:/guest/vmlinux \
    --add build/guest-balloon.cpio.gz:/guest/balloon.cpio.gz \
    --add resources/balloon-demo.sh:/guest/balloon-demo.sh \
    --add resources/l1-lib.sh:/guest/l1-lib.sh
exec resources/run-l1.sh --initrd "$work/l1-demo.cpio.gz" --timeout 900 --log "$work/l1-demo.log"
