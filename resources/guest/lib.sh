# Shell functions for the guest workloads: every guest image has this file
# as /guest-lib.sh (resources/build-initramfs.sh puts it there); a workload
# sources it with `. /guest-lib.sh`.

# total: the guest's MemTotal, in KiB.
total() { grep MemTotal /proc/meminfo | grep -o '[0-9]*'; }

# balloon_phase KIB: moves $phase on (inflate, then deflate, then finished)
# as a MemTotal of KIB shows the balloon's pages go (below three quarters of
# $t0, the MemTotal before) and come back (within 5% of $t0), printing
# GUEST-SAW-INFLATE and GUEST-SAW-DEFLATE. Without deflate-on-OOM the
# balloon takes its pages out of MemTotal.
balloon_phase() {
    if [ "$phase" = inflate ] && [ "$1" -lt $((t0 * 3 / 4)) ]; then
        echo "GUEST-SAW-INFLATE MemTotal=$1"
        phase=deflate
    elif [ "$phase" = deflate ] && [ "$1" -gt $((t0 - t0 / 20)) ]; then
        echo "GUEST-SAW-DEFLATE MemTotal=$1"
        phase=finished
    fi
}
