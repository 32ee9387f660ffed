#!/bin/sh
# Runs in the guest (as /guest-test.sh) for the poisoned-page L1 test. The
# host shrinks its huge page pool once it sees GUEST-POISON-READY, so the
# memory this script then fills cannot be served: the VMM poisons it and
# the guest takes machine checks. What the guest kernel makes of them is
# on the console (a killed process, or a panic for a kernel access).
echo "GUEST-CPU $(grep -m3 -e vendor_id -e "cpu family" -e "model name" /proc/cpuinfo | tr "\n\t" "  ")"
echo "GUEST-FLAGS $(grep -m1 flags /proc/cpuinfo)"
echo "GUEST-POISON-READY MemTotal=$(grep MemTotal /proc/meminfo | grep -o '[0-9]*')"
sleep 5
mkdir -p /mnt && mount -t tmpfs -o size=230m tmpfs /mnt
echo "GUEST-FILLING"
dd if=/dev/zero of=/mnt/fill bs=1M count=200 2>&1
echo "GUEST-FILL-DONE"
