#!/bin/sh
# Boots the guest with a virtio-balloon and drives it through the API:
# prints the host's and the guest's view of memory, inflates to half the
# guest, waits for the guest's balloon to reach the target, deflates.
# Runs wherever /dev/kvm can run the guest: inside the L1 (as
# /guest/balloon-demo.sh) or directly on a host with vmx/svm. POSIX sh, so
# busybox runs it; l1-lib.sh must be beside it.
#
# Environment: INITRD (path), MEMORY_MIB (512), TARGET_MIB (half), VCPUS (1),
# VMM_ARGS (more VMM options, split on spaces), and l1-lib.sh's (VMM,
# VMMCTL, KERNEL, VMM_CPU).
INITRD=${INITRD:-/guest/balloon.cpio.gz}
MEMORY_MIB=${MEMORY_MIB:-512}
TARGET_MIB=${TARGET_MIB:-$((MEMORY_MIB / 2))}
VCPUS=${VCPUS:-1}
# shellcheck source-path=SCRIPTDIR source=l1-lib.sh
. "$(dirname "$0")/l1-lib.sh"
l1_workdir balloon-demo

guest_line() { grep "$1" "$serial" | tail -1; }
# The VMM's resident memory (guest RAM included: it is mapped once).
rss_mib() { awk '/^VmRSS/ { print int($2 / 1024) }' "/proc/$vmm/status"; }

# shellcheck disable=SC2086 # VMM_ARGS is a list of options
start_vmm --vcpus "$VCPUS" --mem-backend memfd --fault-handler uffd --balloon ${VMM_ARGS:-}
wait_guest GUEST-READY || exit 1

wait_actual() {
    wait_field /balloon actual_mib "$1" || return 1
    echo "BALLOON-SECONDS target=$1 s=$n"
}

echo "== before: guest $(guest_line GUEST-READY | cut -d' ' -f2), host memfd allocated $(field /vm host_allocated_mib) MiB"
echo "HOST-BEFORE allocated_mib=$(field /vm host_allocated_mib) rss_mib=$(rss_mib)"
echo "== inflating the balloon to $TARGET_MIB MiB (PUT /balloon)"
echo "FAULTS-BEFORE-INFLATE pages_installed=$(field /metrics pages_installed)"
"$VMMCTL" --sock "$sock" PUT /balloon "{\"target_mib\": $TARGET_MIB}" || exit 1
wait_actual "$TARGET_MIB" || exit 1
echo "FAULTS-AFTER-INFLATE pages_installed=$(field /metrics pages_installed)"
echo "HOST-INFLATED allocated_mib=$(field /vm host_allocated_mib) rss_mib=$(rss_mib)"
sleep 3
echo "== inflated: guest $(guest_line GUEST-MEM | cut -d' ' -f2), host memfd allocated $(field /vm host_allocated_mib) MiB"
"$VMMCTL" --sock "$sock" GET /balloon
echo "== deflating the balloon to 0 MiB"
"$VMMCTL" --sock "$sock" PUT /balloon '{"target_mib": 0}' || exit 1
wait_actual 0 || exit 1
echo "HOST-DEFLATED allocated_mib=$(field /vm host_allocated_mib) rss_mib=$(rss_mib)"
sleep 3
echo "FAULTS-SETTLED pages_installed=$(field /metrics pages_installed) huge_fills=$(field /metrics huge_fills)"
echo "== deflated: guest $(guest_line GUEST-MEM | cut -d' ' -f2), host memfd allocated $(field /vm host_allocated_mib) MiB (pages come back as the guest touches them)"
finish_vmm
