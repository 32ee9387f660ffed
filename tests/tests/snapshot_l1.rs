//! Snapshot and restore of a Linux guest, inside the nested L1: the
//! guest checksums its data every second, with 128 MiB of virtio-mem
//! plugged; it is paused and saved, its VMM ended, and the snapshot
//! restored in a new VMM process, lazily and then eagerly, each time with
//! the balloon inflated to half the guest and virtio-mem unplugged at once
//! (while memory is still streaming in), then the balloon deflated. The guest carries on
//! where it stopped — its console, its uptime, its checksums — and powers
//! off cleanly; no inflated range is backed after its discard; the
//! snapshot is unchanged. Timings go to `target/bench/snapshot.json`.

use integration_tests::l1::{guest_image_with, l1_unavailable, repo_root, run_l1};

const L1: &str = r#"#!/bin/sh
VMMCTL=/bin/vmmctl MEMORY_MIB=512 MODES="lazy eager" sh /guest/snapshot-demo.sh
"#;

fn uptime(line: &str) -> f64 {
    line.split([' ', ','])
        .find_map(|w| w.strip_prefix("uptime="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn a_linux_guest_resumes_from_lazy_and_eager_restores_with_the_balloon_live() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let image = guest_image_with("snapshot", "resources/guest/snapshot-workload.sh")
        .expect("building the snapshot guest initramfs");
    let vmmctl = integration_tests::l1::vmm_binary()
        .unwrap()
        .with_file_name("vmmctl");
    let out = run_l1(
        "snapshot",
        &[
            (image, "/guest/snapshot.cpio.gz"),
            (vmmctl, "/bin/vmmctl"),
            (
                repo_root().join("resources/snapshot-demo.sh"),
                "/guest/snapshot-demo.sh",
            ),
        ],
        L1,
        900,
    )
    .expect("running the L1");
    let fail = |what: &str| -> ! { out.fail(what) };
    out.assert_script_ok();
    let paused_at = out
        .line("PAUSED-AT")
        .map(uptime)
        .unwrap_or_else(|| fail("no PAUSED-AT line"));
    let mut json = serde_json::Map::new();
    for key in ["snapshot_s", "guest_used_mib", "file_mib", "apparent_mib"] {
        let v: f64 = out
            .value("SNAPSHOT ", key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fail(&format!("no {key} on the SNAPSHOT line")));
        json.insert(key.replace("file_mib", "snapshot_file_mib"), v.into());
    }
    for mode in ["lazy", "eager"] {
        let line = out
            .log
            .lines()
            .find(|l| l.contains("RESTORED") && l.contains(&format!("mode={mode}")))
            .unwrap_or_else(|| fail(&format!("no RESTORED line for {mode}")));
        // The guest's first line after the restore carries on from the
        // pause: its uptime continues rather than starting over.
        let resumed = uptime(line);
        if !(paused_at..paused_at + 30.0).contains(&resumed) {
            fail(&format!(
                "{mode}: the guest's uptime went from {paused_at} to {resumed}"
            ));
        }
        let num = |key: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("no {key} for {mode}")))
        };
        json.insert(format!("restore_{mode}_s"), num("running_s").into());
        json.insert(
            format!("first_response_{mode}_s"),
            num("first_response_s").into(),
        );
        json.insert(
            format!("pages_first_second_{mode}"),
            num("pages_first_second").into(),
        );
        for marker in [
            "GUEST-SAW-INFLATE",
            "GUEST-SAW-DEFLATE",
            "GUEST-WORKLOAD-OK",
        ] {
            if !out.log.contains(&format!("{mode}: {marker}")) {
                fail(&format!("{mode}: no {marker}"));
            }
        }
        if out.log.contains("GUEST-DATA-CORRUPT") {
            fail("the guest's data changed across the snapshot");
        }
        if !out.log.contains(&format!("VMM-EXIT mode={mode} code=0")) {
            fail(&format!("{mode}: the restored VMM did not exit cleanly"));
        }
    }
    // Every inflated range was a hole right after its discard, while
    // pages were still coming from the snapshot.
    let strays: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.starts_with("BALLOON-AFTER-INFLATE"))
        .collect();
    if strays.len() != 2 || strays.iter().any(|l| !l.contains("\"stray_ranges\": 0")) {
        fail("stray pages behind balloon discards during the restore");
    }
    let plugged = out
        .line("PLUGGED ")
        .unwrap_or_else(|| fail("no PLUGGED line"));
    if !plugged.contains("\"plugged_mib\": 128") {
        fail("virtio-mem did not plug 128 MiB before the snapshot");
    }
    for mode in ["lazy", "eager"] {
        let line = out
            .line(&format!("UNPLUGGED mode={mode}"))
            .unwrap_or_else(|| fail(&format!("no UNPLUGGED line for {mode}")));
        if !line.contains("\"plugged_mib\": 0") {
            fail(&format!(
                "{mode}: virtio-mem did not unplug during the restore"
            ));
        }
    }
    if out.line("SNAPSHOT-UNCHANGED yes").is_none() {
        fail("restoring modified the snapshot");
    }
    let text = serde_json::to_string_pretty(&json).unwrap();
    eprintln!("{text}");
    integration_tests::stress::write_json(
        &integration_tests::stress::bench_json("snapshot.json"),
        &text,
    )
    .unwrap();
}
