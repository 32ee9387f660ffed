#!/bin/sh
# Runs in the guest (as /guest-test.sh) for the virtio-mem benchmark. It
# dirties nearly all free boot memory once (so the host has boot RAM backed
# before it takes its baseline), then, each time the host plugs memory, waits
# until the plugged memory is online (memhp_default_state=online_movable),
# fills free memory once and frees it again, so the plugged blocks are backed
# on the host and the unplug has real memory to give back. It idles
# otherwise. The plug size comes from vmembench.plug_mib= on the kernel
# command line (default 256).
total() { grep MemTotal /proc/meminfo | grep -o '[0-9]*'; }
free_kb() { grep MemFree /proc/meminfo | grep -o '[0-9]*'; }
# fill: writes free memory but 48 MiB to tmpfs and deletes it again.
fill() {
    n=$((($(free_kb) - 48 * 1024) / 1024))
    dd if=/dev/zero of=/mnt/fill bs=1M count=$n 2>/dev/null || { echo "GUEST-FILL-FAILED"; return 1; }
    rm -f /mnt/fill
    echo "$n"
}
# wait_total ge|le KB: waits until MemTotal is at least / at most KB.
wait_total() {
    n=0
    while :; do
        t=$(total)
        case $1 in
            ge) [ "$t" -ge "$2" ] && return 0 ;;
            le) [ "$t" -le "$2" ] && return 0 ;;
        esac
        sleep 0.2
        n=$((n + 1))
        [ $n -lt 3000 ] || { echo "GUEST-TIMEOUT MemTotal=$t, waited for $1 $2"; return 1; }
    done
}

plug=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^vmembench.plug_mib=//p')
plug=${plug:-256}
mkdir -p /mnt && # size is only a limit: boot RAM plus whatever gets plugged must fit.
mount -t tmpfs -o size=64G tmpfs /mnt || exit 1
fill >/dev/null || exit 1
t0=$(total)
echo "GUEST-READY MemTotal=$t0 MemFree=$(free_kb)"
round=1
while :; do
    # Plugged memory counts once it is online; allow 8 MiB of slack.
    wait_total ge $((t0 + (plug - 8) * 1024)) || exit 1
    sleep 0.5
    filled=$(fill) || exit 1
    echo "GUEST-USED round=$round MemTotal=$(total) filled_mib=$filled"
    wait_total le $((t0 + 8 * 1024)) || exit 1
    echo "GUEST-SAW-UNPLUG round=$round MemTotal=$(total)"
    round=$((round + 1))
done
