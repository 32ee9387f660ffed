//! `stress`: the balloon-shrink stress suite on this machine's /dev/kvm.
//! Prints a verdict table, writes it as JSON, exits 1 when anything was
//! lost or left stray.
//!
//! ```text
//! cargo run --release -p integration-tests --bin stress -- --seconds 60 --vcpus 4
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use guest_mem::Readahead;
use integration_tests::stress::{self, StressConfig, Verdict};

#[derive(Parser, Debug)]
#[command(about = "Balloon, resize and fault-handler stress on CPL3 vCPUs; prints a verdict")]
struct Args {
    /// How long the host drives the guest.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    #[arg(long, default_value_t = 4)]
    vcpus: u8,
    /// Boot RAM in MiB (the balloon works on all of it above 8 MiB).
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// The resizable region's largest size in MiB (0: none).
    #[arg(long, default_value_t = 64)]
    window_mib: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest readahead window in KiB (0: one page per fault).
    #[arg(long, default_value_t = 2048)]
    readahead_kib: u64,
    /// Test switch: serve faults without the generation re-check.
    #[arg(long)]
    no_recheck: bool,
    /// Test switch: sleep this long after every fetch (microseconds).
    #[arg(long, default_value_t = 0)]
    fetch_delay_us: u64,
    /// Run twice, re-check on and off (no delay), and compare throughput.
    #[arg(long)]
    compare_recheck: bool,
    /// Run without the VMM's seccomp filters (to measure what they cost).
    #[arg(long)]
    no_seccomp: bool,
    /// Pause and snapshot the VM this many seconds in, end it, and carry on
    /// in a VM restored lazily from the snapshot.
    #[arg(long)]
    snapshot_at: Option<f64>,
    /// Back guest memory with files in DIR (say a tmpfs mounted
    /// `huge=advise`) and let fresh memory read zero, so that the fault
    /// handler fills it a huge page at a time where the mount allows.
    #[arg(long, value_name = "DIR", conflicts_with = "snapshot_at")]
    zero_fresh_in: Option<PathBuf>,
    /// Where to write the JSON verdict.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn write(path: &std::path::Path, text: &str) -> Result<(), String> {
    stress::write_json(path, text)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_one(cfg: &StressConfig) -> Result<Verdict, String> {
    eprintln!(
        "stress: {:.0} s, {} vCPUs, {} MiB + {} MiB window, seed {}, re-check {}, seccomp {}",
        cfg.duration.as_secs_f64(),
        cfg.vcpus,
        cfg.memory >> 20,
        cfg.window >> 20,
        cfg.seed,
        if cfg.skip_recheck { "off" } else { "on" },
        if cfg.seccomp { "on" } else { "off" }
    );
    let v = stress::run(cfg)?;
    println!("{}", v.table());
    Ok(v)
}

fn main() -> ExitCode {
    env_logger_init();
    let a = Args::parse();
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        eprintln!("stress: --seconds must be positive");
        return ExitCode::from(2);
    }
    let cfg = StressConfig {
        duration: Duration::from_secs_f64(a.seconds),
        vcpus: a.vcpus,
        memory: a.memory_mib << 20,
        window: a.window_mib << 20,
        seed: a.seed,
        skip_recheck: a.no_recheck,
        fetch_delay: Duration::from_micros(a.fetch_delay_us),
        readahead: if a.readahead_kib == 0 {
            Readahead::NONE
        } else {
            Readahead {
                max: a.readahead_kib << 10,
                adaptive: true,
            }
        },
        progress: true,
        seccomp: !a.no_seccomp,
        snapshot_at: a.snapshot_at.map(Duration::from_secs_f64),
        zero_fresh_in: a.zero_fresh_in.clone(),
    };
    let result = if a.compare_recheck {
        compare(
            &cfg,
            a.json
                .unwrap_or_else(|| stress::bench_json("stress-recheck.json")),
        )
    } else {
        run_one(&cfg).and_then(|v| {
            write(
                &a.json.unwrap_or_else(|| stress::bench_json("stress.json")),
                &v.to_json(),
            )?;
            Ok(v.passed())
        })
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stress: {e}");
            ExitCode::from(2)
        }
    }
}

/// Re-check on, then off, same seed and length: throughput side by side.
fn compare(cfg: &StressConfig, json: PathBuf) -> Result<bool, String> {
    let on = run_one(&StressConfig {
        skip_recheck: false,
        fetch_delay: Duration::ZERO,
        ..cfg.clone()
    })?;
    let off = run_one(&StressConfig {
        skip_recheck: true,
        fetch_delay: Duration::ZERO,
        ..cfg.clone()
    })?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let out = serde_json::json!({
        "recheck_on": on,
        "recheck_off": off,
        "operations_per_s_on_over_off": ratio(on.operations_per_s, off.operations_per_s),
        "verified_writes_per_s_on_over_off": ratio(on.verified_writes_per_s, off.verified_writes_per_s),
        "fault_p50_us": [on.fault_p50_us, off.fault_p50_us],
        "fault_p99_us": [on.fault_p99_us, off.fault_p99_us],
    });
    println!(
        "re-check on/off: operations {:.0}/{:.0} per s ({:.3}x), verified writes {:.0}/{:.0} per s, \
         fault p50 {:.0}/{:.0} us, p99 {:.0}/{:.0} us",
        on.operations_per_s,
        off.operations_per_s,
        ratio(on.operations_per_s, off.operations_per_s),
        on.verified_writes_per_s,
        off.verified_writes_per_s,
        on.fault_p50_us,
        off.fault_p50_us,
        on.fault_p99_us,
        off.fault_p99_us
    );
    write(
        &json,
        &serde_json::to_string_pretty(&out).expect("serializes"),
    )?;
    Ok(on.passed())
}

fn env_logger_init() {
    // Warnings from the fault handler and devices go to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
}
