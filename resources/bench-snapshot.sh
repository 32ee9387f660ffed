#!/usr/bin/env bash
# Snapshot benchmark, in the L1: a 1 GiB guest (Debian kernel, 1 vCPU)
# whose workload checksums 200 MiB of data is paused and saved; the VMM
# ends, and the snapshot is restored in a new VMM process, lazily and then
# eagerly (resources/snapshot-demo.sh, balloon inflated and deflated during
# each restore). Measured: the snapshot's time and its memory file (on
# disk and apparent); per mode, the time from the restoring process's start
# to the VM running (its API socket up), to the guest's first line after
# the resume, and the pages installed in the first second. Prints a table
# and writes target/bench/snapshot.json.
#
# Usage: resources/bench-snapshot.sh [--memory MiB] [--data MiB]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

memory=1024
data=200
while (($#)); do
    case "$1" in
        --memory) memory="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
for v in "$memory" "$data"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--memory and --data take positive integers"
done
((data * 2 < memory)) || die "--data must be less than half of --memory"
bench_prepare
image="$GUEST_CACHE/guest-snapshot.cpio.gz"
"$RESOURCES_DIR/build-initramfs.sh" --out "$image" \
    --extra "$RESOURCES_DIR/guest/snapshot-workload.sh:/guest-test.sh"
script="$GUEST_CACHE/bench/snapshot.sh"
mkdir -p "$(dirname "$script")"
cat >"$script" <<SCRIPT
#!/bin/sh
MEMORY_MIB=$memory DATA_MIB=$data MODES="lazy eager" sh /guest/snapshot-demo.sh
SCRIPT
bench_run_l1 snapshot "$script" \
    --add "$image:/guest/snapshot.cpio.gz" \
    --add "$RESOURCES_DIR/snapshot-demo.sh:/guest/snapshot-demo.sh"
log="$GUEST_CACHE/bench/snapshot.log"
out_path="$REPO_ROOT/target/bench/snapshot.json"
mkdir -p "$(dirname "$out_path")"
python3 - "$log" "$out_path" "$memory" "$data" <<'PY'
import json, re, sys
log, out_path, memory, data = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(log, errors="replace").read()
def kv(line):
    return dict(m.groups() for m in re.finditer(r"(\w+)=([^\s,]+)", line))
snap = next((kv(l) for l in text.splitlines() if l.startswith("SNAPSHOT ")), None)
restored = {kv(l)["mode"]: kv(l) for l in text.splitlines() if l.startswith("RESTORED ")}
if snap is None or set(restored) != {"lazy", "eager"}:
    sys.exit(f"bench-snapshot: the run did not complete; see {log}")
out = {
    "memory_mib": memory, "guest_data_mib": data,
    "snapshot_s": float(snap["snapshot_s"]),
    "snapshot_file_mib": int(snap["file_mib"]),
    "snapshot_apparent_mib": int(snap["apparent_mib"]),
    "guest_used_mib": int(snap["guest_used_mib"]),
}
for m in ("lazy", "eager"):
    r = restored[m]
    out[f"restore_{m}_s"] = float(r["running_s"])
    out[f"first_response_{m}_s"] = float(r["first_response_s"])
    out[f"pages_first_second_{m}"] = int(r["pages_first_second"])
out["restore_lazy_to_eager"] = out["restore_lazy_s"] / out["restore_eager_s"]
with open(out_path, "w") as f:
    json.dump(out, f, indent=2)
print(f"snapshot: {out['snapshot_s']:.2f} s, memory file {out['snapshot_file_mib']} MiB on disk "
      f"({out['snapshot_apparent_mib']} MiB apparent), host had {out['guest_used_mib']} MiB")
print(f"{'':6} {'running s':>10} {'first line s':>13} {'pages in 1st s':>15}")
for m in ("lazy", "eager"):
    print(f"{m:6} {out[f'restore_{m}_s']:>10.2f} {out[f'first_response_{m}_s']:>13.2f}"
          f" {out[f'pages_first_second_{m}']:>15}")
print(f"lazy/eager to a running guest: {out['restore_lazy_to_eager']:.2f}x   -> {out_path}")
PY
