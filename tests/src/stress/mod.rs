//! The balloon-shrink stress suite: a CPL3 guest on several vCPUs writes,
//! verifies, balloons, un-balloons and reports free stamped pages through
//! the real virtio-balloon device, and works in a resizable region, while a host
//! driver moves the balloon target and shrinks and grows the region. The
//! fault handler runs with readahead, so installs of neighbouring pages
//! race with discards. At the end a [`Verdict`] says whether anything was
//! lost or any page the guest gave back is still backed.
//!
//! The seed fixes every choice the guest's vCPUs and the host driver make;
//! thread timing still varies from run to run.

mod driver;
pub mod layout;
pub mod payload;
mod verdict;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FaultConfig, GuestMem, PageSource, Readahead, RegionConfig, RegionSource};
use vmm::vcpu::PayloadArgs;
use vmm::{BalloonOptions, ExitReason, SerialOut, Vm, VmConfig};

pub use verdict::Verdict;

use layout::{Layout, CTRL, LOAD, POOL_START, STACKS};

/// What to run.
#[derive(Clone, Debug)]
pub struct StressConfig {
    /// How long the host drives the guest.
    pub duration: Duration,
    pub vcpus: u8,
    /// Boot RAM (the balloon's pool is all of it above 8 MiB).
    pub memory: u64,
    /// The resizable region's largest size (0: none).
    pub window: u64,
    pub seed: u64,
    /// Test-only: the fault handler skips the generation re-check.
    pub skip_recheck: bool,
    /// Test-only: the fault handler sleeps this long after every fetch.
    pub fetch_delay: Duration,
    pub readahead: Readahead,
    /// Print a line every few seconds.
    pub progress: bool,
    /// The VMM's seccomp filters on the vCPU, fault handler and event loop
    /// threads (on unless measuring what they cost).
    pub seccomp: bool,
    /// Pause and snapshot the VM this far into the run, end it, restore the
    /// snapshot (lazily) into a fresh VM and drive that one to the end.
    pub snapshot_at: Option<Duration>,
    /// Back guest memory with files in this directory (a tmpfs that may
    /// give huge pages) and let fresh memory read zero instead of coming
    /// from a page source: then the fault handler fills fresh memory a
    /// huge page at a time where the mount allows it.
    pub zero_fresh_in: Option<std::path::PathBuf>,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            duration: Duration::from_secs(10),
            vcpus: 2,
            memory: 128 << 20,
            window: 32 << 20,
            seed: 1,
            skip_recheck: false,
            fetch_delay: Duration::ZERO,
            readahead: Readahead::default(),
            progress: false,
            seccomp: true,
            snapshot_at: None,
            zero_fresh_in: None,
        }
    }
}

/// First-touch contents of the stress guest's memory: every word of page
/// `p` holds `FRESH_TAG | p`, never zero, so a stale install into memory
/// given back is visible to the guest.
#[derive(Debug)]
struct FreshSource {
    len: u64,
}

/// Marks source words.
pub const FRESH_TAG: u64 = 0xf5e5_0000_0000_0000;

impl PageSource for FreshSource {
    fn size(&self) -> Option<u64> {
        Some(self.len)
    }
    fn is_zero(&self, offset: u64, _len: u64) -> bool {
        offset >= self.len
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        for (i, w) in buf.chunks_mut(8).enumerate() {
            let at = offset + i as u64 * 8;
            let v = if at < self.len {
                FRESH_TAG | (at >> 12)
            } else {
                0
            };
            w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
        }
        Ok(())
    }
}

fn region(cfg: &StressConfig, guest_addr: u64, size: u64, resizable: bool) -> RegionConfig {
    let mut rc = RegionConfig::new(guest_addr, size);
    if resizable {
        rc.max_size = Some(size);
    }
    match &cfg.zero_fresh_in {
        Some(dir) => {
            let name = if resizable { "window" } else { "ram" };
            rc.backing = guest_mem::Backing::File(dir.join(name));
        }
        None => {
            rc.source = Some(RegionSource {
                source: Arc::new(FreshSource { len: size }),
                offset: 0,
            });
        }
    }
    rc
}

fn fault_config(cfg: &StressConfig) -> FaultConfig {
    FaultConfig {
        threads: 2,
        readahead: cfg.readahead,
        skip_recheck: cfg.skip_recheck,
        fetch_delay: cfg.fetch_delay,
        on_thread_start: cfg.seccomp.then(vmm::seccomp::fault_thread_hook),
        ..FaultConfig::default()
    }
}

fn build_memory(cfg: &StressConfig, window_base: u64) -> Result<GuestMem, String> {
    let mut builder = GuestMem::builder()
        .region(region(cfg, 0, cfg.memory, false))
        .fault_config(fault_config(cfg));
    if cfg.window > 0 {
        builder = builder.region(region(cfg, window_base, cfg.window, true));
    }
    builder
        .build()
        .map_err(|e| format!("building guest memory: {e}"))
}

/// Runs the suite once.
pub fn run(cfg: &StressConfig) -> Result<Verdict, String> {
    if cfg.memory > vmm::layout::MMIO_GAP_START {
        return Err(format!(
            "memory {} MiB: the stress guest keeps RAM below the MMIO gap ({} MiB)",
            cfg.memory >> 20,
            vmm::layout::MMIO_GAP_START >> 20
        ));
    }
    let window_base = vmm::layout::hotplug_base(cfg.memory);
    let layout = Layout::new(
        cfg.vcpus,
        cfg.memory,
        window_base,
        cfg.window,
        vmm::layout::VIRTIO_MMIO_BASE,
    )?;
    let mem = build_memory(cfg, window_base)?;
    let mut vm = Vm::with_memory(
        VmConfig {
            memory: cfg.memory,
            vcpus: cfg.vcpus,
            backend: vmm::MemBackend::Memfd,
            fault: FaultConfig::default(),
            serial: SerialOut::Sink,
            balloon: Some(BalloonOptions {
                deflate_on_oom: false,
                free_page_reporting: true,
            }),
            hotplug: None,
            api_socket: None,
            seccomp: cfg.seccomp,
        },
        mem,
    )
    .map_err(|e| format!("creating the VM: {e}"))?;
    let mem = vm.memory().clone();
    let balloon = vm.balloon().expect("the VM has a balloon").clone();
    // The guest's bookkeeping starts zeroed (the source would fill it).
    {
        let guard = mem.memory();
        let m = guard.memory();
        let zeros = vec![0u8; (POOL_START - CTRL) as usize];
        m.write_slice(&zeros, GuestAddress(CTRL))
            .map_err(|e| format!("clearing the control area: {e}"))?;
        m.write_obj(
            layout.window.pages,
            GuestAddress(CTRL + layout::ctrl::LIMIT),
        )
        .map_err(|e| format!("writing the window limit: {e}"))?;
    }
    let code = payload::stress_payload(&layout, LOAD);
    let seeds: Vec<u64> = (0..cfg.vcpus)
        .map(|id| splitmix(cfg.seed ^ ((u64::from(id) + 1) << 32)) | 1)
        .collect();
    vm.load_payload(&code, LOAD, true, |id| PayloadArgs {
        entry: LOAD,
        stack: STACKS + (u64::from(id) + 1) * 0x1000,
        args: [u64::from(id), seeds[usize::from(id)], 0, 0, 0, 0],
    })
    .map_err(|e| format!("loading the payload: {e}"))?;

    let start = Instant::now();
    let (vm, mem, balloon, mut driven) = match cfg.snapshot_at {
        None => (vm, mem, balloon, driver::Driven::default()),
        Some(at) => first_leg(cfg, &layout, vm, at)?,
    };
    let before = mem.stats();
    let rest = cfg.duration.saturating_sub(start.elapsed());
    // Set when the VM stopped, so the driver does not wait for a guest
    // that is gone (a vCPU that failed stops them all).
    let vm_done = Arc::new(AtomicBool::new(false));
    let drv = {
        let (cfg, mem, balloon) = (cfg.clone(), mem.clone(), balloon.clone());
        let vm_done = vm_done.clone();
        std::thread::Builder::new()
            .name("stress-driver".into())
            .spawn(move || driver::drive(&cfg, &layout, &mem, &balloon, &vm_done, rest, true))
            .map_err(|e| format!("spawning the driver: {e}"))?
    };
    let outcome = vm.run().map_err(|e| format!("running the guest: {e}"));
    vm_done.store(true, Ordering::Release);
    driven.merge(
        drv.join()
            .map_err(|_| "the stress driver panicked".to_string())?,
    );
    let outcome = outcome?;
    let seconds = start.elapsed().as_secs_f64();
    let reasons: Vec<String> = outcome
        .reasons
        .iter()
        .filter(|r| !matches!(r, ExitReason::PayloadDone { code: 0, .. }))
        .map(ToString::to_string)
        .collect();
    verdict::judge(verdict::Inputs {
        cfg,
        layout: &layout,
        mem: &mem,
        balloon: &balloon,
        driven,
        before,
        seconds,
        bad_exits: reasons,
    })
}

/// The first leg of a run with a snapshot: drives the VM for `at`, pauses
/// and saves it, ends it, and restores the snapshot lazily into a fresh VM
/// (same fault settings), which it returns with its memory and balloon.
fn first_leg(
    cfg: &StressConfig,
    layout: &Layout,
    vm: Vm,
    at: Duration,
) -> Result<(Vm, Arc<GuestMem>, vmm::api::BalloonHandle, driver::Driven), String> {
    use vmm::control::ControlRequest;
    let (mem, balloon) = (
        vm.memory().clone(),
        vm.balloon().expect("a balloon").clone(),
    );
    let control = vm.control();
    let running = std::thread::spawn(move || vm.run());
    let not_running = AtomicBool::new(false);
    let mut driven = driver::drive(cfg, layout, &mem, &balloon, &not_running, at, false);
    let dir = std::env::temp_dir().join(format!(
        "stress-snapshot-{}-{}",
        std::process::id(),
        cfg.seed
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let ask = |req: ControlRequest| {
        control
            .request(req.clone(), Duration::from_secs(60))
            .map_err(|e| format!("{req:?}: {e}"))
    };
    ask(ControlRequest::Pause)?;
    ask(ControlRequest::Snapshot(dir.clone()))?;
    ask(ControlRequest::Stop)?;
    let first = running
        .join()
        .map_err(|_| "the first VM's thread panicked".to_string())?
        .map_err(|e| format!("running the first VM: {e}"))?;
    if first.reason != ExitReason::Stopped {
        return Err(format!(
            "the first VM ended before its snapshot: {}",
            first.reason
        ));
    }
    drop(mem);
    let restored = Vm::restore(vmm::builder::RestoreConfig {
        dir: dir.clone(),
        mode: vmm::builder::RestoreMode::Lazy,
        fault: fault_config(cfg),
        serial: SerialOut::Sink,
        api_socket: None,
        seccomp: cfg.seccomp,
    })
    .map_err(|e| format!("restoring the snapshot: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let mem = restored.memory().clone();
    let balloon = restored.balloon().expect("a restored balloon").clone();
    driven.restores += 1;
    Ok((restored, mem, balloon, driven))
}

/// Where the benchmarks keep their JSON: `target/bench/NAME` in the
/// repository, beside what the L1 benchmarks write.
pub fn bench_json(name: &str) -> PathBuf {
    crate::l1::repo_root().join("target/bench").join(name)
}

/// Writes `text` to `path`, creating its directory.
pub fn write_json(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// splitmix64: spreads a seed into well-mixed generator states.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The host driver's generator (xorshift64*, like the guest's).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 16
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}
