//! The hostile-guest suite on this machine's `/dev/kvm`: a CPL3 guest
//! abuses the balloon and virtio-mem through their registers and rings
//! (see `integration_tests::hostile`). For every case the VMM keeps
//! running, counts what it refused, leaves the guest's other pages alone,
//! keeps its own memory within a bound, and answers a second API client
//! within a second while the guest does its worst. Writes
//! `hostile_cases`, `hostile_cases_survived` and `vmm_rss_growth_mib_max`
//! into `target/bench/hardening.json`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::hostile::{cases, run_case};
use integration_tests::stress::{bench_json, write_json};
use integration_tests::{api_request, kvm_available};

/// Most the VMM's anonymous memory may grow over one case.
const RSS_BOUND_MIB: f64 = 64.0;

/// One HTTP request on a fresh connection; the answer's status line.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> Result<String, String> {
    api_request(sock, method, path, body).map(|(status, _)| status)
}

/// A second API client: once the socket answers, sets a balloon target and
/// reads the memory state and metrics, each within a second. Returns the
/// slowest answer, or `None` when the guest was done before the socket
/// came up.
fn api_client(sock: PathBuf, running: Arc<AtomicBool>) -> Result<Option<Duration>, String> {
    while UnixStream::connect(&sock).is_err() {
        if !running.load(Ordering::SeqCst) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut slowest = Duration::ZERO;
    for (method, path, body) in [
        ("PUT", "/balloon", r#"{"target_mib": 1}"#),
        ("GET", "/memory", ""),
        ("GET", "/metrics", ""),
    ] {
        let start = Instant::now();
        let status = match request(&sock, method, path, body) {
            Ok(s) => s,
            Err(e) => {
                // The VM may have ended meanwhile, taking the socket: only
                // an error while it still runs counts.
                std::thread::sleep(Duration::from_millis(200));
                if !running.load(Ordering::SeqCst) {
                    return Ok(Some(slowest));
                }
                return Err(format!("{method} {path}: {e}"));
            }
        };
        let took = start.elapsed();
        if !status.contains(" 200 ") && !status.contains(" 204 ") {
            return Err(format!("{method} {path}: {status:?}"));
        }
        if took > Duration::from_secs(1) {
            return Err(format!("{method} {path} took {took:?}"));
        }
        slowest = slowest.max(took);
    }
    Ok(Some(slowest))
}

#[test]
fn a_hostile_guest_cannot_hurt_the_vmm() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let dir = std::env::temp_dir().join(format!("hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut results = Vec::new();
    for case in cases() {
        let s = sock.clone();
        let r = run_case(&case, &sock, move |running| api_client(s, running));
        eprintln!(
            "{:<74} {:>6.2} s  RSS {:>+5.1} MiB  API {:>8}  {}",
            r.name,
            r.seconds,
            r.rss_growth_mib,
            r.api_latency.map_or("-".to_string(), |d| format!(
                "{:.1} ms",
                d.as_secs_f64() * 1e3
            )),
            match &r.survived {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        results.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The storms run long enough for the second client to be served.
    for r in &results {
        if r.name.contains("storm") || r.name.contains("flood") {
            assert!(
                r.api_latency.is_some(),
                "{}: the API was never reached",
                r.name
            );
        }
    }
    let survived = results
        .iter()
        .filter(|r| r.survived.is_ok() && r.rss_growth_mib <= RSS_BOUND_MIB)
        .count();
    let growth = results
        .iter()
        .map(|r| r.rss_growth_mib)
        .fold(0.0f64, f64::max);
    let path = bench_json("hardening.json");
    let mut json: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    json.insert("hostile_cases".into(), results.len().into());
    json.insert("hostile_cases_survived".into(), survived.into());
    json.insert("vmm_rss_growth_mib_max".into(), growth.into());
    let _ = write_json(
        &path,
        &serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    let failed: Vec<_> = results
        .iter()
        .filter(|r| r.survived.is_err() || r.rss_growth_mib > RSS_BOUND_MIB)
        .map(|r| r.name)
        .collect();
    assert!(failed.is_empty(), "cases that hurt the VMM: {failed:?}");
}
