//! virtio-balloon driven through the API on the Debian kernel, inside the
//! nested L1: inflate to half the guest while its workload keeps the fault
//! handler busy, check the guest's balloon reached the target, the host got
//! the memory back and no discarded range was refilled, deflate, check
//! again. Then the same once more with the L1's shmem allowed huge pages
//! (`advise`): the fault handler fills fresh memory 2 MiB at a time, and
//! the balloon's 4 KiB discards must split those huge pages to give the
//! memory back. Free page reporting is off for that round: it would hand
//! the dirtied memory back before the inflate (whole huge pages, quickly),
//! leaving the inflate nothing to show.

use integration_tests::l1::{guest_image_with, l1_unavailable, repo_root, run_l1, L1Output};

/// In the L1: the demo's own balloon script, told where things are, twice.
const L1: &str = r#"#!/bin/sh
VMMCTL=/bin/vmmctl MEMORY_MIB=512 TARGET_MIB=256 sh /guest/balloon-demo.sh || exit 1
echo "ROUND huge-fills"
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled
VMM_ARGS="--balloon-free-page-reporting false" VMMCTL=/bin/vmmctl MEMORY_MIB=512 \
    TARGET_MIB=256 sh /guest/balloon-demo.sh
"#;

#[test]
fn balloon_inflates_returns_memory_and_deflates_under_a_workload() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let image = guest_image_with("balloon", "resources/guest/balloon-workload.sh")
        .expect("building the balloon guest initramfs");
    let vmmctl = integration_tests::l1::vmm_binary()
        .unwrap()
        .with_file_name("vmmctl");
    let out = run_l1(
        "balloon",
        &[
            (image, "/guest/balloon.cpio.gz"),
            (vmmctl, "/bin/vmmctl"),
            (
                repo_root().join("resources/balloon-demo.sh"),
                "/guest/balloon-demo.sh",
            ),
        ],
        L1,
        600,
    )
    .expect("running the L1");
    out.assert_script_ok();
    let Some((pages, huge)) = out.log.split_once("ROUND huge-fills") else {
        out.fail("the second round never started");
    };
    let round = |log: &str| L1Output {
        log: log.to_string(),
        log_path: out.log_path.clone(),
        code: out.code,
    };
    check_round(&round(pages), false);
    check_round(&round(huge), true);
}

/// One round's checks; `huge`: the round with huge fills and no free page
/// reporting.
fn check_round(out: &L1Output, huge: bool) {
    let fail = |what: &str| -> ! { out.fail(what) };
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
    // The VMM's resident memory drops with it (guest RAM is its mapping).
    let rss = |marker: &str| -> u64 {
        out.value(marker, "rss_mib")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fail(&format!("no rss_mib on the {marker} line")))
    };
    let (rss_before, rss_inflated) = (rss("HOST-BEFORE"), rss("HOST-INFLATED"));
    eprintln!("VMM RSS: before {rss_before} MiB, inflated {rss_inflated} MiB");
    if rss_before.saturating_sub(rss_inflated) < 200 {
        fail("the VMM's resident memory did not drop with the inflate");
    }
    if out.line("GUEST-SAW-INFLATE").is_none() || out.line("GUEST-SAW-DEFLATE").is_none() {
        fail("the guest did not see its memory go and come back");
    }
    // The fault handler was busy while the balloon inflated and deflated:
    // the guest's workload kept faulting in fresh memory (free page
    // reporting hands its freed pages back to the host between rounds).
    // Counted until 3 s after the deflate: an inflate can take 2 s, and a
    // round of the workload 6 s.
    let installed = |marker: &str| -> u64 {
        out.value(marker, "pages_installed")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fail(&format!("no {marker} line")))
    };
    let inflate = installed("FAULTS-AFTER-INFLATE") - installed("FAULTS-BEFORE-INFLATE");
    let during = installed("FAULTS-SETTLED") - installed("FAULTS-BEFORE-INFLATE");
    eprintln!(
        "pages installed by the fault handler: {inflate} during the inflate, {during} until 3 s after the deflate"
    );
    // Without free page reporting the workload reuses memory that stays
    // backed: the handler is busy only where reporting gives memory back.
    if during < 4096 && !huge {
        fail("the fault handler was idle around the balloon's work (fewer than 16 MiB installed)");
    }
    let fills: u64 = out
        .value("FAULTS-SETTLED", "huge_fills")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fail("no huge_fills on the FAULTS-SETTLED line"));
    eprintln!("huge pages filled by the fault handler: {fills}");
    if huge && fills == 0 {
        fail("fresh memory was not filled a huge page at a time under shmem_enabled=advise");
    }
    // Every inflated range was a hole when the inflate completed, while the
    // fault handler served the guest's workload.
    let strays: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.contains("\"stray_ranges\""))
        .collect();
    if strays.is_empty() || strays.iter().any(|l| !l.contains("\"stray_ranges\": 0")) {
        fail("stray pages behind balloon discards");
    }
    if out.line("GUEST-WORKLOAD-OK").is_none() {
        fail("the guest workload did not finish cleanly");
    }
    if out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE").as_deref() != Some("0") {
        fail("the VMM did not exit cleanly");
    }
    let _ = deflated;
}
