//! The listening socket, and the service of each peer that connects: a
//! handshake checked against the memory file, then `guest-mem`'s external
//! fault handler until the peer hangs up. A refused handshake closes that
//! connection only; the server keeps listening.

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::external::{Ended, ExternalHandler, ExternalMemory, ExternalRegion};
use guest_mem::source::PageSource;
use guest_mem::{FaultConfig, FileSource};

use crate::handshake::{self, HandshakeError, UffdRegion};

/// How long a peer has to send its handshake once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a peer was not served.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Its handshake was malformed or does not fit the memory file.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Its memory cannot be served as described (the descriptor is not a
    /// userfaultfd, the regions do not fit...).
    #[error(transparent)]
    Memory(#[from] guest_mem::Error),
}

/// A peer being served.
#[derive(Debug)]
pub struct Peer {
    /// Connection number, from 1.
    pub id: u64,
    /// The peer's pid (`SO_PEERCRED`), if the kernel told.
    pub pid: Option<i32>,
    /// Its regions, as it sent them.
    pub regions: Vec<UffdRegion>,
    /// The fault handler serving it.
    pub handler: ExternalHandler,
    started: Instant,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "peer {} (pid {pid})", self.id),
            None => write!(f, "peer {}", self.id),
        }
    }
}

impl Peer {
    /// Serves until the peer goes away; returns the closing line.
    pub fn wait(self) -> String {
        let name = self.to_string();
        let took = self.started.elapsed();
        let ended = self.handler.wait();
        format!(
            "{name}: ended after {:.1} s ({}): {}",
            took.as_secs_f64(),
            ended.reason,
            summary(&ended)
        )
    }
}

/// One line of what a service did.
pub fn summary(ended: &Ended) -> String {
    let s = &ended.stats;
    format!(
        "{} pages in {} faults ({} readahead), {} pages removed by {} remove events, \
         {} retries, {} installs held back, fault p50 {:.0} us p99 {:.0} us",
        s.pages_installed,
        s.faults,
        s.readahead_pages,
        s.pages_removed,
        s.remove_events,
        s.retries,
        s.installs_held_back,
        s.fault_latency.p50_ns as f64 / 1e3,
        s.fault_latency.p99_ns as f64 / 1e3,
    )
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The memory file could not be opened.
    #[error("memory file {path}: {source}")]
    MemFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The socket could not be bound.
    #[error("socket {path}: {why}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        why: String,
    },
}

/// The listening handler.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    mem_file: PathBuf,
    source: Arc<FileSource>,
    file_len: u64,
    fault: FaultConfig,
    next_peer: AtomicU64,
}

impl Server {
    /// Opens the memory file and listens on `socket`. A socket file left
    /// by a handler that is gone is replaced; a live one, or a file that
    /// is not a socket, is refused.
    pub fn bind(socket: &Path, mem_file: &Path, fault: FaultConfig) -> Result<Server, StartError> {
        let mem_err = |source| StartError::MemFile {
            path: mem_file.to_path_buf(),
            source,
        };
        let source = FileSource::open(mem_file).map_err(mem_err)?;
        let file_len = source.size().unwrap_or(0);
        let sock_err = |why: String| StartError::Socket {
            path: socket.to_path_buf(),
            why,
        };
        if let Ok(meta) = std::fs::symlink_metadata(socket) {
            if !meta.file_type().is_socket() {
                return Err(sock_err("exists and is not a socket".into()));
            }
            if UnixStream::connect(socket).is_ok() {
                return Err(sock_err("another handler is listening on it".into()));
            }
            std::fs::remove_file(socket)
                .map_err(|e| sock_err(format!("removing the stale socket: {e}")))?;
        }
        let listener = UnixListener::bind(socket).map_err(|e| sock_err(e.to_string()))?;
        Ok(Server {
            listener,
            path: socket.to_path_buf(),
            mem_file: mem_file.to_path_buf(),
            source: Arc::new(source),
            file_len,
            fault,
            next_peer: AtomicU64::new(1),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The memory file's length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Takes the next connection and its handshake, and starts serving it.
    /// The outer error is the listener's; the inner one the peer's refusal
    /// (with its connection number).
    pub fn accept(&self) -> io::Result<Result<Peer, (u64, Refused)>> {
        let (stream, _) = self.listener.accept()?;
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        Ok(self.serve(id, stream).map_err(|e| (id, e)))
    }

    fn serve(&self, id: u64, stream: UnixStream) -> Result<Peer, Refused> {
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(HandshakeError::Io)?;
        let h = handshake::receive(&stream, self.file_len).map_err(|e| match e {
            HandshakeError::Io(io) if io.kind() == io::ErrorKind::WouldBlock => {
                HandshakeError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                ))
            }
            e => e,
        })?;
        let regions: Vec<ExternalRegion> = h.regions.iter().map(|r| r.external()).collect();
        let handler = ExternalMemory::new(regions, self.source.clone())
            .fault_config(self.fault.clone())
            .watch(stream.into())
            .serve(h.uffd.into())?;
        Ok(Peer {
            id,
            pid: h.peer_pid,
            regions: h.regions,
            handler,
            started: Instant::now(),
        })
    }

    /// Serves every peer that connects, each on a thread of its own, and
    /// prints a line when one starts, is refused or ends. Returns only if
    /// the listener fails.
    pub fn run(&self) -> io::Error {
        println!(
            "uffd-handler: listening on {}, memory file {} ({} MiB)",
            self.path.display(),
            self.mem_file.display(),
            self.file_len >> 20
        );
        loop {
            match self.accept() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return e,
                Ok(Err((id, e))) => println!("uffd-handler: peer {id}: refused: {e}"),
                Ok(Ok(peer)) => {
                    println!("uffd-handler: {peer}: serving {}", describe(&peer.regions));
                    let spawned = std::thread::Builder::new()
                        .name(format!("peer-{}", peer.id))
                        .spawn(move || println!("uffd-handler: {}", peer.wait()));
                    if let Err(e) = spawned {
                        // The peer (moved into the closure) is dropped:
                        // its service stops.
                        println!("uffd-handler: cannot start a thread for a peer: {e}");
                    }
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// "2 regions, 256 MiB in 4 KiB pages".
fn describe(regions: &[UffdRegion]) -> String {
    let bytes: u64 = regions.iter().map(|r| r.size).sum();
    let page = regions.first().map_or(0, |r| r.page_size);
    format!(
        "{} region{}, {} MiB in {} KiB pages",
        regions.len(),
        if regions.len() == 1 { "" } else { "s" },
        bytes >> 20,
        page >> 10
    )
}
