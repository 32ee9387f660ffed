//! Helpers shared by the integration tests: guest payloads assembled in
//! Rust, and checks for what this machine can run.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod external_guest;
pub mod failing_source;
pub mod hostile;
pub mod l1;
pub mod payload;
pub mod stress;
pub mod uffd_peer;

/// Whether `/dev/kvm` can be opened here.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The configuration the KVM payload tests start from: `memory` bytes on a
/// memfd, served through userfaultfd with the default settings, `vcpus`
/// vCPUs, the serial port discarded, no devices and no API, seccomp on.
pub fn payload_vm_config(memory: u64, vcpus: u8) -> vmm::VmConfig {
    vmm::VmConfig {
        memory,
        vcpus,
        backend: vmm::MemBackend::Memfd,
        fault: Default::default(),
        serial: vmm::SerialOut::Sink,
        balloon: None,
        hotplug: None,
        api_socket: None,
        seccomp: true,
    }
}

/// One HTTP request to a VM's API socket on a fresh connection (read
/// timeout 5 s): the answer's status line and body.
pub fn api_request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(String, String), String> {
    use std::io::{Read, Write};
    let mut s =
        std::os::unix::net::UnixStream::connect(sock).map_err(|e| format!("connecting: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok();
    let msg = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("writing: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("reading: {e}"))?;
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}
