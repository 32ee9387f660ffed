//! A real Linux guest takes a machine check for memory the VMM could not
//! serve, and the VMM goes on (runs when the nested L1 is available).
//!
//! The L1 runs Debian 13's 6.12 kernel, whose userfaultfd has
//! `UFFDIO_POISON`. The guest's RAM is on 2 MiB huge pages; once it has
//! booted, the L1 shrinks its huge page pool to what is in use, so every
//! page the guest touches after that cannot be installed. The fault
//! handler retries, then poisons the page; KVM raises `SIGBUS` on the vCPU
//! thread, and the VMM injects a machine check into the guest, which has
//! enabled them. (What the guest makes of it is not asserted: here it
//! touches the same page again while its handler still runs, and KVM
//! shuts a guest down on a second machine check in progress, as hardware
//! does; the VMM then ends with an error naming the page.)

use integration_tests::l1::{guest_image_of_with, kernel_dir_of, l1_unavailable, run_l1_on};

#[test]
fn a_page_that_cannot_be_served_reaches_the_linux_guest_as_a_machine_check() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    // Debian 13's kernel as the L1 and as the guest: Debian 12's cloud
    // kernel is built without CONFIG_X86_MCE, so it never enables machine
    // checks (CR4.MCE) and cannot take one.
    let (vmlinux, image) =
        guest_image_of_with("trixie", "poison", "resources/guest/poison-workload.sh")
            .expect("the Debian 13 kernel and guest image");
    let l1_kernel = kernel_dir_of("trixie");
    let script = r#"#!/bin/sh
pool=/sys/kernel/mm/hugepages/hugepages-2048kB
echo 150 > /proc/sys/vm/nr_hugepages
echo "POOL-BEFORE total=$(cat $pool/nr_hugepages) free=$(cat $pool/free_hugepages)"
RUST_LOG=warn taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/vmlinux-6.12 \
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
        &[
            (vmlinux, "/guest/vmlinux-6.12"),
            (image, "/guest/poison.cpio.gz"),
        ],
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
    // The guest kernel had enabled machine checks (CPUID announces them;
    // Debian 13's kernel has CONFIG_X86_MCE), so KVM took the first one.
    if log.contains("has not enabled machine checks") {
        out.fail("the guest had not enabled machine checks (CR4.MCE)");
    }
    // The VMM was not killed by SIGBUS (135) or any signal, and said why
    // the guest stopped.
    let code = out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE");
    if !matches!(code.as_deref(), Some("0" | "2")) || !log.contains("vmm: guest stopped:") {
        out.fail(&format!("the VMM did not end cleanly (exit code {code:?})"));
    }
}
