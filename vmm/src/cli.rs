//! Command-line parsing: sizes like `256M`, memory backends and the run
//! options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use guest_mem::{FaultConfig, FaultMode, Readahead, Unservable};

use crate::api::ApiConfig;
use crate::boot::mptable::MAX_CPUS_IN_EBDA;
use crate::config::{MemBackend, SerialOut};

/// Boot a Linux kernel (or a flat payload) on file-backed, fault-managed
/// guest memory.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
pub struct Args {
    /// Kernel image: an ELF vmlinux or a bzImage.
    #[arg(
        long,
        required_unless_present_any = ["payload", "restore"],
        conflicts_with_all = ["payload", "restore"]
    )]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load with the kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 noxsave")]
    pub cmdline: String,
    /// A flat 64-bit payload to run on every vCPU instead of a kernel.
    #[arg(long, conflicts_with = "restore")]
    pub payload: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory (`PUT /snapshot`)
    /// instead of booting one: the machine (memory, vCPUs, devices) is the
    /// snapshot's.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// How a restore gets guest memory: `lazy` serves each page from the
    /// snapshot on first touch (the guest runs at once), `eager` copies it
    /// all first.
    #[arg(long, default_value = "lazy", requires = "restore")]
    pub restore_mode: crate::builder::RestoreMode,
    /// Run the payload at CPL0 instead of CPL3.
    #[arg(long, requires = "payload")]
    pub payload_cpl0: bool,
    /// Guest memory size: bytes, or with a K, M, G or T suffix.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs (at most what the MP table in the EBDA can list).
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS_IN_EBDA))
    )]
    pub vcpus: u8,
    /// Where guest RAM lives: `memfd`, `file:PATH`, `hugetlbfs` or
    /// `hugetlbfs:PATH`.
    #[arg(long, default_value = "memfd", value_parser = parse_backend)]
    pub mem_backend: MemBackend,
    /// Who serves guest memory faults.
    #[arg(long, value_enum, default_value_t = FaultHandler::Auto)]
    pub fault_handler: FaultHandler,
    /// Largest readahead window for first touches, as a size (0 = none).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub readahead: u64,
    /// Fault handler threads.
    #[arg(long, default_value_t = 1)]
    pub fault_threads: usize,
    /// A guest page whose fetch keeps failing: `poison` it (a vCPU that
    /// touches it gets a machine check; the VM goes on; falls back to
    /// `report` on kernels without UFFDIO_POISON) or `report` it (the VM
    /// stops with an error naming the page). With `poison`, a virtio-mem
    /// window is one memory slot and a guest touch of memory it has not
    /// plugged is poisoned too; with `report`, the window is one memory
    /// slot too, its unplugged blocks `PROT_NONE` in the VMM's mapping (a
    /// guest touch of one stops the VM with an error).
    #[arg(long, value_enum, default_value_t = OnUnservable::Poison)]
    pub on_unservable: OnUnservable,
    /// Serial console: `stdout`, `file:PATH` or `none`.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Print guest-memory statistics when the guest stops.
    #[arg(long)]
    pub stats: bool,
    /// Give the guest a virtio-balloon (announced on the command line).
    #[arg(long)]
    pub balloon: bool,
    /// Let the guest deflate the balloon when it runs out of memory.
    #[arg(long, requires = "balloon")]
    pub balloon_deflate_on_oom: bool,
    /// Offer free page reporting: the guest hands free memory back by itself.
    #[arg(long, requires = "balloon", action = clap::ArgAction::Set, default_value_t = true,
          value_name = "BOOL")]
    pub balloon_free_page_reporting: bool,
    /// Ask the guest for fresh balloon statistics every SECS seconds (0:
    /// never); `GET /balloon` shows the last ones and asks for nothing.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub balloon_stats_interval: u64,
    /// Give the guest a virtio-mem window of this size (a multiple of
    /// 128M) above its RAM, plugged and unplugged at run time through the
    /// API (`PUT /memory`). Nothing is plugged at start.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub virtio_mem: Option<u64>,
    /// Serve the control API on this Unix socket (created owner-only).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Run without the seccomp filters that otherwise confine the vCPU,
    /// fault handler and event loop threads (to debug a refused call).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Leave the memory a Linux guest's earliest boot touches to be mapped
    /// into KVM page by page as the guest first touches it, instead of in
    /// one `KVM_PRE_FAULT_MEMORY` before it runs (or, where KVM cannot and
    /// fresh memory comes in huge pages, allocated before it runs), for
    /// comparing the two.
    #[arg(long)]
    pub no_pre_fault: bool,
    /// Serve first touches of guest RAM 4 KiB at a time even where the
    /// host gives shmem huge pages (`shmem_enabled` advise or more, or a
    /// tmpfs mounted `huge=`), which otherwise fill fresh memory 2 MiB at a
    /// time: fewer faults and one mapping per 2 MiB, up to 2 MiB of host
    /// memory per first touch.
    #[arg(long)]
    pub no_huge_fill: bool,
}

/// Who serves faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaultHandler {
    /// userfaultfd when the backing supports it, else the kernel.
    Auto,
    /// userfaultfd (fails if the backing cannot be managed).
    Uffd,
    /// The kernel's own demand paging.
    Kernel,
}

/// What happens to a guest page that cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnUnservable {
    /// Poison it: a machine check for the vCPU that touches it.
    Poison,
    /// Report it: the VM stops.
    Report,
}

impl Args {
    /// The fault configuration these options describe.
    pub fn fault_config(&self) -> FaultConfig {
        FaultConfig {
            mode: match self.fault_handler {
                FaultHandler::Auto => FaultMode::Auto,
                FaultHandler::Uffd => FaultMode::Userfault,
                FaultHandler::Kernel => FaultMode::Kernel,
            },
            threads: self.fault_threads,
            readahead: Readahead {
                max: self.readahead,
                adaptive: true,
            },
            on_unservable: match self.on_unservable {
                OnUnservable::Poison => Unservable::Poison,
                OnUnservable::Report => Unservable::Report,
            },
            huge_fill: !self.no_huge_fill,
            ..FaultConfig::default()
        }
    }

    /// The API server's settings these options describe.
    pub fn api_config(&self) -> ApiConfig {
        ApiConfig {
            balloon_stats_interval: (self.balloon_stats_interval > 0)
                .then(|| Duration::from_secs(self.balloon_stats_interval)),
            ..ApiConfig::default()
        }
    }

    /// The serial output these options describe.
    pub fn serial_out(&self) -> Result<SerialOut, String> {
        match self.serial.as_str() {
            "stdout" => Ok(SerialOut::Stdout),
            "none" => Ok(SerialOut::Sink),
            s => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialOut::File(p.into())),
                _ => Err(format!(
                    "invalid --serial {s:?}: use stdout, none or file:PATH"
                )),
            },
        }
    }
}

/// Parses `512`, `64K`, `256M`, `2G`, `1T` (binary units, case-insensitive,
/// an optional trailing `B` or `iB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {t:?}: use e.g. 512M or 2G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {t:?} is too large"))
}

/// Parses a memory backend.
pub fn parse_backend(s: &str) -> Result<MemBackend, String> {
    match s {
        "memfd" => Ok(MemBackend::Memfd),
        "hugetlbfs" => Ok(MemBackend::Hugetlbfs(None)),
        _ => {
            if let Some(p) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
                Ok(MemBackend::File(p.into()))
            } else if let Some(p) = s.strip_prefix("hugetlbfs:").filter(|p| !p.is_empty()) {
                Ok(MemBackend::Hugetlbfs(Some(p.into())))
            } else {
                Err(format!(
                    "invalid memory backend {s:?}: use memfd, file:PATH, hugetlbfs or hugetlbfs:PATH"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1TB"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn backends() {
        assert_eq!(parse_backend("memfd"), Ok(MemBackend::Memfd));
        assert_eq!(
            parse_backend("file:/dev/shm/x"),
            Ok(MemBackend::File("/dev/shm/x".into()))
        );
        assert_eq!(parse_backend("hugetlbfs"), Ok(MemBackend::Hugetlbfs(None)));
        assert!(parse_backend("file:").is_err());
        assert!(parse_backend("tmpfs").is_err());
    }

    #[test]
    fn kernel_or_payload_is_required() {
        assert!(Args::try_parse_from(["vmm"]).is_err());
        assert!(Args::try_parse_from(["vmm", "--kernel", "k", "--payload", "p"]).is_err());
        let a = Args::try_parse_from(["vmm", "--kernel", "k", "--memory", "1G"]).unwrap();
        assert_eq!(a.memory, 1 << 30);
        assert!(Args::try_parse_from(["vmm", "--kernel", "k", "--vcpus", "0"]).is_err());
        let n = |v: u8| Args::try_parse_from(["vmm", "--kernel", "k", "--vcpus", &v.to_string()]);
        assert!(n(MAX_CPUS_IN_EBDA).is_ok());
        assert!(
            n(MAX_CPUS_IN_EBDA + 1).is_err(),
            "more than the MP table can list"
        );
        assert!(Args::try_parse_from(["vmm", "--kernel", "k", "--memory", "lots"]).is_err());
        assert!(!a.no_seccomp, "seccomp is on by default");
        let a = Args::try_parse_from(["vmm", "--kernel", "k", "--no-seccomp"]).unwrap();
        assert!(a.no_seccomp);
    }

    #[test]
    fn huge_fills_are_on_unless_turned_off() {
        let a = Args::try_parse_from(["vmm", "--kernel", "k"]).unwrap();
        assert!(a.fault_config().huge_fill);
        let a = Args::try_parse_from(["vmm", "--kernel", "k", "--no-huge-fill"]).unwrap();
        assert!(!a.fault_config().huge_fill);
    }

    #[test]
    fn balloon_stats_interval() {
        let a = Args::try_parse_from(["vmm", "--kernel", "k"]).unwrap();
        assert_eq!(
            a.api_config().balloon_stats_interval,
            Some(Duration::from_secs(1))
        );
        let a = Args::try_parse_from(["vmm", "--kernel", "k", "--balloon-stats-interval", "0"])
            .unwrap();
        assert_eq!(a.api_config().balloon_stats_interval, None);
    }
}
