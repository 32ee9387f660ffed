# shellcheck shell=bash
# Shared by the L1 benchmarks (bench-boot.sh, bench-balloon.sh): builds what
# they need and runs one L1 that holds both this VMM and QEMU, so the two are
# measured side by side under the same nested KVM. Source it.

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# bench_prepare: host packages, the guest kernel, the default guest
# initramfs, and release builds of vmm and vmmctl.
bench_prepare() {
    "$RESOURCES_DIR/install-host-deps.sh"
    fetch_kernels
    "$RESOURCES_DIR/build-initramfs.sh"
    log "building vmm and vmmctl (release)"
    (cd "$REPO_ROOT" && cargo build --release -p vmm --bins)
}

# check_shmem_thp MODE: dies unless MODE is a shmem huge page policy the
# benchmarks may set in the L1 (empty: leave the L1 kernel's own).
check_shmem_thp() {
    case "$1" in
        "" | never | advise | within_size | always) ;;
        *) die "--shmem-thp takes never, advise, within_size or always" ;;
    esac
}

# bench_run_l1 NAME SCRIPT [--add SRC:DEST ...]: builds an L1 with the VMM,
# vmmctl, QEMU (binary, firmware) and the guest kernel and initramfs, runs
# SCRIPT in it and leaves the console in build/bench/NAME.log. An L1 that
# dies before it is ready (under TCG the 6.12 L1 now and then takes an
# `Oops: int3` while it patches its own code) is booted again, up to three
# times in all, as the tests do.
bench_run_l1() {
    local name="$1" script="$2" dir="$GUEST_CACHE/bench"
    shift 2
    need_cmd qemu-system-x86_64 "Debian package qemu-system-x86"
    mkdir -p "$dir"
    "$RESOURCES_DIR/build-l1.sh" --out "$dir/l1-$name.cpio.gz" --script "$script" \
        --add "$BIN_DIR/vmm:/bin/vmm" \
        --add "$BIN_DIR/vmmctl:/bin/vmmctl" \
        --add "$(command -v qemu-system-x86_64):/usr/bin/" \
        --add /usr/share/qemu:/usr/share/qemu \
        --add "$GUEST_KERNEL_DIR/vmlinux:/guest/vmlinux" \
        --add "$(guest_initramfs_path):/guest/guest-initramfs.cpio.gz" \
        "$@"
    local attempt rc
    for attempt in 1 2 3; do
        rc=0
        "$RESOURCES_DIR/run-l1.sh" --initrd "$dir/l1-$name.cpio.gz" --timeout 1500 \
            --log "$dir/$name.log" >&2 || rc=$?
        if [[ $rc -ne 124 && $rc -ne 125 ]] || grep -q -a L1-READY "$dir/$name.log"; then
            return "$rc"
        fi
        log "the L1 died before it was ready (attempt $attempt of 3)"
    done
    return "$rc"
}

# bench_l1_helpers: shell functions for the L1 scripts of the benchmarks.
# `now` is the L1's uptime (10 ms steps), `since T` the seconds since T,
# `shmem_mib PID` a process's RssShmem, `until_equal WANT CMD...` polls CMD
# every 50 ms until it prints WANT, `vmm_put_wait PATH BODY` sends this
# VMM's API (/tmp/api.sock) a PUT whose BODY has a "wait_ms" and returns
# once the answer says the guest reached the target, leaving in resize_s
# the time vmmctl --time measured from the request's first byte to the
# answer, `wait_marker FILE MARKER` waits until
# the guest console FILE shows MARKER (giving up if the VMM, $pid, exits, the
# guest reports GUEST-TIMEOUT or GUEST-FILL-FAILED, or 5 minutes pass).
# For QEMU driven over a QMP pipe (fds 3
# and 4): `qmp CMD` sends CMD and prints its reply, keeping events in
# /tmp/qmp.events; `qmp_events NAME FIELD VMM PHASE` prints every NAME
# event since the file was last cleared as "BENCH-EVENT VMM run=$run
# phase=PHASE ts=SECONDS actual=FIELD-VALUE" and clears it. QEMU sends some
# events at most once a second (with the latest timestamp), so qmp_events
# waits for the last one first.
# `kvm_hist_start` starts histograms of KVM's exits by reason and of its
# nested page faults by 2 MiB of guest-physical address (the kvm_exit and
# kvm_page_fault tracepoints, where the L1 kernel has hist triggers) when
# KVM_HIST_ON is set (tracing costs each exit a little: not for timed runs);
# `kvm_hist_stop VMM PHASE` prints and drops them as "BENCH-KVM-EXITS VMM
# run=$run phase=PHASE 0xREASON=COUNT ..." (SVM exit codes: 0x400 nested
# page fault, 0x60 interrupt, 0x7b I/O port, 0x7c MSR, 0x72 CPUID, 0x78
# HLT, 0x64 virtual interrupt window) and "BENCH-KVM-NPF VMM run=$run
# phase=PHASE MIB=COUNT ..." (faults per 2 MiB, keyed by its first MiB),
# "BENCH-KVM-RIP VMM run=$run phase=PHASE 0xREASON@GUEST_RIP=COUNT ..."
# (the 30 commonest exits by guest instruction: booted nokaslr, the
# guest's kallsyms name the code behind them), and each fallocate and
# madvise made meanwhile, and each mprotect over 1 ms, timed
# ("BENCH-SYSCALL").
bench_l1_helpers() {
    cat <<'SH'
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN { printf \"%.3f\", $(now) - $1 }"; }
shmem_mib() { awk '/^RssShmem/ { printf "%.1f", $2 / 1024 }' /proc/$1/status; }
until_equal() {
    want=$1
    shift
    n=0
    until [ "$("$@")" = "$want" ]; do
        sleep 0.05
        n=$((n + 1))
        [ $n -lt 6000 ] || { echo "BENCH-ERROR stuck waiting for $want"; return 1; }
    done
}
vmm_put_wait() {
    /bin/vmmctl --sock /tmp/api.sock --time PUT $1 "$2" >/tmp/put.out 2>/tmp/put.err
    resize_s=$(sed -n "s|^vmmctl: PUT $1: \([0-9.]*\) s\$|\1|p" /tmp/put.err)
    grep -q '"reached": *true' /tmp/put.out && [ -n "$resize_s" ] && return 0
    echo "BENCH-ERROR vmm did not reach $2: $(tr -d '\n' </tmp/put.out)"
    return 1
}
wait_marker() {
    n=0
    until grep -q "$2" $1 2>/dev/null; do
        sleep 0.2
        n=$((n + 1))
        kill -0 $pid 2>/dev/null || { echo "BENCH-ERROR the VMM exited before the guest printed $2"; cat $1; return 1; }
        grep -q -E 'GUEST-TIMEOUT|GUEST-FILL-FAILED' $1 && { echo "BENCH-ERROR the guest gave up"; cat $1; return 1; }
        [ $n -lt 1500 ] || { echo "BENCH-ERROR the guest never printed $2"; cat $1; return 1; }
    done
}
qmp() { echo "$1" >&3; while IFS= read -r reply <&4; do case "$reply" in *'"event"'*) echo "$reply" >>/tmp/qmp.events ;; *) echo "$reply"; return ;; esac; done; }
qmp_events() {
    sleep 1.2
    qmp '{"execute": "query-status"}' >/dev/null
    sed -n "s/.*\"seconds\": \([0-9]*\), \"microseconds\": \([0-9]*\).*\"$1\".*\"$2\": \([0-9]*\).*/\1 \2 \3/p" /tmp/qmp.events |
        while read -r sec usec value; do
            echo "BENCH-EVENT $3 run=$run phase=$4 ts=$sec.$(printf %06d "$usec") actual=$value"
        done
    : >/tmp/qmp.events
}
mount -t debugfs none /sys/kernel/debug 2>/dev/null
# scrub_l1_memory: when BENCH_SCRUB is set, writes every free page of the
# L1 (its free huge pages through a hugetlbfs file, the rest through a
# tmpfs file) and frees them again. The TCG running the L1 keeps the
# translations of code the last guest ran, and the first write to such a
# page pays for dropping them (about 12 ms per 2 MiB against 0.7 ms): which
# VMM draws those pages depends on the order the rows run in. Scrubbing
# before each boot hands every VMM the same clean memory, as real hardware
# would.
scrub_l1_memory() {
    [ -n "${BENCH_SCRUB:-}" ] || return 0
    mkdir -p /tmp/scrub-huge /tmp/scrub-small
    grep -q ' /tmp/scrub-huge ' /proc/mounts || mount -t hugetlbfs none /tmp/scrub-huge
    grep -q ' /tmp/scrub-small ' /proc/mounts || mount -t tmpfs -o size=95% none /tmp/scrub-small
    huge=$(awk '/^HugePages_Free:/ { print $2 * 2 }' /proc/meminfo)
    [ "$huge" -eq 0 ] || fallocate -l ${huge}M /tmp/scrub-huge/f
    rm -f /tmp/scrub-huge/f
    small=$(awk '/^MemFree:/ { print int($2 / 1024) - 160 }' /proc/meminfo)
    [ "$small" -le 0 ] || dd if=/dev/zero of=/tmp/scrub-small/f bs=1M count=$small 2>/dev/null
    rm -f /tmp/scrub-small/f
}
SYS_TRACE=/sys/kernel/debug/tracing
KVM_TRACE=$SYS_TRACE/events/kvm
KVM_NPF_HIST='hist:keys=fault_address.buckets=2097152:vals=hitcount:sort=fault_address:size=4096'
# One histogram of exits by (reason, guest RIP); the counts by reason are
# its sums (a second histogram on kvm_exit read back empty in the L1).
KVM_EXIT_HIST='hist:keys=exit_reason,guest_rip.hex:vals=hitcount:sort=hitcount.descending:size=16384'
# How the VMMs give memory back and fence it off: fallocate, madvise, and
# mprotect (printed when it takes over 1 ms: every process start makes some).
SYS_EVENTS='sys_enter_fallocate sys_exit_fallocate sys_enter_madvise sys_exit_madvise sys_enter_mprotect sys_exit_mprotect'
kvm_hist_start() {
    [ -n "${KVM_HIST_ON:-}" ] && [ -w $KVM_TRACE/kvm_exit/trigger ] || return 0
    echo "$KVM_EXIT_HIST" >$KVM_TRACE/kvm_exit/trigger 2>/dev/null
    echo "$KVM_NPF_HIST" >$KVM_TRACE/kvm_page_fault/trigger 2>/dev/null
    # Each call of $SYS_EVENTS, timed.
    echo >$SYS_TRACE/trace
    for e in $SYS_EVENTS; do
        echo 1 >$SYS_TRACE/events/syscalls/$e/enable 2>/dev/null
    done
    return 0
}
kvm_hist_stop() {
    [ -n "${KVM_HIST_ON:-}" ] && [ -w $KVM_TRACE/kvm_exit/trigger ] || return 0
    echo "BENCH-KVM-EXITS $1 run=$run phase=$2 $(awk '$4 == "guest_rip:" { sub(",", "", $3); n[sprintf("0x%x", $3)] += $8 } /Dropped:/ && $2 > 0 { print "dropped=" $2 } END { for (r in n) print r "=" n[r] }' $KVM_TRACE/kvm_exit/hist | sort -t= -k2 -rn | tr '\n' ' ')"
    echo "BENCH-KVM-NPF $1 run=$run phase=$2 $(sed -n 's/.*~ \([0-9]*\)-[0-9]* } hitcount: *\([0-9]*\).*/\1 \2/p' $KVM_TRACE/kvm_page_fault/hist | awk '{ printf "%d=%s ", $1 / 1048576, $2 }')"
    # The guest code behind the exits: the 30 commonest (reason, guest
    # RIP) pairs (symbolize with the guest's kallsyms; boot it nokaslr).
    echo "BENCH-KVM-RIP $1 run=$run phase=$2 $(awk '$4 == "guest_rip:" { sub(",", "", $3); printf "0x%x@%s=%s ", $3, $5, $8 }' $KVM_TRACE/kvm_exit/hist | cut -d' ' -f1-30)"
    for e in $SYS_EVENTS; do
        echo 0 >$SYS_TRACE/events/syscalls/$e/enable 2>/dev/null
    done
    awk '/sys_(fallocate|madvise|mprotect)\(/ { sub(":", "", $4); t[$1] = $4; a[$1] = $6 " " $7 " " $8 " " $9 " " $10 }
         /sys_(fallocate|madvise|mprotect) ->/ { sub(":", "", $4); if ($1 in t) { ms = ($4 - t[$1]) * 1000
             if ($5 !~ /mprotect/ || ms > 1) printf "%s %s %.1f ms\n", $5, a[$1], ms }; delete t[$1] }' \
        $SYS_TRACE/trace | sed "s/^/BENCH-SYSCALL $1 run=$run phase=$2 /" | head -40
    echo "!$KVM_EXIT_HIST" >$KVM_TRACE/kvm_exit/trigger 2>/dev/null
    echo "!$KVM_NPF_HIST" >$KVM_TRACE/kvm_page_fault/trigger 2>/dev/null
    return 0
}
SH
}
