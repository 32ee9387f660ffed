#!/usr/bin/env bash
# The main job: boots the stock Debian kernel under this VMM with guest RAM
# on a memfd whose faults are served by guest-mem's userfaultfd handler, and
# prints the guest's console and the VMM's memory statistics.
#
# On a host whose CPU has vmx/svm the VMM runs directly; otherwise (as on
# these machines, whose /dev/kvm cannot run a stock kernel) it runs inside
# the nested QEMU-TCG L1, automatically.
#
# Usage: resources/demo.sh [--memory SIZE] [--vcpus N]
set -euo pipefail
cd "$(dirname "$0")/.."
memory=512M
vcpus=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --memory) memory="$2"; shift 2 ;;
        --vcpus) vcpus="$2"; shift 2 ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "demo: unknown argument $1" >&2; exit 2 ;;
    esac
done

say() { echo "[demo] $*" >&2; }

say "installing host packages (first run only)"
resources/install-host-deps.sh
say "fetching the guest kernel and busybox, building the guest initramfs"
resources/fetch-kernel.sh
resources/build-initramfs.sh
say "building the VMM (release)"
cargo build --release -p vmm --bin vmm

vmm_args=(--kernel build/kernel/vmlinux --initrd build/guest-initramfs.cpio.gz
    --memory "$memory" --vcpus "$vcpus" --mem-backend memfd --fault-handler uffd --stats)

if grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
    say "hardware virtualization present: running the VMM directly"
    exec target/release/vmm "${vmm_args[@]}"
fi

say "no vmx/svm on this CPU: running the VMM inside the nested L1 (QEMU-TCG with SVM)"
work=build/demo
mkdir -p "$work"
cat > "$work/l1-demo.sh" <<SCRIPT
#!/bin/sh
echo "L1: starting the VMM on CPU \${L1_VMM_CPU:-1}"
taskset -c "\${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/vmlinux \
    --initrd /guest/guest-initramfs.cpio.gz --memory $memory --vcpus $vcpus \
    --mem-backend memfd --fault-handler uffd --stats
SCRIPT
resources/build-l1.sh --out "$work/l1-demo.cpio.gz" --script "$work/l1-demo.sh" \
    --add target/release/vmm:/bin/vmm \
    --add build/kernel/vmlinux:/guest/vmlinux \
    --add build/guest-initramfs.cpio.gz:/guest/
exec resources/run-l1.sh --initrd "$work/l1-demo.cpio.gz" --timeout 600 --log "$work/l1-demo.log"
