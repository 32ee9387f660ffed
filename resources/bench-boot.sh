#!/usr/bin/env bash
# Boot benchmark: this VMM against QEMU (-M microvm,rtc=on) booting the same
# Debian kernel and initramfs with the same memory and vCPUs, alternately,
# in one L1. Per run: the wall time from starting the VMM to the guest
# init's marker (GUEST-INIT-OK), and the VMM's resident memory outside guest
# RAM at that moment (the Rss of every mapping in /proc/PID/smaps but the
# guest RAM memfd). A third row, this VMM with the kernel serving its page
# faults (--fault-handler kernel), shows what userfaultfd costs at boot,
# and a fourth, this VMM with --no-pre-fault, what KVM_PRE_FAULT_MEMORY
# saves (it needs an L1 kernel that has it: L1_KERNEL_DIR=build/kernel-trixie;
# under the default 6.1 L1 both rows boot the same way).
# Two more rows boot both VMMs on 2 MiB huge pages (hugetlbfs memfds,
# reserved in the L1): under nested virtualization every 4 KiB page the
# guest touches first costs an exit to the L1's KVM, so huge pages shorten
# the boot for both, and this shows by how much.
# After the timed runs, one more boot of each row is profiled (untimed,
# since tracing slows every exit): KVM's exits by reason and its nested
# page faults per 2 MiB of guest memory, to the guest's power-off
# (BENCH-KVM-EXITS and BENCH-KVM-NPF lines, from the L1 kernel's
# tracepoints): where a boot still takes exits the VMM could spare it.
# Prints a table and writes target/bench/boot.json (medians, every run;
# kvm_exits has the profiled boot's exits).
#
# --shmem-thp MODE sets the L1's shmem huge page policy
# (/sys/kernel/mm/transparent_hugepage/shmem_enabled: never, advise,
# within_size, always) for both VMMs' memfd guest RAM; the default leaves
# the L1 kernel's own (Debian: never). With advise or more, this VMM serves
# fresh memory 2 MiB at a time and QEMU, which marks its RAM MADV_HUGEPAGE,
# gets huge pages where its mapping is aligned.
#
# --scrub writes and frees all of the L1's free memory before each boot
# (untimed), so that no VMM inherits pages whose old guest code the TCG
# under the L1 must first forget (see scrub_l1_memory in bench-lib.sh):
# without it, a row's time depends on what the row before it left behind.
#
# Usage: resources/bench-boot.sh [--runs N] [--memory MiB] [--vcpus N] [--shmem-thp MODE] [--scrub]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

runs=5
memory=256
vcpus=1
shmem_thp=
scrub=
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --memory) memory="$2"; shift 2 ;;
        --vcpus) vcpus="$2"; shift 2 ;;
        --shmem-thp) shmem_thp="$2"; shift 2 ;;
        --scrub) scrub=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
check_shmem_thp "$shmem_thp"
for v in "$runs" "$memory" "$vcpus"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--runs, --memory and --vcpus take positive integers"
done
bench_prepare
# The guest holds on for a moment after its marker, so that the VMM's
# memory is read while it still runs.
hold="$GUEST_CACHE/bench/hold.sh"
mkdir -p "$(dirname "$hold")"
printf '#!/bin/sh\nsleep 2\n' >"$hold"
image="$GUEST_CACHE/guest-bench.cpio.gz"
"$RESOURCES_DIR/build-initramfs.sh" --out "$image" --extra "$hold:/guest-test.sh"

script="$GUEST_CACHE/bench/boot.sh"
mkdir -p "$(dirname "$script")"
cmdline="console=ttyS0 reboot=k panic=-1 noxsave quiet"
cat >"$script" <<SCRIPT
#!/bin/sh
# In the L1: boot with each VMM in turn, on the CPU the L1 keeps free.
$(bench_l1_helpers)
measure() {
    name=\$1
    shift
    fifo=/tmp/console.fifo
    rm -f \$fifo
    mkfifo \$fifo
    scrub_l1_memory
    t0=\$(cut -d' ' -f1 /proc/uptime)
    kvm_hist_start
    taskset -c "\${L1_VMM_CPU:-0}" "\$@" >\$fifo 2>/tmp/\$name.err </dev/null &
    pid=\$!
    boot=none
    rss=none
    up=none
    while IFS= read -r line; do
        case "\$line" in
            *GUEST-INIT-OK*)
                t1=\$(cut -d' ' -f1 /proc/uptime)
                rss=\$(awk '/^[0-9a-f]+-[0-9a-f]+ / { ram = (\$0 ~ /memfd:/) } /^Rss:/ && !ram { s += \$2 } END { printf "%.2f", s / 1024 }' /proc/\$pid/smaps)
                boot=\$(awk "BEGIN { printf \"%.2f\", \$t1 - \$t0 }")
                up=\$(echo "\$line" | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p')
                ;;
        esac
    done <\$fifo
    wait \$pid
    code=\$?
    kvm_hist_stop \$name boot
    [ \$code -eq 0 ] || { echo "\$name exited with \$code:"; tail -5 /tmp/\$name.err; }
    echo "BENCH \$name run=\$run boot_s=\$boot rss_mib=\$rss guest_uptime_s=\$up exit=\$code"
}
echo $((memory / 2 + 8)) >/proc/sys/vm/nr_hugepages
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
[ -z "$shmem_thp" ] || echo $shmem_thp >\$thp
BENCH_SCRUB=$scrub
echo "SCRUB \${BENCH_SCRUB:-off}"
echo "SHMEM-THP \$(sed 's/.*\[\(.*\)\].*/\1/' \$thp 2>/dev/null || echo none)"
echo "HUGE-PAGES reserved=\$(cat /proc/sys/vm/nr_hugepages) wanted=$((memory / 2 + 8))"
boot_all() {
    measure vmm /bin/vmm --kernel /guest/vmlinux --initrd /guest/bench.cpio.gz \\
        --memory ${memory}M --vcpus $vcpus --mem-backend memfd --cmdline "$cmdline"
    measure vmm-no-pre-fault /bin/vmm --kernel /guest/vmlinux --initrd /guest/bench.cpio.gz \\
        --memory ${memory}M --vcpus $vcpus --mem-backend memfd --no-pre-fault --cmdline "$cmdline"
    measure vmm-kernel-faults /bin/vmm --kernel /guest/vmlinux --initrd /guest/bench.cpio.gz \\
        --memory ${memory}M --vcpus $vcpus --mem-backend memfd --fault-handler kernel --cmdline "$cmdline"
    measure qemu qemu-system-x86_64 -accel kvm -M microvm,rtc=on -cpu host \\
        -smp $vcpus -m ${memory}M -display none -no-reboot -nodefaults -serial stdio \\
        -object memory-backend-memfd,id=mem,size=${memory}M,share=on -machine memory-backend=mem \\
        -kernel /guest/vmlinux -initrd /guest/bench.cpio.gz -append "$cmdline"
    measure vmm-hugetlbfs /bin/vmm --kernel /guest/vmlinux --initrd /guest/bench.cpio.gz \\
        --memory ${memory}M --vcpus $vcpus --mem-backend hugetlbfs --cmdline "$cmdline"
    measure qemu-hugetlbfs qemu-system-x86_64 -accel kvm -M microvm,rtc=on -cpu host \\
        -smp $vcpus -m ${memory}M -display none -no-reboot -nodefaults -serial stdio \\
        -object memory-backend-memfd,id=mem,size=${memory}M,share=on,hugetlb=on -machine memory-backend=mem \\
        -kernel /guest/vmlinux -initrd /guest/bench.cpio.gz -append "$cmdline"
}
run=1
while [ \$run -le $runs ]; do
    boot_all
    run=\$((run + 1))
done
KVM_HIST_ON=1
run=profile
boot_all
SCRIPT
bench_run_l1 boot "$script" --add "$image:/guest/bench.cpio.gz"

mkdir -p "$REPO_ROOT/target/bench"
python3 - "$GUEST_CACHE/bench/boot.log" "$(cat "$GUEST_KERNEL_DIR/VERSION")" "$memory" "$vcpus" \
    "$REPO_ROOT/target/bench/boot.json" "$(cat "$L1_KERNEL_DIR/VERSION")" <<'PY'
import json, re, statistics, sys
log, version, memory, vcpus, out_path, l1_version = sys.argv[1:7]
text = open(log, errors="replace").read()
thp = re.search(r"SHMEM-THP (\w+)", text)
shmem_thp = thp.group(1) if thp else None
scrub = re.search(r"^SCRUB 1", text, re.M) is not None
runs = {"vmm": [], "vmm-no-pre-fault": [], "vmm-kernel-faults": [], "qemu": [], "vmm-hugetlbfs": [], "qemu-hugetlbfs": []}
for line in open(log, errors="replace"):
    m = re.search(r"BENCH ([\w-]+) run=\d+ boot_s=([\d.]+) rss_mib=([\d.]+)"
                  r" guest_uptime_s=([\d.]+) exit=0", line)
    if m and m.group(1) in runs:
        runs[m.group(1)].append({"boot_s": float(m.group(2)), "rss_mib": float(m.group(3)),
                                 "guest_uptime_s": float(m.group(4))})
if not runs["vmm"] or not runs["qemu"]:
    sys.exit(f"bench-boot: a VMM never reached the guest's init; see {log}")
# KVM's exits in the profiled boot (to the guest's power-off), by reason.
exits = {k: [] for k in runs}
for line in open(log, errors="replace"):
    m = re.search(r"BENCH-KVM-EXITS ([\w-]+) run=\w+ phase=boot (.*)", line)
    if m and m.group(1) in exits:
        counts = dict(re.findall(r"(0x[0-9a-f]+)=(\d+)", m.group(2)))
        exits[m.group(1)].append({"total": sum(int(c) for c in counts.values()),
                                  "npf": int(counts.get("0x400", 0)),
                                  "io": int(counts.get("0x7b", 0)),
                                  "msr": int(counts.get("0x7c", 0))})
med = {k: {f: statistics.median(r[f] for r in v) for f in ("boot_s", "rss_mib", "guest_uptime_s")}
       for k, v in runs.items() if v}
out = {
    "vmm_boot_s": med["vmm"]["boot_s"],
    "qemu_boot_s": med["qemu"]["boot_s"],
    "vmm_rss_mib": med["vmm"]["rss_mib"],
    "qemu_rss_mib": med["qemu"]["rss_mib"],
    "boot_ratio": med["vmm"]["boot_s"] / med["qemu"]["boot_s"],
    "vmm_no_pre_fault_boot_s": med.get("vmm-no-pre-fault", {}).get("boot_s"),
    "vmm_kernel_faults_boot_s": med.get("vmm-kernel-faults", {}).get("boot_s"),
    "vmm_hugetlbfs_boot_s": med.get("vmm-hugetlbfs", {}).get("boot_s"),
    "qemu_hugetlbfs_boot_s": med.get("qemu-hugetlbfs", {}).get("boot_s"),
    "kernel": version, "l1_kernel": l1_version, "memory_mib": int(memory), "vcpus": int(vcpus),
    "shmem_thp": shmem_thp,
    "scrub": scrub,
    "runs": runs,
    "kvm_exits_runs": exits,
    "kvm_exits": {k: {f: statistics.median(e[f] for e in v) for f in ("total", "npf", "io", "msr")}
                  for k, v in exits.items() if v},
}
if "vmm-hugetlbfs" in med and "qemu-hugetlbfs" in med:
    out["hugetlbfs_boot_ratio"] = med["vmm-hugetlbfs"]["boot_s"] / med["qemu-hugetlbfs"]["boot_s"]
with open(out_path, "w") as f:
    json.dump(out, f, indent=2)
print(f"{'':18} {'boot to init (s)':>17} {'of it in the guest':>19} {'RSS outside RAM (MiB)':>22}"
      f" {'runs':>5}")
for k in med:
    m = med[k]
    print(f"{k:18} {m['boot_s']:>17.2f} {m['guest_uptime_s']:>19.2f} {m['rss_mib']:>22.2f}"
          f" {len(runs[k]):>5}")
print("(medians; 'of it in the guest' is the guest kernel's uptime at its init marker)")
for k, e in out["kvm_exits"].items():
    print(f"  {k:18} KVM exits per boot {e['total']:>7.0f}: nested page faults {e['npf']:>6.0f},"
          f" I/O {e['io']:>5.0f}, MSR {e['msr']:>5.0f}")
if "hugetlbfs_boot_ratio" in out:
    print(f"boot time vmm/qemu on huge pages: {out['hugetlbfs_boot_ratio']:.2f}x")
print(f"boot time vmm/qemu: {out['boot_ratio']:.2f}x (L1 {l1_version}, shmem huge pages:"
      f" {shmem_thp}, scrubbed: {'yes' if scrub else 'no'})   -> {out_path}")
PY
