//! A small client for the VMM's control API, for hosts without curl:
//!
//! ```text
//! vmmctl --sock /tmp/vmm.sock GET /balloon
//! vmmctl --sock /tmp/vmm.sock PUT /balloon '{"target_mib": 256}'
//! vmmctl --sock /tmp/vmm.sock PUT /balloon '{"target_mib": 256}' -- GET /balloon
//! vmmctl --sock /tmp/vmm.sock PUT /vm '{"state": "paused"}' -- PUT /snapshot '{"dir": "/tmp/snap"}'
//! ```
//!
//! Requests separated by `--` go over one connection, in order; each
//! response body is printed. The exit status is 0 when every answer is 2xx.
//! `--time` (after the socket) prints, on stderr, how long each request
//! took from its first byte sent to its answer read (process start and
//! connection not included): `vmmctl: PUT /memory: 0.0734 s`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: vmmctl --sock PATH [--time] METHOD PATH [JSON-BODY] [-- METHOD PATH [JSON-BODY]]...";

struct Req {
    method: String,
    path: String,
    body: String,
}

fn parse_requests(args: &[String]) -> Option<Vec<Req>> {
    args.split(|a| a == "--")
        .map(|r| match r {
            [m, p] => Some(Req {
                method: m.clone(),
                path: p.clone(),
                body: String::new(),
            }),
            [m, p, b] => Some(Req {
                method: m.clone(),
                path: p.clone(),
                body: b.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Reads one response: its status and body (by Content-Length; without
/// one, a 204 has none and anything else runs to the end of the stream).
fn read_response(r: &mut impl BufRead) -> std::io::Result<(u16, String)> {
    let mut status_line = String::new();
    if r.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut length = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None if status == 204 => {}
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The body's `"wait_ms"`, if any (the VMM checks it; 0 when absent or
/// not a number).
fn wait_ms(body: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("wait_ms")?.as_u64())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sock, rest) = match args.as_slice() {
        [flag, sock, rest @ ..] if flag == "--sock" => (sock.clone(), rest),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (time, rest) = match rest {
        [flag, rest @ ..] if flag == "--time" => (true, rest),
        _ => (false, rest),
    };
    let Some(requests) = parse_requests(rest) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut failed = false;
    let run = |failed: &mut bool| -> std::io::Result<()> {
        let s = UnixStream::connect(&sock)?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut writer = s;
        for (i, req) in requests.iter().enumerate() {
            let last = i + 1 == requests.len();
            // A snapshot writes all of guest memory: the VMM allows it
            // ten minutes. A request with "wait_ms" is answered up to that
            // late.
            let wait = if req.path.starts_with("/snapshot") {
                660
            } else {
                10 + wait_ms(&req.body) / 1000
            };
            let sent = std::time::Instant::now();
            writer.set_read_timeout(Some(Duration::from_secs(wait)))?;
            write!(
                writer,
                "{} {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\
                 Content-Type: application/json\r\nConnection: {}\r\n\r\n{}",
                req.method,
                req.path,
                req.body.len(),
                if last { "close" } else { "keep-alive" },
                req.body
            )?;
            let (status, body) = read_response(&mut reader)?;
            if time {
                let secs = sent.elapsed().as_secs_f64();
                eprintln!("vmmctl: {} {}: {secs:.4} s", req.method, req.path);
            }
            print!("{body}");
            if !(200..300).contains(&status) {
                eprintln!("vmmctl: {} {}: HTTP {status}", req.method, req.path);
                *failed = true;
            }
        }
        Ok(())
    };
    match run(&mut failed) {
        Ok(()) if !failed => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vmmctl: {sock}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_request_gets_its_wait_on_top_of_the_read_timeout() {
        assert_eq!(
            wait_ms(r#"{"requested_mib": 256, "wait_ms": 60000}"#),
            60000
        );
        assert_eq!(wait_ms(r#"{"target_mib": 0}"#), 0);
        assert_eq!(wait_ms(r#"{"wait_ms": "soon"}"#), 0);
        assert_eq!(wait_ms(""), 0);
    }
}
