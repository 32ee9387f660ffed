//! The `uffd-handler` program itself: a peer that sends garbage is refused
//! with a clear line and the program keeps listening; a good peer is
//! served from the memory file, and its hang-up ends its service.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use userfaultfd::{FeatureFlags, UffdBuilder};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const LEN: usize = 2 << 20;

struct Handler {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Handler {
    fn line(&self, containing: &str) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no line with {containing:?} within 10 s"));
            if l.contains(containing) {
                return l;
            }
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_program_refuses_garbage_keeps_listening_and_serves_a_peer() {
    let dir = std::env::temp_dir().join(format!("uffd-handler-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, mem) = (dir.join("uffd.sock"), dir.join("snapshot.mem"));
    let mut image = vec![0u8; LEN];
    image[3 * 4096..3 * 4096 + 11].copy_from_slice(b"saved state");
    std::fs::File::create(&mem)
        .unwrap()
        .write_all(&image)
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_uffd-handler"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--mem-file",
            mem.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let h = Handler { child, lines };
    h.line("listening on");

    let garbage = UnixStream::connect(&sock).unwrap();
    (&garbage).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let l = h.line("refused");
    assert!(l.contains("not a JSON array"), "{l}");

    // A peer as Firecracker is: anonymous memory registered with a
    // userfaultfd, sent with its regions.
    // SAFETY: a fresh anonymous mapping of LEN bytes, unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let uffd = match UffdBuilder::new()
        .require_features(FeatureFlags::EVENT_REMOVE)
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
    {
        Ok(u) => u,
        Err(e) => {
            eprintln!("skipped the peer: no userfaultfd here ({e})");
            return;
        }
    };
    uffd.register(mem, LEN).unwrap();
    let body = format!(
        r#"[{{"base_host_virt_addr":{},"size":{LEN},"offset":0,"page_size":4096,"page_size_kib":4096}}]"#,
        mem as u64
    );
    let peer = UnixStream::connect(&sock).unwrap();
    peer.send_with_fd(body.as_bytes(), uffd.as_raw_fd())
        .unwrap();
    let l = h.line("serving");
    assert!(l.contains("1 region, 2 MiB in 4 KiB pages"), "{l}");
    // SAFETY: 11 bytes inside page 3 of the mapping; the handler process
    // serves the fault.
    let marker = unsafe { std::slice::from_raw_parts((mem as *const u8).add(3 * 4096), 11) };
    assert_eq!(marker, b"saved state");
    drop(peer);
    let l = h.line("ended");
    assert!(l.contains("the peer closed its socket"), "{l}");
    // SAFETY: the mapping made above; nothing points into it any more.
    unsafe { libc::munmap(mem, LEN) };
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}
