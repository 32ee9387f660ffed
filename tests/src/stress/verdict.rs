//! The end of a stress run: the guest's own counters, a host-side check of
//! every page against the guest's record, and the pass/fail verdict.

use std::fmt::Write as _;

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{GuestMem, StatsSnapshot};
use serde::Serialize;
use vmm::api::BalloonHandle;

use super::driver::{Driven, WINDOW_REGION};
use super::layout::{self, ctrl, stat, state, Layout, Pool, CTRL};
use super::StressConfig;

pub(crate) struct Inputs<'a> {
    pub cfg: &'a StressConfig,
    pub layout: &'a Layout,
    pub mem: &'a GuestMem,
    pub balloon: &'a BalloonHandle,
    pub driven: Driven,
    pub before: StatsSnapshot,
    pub seconds: f64,
    pub bad_exits: Vec<String>,
}

/// A bad page: where, what should have been there, what was.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BadPage {
    pub addr: u64,
    pub expected: u64,
    pub found: u64,
    /// Who saw it: a vCPU (`vcpu N`) or the host's final check.
    pub seen_by: String,
}

/// What a stress run did and found. `passed()` is the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub seconds: f64,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub window_mib: u64,
    pub seed: u64,
    pub recheck: bool,
    pub fetch_delay_us: u64,
    pub readahead_kib: u64,
    /// Page stamps checked and written again.
    pub verified_writes: u64,
    pub writes: u64,
    pub operations: u64,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Pages reported free through the reporting queue.
    pub reported_pages: u64,
    pub target_changes: u64,
    pub shrinks: u64,
    pub grows: u64,
    /// Snapshots taken and restored mid-run.
    pub restores: u64,
    pub faults: u64,
    pub pages_installed: u64,
    /// Huge pages of fresh memory filled whole.
    pub huge_fills: u64,
    pub retries: u64,
    pub spurious_retries: u64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    /// Discard requests the balloon carried out.
    pub discards: u64,
    /// Pages whose stamp was not the last one written (guest and host).
    pub lost_writes: u64,
    /// Pages given back that were backed again or read non-zero.
    pub stray_pages: u64,
    /// Of the pages in the balloon at the end, the share the host no
    /// longer backs (holes in the memfd), in percent.
    pub returned_pct: f64,
    pub ballooned_pages_at_end: u64,
    pub allocated_mib_at_end: f64,
    pub operations_per_s: f64,
    pub verified_writes_per_s: f64,
    pub inflates_per_s: f64,
    pub deflates_per_s: f64,
    pub resizes_per_s: f64,
    pub first_bad_pages: Vec<BadPage>,
    /// Everything that makes the run fail besides lost and stray pages.
    pub problems: Vec<String>,
}

impl Verdict {
    /// Nothing lost, nothing stray, no other problem, and every kind of
    /// operation actually happened.
    pub fn passed(&self) -> bool {
        self.lost_writes == 0 && self.stray_pages == 0 && self.problems.is_empty()
    }

    /// The verdict as pretty JSON.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("the verdict serializes");
        v["passed"] = serde_json::Value::Bool(self.passed());
        serde_json::to_string_pretty(&v).expect("the verdict serializes")
    }

    /// The verdict as a table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<24} {v}");
        };
        row(
            "run",
            format!(
                "{:.1} s, {} vCPUs, {} MiB + {} MiB window, seed {}, re-check {}{}",
                self.seconds,
                self.vcpus,
                self.memory_mib,
                self.window_mib,
                self.seed,
                if self.recheck { "on" } else { "OFF" },
                if self.fetch_delay_us > 0 {
                    format!(", fetch delay {} us", self.fetch_delay_us)
                } else {
                    String::new()
                }
            ),
        );
        row(
            "verified writes",
            format!(
                "{} ({:.0}/s)",
                self.verified_writes, self.verified_writes_per_s
            ),
        );
        row(
            "balloon",
            format!(
                "{} pages in, {} out, {} reported, {} target changes, {} discards",
                self.inflated_pages,
                self.deflated_pages,
                self.reported_pages,
                self.target_changes,
                self.discards
            ),
        );
        row(
            "window",
            format!(
                "{} shrinks, {} grows, {} snapshot restores",
                self.shrinks, self.grows, self.restores
            ),
        );
        row(
            "faults",
            format!(
                "{} ({} pages installed, {} huge pages filled), p50 {:.0} us, p99 {:.0} us",
                self.faults,
                self.pages_installed,
                self.huge_fills,
                self.fault_p50_us,
                self.fault_p99_us
            ),
        );
        row(
            "retries",
            format!("{} ({} spurious)", self.retries, self.spurious_retries),
        );
        row("lost writes", self.lost_writes.to_string());
        row("stray pages", self.stray_pages.to_string());
        row(
            "returned",
            format!(
                "{:.1}% of {} ballooned pages; {:.1} MiB allocated",
                self.returned_pct, self.ballooned_pages_at_end, self.allocated_mib_at_end
            ),
        );
        for b in &self.first_bad_pages {
            row(
                "bad page",
                format!(
                    "{:#x}: expected {:#018x}, found {:#018x} ({})",
                    b.addr, b.expected, b.found, b.seen_by
                ),
            );
        }
        for p in &self.problems {
            row("problem", p.clone());
        }
        row(
            "verdict",
            if self.passed() { "PASS" } else { "FAIL" }.to_string(),
        );
        t
    }
}

const KEEP_BAD: usize = 8;

pub(crate) fn judge(i: Inputs) -> Result<Verdict, String> {
    let guard = i.mem.memory();
    let m = guard.memory();
    let word = |addr: u64| m.read_obj::<u64>(GuestAddress(addr)).ok();
    let mut problems = Vec::new();
    let mut bad = Vec::new();
    let (mut lost, mut stray) = (0u64, 0u64);
    let (mut verified, mut writes, mut ops) = (0, 0, 0);
    let (mut inflated, mut deflated, mut reported) = (0, 0, 0);
    for id in 0..i.layout.vcpus {
        let s = |off| word(Layout::stats(id) + off).unwrap_or(0);
        verified += s(stat::VERIFIED);
        writes += s(stat::WRITES);
        ops += s(stat::OPS);
        inflated += s(stat::INFLATED);
        deflated += s(stat::DEFLATED);
        reported += s(stat::REPORTED);
        lost += s(stat::LOST);
        stray += s(stat::STRAY);
        if s(stat::BAD_ADDR) != 0 {
            bad.push(BadPage {
                addr: s(stat::BAD_ADDR),
                expected: s(stat::BAD_EXPECTED),
                found: s(stat::BAD_FOUND),
                seen_by: format!("vCPU {id}"),
            });
        }
    }
    problems.extend(i.bad_exits.iter().map(|r| format!("vCPU exit: {r}")));
    if word(CTRL + ctrl::INIT_ERR).unwrap_or(0) != 0 {
        problems.push(format!(
            "the guest's balloon set-up failed at step {}",
            word(CTRL + ctrl::INIT_ERR).unwrap_or(0)
        ));
    }

    // The host's check of every page against the guest's record.
    let regions = i.mem.regions();
    let window_plugged = regions
        .get(WINDOW_REGION.0)
        .map_or(0, |r| r.backed_size() / 4096);
    // Where fresh memory reads zero (no source), a page a shrink cut off is
    // fresh again once the region grows back over it: readahead and huge
    // fills may back it with zeros (the guest checks it reads zero). Only
    // what the balloon was given (the discard map) must stay a hole.
    let regrown_is_fresh = i.cfg.zero_fresh_in.is_some();
    let mut check = |pool: &Pool, region: usize, plugged: u64| -> Result<(u64, u64), String> {
        let mut states = vec![0u8; (pool.pages * 4) as usize];
        m.read_slice(&mut states, GuestAddress(pool.state))
            .map_err(|e| format!("reading the page record: {e}"))?;
        let r = &regions[region];
        let (mut given_back, mut holes) = (0u64, 0u64);
        for (idx, st) in states.chunks_exact(4).enumerate() {
            let idx = idx as u64;
            let st = u32::from_le_bytes(st.try_into().expect("4 bytes"));
            let gpa = pool.base + idx * 4096;
            match st {
                state::FRESH => {}
                state::BALLOONED | state::ZERO => {
                    if idx >= plugged {
                        continue; // truncated away
                    }
                    if regrown_is_fresh && region == WINDOW_REGION.0 && st == state::ZERO {
                        continue;
                    }
                    let off = gpa - r.guest_base().0;
                    // Never read these through the mapping: a read would
                    // fault them in.
                    let backed = r
                        .backing()
                        .has_data(r.file_range(off, 4096))
                        .map_err(|e| format!("SEEK_DATA on {gpa:#x}: {e}"))?;
                    if st == state::BALLOONED {
                        given_back += 1;
                    }
                    if backed {
                        stray += 1;
                        if bad.len() < KEEP_BAD {
                            bad.push(BadPage {
                                addr: gpa,
                                expected: 0,
                                found: u64::MAX,
                                seen_by: "host: given back but backed".into(),
                            });
                        }
                    } else if st == state::BALLOONED {
                        holes += 1;
                    }
                }
                state::TAKING => problems.push(format!("page {gpa:#x} left mid-deflate")),
                seq => {
                    let want = layout::stamp(gpa, i.layout.owner(idx), seq);
                    for at in [gpa, gpa + 0xff8] {
                        let found = word(at);
                        if found != Some(want) {
                            lost += 1;
                            if bad.len() < KEEP_BAD {
                                bad.push(BadPage {
                                    addr: gpa,
                                    expected: want,
                                    found: found.unwrap_or(u64::MAX),
                                    seen_by: "host: final check".into(),
                                });
                            }
                            break;
                        }
                    }
                }
            }
        }
        Ok((given_back, holes))
    };
    let (ballooned, holes) = check(&i.layout.ram, 0, i.layout.ram.pages)?;
    if i.layout.window.pages > 0 {
        check(&i.layout.window, WINDOW_REGION.0, window_plugged)?;
    }
    problems.truncate(16);

    // The device saw exactly what the guest sent.
    let c = &i.balloon.state.counters;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let dev_in = c.inflated_pages.load(relaxed);
    let dev_out = c.deflated_pages.load(relaxed);
    let dev_reported = c.reported_bytes.load(relaxed) / 4096;
    if (dev_in, dev_out, dev_reported) != (inflated, deflated, reported) {
        problems.push(format!(
            "the guest sent {inflated} pages in, {deflated} out and reported {reported}; \
             the device saw {dev_in}, {dev_out} and {dev_reported}"
        ));
    }
    for (what, n) in [
        ("rejected PFNs", c.rejected_pfns.load(relaxed)),
        ("rejected chains", c.rejected_chains.load(relaxed)),
        ("discard errors", c.discard_errors.load(relaxed)),
    ] {
        if n > 0 {
            problems.push(format!("balloon: {n} {what}"));
        }
    }
    let d = &i.driven;
    problems.extend(d.resize_errors.iter().cloned());
    if d.ack_timeouts > 0 {
        problems.push(format!(
            "{} window shrinks not acknowledged",
            d.ack_timeouts
        ));
    }
    if d.stuck_vcpus > 0 {
        problems.push(format!("{} vCPUs did not stop when asked", d.stuck_vcpus));
    }
    // A run that did not exercise every path proves nothing.
    for (what, n) in [
        ("verified writes", verified),
        ("inflates", inflated),
        ("deflates", deflated),
        ("free page reports", reported),
    ] {
        if n == 0 {
            problems.push(format!("no {what} happened"));
        }
    }
    if i.layout.window.pages > 0 && (d.shrinks == 0 || d.grows == 0) {
        problems.push("the window was not both shrunk and grown".into());
    }
    let s = i.mem.stats();
    let secs = i.seconds.max(1e-9);
    Ok(Verdict {
        seconds: i.seconds,
        vcpus: i.layout.vcpus,
        memory_mib: i.cfg.memory >> 20,
        window_mib: i.cfg.window >> 20,
        seed: i.cfg.seed,
        recheck: !i.cfg.skip_recheck,
        fetch_delay_us: i.cfg.fetch_delay.as_micros() as u64,
        readahead_kib: i.cfg.readahead.max >> 10,
        verified_writes: verified,
        writes,
        operations: ops,
        inflated_pages: inflated,
        deflated_pages: deflated,
        reported_pages: reported,
        target_changes: d.target_changes,
        shrinks: d.shrinks,
        grows: d.grows,
        restores: d.restores,
        faults: s.faults - i.before.faults,
        pages_installed: s.pages_installed - i.before.pages_installed,
        huge_fills: s.huge_fills - i.before.huge_fills,
        retries: s.retries - i.before.retries,
        spurious_retries: s.spurious_retries - i.before.spurious_retries,
        fault_p50_us: s.fault_latency.p50_ns as f64 / 1e3,
        fault_p99_us: s.fault_latency.p99_ns as f64 / 1e3,
        discards: c.discards.load(relaxed),
        lost_writes: lost,
        stray_pages: stray,
        returned_pct: if ballooned == 0 {
            100.0
        } else {
            holes as f64 * 100.0 / ballooned as f64
        },
        ballooned_pages_at_end: ballooned,
        allocated_mib_at_end: i.mem.allocated_bytes() as f64 / (1 << 20) as f64,
        operations_per_s: ops as f64 / secs,
        verified_writes_per_s: verified as f64 / secs,
        inflates_per_s: inflated as f64 / secs,
        deflates_per_s: deflated as f64 / secs,
        resizes_per_s: (d.shrinks + d.grows) as f64 / secs,
        first_bad_pages: bad,
        problems,
    })
}
