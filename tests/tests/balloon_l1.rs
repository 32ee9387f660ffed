//! virtio-balloon driven through the API on the Debian kernel, inside the
//! nested L1: inflate to half the guest, check the guest's balloon reached
//! the target and the host got the memory back, keep a workload running,
//! deflate, check again.

use integration_tests::l1::{guest_images, l1_unavailable, repo_root, run_l1};

/// Runs in the guest: dirties memory and frees it (so the host has it
/// allocated), then keeps a workload going while the host inflates and
/// deflates, and checks its data survived.
const GUEST: &str = r#"#!/bin/sh
total() { grep MemTotal /proc/meminfo | grep -o '[0-9]*'; }
mkdir -p /mnt && mount -t tmpfs -o size=90% tmpfs /mnt || exit 1
dd if=/dev/zero of=/mnt/fill bs=1M count=400 2>/dev/null || exit 1
rm /mnt/fill
t0=$(total)
echo "GUEST-READY MemTotal=$t0"
phase=inflate
i=0
while [ $i -lt 300 ]; do
    dd if=/dev/urandom of=/mnt/work bs=1M count=32 2>/dev/null || exit 1
    sum1=$(md5sum /mnt/work | cut -d' ' -f1)
    sleep 1
    sum2=$(md5sum /mnt/work | cut -d' ' -f1)
    [ "$sum1" = "$sum2" ] || { echo "GUEST-WORKLOAD-CORRUPT round $i"; exit 1; }
    rm /mnt/work
    t=$(total)
    # Without deflate-on-OOM the balloon takes its pages out of MemTotal.
    if [ $phase = inflate ] && [ $t -lt $((t0 - 200000)) ]; then
        echo "GUEST-SAW-INFLATE MemTotal=$t"; phase=deflate
    elif [ $phase = deflate ] && [ $t -gt $((t0 - 20000)) ]; then
        echo "GUEST-SAW-DEFLATE MemTotal=$t"; break
    fi
    i=$((i+1))
done
echo "GUEST-WORKLOAD-OK rounds=$i phase=$phase"
"#;

/// Runs in L1: starts the VMM, drives the balloon through the API.
const L1: &str = r#"#!/bin/sh
sock=/tmp/api.sock
trap 'echo "--- guest serial ---"; cat /tmp/serial.log' EXIT
field() { /bin/vmmctl --sock $sock GET "$1" | grep -o "\"$2\": [0-9]*" | head -1 | grep -o '[0-9]*$'; }
taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/vmlinux --initrd /guest/balloon.cpio.gz \
    --memory 512M --vcpus 1 --balloon --api-sock $sock --serial file:/tmp/serial.log &
vmm=$!
n=0
until grep -q GUEST-READY /tmp/serial.log 2>/dev/null; do
    sleep 1; n=$((n+1)); [ $n -lt 240 ] || { echo "guest never got ready"; cat /tmp/serial.log; exit 1; }
done
wait_actual() {
    n=0
    while [ "$(field /balloon actual_mib)" != "$1" ]; do
        sleep 1; n=$((n+1))
        [ $n -lt 120 ] || { echo "balloon stuck at $(field /balloon actual_mib) MiB, wanted $1"; return 1; }
    done
    echo "BALLOON-SECONDS target=$1 s=$n"
}
before=$(field /vm host_allocated_mib)
echo "HOST-BEFORE allocated_mib=$before"
/bin/vmmctl --sock $sock PUT /balloon '{"target_mib": 256}' || exit 1
wait_actual 256 || exit 1
inflated=$(field /vm host_allocated_mib)
echo "HOST-INFLATED allocated_mib=$inflated"
/bin/vmmctl --sock $sock GET /balloon
/bin/vmmctl --sock $sock PUT /balloon '{"target_mib": 0}' || exit 1
wait_actual 0 || exit 1
echo "HOST-DEFLATED allocated_mib=$(field /vm host_allocated_mib)"
/bin/vmmctl --sock $sock GET /metrics | head -40
wait $vmm
echo "VMM-EXIT-CODE=$?"
"#;

#[test]
fn balloon_inflates_returns_memory_and_deflates_under_a_workload() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let _ = guest_images().expect("guest images");
    let build = repo_root().join("build");
    let guest_script = repo_root().join("target/l1-logs/balloon-guest.sh");
    std::fs::create_dir_all(guest_script.parent().unwrap()).unwrap();
    std::fs::write(&guest_script, GUEST).unwrap();
    let image = build.join("guest-balloon.cpio.gz");
    let ok = std::process::Command::new("bash")
        .current_dir(repo_root())
        .args(["resources/build-initramfs.sh", "--out"])
        .arg(&image)
        .arg("--extra")
        .arg(format!("{}:/guest-test.sh", guest_script.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "building the balloon guest initramfs");
    let vmmctl = integration_tests::l1::vmm_binary()
        .unwrap()
        .with_file_name("vmmctl");
    let out = run_l1(
        "balloon",
        &[(image, "/guest/balloon.cpio.gz"), (vmmctl, "/bin/vmmctl")],
        L1,
        600,
    )
    .expect("running the L1");
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- log kept at {} ---\n{}",
            out.log_path.display(),
            out.log
        )
    };
    if out.code != 0 {
        fail(&format!("the L1 script failed with {}", out.code));
    }
    let num = |marker: &str| -> u64 {
        out.value(marker, "allocated_mib")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fail(&format!("no {marker} line")))
    };
    let (before, inflated, deflated) = (
        num("HOST-BEFORE"),
        num("HOST-INFLATED"),
        num("HOST-DEFLATED"),
    );
    eprintln!(
        "host allocation: before {before} MiB, inflated {inflated} MiB, deflated {deflated} MiB"
    );
    if before < 400 {
        fail("the guest did not dirty its memory first");
    }
    // About 256 MiB come back (the balloon may take pages the guest never
    // touched, which were never allocated).
    if before.saturating_sub(inflated) < 200 {
        fail("the host did not get the inflated memory back");
    }
    if out.line("GUEST-SAW-INFLATE").is_none() || out.line("GUEST-SAW-DEFLATE").is_none() {
        fail("the guest did not see its memory go and come back");
    }
    if out.line("GUEST-WORKLOAD-OK").is_none() {
        fail("the guest workload did not finish cleanly");
    }
    if out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE").as_deref() != Some("0") {
        fail("the VMM did not exit cleanly");
    }
    let _ = deflated;
}
