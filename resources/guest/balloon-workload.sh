#!/bin/sh
# Runs in the guest (as /guest-test.sh): dirties and frees most of memory so
# the host has it allocated, then keeps a checksummed workload going while
# the host inflates and deflates the balloon, reporting what it sees.
# Without deflate-on-OOM the balloon's pages leave MemTotal, so the guest
# watches MemTotal drop and come back.
. /guest-lib.sh
t0=$(total)
mkdir -p /mnt && mount -t tmpfs -o size=90% tmpfs /mnt || exit 1
dd if=/dev/zero of=/mnt/fill bs=1M count=$((t0 * 8 / 10 / 1024)) 2>/dev/null || exit 1
rm /mnt/fill
echo "GUEST-READY MemTotal=$t0"
phase=inflate
# look: notes the balloon's inflate and deflate as MemTotal shows them.
# Called every second, so that no phase of the host's passes unseen.
look() {
    t=$(total)
    balloon_phase "$t"
}
i=0
left=5
while [ $i -lt 300 ] && [ $left -gt 0 ]; do
    dd if=/dev/urandom of=/mnt/work bs=1M count=32 2>/dev/null || exit 1
    sum1=$(md5sum /mnt/work | cut -d' ' -f1)
    sleep 1
    look
    sum2=$(md5sum /mnt/work | cut -d' ' -f1)
    [ "$sum1" = "$sum2" ] || { echo "GUEST-WORKLOAD-CORRUPT round $i"; exit 1; }
    rm /mnt/work
    # Free page reporting hands freed memory back 2 s after a free: wait
    # for it, so that each round faults its memory in again through the
    # host's fault handler (racing the balloon's discards).
    for _ in 1 2 3; do
        sleep 1
        look
    done
    echo "GUEST-MEM MemTotal=$t round=$i"
    # Keep working a few rounds after the deflate, under the host's eyes.
    [ $phase = finished ] && left=$((left - 1))
    i=$((i + 1))
done
echo "GUEST-WORKLOAD-OK rounds=$i phase=$phase"
