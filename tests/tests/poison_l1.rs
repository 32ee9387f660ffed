//! A real Linux guest takes a machine check for memory the VMM could not
//! serve, and the VMM goes on (runs when the nested L1 is available).
//!
//! The L1 runs Debian 13's 6.12 kernel, whose userfaultfd has
//! `UFFDIO_POISON`. The guest's RAM is on 2 MiB huge pages; once it has
//! booted, the L1 shrinks its huge page pool to what is in use, so every
//! page the guest touches after that cannot be installed. The fault
//! handler retries, then poisons the page; KVM raises `SIGBUS` on the vCPU
//! thread, and the VMM injects a machine check the guest kernel reports.

use integration_tests::l1::{guest_image_with, guest_images_of, l1_unavailable, run_l1_on};

#[test]
fn a_page_that_cannot_be_served_reaches_the_linux_guest_as_a_machine_check() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let (l1_vmlinux, _) = guest_images_of("trixie").expect("the Debian 13 kernel");
    let l1_kernel = l1_vmlinux.parent().expect("the kernel cache").to_path_buf();
    let image =
        guest_image_with("poison", "resources/guest/poison-workload.sh").expect("the guest image");
    let script = r#"#!/bin/sh
pool=/sys/kernel/mm/hugepages/hugepages-2048kB
echo 150 > /proc/sys/vm/nr_hugepages
echo "POOL-BEFORE total=$(cat $pool/nr_hugepages) free=$(cat $pool/free_hugepages)"
RUST_LOG=warn taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/vmlinux \
    --initrd /guest/poison.cpio.gz --memory 256M --mem-backend hugetlbfs >/tmp/vmm.log 2>&1 &
pid=$!
n=0
until grep -q GUEST-POISON-READY /tmp/vmm.log; do
    sleep 0.5
    n=$((n + 1))
    [ $n -lt 400 ] || { echo "POOL-TIMEOUT"; break; }
done
echo 0 > /proc/sys/vm/nr_hugepages
echo "POOL-AFTER total=$(cat $pool/nr_hugepages) free=$(cat $pool/free_hugepages)"
wait $pid
echo "VMM-EXIT-CODE=$?"
cat /tmp/vmm.log
"#;
    let out = run_l1_on(
        Some(&l1_kernel),
        "poison",
        &[(image, "/guest/poison.cpio.gz")],
        script,
        400,
    )
    .expect("running the L1");
    out.assert_script_ok();
    if out.line("GUEST-FILLING").is_none() {
        out.fail("the guest never started filling memory after the pool shrank");
    }
    if out.value("POOL-AFTER", "free").as_deref() != Some("0") {
        out.fail("the huge page pool kept free pages");
    }
    let log = &out.log;
    if !log.contains("a touch of it raises a machine check") {
        out.fail("the fault handler poisoned no page");
    }
    if !log.contains("machine check injected") {
        out.fail("no machine check was injected into the guest");
    }
    // Linux reports a machine check it recovers from (a killed process, an
    // isolated page) and one it cannot (a panic) alike on the console.
    let guest_saw = ["Hardware Error", "Machine check", "Memory failure", "MCE:"]
        .iter()
        .any(|s| log.contains(s));
    if !guest_saw {
        out.fail("the guest kernel reported no machine check");
    }
    // The VMM was not killed by SIGBUS (135) or any signal, and said why
    // the guest stopped.
    let code = out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE");
    if !matches!(code.as_deref(), Some("0" | "2")) || !log.contains("vmm: guest stopped:") {
        out.fail(&format!("the VMM did not end cleanly (exit code {code:?})"));
    }
}
