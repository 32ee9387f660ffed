#!/usr/bin/env bash
# Balloon benchmark: this VMM's virtio-balloon against QEMU's, on the same
# guest (Debian kernel, 256 MiB, 1 vCPU) in the same L1, alternately. The
# guest dirties nearly all its free memory and idles; then the balloon is
# inflated by 128 MiB and deflated again. Measured: the time from the
# request to the device's `actual` reaching the target (this VMM is asked
# with PUT /balloon and "wait_ms", which answers when the guest has reached
# the target, timed by vmmctl --time from the request's first byte to its
# answer; QEMU has no such wait, so it is asked with QMP `balloon` over a
# pipe that is already open and `query-balloon` is polled every 50 ms;
# "request s" in the log adds the vmmctl process's own start, ~30 ms in the
# L1), and the host memory returned: the drop of the
# VMM's RssShmem (guest RAM is a memfd for both). Free page reporting is off
# for both, so only the balloon gives memory back. Also timed by each VMM
# itself, free of polling: from the guest's first `actual` update to the one
# that reaches the target (this VMM's GET /balloon `last_resize`; QEMU's
# BALLOON_CHANGE event timestamps). The same VMM also runs with
# --no-seccomp in each round, so the filters' cost is a ratio measured side
# by side. Prints a table and writes target/bench/balloon.json.
#
# Usage: resources/bench-balloon.sh [--runs N] [--memory MiB] [--inflate MiB]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

runs=3
memory=256
inflate=128
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --memory) memory="$2"; shift 2 ;;
        --inflate) inflate="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
for v in "$runs" "$memory" "$inflate"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--runs, --memory and --inflate take positive integers"
done
((inflate < memory)) || die "--inflate must be less than --memory"
bench_prepare
image="$GUEST_CACHE/guest-balloon-idle.cpio.gz"
"$RESOURCES_DIR/build-initramfs.sh" --out "$image" \
    --extra "$RESOURCES_DIR/guest/balloon-idle.sh:/guest-test.sh"

script="$GUEST_CACHE/bench/balloon.sh"
mkdir -p "$(dirname "$script")"
cmdline="console=ttyS0 reboot=k panic=-1 noxsave quiet"
cat >"$script" <<SCRIPT
#!/bin/sh
# In the L1: each VMM in turn boots the idle guest, inflates, deflates.
MEM=$memory
INFLATE=$inflate
CPU=\${L1_VMM_CPU:-0}
$(bench_l1_helpers)
# wait_ready FILE: the guest printed GUEST-READY; give it a moment to settle.
wait_ready() { wait_marker \$1 GUEST-READY && sleep 2; }

vmm_actual() { /bin/vmmctl --sock /tmp/api.sock GET /balloon | grep -o '"actual_mib": [0-9]*' | grep -o '[0-9]*\$'; }
# vmm_timing PHASE: the device's own timing of the last resize.
vmm_timing() {
    b=\$(/bin/vmmctl --sock /tmp/api.sock GET /balloon)
    first=\$(echo "\$b" | grep -o '"first_change_ms": [0-9.]*' | grep -o '[0-9.]*\$')
    settled=\$(echo "\$b" | grep -o '"settled_ms": [0-9.]*' | grep -o '[0-9.]*\$')
    echo "BENCH-TIMING vmm run=\$run phase=\$1 first_ms=\$first settled_ms=\$settled"
}
# vmm_resize MIB: sets the balloon's target and returns once the guest has
# reached it ("wait_ms": no polling interval in the time, which is left in
# resize_s).
vmm_resize() { vmm_put_wait /balloon "{\"target_mib\": \$1, \"wait_ms\": 60000}"; }
# bench_vmm NAME [VMM FLAGS]: NAME vmm (as shipped) or vmm_noseccomp.
bench_vmm() {
    name=\$1
    shift
    rm -f /tmp/api.sock /tmp/serial.vmm
    taskset -c \$CPU /bin/vmm --kernel /guest/vmlinux --initrd /guest/balloon-idle.cpio.gz \\
        --memory \${MEM}M --mem-backend memfd --cmdline "$cmdline" --serial file:/tmp/serial.vmm \\
        --balloon --balloon-free-page-reporting false --api-sock /tmp/api.sock "\$@" 2>/tmp/vmm.err &
    pid=\$!
    wait_ready /tmp/serial.vmm || return 1
    before=\$(shmem_mib \$pid)
    t=\$(now)
    vmm_resize \$INFLATE || return 1
    inflate_req_s=\$(since \$t)
    inflate_s=\$resize_s
    until_equal \$INFLATE vmm_actual || return 1
    [ \$name = vmm ] && vmm_timing inflate
    # Every inflated range the host had backed must be a hole once discarded.
    echo "BENCH-CHECK \$name run=\$run stray_ranges=\$(/bin/vmmctl --sock /tmp/api.sock GET /balloon | grep -o '"stray_ranges": [0-9]*' | grep -o '[0-9]*\$')"
    sleep 1
    after=\$(shmem_mib \$pid)
    t=\$(now)
    vmm_resize 0 || return 1
    deflate_req_s=\$(since \$t)
    deflate_s=\$resize_s
    until_equal 0 vmm_actual || return 1
    echo "BENCH-REQUEST \$name run=\$run inflate_req_s=\$inflate_req_s deflate_req_s=\$deflate_req_s"
    [ \$name = vmm ] && vmm_timing deflate
    echo "BENCH \$name run=\$run inflate_s=\$inflate_s deflate_s=\$deflate_s shmem_before_mib=\$before shmem_after_mib=\$after"
    kill \$pid
    wait \$pid 2>/dev/null
    return 0
}

qemu_actual() { qmp '{"execute": "query-balloon"}' | grep -o '"actual": [0-9]*' | awk '{ print (\$2 / 1048576) }'; }
bench_qemu() {
    rm -f /tmp/qmp.in /tmp/qmp.out /tmp/serial.qemu
    mkfifo /tmp/qmp.in /tmp/qmp.out
    taskset -c \$CPU qemu-system-x86_64 -accel kvm -M microvm,rtc=on -cpu host -m \${MEM}M \\
        -display none -no-reboot -nodefaults -serial file:/tmp/serial.qemu \\
        -object memory-backend-memfd,id=mem,size=\${MEM}M,share=on -machine memory-backend=mem \\
        -device virtio-balloon-device -chardev pipe,id=qmp,path=/tmp/qmp -mon chardev=qmp,mode=control \\
        -kernel /guest/vmlinux -initrd /guest/balloon-idle.cpio.gz -append "$cmdline" 2>/tmp/qemu.err &
    pid=\$!
    exec 3>/tmp/qmp.in 4</tmp/qmp.out
    read -r greeting <&4
    qmp '{"execute": "qmp_capabilities"}' >/dev/null
    wait_ready /tmp/serial.qemu || return 1
    before=\$(shmem_mib \$pid)
    : >/tmp/qmp.events
    t=\$(now)
    qmp "{\"execute\": \"balloon\", \"arguments\": {\"value\": \$(((MEM - INFLATE) << 20))}}" >/dev/null
    until_equal \$((MEM - INFLATE)) qemu_actual || return 1
    inflate_s=\$(since \$t)
    qmp_events BALLOON_CHANGE actual qemu inflate
    sleep 1
    after=\$(shmem_mib \$pid)
    t=\$(now)
    qmp "{\"execute\": \"balloon\", \"arguments\": {\"value\": \$((MEM << 20))}}" >/dev/null
    until_equal \$MEM qemu_actual || return 1
    deflate_s=\$(since \$t)
    qmp_events BALLOON_CHANGE actual qemu deflate
    echo "BENCH qemu run=\$run inflate_s=\$inflate_s deflate_s=\$deflate_s shmem_before_mib=\$before shmem_after_mib=\$after"
    qmp '{"execute": "quit"}' >/dev/null
    exec 3>&- 4<&-
    wait \$pid 2>/dev/null
    return 0
}

run=1
while [ \$run -le $runs ]; do
    bench_vmm vmm || { tail -5 /tmp/vmm.err; exit 1; }
    bench_vmm vmm_noseccomp --no-seccomp || { tail -5 /tmp/vmm.err; exit 1; }
    bench_qemu || { tail -5 /tmp/qemu.err; exit 1; }
    run=\$((run + 1))
done
SCRIPT
bench_run_l1 balloon "$script" --add "$image:/guest/balloon-idle.cpio.gz"

mkdir -p "$REPO_ROOT/target/bench"
BENCH_LIB_DIR="$RESOURCES_DIR" PYTHONDONTWRITEBYTECODE=1 python3 - "$GUEST_CACHE/bench/balloon.log" "$memory" "$inflate" \
    "$REPO_ROOT/target/bench/balloon.json" <<'PY'
import json, os, re, statistics, sys
sys.path.insert(0, os.environ["BENCH_LIB_DIR"])
import bench_timing  # noqa: E402
log, memory, inflate, out_path = sys.argv[1:5]
inflate = int(inflate)
pat = re.compile(r"BENCH (\w+) run=\d+ inflate_s=([\d.]+) deflate_s=([\d.]+) "
                 r"shmem_before_mib=([\d.]+) shmem_after_mib=([\d.]+)")
runs = {"vmm": [], "qemu": [], "vmm_noseccomp": []}
for line in open(log, errors="replace"):
    m = pat.search(line)
    if m and m.group(1) in runs:
        i, d, b, a = map(float, m.groups()[1:])
        runs[m.group(1)].append({
            "inflate_s": i, "deflate_s": d, "shmem_before_mib": b, "shmem_after_mib": a,
            "inflate_mib_s": inflate / i, "deflate_mib_s": inflate / d,
            "returned_mib": b - a,
        })
if not all(runs.values()):
    sys.exit(f"bench-balloon: a VMM did not complete a run; see {log}")
# This VMM's times with the vmmctl process's start added (for reference).
req = re.compile(r"BENCH-REQUEST (\w+) run=(\d+) inflate_req_s=([\d.]+) deflate_req_s=([\d.]+)")
for line in open(log, errors="replace"):
    m = req.search(line)
    if m and m.group(1) in runs and int(m.group(2)) <= len(runs[m.group(1)]):
        r = runs[m.group(1)][int(m.group(2)) - 1]
        r["inflate_request_s"], r["deflate_request_s"] = float(m.group(3)), float(m.group(4))

# Each VMM's own clock: first `actual` update after the request to the one
# that reached the target.
memory_b = int(memory) << 20
targets = {"inflate": memory_b - (inflate << 20), "deflate": memory_b}
guest = bench_timing.first_to_settled(log, targets)
stray = [int(m[1]) for m in re.finditer(r"BENCH-CHECK vmm run=\d+ stray_ranges=(\d+)", open(log, errors="replace").read())]
for k in runs:
    for i, r in enumerate(runs[k], start=1):
        for phase in ("inflate", "deflate"):
            r[f"{phase}_guest_s"] = guest.get(k, {}).get((i, phase))
have_guest = all(r.get(f"{p}_guest_s") is not None
                 for k in ("vmm", "qemu") for r in runs[k] for p in ("inflate", "deflate"))
med = {k: {f: statistics.median(r[f] for r in v if r.get(f) is not None)
           for f in v[0] if v[0][f] is not None}
       for k, v in runs.items()}
out = {
    "vmm_inflate_mib_s": med["vmm"]["inflate_mib_s"],
    "vmm_deflate_mib_s": med["vmm"]["deflate_mib_s"],
    "qemu_inflate_mib_s": med["qemu"]["inflate_mib_s"],
    "qemu_deflate_mib_s": med["qemu"]["deflate_mib_s"],
    "returned_pct": 100 * med["vmm"]["returned_mib"] / inflate,
    "qemu_returned_pct": 100 * med["qemu"]["returned_mib"] / inflate,
    "inflate_ratio": med["vmm"]["inflate_mib_s"] / med["qemu"]["inflate_mib_s"],
    "deflate_ratio": med["vmm"]["deflate_mib_s"] / med["qemu"]["deflate_mib_s"],
    "memory_mib": int(memory), "inflate_mib": inflate,
    # Inflated ranges found still backed right after their discard (this
    # VMM checks each one): 0 means all the host had backed came back.
    "vmm_stray_ranges_runs": stray,
    # What the seccomp filters cost: the same VMM with --no-seccomp, in
    # the same run (>1: the filtered VMM is slower).
    "noseccomp_inflate_mib_s": med["vmm_noseccomp"]["inflate_mib_s"],
    "noseccomp_deflate_mib_s": med["vmm_noseccomp"]["deflate_mib_s"],
    "seccomp_cost_inflate_ratio": med["vmm"]["inflate_s"] / med["vmm_noseccomp"]["inflate_s"],
    "seccomp_cost_deflate_ratio": med["vmm"]["deflate_s"] / med["vmm_noseccomp"]["deflate_s"],
    "runs": runs,
}
if have_guest:
    for p in ("inflate", "deflate"):
        out[f"vmm_{p}_guest_s"] = med["vmm"][f"{p}_guest_s"]
        out[f"qemu_{p}_guest_s"] = med["qemu"][f"{p}_guest_s"]
        out[f"{p}_guest_ratio"] = med["qemu"][f"{p}_guest_s"] / med["vmm"][f"{p}_guest_s"]
with open(out_path, "w") as f:
    json.dump(out, f, indent=2)
print(f"{'':6} {'inflate s':>10} {'MiB/s':>8} {'deflate s':>10} {'MiB/s':>8} {'returned MiB':>13} {'%':>6}")
for k in ("vmm", "vmm_noseccomp", "qemu"):
    m = med[k]
    print(f"{k:6} {m['inflate_s']:>10.2f} {m['inflate_mib_s']:>8.1f} {m['deflate_s']:>10.2f}"
          f" {m['deflate_mib_s']:>8.1f} {m['returned_mib']:>13.1f} {100 * m['returned_mib'] / inflate:>6.1f}")
print(f"vmm/qemu: inflate {out['inflate_ratio']:.2f}x, deflate {out['deflate_ratio']:.2f}x"
      f"   -> {out_path}")
print(f"seccomp cost (filtered / unfiltered time): inflate {out['seccomp_cost_inflate_ratio']:.2f}x, "
      f"deflate {out['seccomp_cost_deflate_ratio']:.2f}x")
print(f"this VMM's inflated ranges still backed after their discard, per run: {stray}")
if "inflate_request_s" in med["vmm"]:
    print(f"vmm with vmmctl's own start: inflate {med['vmm']['inflate_request_s']:.2f} s, "
          f"deflate {med['vmm']['deflate_request_s']:.2f} s")
if have_guest:
    print("first to last `actual` update, each VMM's own clock:")
    for k in ("vmm", "qemu"):
        print(f"{k:6} inflate {med[k]['inflate_guest_s']:.3f} s, deflate {med[k]['deflate_guest_s']:.3f} s")
    print(f"vmm/qemu: inflate {out['inflate_guest_ratio']:.2f}x, deflate {out['deflate_guest_ratio']:.2f}x")
else:
    print("(no device-side timing in the log: figures above only)")
PY
