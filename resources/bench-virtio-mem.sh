#!/usr/bin/env bash
# virtio-mem benchmark: this VMM's virtio-mem against QEMU's, on the same
# guest (Debian kernel, 512 MiB boot RAM, 1 vCPU, a 1 GiB virtio-mem window,
# memhp_default_state=online_movable) in the same L1, alternately. The guest
# dirties its free boot memory and idles; then 256 MiB are plugged, the
# guest fills free memory once (so the plugged blocks are backed on the
# host) and frees it, and the 256 MiB are unplugged again. Measured:
#   - plug and unplug time: from the request until the device's plugged
#     size equals the requested size, read from the L1's /proc/uptime
#     (10 ms steps). This VMM is asked with PUT /memory and "wait_ms",
#     which answers when the guest has reached the size, timed by vmmctl
#     --time from the request's first byte to its answer (the vmmctl
#     process's own start, ~50 ms in the L1, is in "request s" only); QEMU
#     has no such wait, so it is asked with a QMP
#     qom-set of requested-size over a pipe that is already open and its
#     size (qom-get) is polled every 50 ms. Also recorded: what QEMU's
#     request itself took and what one poll costs (the polling's
#     resolution);
#   - the same, timed by each VMM itself, free of polling: from the first
#     change of the plugged size to the one that reached the request (this
#     VMM's GET /memory last_resize; QEMU's MEMORY_DEVICE_SIZE_CHANGE event
#     timestamps);
#   - host memory returned: of what plug + use allocated on the host, the
#     share the unplug gives back, read two ways for both VMMs: the window
#     memfd's allocated bytes (st_blocks; GET /memory host_allocated_mib for
#     this VMM, stat of QEMU's window memfd in /proc/PID/fd for QEMU), and
#     the VMM process's RssShmem (guest RAM is a memfd for both).
# QEMU runs as -M q35 with virtio-mem-pci: microvm has no memory-device
# support (QEMU 7.2 realizes virtio-mem on its virtio-mmio bus and
# virtio-mem-pci on microvm,pcie=on, but never maps the window into the
# guest), so QEMU's guest also loads virtio_pci. Both guests use the same
# initramfs. QEMU's boot (SeaBIOS, PCI) is slower, but timing starts only
# once the guest is ready, so it compares the device paths.
# A benchmark, not a test: no thresholds. Prints a table and writes
# target/bench/virtio-mem.json (medians and every run).
#
# Usage: resources/bench-virtio-mem.sh [--runs N] [--memory MiB]
#            [--window MiB] [--plug MiB] [--shmem-thp MODE] [--scrub]
#
#   --runs N        runs per VMM, alternating (default 3)
#   --memory MiB    boot RAM (default 512)
#   --window MiB    virtio-mem window, a multiple of 128 and not equal to
#                   --memory (QEMU's window memfd is told apart by its size;
#                   default 1024)
#   --plug MiB      memory to plug and unplug, a multiple of 2 (default 256)
#   --shmem-thp M   the L1's shmem huge page policy for both VMMs' guest
#                   memory (never, advise, within_size, always; default: the
#                   L1 kernel's own, Debian's never)
#   --scrub         write and free the L1's free memory before each VMM's
#                   run (untimed), so neither inherits pages whose old guest
#                   code the TCG under the L1 must first forget
#                   (scrub_l1_memory in bench-lib.sh)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

runs=3
memory=512
window=1024
plug=256
shmem_thp=
scrub=
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --memory) memory="$2"; shift 2 ;;
        --window) window="$2"; shift 2 ;;
        --plug) plug="$2"; shift 2 ;;
        --shmem-thp) shmem_thp="$2"; shift 2 ;;
        --scrub) scrub=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
check_shmem_thp "$shmem_thp"
for v in "$runs" "$memory" "$window" "$plug"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--runs, --memory, --window and --plug take positive integers"
done
((window % 128 == 0)) || die "--window must be a multiple of 128 (MiB)"
((plug % 2 == 0 && plug <= window)) || die "--plug must be a multiple of 2 and at most --window"
((window != memory)) || die "--window must differ from --memory"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
# BENCH_VMM_LOG=devices=debug,vmm=debug: the VMM's log at that level, for
# finding where a request spends its time (printed as BENCH-VMM-LOG lines).
vmm_log="${BENCH_VMM_LOG:-}"
# BENCH_VMM_ARGS: added to this VMM's command line (e.g. "--readahead 0"
# or "--on-unservable report", which guards the window by protection).
vmm_args="${BENCH_VMM_ARGS:-}"
# BENCH_KVM_EXITS=1: KVM's exits by reason, nested page faults per 2 MiB
# and each fallocate/madvise timed, per phase, for both VMMs
# (BENCH-KVM-EXITS / BENCH-KVM-NPF / BENCH-SYSCALL lines;
# tracing slows every exit a little, so the times of such a run lean
# against the VMM that takes more).
# BENCH_GUEST_CMDLINE: added to both guests' command line (e.g.
# "ignore_loglevel virtio_mem.dyndbg=+p" shows the driver's steps);
# BENCH_GUEST_NOTES=N: kernel lines of each guest printed (default 20).
bench_prepare
[[ -f /usr/share/seabios/bios-256k.bin ]] ||
    die "/usr/share/seabios/bios-256k.bin not found (Debian package seabios), QEMU's q35 needs it"
image="$GUEST_CACHE/guest-virtio-mem-idle.cpio.gz"
"$RESOURCES_DIR/build-initramfs.sh" --out "$image" --module virtio_pci \
    --extra "$RESOURCES_DIR/guest/virtio-mem-idle.sh:/guest-test.sh"

script="$GUEST_CACHE/bench/virtio-mem.sh"
mkdir -p "$(dirname "$script")"
cmdline="console=ttyS0 reboot=k panic=-1 noxsave quiet memhp_default_state=online_movable vmembench.plug_mib=$plug${BENCH_GUEST_CMDLINE:+ $BENCH_GUEST_CMDLINE}"
cat >"$script" <<SCRIPT
#!/bin/sh
# In the L1: each VMM in turn boots the guest, plugs, lets it use the memory, unplugs.
MEM=$memory
WIN=$window
PLUG=$plug
CPU=\${L1_VMM_CPU:-0}
KVM_HIST_ON=${BENCH_KVM_EXITS:-}
$(bench_l1_helpers)
# poll_cost CMD...: seconds one call of CMD takes (mean of 10), the
# resolution of the plugged-size polling.
poll_cost() {
    t=\$(now)
    i=0
    while [ \$i -lt 10 ]; do
        "\$@" >/dev/null
        i=\$((i + 1))
    done
    awk "BEGIN { printf \"%.3f\", (\$(now) - \$t) / 10 }"
}
# KVM's own counters (debugfs, summed over the L1's VMs; one runs at a
# time): what a phase cost the guest in exits, in the kernel and out of it;
# kvm_snap also starts the exit histograms (bench_l1_helpers) that
# kvm_delta prints.
KVM_STATS="exits pf_taken pf_fixed mmio_exits io_exits irq_exits halt_exits irq_window_exits request_irq_exits signal_exits irq_injections"
kvm_counters() { for n in \$KVM_STATS; do cat /sys/kernel/debug/kvm/\$n 2>/dev/null || echo 0; done | tr '\n' ' '; }
kvm_snap() { kvm_hist_start; kvm_counters; }
# kvm_delta NAME PHASE BEFORE: what the phase added to each counter.
kvm_delta() {
    kvm_hist_stop \$1 \$2
    echo "BENCH-KVM \$1 run=\$run phase=\$2 \$(echo "\$KVM_STATS|\$3|\$(kvm_counters)" | awk -F'|' '{ n = split(\$1, k, " "); split(\$2, b, " "); split(\$3, a, " "); for (i = 1; i <= n; i++) printf "%s=%d ", k[i], a[i] - b[i] }')"
}
# host_huge NAME: how much of the L1's shmem (both VMMs' guest memory) is
# in transparent huge pages, and mapped so, once the plugged memory is used.
host_huge() {
    echo "BENCH-HOST \$1 run=\$run \$(awk '/^(ShmemHugePages|ShmemPmdMapped):/ { printf "%s=%d ", \$1, \$2 }' /proc/meminfo | tr -d :)"
}
# report NAME: one result line from the variables the runs set.
report() {
    echo "BENCH \$1 run=\$run plug_s=\$plug_s unplug_s=\$unplug_s" \\
        "shmem_before_mib=\$s0 shmem_used_mib=\$s1 shmem_after_mib=\$s2" \\
        "window_before_mib=\$w0 window_used_mib=\$w1 window_after_mib=\$w2 filled_mib=\$filled poll_s=\$poll_s" \\
        "plug_request_s=\$plug_req_s unplug_request_s=\$unplug_req_s"
}
# guest_notes NAME FILE: the guest kernel's complaints (it boots quiet, so
# only warnings and worse reach the console). This VMM has no PCI, so its
# guest's "PCI: Fatal: No config space access function found" is left out.
guest_notes() {
    grep -v -E '^(GUEST-|\\[ *[0-9.]+\\] (tsc|clocksource|kvm-clock|PCI: Fatal: No config space))' \$2 | grep -E '^\\[' | head -${BENCH_GUEST_NOTES:-20} | sed "s/^/BENCH-GUEST \$1 run=\$run /"
}
# guest_debug NAME FILE: with BENCH_GUEST_CMDLINE set, the guest's
# virtio_mem and memory hotplug lines, whole.
guest_debug() {
    [ -n "${BENCH_GUEST_CMDLINE:-}" ] || return 0
    grep -E 'virtio_mem|memory|Memory|GUEST-' \$2 | sed "s/^/BENCH-GUEST-DEBUG \$1 run=\$run /"
}
filled_mib() { grep -o 'GUEST-USED round=1 .*filled_mib=[0-9]*' \$1 | grep -o '[0-9]*\$'; }

vmm_get() { /bin/vmmctl --sock /tmp/api.sock GET /memory | grep -o "\"\$1\": [0-9.]*" | head -1 | grep -o '[0-9.]*\$'; }
# vmm_timing PHASE: the device's own timing of the last resize.
vmm_timing() {
    echo "BENCH-TIMING vmm run=\$run phase=\$1 first_ms=\$(vmm_get first_change_ms) settled_ms=\$(vmm_get settled_ms)"
}
# vmm_resize MIB: asks for MIB plugged and returns once the guest has
# them ("wait_ms": the VMM answers when the plugged size reaches the
# request, so no polling interval is in the time).
vmm_resize() { vmm_put_wait /memory "{\"requested_mib\": \$1, \"wait_ms\": 60000}"; }
bench_vmm() {
    rm -f /tmp/api.sock /tmp/serial.vmm
    RUST_LOG="$vmm_log" taskset -c \$CPU /bin/vmm --kernel /guest/vmlinux --initrd /guest/virtio-mem-idle.cpio.gz \\
        --memory \${MEM}M --mem-backend memfd --virtio-mem \${WIN}M --cmdline "$cmdline" \\
        --serial file:/tmp/serial.vmm --api-sock /tmp/api.sock $vmm_args 2>/tmp/vmm.err &
    pid=\$!
    wait_marker /tmp/serial.vmm GUEST-READY || return 1
    sleep 2
    s0=\$(shmem_mib \$pid)
    w0=\$(vmm_get host_allocated_mib)
    poll_s=\$(poll_cost vmm_get plugged_mib)
    k=\$(kvm_snap)
    t=\$(now)
    vmm_resize \$PLUG || return 1
    plug_req_s=\$(since \$t)
    plug_s=\$resize_s
    until_equal \$PLUG vmm_get plugged_mib || return 1
    kvm_delta vmm plug "\$k"
    vmm_timing plug
    wait_marker /tmp/serial.vmm GUEST-USED || return 1
    sleep 1
    s1=\$(shmem_mib \$pid)
    host_huge vmm
    w1=\$(vmm_get host_allocated_mib)
    k=\$(kvm_snap)
    t=\$(now)
    vmm_resize 0 || return 1
    unplug_req_s=\$(since \$t)
    unplug_s=\$resize_s
    until_equal 0 vmm_get plugged_mib || return 1
    kvm_delta vmm unplug "\$k"
    vmm_timing unplug
    wait_marker /tmp/serial.vmm GUEST-SAW-UNPLUG || return 1
    sleep 1
    s2=\$(shmem_mib \$pid)
    w2=\$(vmm_get host_allocated_mib)
    filled=\$(filled_mib /tmp/serial.vmm)
    report vmm
    guest_notes vmm /tmp/serial.vmm
    guest_debug vmm /tmp/serial.vmm
    echo "BENCH-VMM-MEMORY run=\$run \$(/bin/vmmctl --sock /tmp/api.sock GET /memory | tr -d '\n ')"
    kill \$pid
    wait \$pid 2>/dev/null
    grep -i -E 'warn|error|panic' /tmp/vmm.err | head -20 | sed 's/^/BENCH-VMM-STDERR /'
    [ -z "$vmm_log" ] || grep -E 'DEBUG|TRACE' /tmp/vmm.err | sed "s/^/BENCH-VMM-LOG run=\$run /"
    return 0
}

qemu_size() { qmp '{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vm0", "property": "size"}}' | grep -o '"return": [0-9]*' | grep -o '[0-9]*\$'; }
qemu_request() { qmp "{\"execute\": \"qom-set\", \"arguments\": {\"path\": \"/machine/peripheral/vm0\", \"property\": \"requested-size\", \"value\": \$((\$1 << 20))}}" >/dev/null; }
# qemu_window_mib PID: allocated MiB of QEMU's window memfd (the one of the window's size).
qemu_window_mib() {
    for f in /proc/\$1/fd/*; do
        case "\$(readlink \$f)" in
            *memfd:*)
                set -- \$(stat -L -c '%s %b %B' \$f)
                [ "\$1" = \$((WIN << 20)) ] && { awk "BEGIN { printf \"%d\", \$2 * \$3 / 1048576 }"; return; }
                ;;
        esac
    done
    echo "BENCH-ERROR no memfd of \$WIN MiB in QEMU" >&2
}
bench_qemu() {
    rm -f /tmp/qmp.in /tmp/qmp.out /tmp/serial.qemu
    mkfifo /tmp/qmp.in /tmp/qmp.out
    taskset -c \$CPU qemu-system-x86_64 -accel kvm -M q35 -cpu host -m \${MEM}M,maxmem=\$((MEM + WIN))M \\
        -display none -no-reboot -nodefaults -serial file:/tmp/serial.qemu \\
        -object memory-backend-memfd,id=mem,size=\${MEM}M,share=on -machine memory-backend=mem \\
        -object memory-backend-memfd,id=vmem0,size=\${WIN}M,share=on \\
        -device virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2M,requested-size=0 \\
        -chardev pipe,id=qmp,path=/tmp/qmp -mon chardev=qmp,mode=control \\
        -kernel /guest/vmlinux -initrd /guest/virtio-mem-idle.cpio.gz -append "$cmdline" 2>/tmp/qemu.err &
    pid=\$!
    exec 3>/tmp/qmp.in 4</tmp/qmp.out
    read -r greeting <&4
    qmp '{"execute": "qmp_capabilities"}' >/dev/null
    wait_marker /tmp/serial.qemu GUEST-READY || return 1
    sleep 2
    s0=\$(shmem_mib \$pid)
    w0=\$(qemu_window_mib \$pid)
    poll_s=\$(poll_cost qemu_size)
    : >/tmp/qmp.events
    k=\$(kvm_snap)
    t=\$(now)
    qemu_request \$PLUG
    plug_req_s=\$(since \$t)
    until_equal \$((PLUG << 20)) qemu_size || return 1
    plug_s=\$(since \$t)
    kvm_delta qemu plug "\$k"
    qmp_events MEMORY_DEVICE_SIZE_CHANGE size qemu plug
    wait_marker /tmp/serial.qemu GUEST-USED || return 1
    sleep 1
    s1=\$(shmem_mib \$pid)
    host_huge qemu
    w1=\$(qemu_window_mib \$pid)
    : >/tmp/qmp.events
    k=\$(kvm_snap)
    t=\$(now)
    qemu_request 0
    unplug_req_s=\$(since \$t)
    until_equal 0 qemu_size || return 1
    unplug_s=\$(since \$t)
    kvm_delta qemu unplug "\$k"
    qmp_events MEMORY_DEVICE_SIZE_CHANGE size qemu unplug
    wait_marker /tmp/serial.qemu GUEST-SAW-UNPLUG || return 1
    sleep 1
    s2=\$(shmem_mib \$pid)
    w2=\$(qemu_window_mib \$pid)
    filled=\$(filled_mib /tmp/serial.qemu)
    report qemu
    guest_notes qemu /tmp/serial.qemu
    guest_debug qemu /tmp/serial.qemu
    qmp '{"execute": "quit"}' >/dev/null
    exec 3>&- 4<&-
    wait \$pid 2>/dev/null
    return 0
}

[ -z "$shmem_thp" ] || echo $shmem_thp >/sys/kernel/mm/transparent_hugepage/shmem_enabled
BENCH_SCRUB=$scrub
echo "BENCH-L1 scrub=\${BENCH_SCRUB:-0} cpus=\$(grep -c ^processor /proc/cpuinfo) shmem_thp=\$(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null) qemu=\$(qemu-system-x86_64 --version | head -1 | tr ' ' _)"
run=1
while [ \$run -le $runs ]; do
    scrub_l1_memory
    bench_vmm || { tail -5 /tmp/vmm.err; exit 1; }
    scrub_l1_memory
    bench_qemu || { tail -5 /tmp/qemu.err; exit 1; }
    run=\$((run + 1))
done
SCRIPT
# q35 boots through SeaBIOS, which Debian keeps outside /usr/share/qemu.
bench_run_l1 virtio-mem "$script" --add "$image:/guest/virtio-mem-idle.cpio.gz" \
    --add /usr/share/seabios/bios-256k.bin:/usr/share/seabios/

mkdir -p "$REPO_ROOT/target/bench"
BENCH_LIB_DIR="$RESOURCES_DIR" PYTHONDONTWRITEBYTECODE=1 python3 - "$GUEST_CACHE/bench/virtio-mem.log" "$memory" "$window" "$plug" \
    "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" \
    "$REPO_ROOT/target/bench/virtio-mem.json" <<'PY'
import datetime, json, os, re, statistics, sys
sys.path.insert(0, os.environ["BENCH_LIB_DIR"])
import bench_timing  # noqa: E402
log, memory, window, plug, load_before, load_after, out_path = sys.argv[1:8]
memory, window, plug = int(memory), int(window), int(plug)
pat = re.compile(r"BENCH (\w+) run=\d+ plug_s=([\d.]+) unplug_s=([\d.]+) "
                 r"shmem_before_mib=([\d.]+) shmem_used_mib=([\d.]+) shmem_after_mib=([\d.]+) "
                 r"window_before_mib=(\d+) window_used_mib=(\d+) window_after_mib=(\d+) filled_mib=(\d+) "
                 r"poll_s=([\d.]+) plug_request_s=([\d.]+) unplug_request_s=([\d.]+)")
runs = {"vmm": [], "qemu": []}
problems = []
counters = []
qemu_version = None
shmem_thp = None
scrub = False
for line in open(log, errors="replace"):
    m = pat.search(line)
    if m and m.group(1) in runs:
        p, u, s0, s1, s2, w0, w1, w2, filled, poll, preq, ureq = map(float, m.groups()[1:])
        runs[m.group(1)].append({
            "plug_s": p, "unplug_s": u,
            "plug_mib_s": plug / p if p else None, "unplug_mib_s": plug / u if u else None,
            "shmem_before_mib": s0, "shmem_used_mib": s1, "shmem_after_mib": s2,
            "window_before_mib": w0, "window_used_mib": w1, "window_after_mib": w2,
            "guest_filled_mib": filled, "poll_s": poll,
            "plug_request_s": preq, "unplug_request_s": ureq,
            "returned_pct": 100 * (w1 - w2) / (w1 - w0) if w1 > w0 else None,
            "returned_shmem_mib": s1 - s2,
            "returned_shmem_pct": 100 * (s1 - s2) / (s1 - s0) if s1 > s0 else None,
        })
    elif "BENCH-VMM-MEMORY" in line:
        counters.append(json.loads(line.split(" ", 2)[2]).get("counters"))
    elif re.search(r"BENCH-(ERROR|VMM-STDERR|GUEST)", line):
        problems.append(line.strip())
    elif "BENCH-L1" in line:
        qemu_version = line.split("qemu=")[-1].strip().replace("_", " ")
        thp = re.search(r"shmem_thp=(\w+)", line)
        shmem_thp = thp.group(1) if thp else None
        scrub = "scrub=1" in line
if not runs["vmm"] or not runs["qemu"]:
    sys.exit(f"bench-virtio-mem: a VMM did not complete a run; see {log}")

# Each VMM's own clock: first change of the plugged size to the one that
# reached the request.
targets = {"plug": plug << 20, "unplug": 0}
guest = bench_timing.first_to_settled(log, targets)
for k in runs:
    for i, r in enumerate(runs[k], start=1):
        for phase in ("plug", "unplug"):
            r[f"{phase}_device_s"] = guest[k].get((i, phase))


def med(rows, field):
    vals = [r[field] for r in rows if r[field] is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    return a / b if a is not None and b else None


fields = list(runs["vmm"][0])
m = {k: {f: med(v, f) for f in fields} for k, v in runs.items()}
out = {
    "vmm_plug_s": m["vmm"]["plug_s"],
    "vmm_unplug_s": m["vmm"]["unplug_s"],
    "qemu_plug_s": m["qemu"]["plug_s"],
    "qemu_unplug_s": m["qemu"]["unplug_s"],
    "returned_pct": m["vmm"]["returned_pct"],
    "qemu_returned_pct": m["qemu"]["returned_pct"],
    "returned_shmem_pct": m["vmm"]["returned_shmem_pct"],
    "qemu_returned_shmem_pct": m["qemu"]["returned_shmem_pct"],
    "vmm_poll_s": m["vmm"]["poll_s"],
    "qemu_poll_s": m["qemu"]["poll_s"],
    "plug_time_ratio": ratio(m["vmm"]["plug_s"], m["qemu"]["plug_s"]),
    "unplug_time_ratio": ratio(m["vmm"]["unplug_s"], m["qemu"]["unplug_s"]),
    "vmm_plug_device_s": m["vmm"]["plug_device_s"],
    "vmm_unplug_device_s": m["vmm"]["unplug_device_s"],
    "qemu_plug_device_s": m["qemu"]["plug_device_s"],
    "qemu_unplug_device_s": m["qemu"]["unplug_device_s"],
    "plug_device_time_ratio": ratio(m["vmm"]["plug_device_s"], m["qemu"]["plug_device_s"]),
    "unplug_device_time_ratio": ratio(m["vmm"]["unplug_device_s"], m["qemu"]["unplug_device_s"]),
    "device_s_method": "first change of the plugged size to the one reaching the request, "
                       "on each VMM's clock (GET /memory last_resize; QEMU "
                       "MEMORY_DEVICE_SIZE_CHANGE timestamps)",
    **{f"{k}_{f}_runs": [r[f] for r in runs[k]] for k in runs
       for f in ("plug_s", "unplug_s", "returned_pct", "returned_shmem_pct", "poll_s",
                 "plug_request_s", "unplug_request_s")},
    "run_count": min(len(runs["vmm"]), len(runs["qemu"])),
    "medians": m,
    "memory_mib": memory, "window_mib": window, "plug_mib": plug, "block_size_mib": 2,
    "shmem_thp": shmem_thp,
    "scrub": scrub,
    "qemu": (qemu_version or "qemu-system-x86_64") +
            ": -M q35, virtio-mem-pci, memory-backend-memfd share=on (boot RAM and window)",
    "returned_pct_method": "drop of the window memfd's allocated bytes (st_blocks) after unplug, "
                           "as a share of what plug + guest use added",
    "returned_shmem_pct_method": "the same from the VMM process's RssShmem",
    "host_loadavg_before": load_before, "host_loadavg_after": load_after,
    "date": datetime.date.today().isoformat(),
    "vmm_counters_runs": counters,
    "problems": problems,
    "runs": runs,
}
with open(out_path, "w") as f:
    json.dump(out, f, indent=2)


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


print(f"{'':6} {'plug s':>7} {'MiB/s':>6} {'unplug s':>9} {'MiB/s':>6} {'request s':>10} {'poll s':>7}"
      f" {'window back MiB':>16} {'%':>6} {'RssShmem back MiB':>18} {'%':>6}")
for k in ("vmm", "qemu"):
    r = m[k]
    print(f"{k:6} {r['plug_s']:>7.2f} {fmt(r['plug_mib_s'], '>6.0f')} {r['unplug_s']:>9.2f}"
          f" {fmt(r['unplug_mib_s'], '>6.0f')} {r['plug_request_s']:>10.3f} {r['poll_s']:>7.3f}"
          f" {r['window_used_mib'] - r['window_after_mib']:>16.0f} {fmt(r['returned_pct'], '>6.1f')}"
          f" {r['returned_shmem_mib']:>18.1f} {fmt(r['returned_shmem_pct'], '>6.1f')}")
print("per run (plug s / unplug s / window returned %):")
for k in ("vmm", "qemu"):
    print(f"  {k:5} " + "   ".join(
        f"{r['plug_s']:.2f} / {r['unplug_s']:.2f} / {fmt(r['returned_pct'], '.1f')}" for r in runs[k]))
print(f"vmm/qemu time: plug {fmt(out['plug_time_ratio'], '.2f')}x,"
      f" unplug {fmt(out['unplug_time_ratio'], '.2f')}x"
      f"   (medians of {len(runs['vmm'])}; host load {load_before} -> {load_after})   -> {out_path}")
print("first to last plugged-size change, each VMM's own clock:")
for k in ("vmm", "qemu"):
    print(f"  {k:5} plug {fmt(m[k]['plug_device_s'], '.3f')} s, unplug {fmt(m[k]['unplug_device_s'], '.3f')} s")
print(f"vmm/qemu time: plug {fmt(out['plug_device_time_ratio'], '.2f')}x,"
      f" unplug {fmt(out['unplug_device_time_ratio'], '.2f')}x")
for p in problems:
    print("note:", p)
PY
