#!/bin/sh
# Boots the guest with a virtio-balloon and drives it through the API:
# prints the host's and the guest's view of memory, inflates to half the
# guest, waits for the guest's balloon to reach the target, deflates.
# Runs wherever /dev/kvm can run the guest: inside the L1 (as /l1-script.sh)
# or directly on a host with vmx/svm. POSIX sh, so busybox runs it.
#
# Environment: VMM, VMMCTL, KERNEL, INITRD (paths), MEMORY_MIB (512),
# TARGET_MIB (half), VCPUS (1), VMM_CPU (CPU to pin the VMM to, optional).
VMM=${VMM:-/bin/vmm}
VMMCTL=${VMMCTL:-/bin/vmmctl}
KERNEL=${KERNEL:-/guest/vmlinux}
INITRD=${INITRD:-/guest/balloon.cpio.gz}
MEMORY_MIB=${MEMORY_MIB:-512}
TARGET_MIB=${TARGET_MIB:-$((MEMORY_MIB / 2))}
VCPUS=${VCPUS:-1}
VMM_CPU=${VMM_CPU:-${L1_VMM_CPU:-}}
dir=$(mktemp -d /tmp/balloon-demo.XXXXXX)
sock=$dir/api.sock
serial=$dir/serial.log

field() { "$VMMCTL" --sock "$sock" GET "$1" | grep -o "\"$2\": [0-9]*" | head -1 | grep -o '[0-9]*$'; }
guest_line() { grep "$1" "$serial" | tail -1; }
# The VMM's resident memory (guest RAM included: it is mapped once).
rss_mib() { awk '/^VmRSS/ { print int($2 / 1024) }' "/proc/$vmm/status"; }
pin=""
[ -n "$VMM_CPU" ] && pin="taskset -c $VMM_CPU"

$pin "$VMM" --kernel "$KERNEL" --initrd "$INITRD" --memory "${MEMORY_MIB}M" --vcpus "$VCPUS" \
    --mem-backend memfd --fault-handler uffd --balloon --api-sock "$sock" \
    --serial "file:$serial" --stats &
vmm=$!
trap 'echo "--- guest console ---"; cat "$serial"' EXIT

n=0
until grep -q GUEST-READY "$serial" 2>/dev/null; do
    sleep 1
    n=$((n + 1))
    kill -0 $vmm 2>/dev/null || { echo "the VMM exited early"; exit 1; }
    [ $n -lt 300 ] || { echo "the guest never got ready"; exit 1; }
done

wait_actual() {
    n=0
    while [ "$(field /balloon actual_mib)" != "$1" ]; do
        sleep 1
        n=$((n + 1))
        [ $n -lt 300 ] || { echo "the balloon is stuck at $(field /balloon actual_mib) MiB, wanted $1"; return 1; }
    done
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
echo "== deflated: guest $(guest_line GUEST-MEM | cut -d' ' -f2), host memfd allocated $(field /vm host_allocated_mib) MiB (pages come back as the guest touches them)"
wait $vmm
code=$?
echo "VMM-EXIT-CODE=$code"
exit $code
