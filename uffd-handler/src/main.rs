//! `uffd-handler --socket PATH --mem-file FILE`: the external page-fault
//! handler for Firecracker's snapshot restore (see the crate documentation).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use guest_mem::{FaultConfig, Readahead};
use uffd_handler::server::Server;

/// Serves the page faults of Firecracker VMs restored from a snapshot with
/// `mem_backend` `{"backend_type": "Uffd", "backend_path": SOCKET}`.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unix socket to listen on (Firecracker's `backend_path`).
    #[arg(long)]
    socket: PathBuf,
    /// The snapshot's memory file.
    #[arg(long)]
    mem_file: PathBuf,
    /// Handler threads per VM.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Largest adaptive readahead window in KiB (0: one page per fault).
    #[arg(long, default_value_t = 2048)]
    readahead_kib: u64,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let fault = FaultConfig {
        threads: args.threads,
        readahead: if args.readahead_kib == 0 {
            Readahead::NONE
        } else {
            Readahead {
                max: args.readahead_kib << 10,
                adaptive: true,
            }
        },
        ..FaultConfig::default()
    };
    let server = match Server::bind(&args.socket, &args.mem_file, fault) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("uffd-handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    let e = server.run();
    eprintln!("uffd-handler: accepting connections failed: {e}");
    ExitCode::FAILURE
}
