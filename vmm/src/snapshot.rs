//! Whole-VM snapshots on disk: a directory with a `state` file (what the
//! VM is made of, every vCPU, the in-kernel devices, the devices) and a
//! sparse `memory` file (guest memory; holes where the guest has none).
//!
//! The `state` file is one header line of JSON — format, version, length
//! and CRC-32 of the body — and the body, JSON. A loader checks all of it
//! before it touches KVM; a snapshot directory is written under a
//! temporary name and renamed when complete, so a failed snapshot leaves
//! nothing that looks valid.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use guest_mem::memory_file;
use guest_mem::GuestMem;
use serde::{Deserialize, Serialize};

use crate::kvm_vm::VmState;
use crate::vcpu_state::VcpuState;

/// Names the file format in the header.
pub const FORMAT: &str = "vmm-snapshot";
/// The version this VMM writes and reads.
pub const VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The largest state body read (vCPU state is ~40 KiB as JSON per vCPU).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Errors saving or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The snapshot is not one this VMM can load.
    #[error("{path}: {why}")]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Guest memory could not be saved.
    #[error("saving guest memory: {0}")]
    Memory(#[from] guest_mem::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The balloon's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonSettings {
    /// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` offered.
    pub deflate_on_oom: bool,
    /// `VIRTIO_BALLOON_F_REPORTING` offered.
    pub free_page_reporting: bool,
}

/// What the VM is made of: enough to build the same machine again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Boot RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM on 2 MiB huge pages.
    pub huge_pages: bool,
    /// The virtio-mem window's size, if any.
    pub hotplug: Option<u64>,
    /// The balloon, if any.
    pub balloon: Option<BalloonSettings>,
    /// Whether the guest is a flat payload (its exit and console ports
    /// live).
    pub payload: bool,
}

/// Where one region's bytes are in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest-physical address of the region.
    pub guest_addr: u64,
    /// Bytes of it that were backed.
    pub size: u64,
    /// The most it can grow to (resizable regions; else `size`).
    pub max_size: u64,
    /// Its backing's page size (4 KiB, or 2 MiB on hugetlbfs).
    pub page_size: u64,
    /// Offset of its first byte in the memory file.
    pub offset: u64,
}

/// Guest memory in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// One entry per region, in the memory's order.
    pub regions: Vec<RegionState>,
    /// The memory file's length.
    pub file_len: u64,
    /// Bytes of data in it (the rest are holes).
    pub data_bytes: u64,
}

/// Everything in a snapshot but guest memory's contents.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The machine.
    pub machine: MachineConfig,
    /// Where guest memory is in the memory file.
    pub memory: MemoryState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel devices (PIC, IOAPIC, PIT, clock).
    pub kvm: VmState,
    /// The VMM's devices.
    pub devices: crate::device_manager::DevicesState,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    state_bytes: u64,
    state_crc32: u32,
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// What [`write()`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Bytes of guest memory data written (holes excluded).
    pub memory_bytes: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
}

/// Writes `snap` and the memory of `mem` to the new directory `dir`. `dir`
/// must not exist; its parent must. The memory must not change meanwhile
/// (the VM paused).
pub fn write(dir: &Path, snap: &mut VmSnapshot, mem: &GuestMem) -> Result<Written, SnapshotError> {
    if dir.symlink_metadata().is_ok() {
        return Err(invalid(
            dir,
            "already exists; snapshots are written to a new directory",
        ));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| invalid(dir, "has no directory name"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let r = write_into(&tmp, snap, mem).and_then(|w| {
        fs::rename(&tmp, dir).map_err(io(dir))?;
        sync_dir(&parent)?;
        Ok(w)
    });
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    r
}

fn write_into(tmp: &Path, snap: &mut VmSnapshot, mem: &GuestMem) -> Result<Written, SnapshotError> {
    let layout = memory_file::save(mem, &tmp.join(MEMORY_FILE))?;
    snap.memory = MemoryState {
        regions: layout
            .regions
            .iter()
            .zip(mem.regions())
            .map(|(r, region)| RegionState {
                guest_addr: r.guest_addr,
                size: r.size,
                max_size: region.max_size(),
                page_size: region.page_size(),
                offset: r.offset,
            })
            .collect(),
        file_len: layout.file_len,
        data_bytes: layout.bytes_written,
    };
    let body = serde_json::to_vec(snap)
        .map_err(|e| invalid(tmp, format!("serializing the state: {e}")))?;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        state_bytes: body.len() as u64,
        state_crc32: crc32fast::hash(&body),
    };
    let path = tmp.join(STATE_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(io(&path))?;
    let mut line = serde_json::to_vec(&header).unwrap_or_default();
    line.push(b'\n');
    f.write_all(&line).map_err(io(&path))?;
    f.write_all(&body).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    sync_dir(tmp)?;
    Ok(Written {
        memory_bytes: layout.bytes_written,
        state_bytes: (line.len() + body.len()) as u64,
    })
}

/// Reads and checks the snapshot in `dir`; returns it and the path of its
/// memory file. Nothing is modified.
pub fn read(dir: &Path) -> Result<(VmSnapshot, PathBuf), SnapshotError> {
    let meta = dir.metadata().map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(invalid(dir, "is not a snapshot directory"));
    }
    let path = dir.join(STATE_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let len = f.metadata().map_err(io(&path))?.len();
    if len > MAX_STATE_BYTES + 4096 {
        return Err(invalid(
            &path,
            format!("{len} bytes is too large for a state file"),
        ));
    }
    let mut raw = Vec::with_capacity(len as usize);
    f.take(MAX_STATE_BYTES + 4096)
        .read_to_end(&mut raw)
        .map_err(io(&path))?;
    let snap = parse_state(&raw).map_err(|why| invalid(&path, why))?;
    let memory = dir.join(MEMORY_FILE);
    let mlen = memory.metadata().map_err(io(&memory))?.len();
    if mlen != snap.memory.file_len {
        return Err(invalid(
            &memory,
            format!(
                "is {mlen} bytes; the state says {} (truncated or from another snapshot)",
                snap.memory.file_len
            ),
        ));
    }
    Ok((snap, memory))
}

/// Parses and checks a state file's bytes (header, checksum, body, and
/// that the parts agree with each other).
pub fn parse_state(raw: &[u8]) -> Result<VmSnapshot, String> {
    let nl = raw
        .iter()
        .take(4096)
        .position(|&b| b == b'\n')
        .ok_or("no header line: not a snapshot state file")?;
    let header: Header = serde_json::from_slice(&raw[..nl])
        .map_err(|e| format!("bad header: not a snapshot state file ({e})"))?;
    if header.format != FORMAT {
        return Err(format!("format {:?}, not {FORMAT:?}", header.format));
    }
    if header.version != VERSION {
        return Err(format!(
            "snapshot version {} (this VMM reads version {VERSION})",
            header.version
        ));
    }
    let body = &raw[nl + 1..];
    if body.len() as u64 != header.state_bytes {
        return Err(format!(
            "the state is {} bytes; the header says {} (truncated?)",
            body.len(),
            header.state_bytes
        ));
    }
    if crc32fast::hash(body) != header.state_crc32 {
        return Err("the state's checksum does not match: the file is corrupt".into());
    }
    let snap: VmSnapshot = serde_json::from_slice(body).map_err(|e| format!("bad state: {e}"))?;
    check(&snap)?;
    Ok(snap)
}

/// What must hold between the parts of a snapshot whatever the machine.
fn check(s: &VmSnapshot) -> Result<(), String> {
    let m = &s.machine;
    if m.vcpus == 0 || m.vcpus > crate::layout::MAX_VCPUS {
        return Err(format!("{} vCPUs", m.vcpus));
    }
    if s.vcpus.len() != usize::from(m.vcpus) {
        return Err(format!(
            "{} vCPU states for {} vCPUs",
            s.vcpus.len(),
            m.vcpus
        ));
    }
    if let Some(v) = s
        .vcpus
        .iter()
        .enumerate()
        .find(|(i, v)| usize::from(v.id) != *i)
    {
        return Err(format!("vCPU state {} has id {}", v.0, v.1.id));
    }
    let page = if m.huge_pages { 2 << 20 } else { 4096 };
    crate::ram::check_memory_size(m.memory, page).map_err(|e| e.to_string())?;
    if let Some(w) = m.hotplug {
        crate::ram::check_hotplug_size(m.memory, w).map_err(|e| e.to_string())?;
    }
    if s.memory.regions.is_empty() || s.memory.regions.len() > 64 {
        return Err(format!("{} memory regions", s.memory.regions.len()));
    }
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in &s.memory.regions {
        if r.page_size != 4096 && r.page_size != 2 << 20 {
            return Err(format!(
                "region at {:#x}: page size {}",
                r.guest_addr, r.page_size
            ));
        }
        let end = r.offset.checked_add(r.size).ok_or("region past 2^64")?;
        let gend = r
            .guest_addr
            .checked_add(r.max_size)
            .ok_or("region past 2^64")?;
        if r.size > r.max_size
            || r.max_size == 0
            || r.max_size % r.page_size != 0
            || r.guest_addr % r.page_size != 0
            || r.size % r.page_size != 0
            || gend > 1 << 46
        {
            return Err(format!(
                "region at {:#x}: {:#x} of {:#x} bytes is not a region this VMM makes",
                r.guest_addr, r.size, r.max_size
            ));
        }
        if spans.iter().any(|&(a, b)| r.guest_addr < b && a < gend) {
            return Err(format!("region at {:#x} overlaps another", r.guest_addr));
        }
        spans.push((r.guest_addr, gend));
        if end > s.memory.file_len || r.offset % 4096 != 0 {
            return Err(format!(
                "region at {:#x}: {:#x}+{:#x} is not inside the {:#x}-byte memory file",
                r.guest_addr, r.offset, r.size, s.memory.file_len
            ));
        }
    }
    Ok(())
}

type WriteJob = (
    PathBuf,
    Box<VmSnapshot>,
    std::sync::mpsc::Sender<Result<Written, SnapshotError>>,
);

/// A thread that writes snapshots, started before the event loop confines
/// itself: the event loop's filter opens no files, this thread's
/// ([`ThreadKind::Snapshot`](crate::seccomp::ThreadKind::Snapshot)) opens
/// and writes files but touches neither KVM nor the guest's devices.
pub struct SnapshotWriter {
    tx: Option<std::sync::mpsc::Sender<WriteJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotWriter {
    /// Starts the thread, confined if `seccomp`.
    pub fn spawn(mem: std::sync::Arc<GuestMem>, seccomp: bool) -> std::io::Result<SnapshotWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<WriteJob>();
        let thread = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let confined = if seccomp {
                    crate::seccomp::install(crate::seccomp::ThreadKind::Snapshot)
                        .map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                for (dir, mut snap, reply) in rx {
                    let r = match &confined {
                        Ok(()) => write(&dir, &mut snap, &mem),
                        Err(e) => Err(invalid(&dir, format!("the snapshot thread: {e}"))),
                    };
                    let _ = reply.send(r);
                }
            })?;
        Ok(SnapshotWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Writes `snap` and guest memory to `dir` on the thread; waits.
    pub fn write(&self, dir: &Path, snap: VmSnapshot) -> Result<Written, SnapshotError> {
        let (reply, answer) = std::sync::mpsc::channel();
        let gone = || invalid(dir, "the snapshot thread has stopped");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send((dir.to_path_buf(), Box::new(snap), reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
