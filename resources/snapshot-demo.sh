#!/bin/sh
# Boots a guest whose workload checksums 96 MiB of data every second, with
# a balloon and a virtio-mem window of which 128 MiB are plugged,
# snapshots it (PUT /vm paused, PUT /snapshot), ends the VMM, and restores
# the snapshot in a new VMM process, once per restore mode given
# (MODES="lazy eager"), each time inflating the balloon to half the guest
# and unplugging all of virtio-mem right away, while memory is still
# streaming in, then deflating; the
# guest carries on (console, uptime, checksums) and powers off. Prints
# timings as KEY=VALUE lines. Runs wherever /dev/kvm can run the guest:
# inside the L1, or on a host with vmx/svm. POSIX sh.
#
# Environment: VMM, VMMCTL, KERNEL, INITRD, MEMORY_MIB (512), DATA_MIB (the
# guest's checksummed data, 96), MODES.
VMM=${VMM:-/bin/vmm}
VMMCTL=${VMMCTL:-/bin/vmmctl}
KERNEL=${KERNEL:-/guest/vmlinux}
INITRD=${INITRD:-/guest/snapshot.cpio.gz}
MEMORY_MIB=${MEMORY_MIB:-512}
MODES=${MODES:-lazy eager}
DATA_MIB=${DATA_MIB:-96}
TARGET_MIB=$((MEMORY_MIB / 2))
dir=$(mktemp -d /tmp/snapshot-demo.XXXXXX)
snap=$dir/snap

now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
field() { "$VMMCTL" --sock "$1" GET "$2" | grep -o "\"$3\": [0-9]*" | head -1 | grep -o '[0-9]*$'; }
# Waits up to $3 s for $2 in the file $1.
wait_line() {
    n=0
    until grep -q "$2" "$1" 2>/dev/null; do
        sleep 0.2
        n=$((n + 1))
        [ $n -lt $(($3 * 5)) ] || { echo "timed out waiting for $2 in $1"; return 1; }
    done
}
wait_actual() {
    n=0
    while [ "$(field "$1" /balloon actual_mib)" != "$2" ]; do
        sleep 1
        n=$((n + 1))
        [ $n -lt 300 ] || { echo "the balloon is stuck at $(field "$1" /balloon actual_mib) MiB, wanted $2"; return 1; }
    done
}
consoles() { for f in "$dir"/serial-*; do echo "--- $f ---"; cat "$f"; done; }
trap consoles EXIT

echo "== booting"
"$VMM" --kernel "$KERNEL" --initrd "$INITRD" --memory "${MEMORY_MIB}M" \
    --balloon --virtio-mem 256M --api-sock "$dir/boot.sock" --serial "file:$dir/serial-boot" \
    --cmdline "console=ttyS0 reboot=k panic=-1 noxsave memhp_default_state=online_movable data_mib=$DATA_MIB" &
vmm=$!
wait_line "$dir/serial-boot" "GUEST-READY" 300 || exit 1
"$VMMCTL" --sock "$dir/boot.sock" PUT /memory '{"requested_mib": 128, "wait_ms": 60000}' | tr -d '\n' | sed 's/^/PLUGGED /'
echo
wait_line "$dir/serial-boot" "GUEST-CHECK round=3" 300 || exit 1
used=$(field "$dir/boot.sock" /vm host_allocated_mib)
t=$(now)
"$VMMCTL" --sock "$dir/boot.sock" PUT /vm '{"state": "paused"}' -- PUT /snapshot "{\"dir\": \"$snap\"}" || exit 1
echo "SNAPSHOT snapshot_s=$(elapsed "$t") guest_used_mib=$used file_mib=$(du -m "$snap/memory" | cut -f1) apparent_mib=$(($(stat -c %s "$snap/memory") >> 20))"
last=$(grep GUEST-CHECK "$dir/serial-boot" | tail -1)
echo "PAUSED-AT $last"
kill -TERM $vmm
wait $vmm
sum_before=$(md5sum "$snap/memory" "$snap/state" | md5sum | cut -d' ' -f1)

for mode in $MODES; do
    echo "== restoring ($mode)"
    sock=$dir/$mode.sock
    serial=$dir/serial-$mode
    t=$(now)
    "$VMM" --restore "$snap" --restore-mode "$mode" --api-sock "$sock" --serial "file:$serial" --stats &
    vmm=$!
    # Pages fetched from the memory file in the first second.
    until [ -S "$sock" ]; do sleep 0.05; done
    running=$(elapsed "$t")
    sleep 1
    fetched=$(field "$sock" /metrics pages_installed)
    # The guest's next line, from the restored VMM.
    wait_line "$serial" "GUEST-CHECK" 120 || exit 1
    first=$(elapsed "$t")
    "$VMMCTL" --sock "$sock" PUT /balloon "{\"target_mib\": $TARGET_MIB}" || exit 1
    "$VMMCTL" --sock "$sock" PUT /memory '{"requested_mib": 0}' || exit 1
    wait_actual "$sock" "$TARGET_MIB" || exit 1
    "$VMMCTL" --sock "$sock" PUT /memory '{"requested_mib": 0, "wait_ms": 60000}' | tr -d '\n' | sed "s/^/UNPLUGGED mode=$mode /"
    echo
    echo "RESTORED mode=$mode running_s=$running pages_first_second=$fetched first_response_s=$first inflated_s=$(elapsed "$t") first_line=$(grep GUEST-CHECK "$serial" | head -1 | tr ' ' ',')"
    "$VMMCTL" --sock "$sock" GET /balloon | tr -d '\n' | sed 's/^/BALLOON-AFTER-INFLATE /'
    echo
    echo "HOST-INFLATED mode=$mode allocated_mib=$(field "$sock" /vm host_allocated_mib)"
    "$VMMCTL" --sock "$sock" PUT /balloon '{"target_mib": 0}' || exit 1
    wait_actual "$sock" 0 || exit 1
    wait $vmm
    code=$?
    grep -E "GUEST-(SAW|WORKLOAD|DATA)" "$serial" | sed "s/^/$mode: /"
    echo "VMM-EXIT mode=$mode code=$code"
    [ $code = 0 ] || exit 1
done
sum_after=$(md5sum "$snap/memory" "$snap/state" | md5sum | cut -d' ' -f1)
[ "$sum_before" = "$sum_after" ] && echo "SNAPSHOT-UNCHANGED yes" || echo "SNAPSHOT-UNCHANGED no"
