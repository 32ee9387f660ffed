//! The programs: `vmm` stops cleanly on SIGTERM and SIGINT (exit 0, API
//! socket removed), a socket left behind by a VMM that was killed does not
//! keep the next one from starting, `vmmctl` sends several requests
//! over one connection, and both are static-pie executables.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A CPL0 payload that halts for good: `hlt; jmp $-1` (with interrupts
/// off and the in-kernel irqchip, the vCPU sleeps in KVM_RUN).
const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd];

fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

struct Setup {
    dir: tempfile::TempDir,
    payload: PathBuf,
    sock: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("halt.bin");
    std::fs::write(&payload, HALT).unwrap();
    let sock = dir.path().join("api.sock");
    Setup { dir, payload, sock }
}

fn spawn(s: &Setup) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--payload-cpl0", "--memory", "16M", "--serial", "none"])
        .arg("--payload")
        .arg(&s.payload)
        .arg("--api-sock")
        .arg(&s.sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the VMM answers `GET /vm` on `sock`.
fn wait_for_api(vmm: &mut Child, sock: &Path) {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            return;
        }
        if let Some(status) = vmm.try_wait().unwrap() {
            panic!("the VMM exited ({status}): {}", stderr(vmm));
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no API");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(vmm: &Child, signo: libc::c_int) {
    // SAFETY: kill() only sends a signal, to the child this test started
    // and has not reaped yet.
    assert_eq!(unsafe { libc::kill(vmm.id() as libc::pid_t, signo) }, 0);
}

fn wait(vmm: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = vmm.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = vmm.kill();
            panic!("the VMM did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(vmm: &mut Child) -> String {
    let mut out = String::new();
    vmm.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    for (signo, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let s = setup();
        let mut vmm = spawn(&s);
        wait_for_api(&mut vmm, &s.sock);
        signal(&vmm, signo);
        let status = wait(&mut vmm);
        let err = stderr(&mut vmm);
        assert!(status.success(), "{name}: {status}: {err}");
        assert!(err.contains(&format!("stopped on {name}")), "{err}");
        assert!(!s.sock.exists(), "{name}: the API socket was left behind");
        // Every vCPU stopped and was joined: nothing taken for stuck.
        assert!(!err.contains("did not stop"), "{name}: {err}");
    }
}

/// A killed VMM leaves its socket; the next one on the same path starts
/// (the stale socket replaced), and a third, while it runs, is refused.
#[test]
fn a_socket_left_by_a_killed_vmm_does_not_block_the_next() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let s = setup();
    let mut first = spawn(&s);
    wait_for_api(&mut first, &s.sock);
    signal(&first, libc::SIGKILL);
    let _ = wait(&mut first);
    assert!(s.sock.exists(), "SIGKILL leaves the socket");

    let mut second = spawn(&s);
    wait_for_api(&mut second, &s.sock);
    let mut third = spawn(&s);
    let status = wait(&mut third);
    let err = stderr(&mut third);
    assert!(!status.success(), "{err}");
    assert!(err.contains("is in use"), "{err}");
    wait_for_api(&mut second, &s.sock);

    signal(&second, libc::SIGTERM);
    assert!(wait(&mut second).success());
    assert!(!s.sock.exists());
    drop(s.dir);
}

/// `vmmctl A -- B` sends both requests over one connection: the server
/// counts the same accepted connections in both answers.
#[test]
fn vmmctl_sends_several_requests_over_one_connection() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let s = setup();
    let mut vmm = spawn(&s);
    wait_for_api(&mut vmm, &s.sock);
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--sock")
        .arg(&s.sock)
        .args([
            "GET", "/metrics", "--", "GET", "/vm", "--", "GET", "/metrics",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(answers.len(), 3, "{text}");
    assert_eq!(answers[1]["state"], "running");
    let accepted = |m: &serde_json::Value| m["api"]["connections_accepted"].clone();
    assert!(accepted(&answers[0]).is_u64(), "{text}");
    assert_eq!(accepted(&answers[0]), accepted(&answers[2]), "{text}");
    assert_eq!(
        answers[2]["api"]["requests"].as_u64(),
        answers[0]["api"]["requests"].as_u64().map(|n| n + 2)
    );

    let bad = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--sock")
        .arg(&s.sock)
        .args(["GET", "/nope", "--", "GET", "/vm"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("running"),
        "the second still answered"
    );

    signal(&vmm, libc::SIGTERM);
    assert!(wait(&mut vmm).success());
}

/// On a CPU without vmx/svm (as on these machines), `vmm --kernel` says at
/// once that a stock kernel cannot run here and where to run it instead.
#[test]
fn a_kernel_on_a_host_without_hardware_virtualization_gets_a_clear_word() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--memory", "16M", "--serial", "none", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "not a kernel: {err}");
    assert_eq!(
        err.contains("no vmx/svm") && err.contains("resources/demo.sh"),
        !hardware,
        "{err}"
    );
}

/// (ELF type, whether it names a program interpreter) of the 64-bit
/// little-endian ELF executable at `path`.
fn elf_kind(path: &str) -> (u16, bool) {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x02", "{path}: not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (usize::from(u16_at(54)), usize::from(u16_at(56)));
    const PT_INTERP: u32 = 3;
    let interp = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP);
    (u16_at(16), interp)
}

/// `.cargo/config.toml` links the programs statically and position
/// independent: no loader or shared library at start (no `PT_INTERP`),
/// and a random load address still (`ET_DYN`).
#[test]
fn the_programs_are_static_pie() {
    const ET_DYN: u16 = 3;
    for path in [env!("CARGO_BIN_EXE_vmm"), env!("CARGO_BIN_EXE_vmmctl")] {
        assert_eq!(
            elf_kind(path),
            (ET_DYN, false),
            "{path}: want a static-pie executable"
        );
    }
}
