#!/bin/sh
# Runs in the guest (as /guest-test.sh): writes DATA MiB (data_mib= on the
# kernel command line, default 96) of random data to a tmpfs file and
# checksums it once, then checks it every second, printing
# its uptime, while the host pauses, snapshots, ends the VMM and restores
# it (the guest does not notice), and inflates and deflates the balloon.
# Finishes a few rounds after it has seen the balloon's pages go and come
# back.
. /guest-lib.sh
t0=$(total)
mkdir -p /mnt && mount -t tmpfs -o size=50% tmpfs /mnt || exit 1
data=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^data_mib=//p')
dd if=/dev/urandom of=/mnt/data bs=1M count="${data:-96}" 2>/dev/null || exit 1
sum=$(md5sum /mnt/data | cut -d' ' -f1)
echo "GUEST-READY MemTotal=$t0 sum=$sum"
phase=inflate
i=0
left=4
while [ $i -lt 900 ] && [ $left -gt 0 ]; do
    s=$(md5sum /mnt/data | cut -d' ' -f1)
    [ "$s" = "$sum" ] || { echo "GUEST-DATA-CORRUPT round=$i sum=$s"; exit 1; }
    t=$(total)
    echo "GUEST-CHECK round=$i uptime=$(cut -d' ' -f1 /proc/uptime) MemTotal=$t"
    balloon_phase "$t"
    [ $phase = finished ] && left=$((left - 1))
    i=$((i + 1))
    sleep 1
done
echo "GUEST-WORKLOAD-OK rounds=$i phase=$phase sum=$sum"
