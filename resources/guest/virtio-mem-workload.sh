#!/bin/sh
# Runs in the guest (as /guest-test.sh): follows the memory the host plugs
# and unplugs through virtio-mem. It fills memory past what boot RAM has
# free once the host plugged 256 MiB, watches the memory go again, and
# keeps faulting in fresh memory while the host unplugs a second time.
# Needs memhp_default_state=online_movable on the kernel command line.
total() { grep MemTotal /proc/meminfo | grep -o '[0-9]*'; }
free_kb() { grep MemFree /proc/meminfo | grep -o '[0-9]*'; }
t0=$(total)
mkdir -p /mnt && mount -t tmpfs -o size=2G tmpfs /mnt || exit 1
echo "GUEST-READY MemTotal=$t0"

# wait_total OP KB: waits until MemTotal OP KB (OP: -gt or -lt).
wait_total() {
    n=0
    until [ "$(total)" "$1" "$2" ]; do
        sleep 1
        n=$((n + 1))
        [ $n -lt 300 ] || { echo "GUEST-TIMEOUT MemTotal=$(total), waited for $1 $2"; return 1; }
    done
}
grown=$((t0 + 200 * 1024))
shrunk=$((t0 + 50 * 1024))

wait_total -gt $grown || exit 1
echo "GUEST-SAW-PLUG MemTotal=$(total)"
fill=$((($(free_kb) - 48 * 1024) / 1024))
dd if=/dev/zero of=/mnt/fill bs=1M count=$fill 2>/dev/null || { echo "GUEST-FILL-FAILED"; exit 1; }
echo "GUEST-USED-HOTPLUG filled_mib=$fill MemFree=$(free_kb)"
rm /mnt/fill

wait_total -lt $shrunk || exit 1
echo "GUEST-SAW-UNPLUG MemTotal=$(total)"

wait_total -gt $grown || exit 1
echo "GUEST-SAW-REPLUG MemTotal=$(total)"
i=0
while [ "$(total)" -gt $shrunk ] && [ $i -lt 300 ]; do
    dd if=/dev/zero of=/mnt/churn bs=1M count=64 2>/dev/null || { echo "GUEST-CHURN-FAILED"; exit 1; }
    rm /mnt/churn
    i=$((i + 1))
done
echo "GUEST-CHURNED rounds=$i MemTotal=$(total)"
# Give the host time to look at the unplugged window before powering off.
sleep 5
