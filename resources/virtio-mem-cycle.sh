#!/bin/sh
# Boots the guest with a virtio-mem window and drives it through the API:
# plugs 256 MiB, lets the guest use it, unplugs it, plugs it again and
# unplugs it while the guest faults in fresh memory. Prints the host's view
# (the window's backing file and its allocation) at each step. Runs where
# /dev/kvm can run the guest: inside the L1 or on a host with vmx/svm.
# POSIX sh, so busybox runs it; l1-lib.sh must be beside it.
#
# Environment: INITRD (path), MEM_BACKEND (memfd, or hugetlbfs: huge pages
# for boot RAM and the window are reserved here), MEMORY_MIB (512),
# WINDOW_MIB (512), PLUG_MIB (256), and l1-lib.sh's (VMM, VMMCTL, KERNEL,
# VMM_CPU).
INITRD=${INITRD:-/guest/virtio-mem.cpio.gz}
MEMORY_MIB=${MEMORY_MIB:-512}
MEM_BACKEND=${MEM_BACKEND:-memfd}
WINDOW_MIB=${WINDOW_MIB:-512}
PLUG_MIB=${PLUG_MIB:-256}
# shellcheck source-path=SCRIPTDIR source=l1-lib.sh
. "$(dirname "$0")/l1-lib.sh"
l1_workdir virtio-mem

if [ "$MEM_BACKEND" = hugetlbfs ]; then
    pages=$(((MEMORY_MIB + WINDOW_MIB) / 2))
    echo $pages >/proc/sys/vm/nr_hugepages
    echo "HUGE-PAGES reserved=$(cat /proc/sys/vm/nr_hugepages) wanted=$pages"
fi
start_vmm --mem-backend "$MEM_BACKEND" --virtio-mem "${WINDOW_MIB}M" \
    --cmdline "console=ttyS0 reboot=k panic=-1 noxsave memhp_default_state=online_movable"

# request MIB: asks for MIB plugged and waits until the guest follows.
request() {
    "$VMMCTL" --sock "$sock" PUT /memory "{\"requested_mib\": $1}" || return 1
    wait_field /memory plugged_mib "$1" || return 1
    echo "PLUGGED-SECONDS requested=$1 s=$n"
}
# host MARKER: one snapshot of the window as the host sees it.
host() {
    m=$("$VMMCTL" --sock "$sock" GET /memory)
    num() { echo "$m" | grep -o "\"$1\": [0-9]*" | head -1 | grep -o '[0-9]*$'; }
    echo "$1 allocated_mib=$(num host_allocated_mib) file_mib=$(num backing_file_mib) plugged_mib=$(num plugged_mib)"
}

wait_guest GUEST-READY || exit 1
host HOT-BEFORE
echo "== plugging $PLUG_MIB MiB (PUT /memory)"
request "$PLUG_MIB" || exit 1
wait_guest GUEST-USED-HOTPLUG || exit 1
host HOT-USED
echo "== unplugging it"
request 0 || exit 1
host HOT-UNPLUGGED
wait_guest GUEST-SAW-UNPLUG || exit 1
echo "== plugging again, then unplugging while the guest faults in fresh memory"
request "$PLUG_MIB" || exit 1
wait_guest GUEST-SAW-REPLUG || exit 1
sleep 2
echo "FAULTS-BEFORE-UNPLUG pages_installed=$(field /metrics pages_installed)"
request 0 || exit 1
echo "FAULTS-AFTER-UNPLUG pages_installed=$(field /metrics pages_installed)"
host HOT-UNPLUGGED-UNDER-LOAD
"$VMMCTL" --sock "$sock" GET /memory
finish_vmm
