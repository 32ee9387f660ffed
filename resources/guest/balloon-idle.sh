#!/bin/sh
# Runs in the guest (as /guest-test.sh) for the balloon benchmark: dirties
# nearly all free memory once, so the host has it backed, frees it, then
# idles while the host inflates and deflates the balloon.
free_kb=$(grep MemFree /proc/meminfo | grep -o '[0-9]*')
mkdir -p /mnt && mount -t tmpfs -o size=95% tmpfs /mnt || exit 1
dd if=/dev/zero of=/mnt/fill bs=1M count=$(((free_kb - 24 * 1024) / 1024)) 2>/dev/null
rm -f /mnt/fill
echo "GUEST-READY MemFree=$(grep MemFree /proc/meminfo | grep -o '[0-9]*')"
while :; do sleep 3600; done
