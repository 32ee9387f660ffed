//! A small client for the VMM's control API, for hosts without curl:
//!
//! ```text
//! vmmctl --sock /tmp/vmm.sock GET /balloon
//! vmmctl --sock /tmp/vmm.sock PUT /balloon '{"target_mib": 256}'
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sock, rest) = match args.as_slice() {
        [flag, sock, rest @ ..] if flag == "--sock" => (sock.clone(), rest.to_vec()),
        _ => {
            eprintln!("usage: vmmctl --sock PATH METHOD PATH [JSON-BODY]");
            return ExitCode::from(2);
        }
    };
    let (method, path, body) = match rest.as_slice() {
        [m, p] => (m.clone(), p.clone(), String::new()),
        [m, p, b] => (m.clone(), p.clone(), b.clone()),
        _ => {
            eprintln!("usage: vmmctl --sock PATH METHOD PATH [JSON-BODY]");
            return ExitCode::from(2);
        }
    };
    let run = || -> std::io::Result<(u16, String)> {
        let mut s = UnixStream::connect(&sock)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\
             Content-Type: application/json\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((status, body.to_string()))
    };
    match run() {
        Ok((status, body)) => {
            print!("{body}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("vmmctl: HTTP {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vmmctl: {sock}: {e}");
            ExitCode::FAILURE
        }
    }
}
