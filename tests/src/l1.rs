//! Running the VMM inside the nested QEMU-TCG L1 (see resources/README.md):
//! builds the guest kernel and images with the resources scripts, packs the
//! release `vmm` binary into an L1 image with a script, boots it, and
//! returns the console output. Logs are kept under `target/l1-logs/`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Whether the L1 can be booted here; if not, why. Set `REQUIRE_L1=1` to
/// turn a missing prerequisite into a test failure (the test command does).
pub fn l1_unavailable() -> Option<String> {
    let has_qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let why = (!has_qemu).then(|| {
        "qemu-system-x86_64 is not installed (run resources/install-host-deps.sh)".to_string()
    });
    if let (Some(w), Some(_)) = (&why, std::env::var_os("REQUIRE_L1")) {
        panic!("REQUIRE_L1 is set but {w}");
    }
    why
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .current_dir(repo_root())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed ({}):\n{text}", out.status))
    }
}

/// Builds the release `vmm` and `vmmctl` binaries; returns the path of
/// `vmm` (`vmmctl` is beside it).
pub fn vmm_binary() -> Result<PathBuf, String> {
    run(Command::new(env!("CARGO")).args(["build", "--release", "-p", "vmm", "--bins"]))?;
    Ok(target_dir().join("x86_64-unknown-linux-gnu/release/vmm"))
}

/// Fetches the guest kernel and builds the default guest initramfs;
/// returns (vmlinux, initramfs).
pub fn guest_images() -> Result<(PathBuf, PathBuf), String> {
    run(Command::new("bash").arg("resources/fetch-kernel.sh"))?;
    run(Command::new("bash").arg("resources/build-initramfs.sh"))?;
    let build = repo_root().join("build");
    Ok((
        build.join("kernel/vmlinux"),
        build.join("guest-initramfs.cpio.gz"),
    ))
}

/// Where [`guest_images_of`] keeps Debian `suite`'s kernel: also the
/// kernel cache an L1 boots with [`run_l1_on`].
pub fn kernel_dir_of(suite: &str) -> PathBuf {
    repo_root().join(format!("build/kernel-{suite}"))
}

/// Fetches Debian `suite`'s cloud kernel (e.g. `trixie`: 6.12) into
/// [`kernel_dir_of`] and builds a guest initramfs with its modules;
/// returns (vmlinux, initramfs).
pub fn guest_images_of(suite: &str) -> Result<(PathBuf, PathBuf), String> {
    run(Command::new("bash")
        .arg("resources/fetch-kernel.sh")
        .arg("--suite")
        .arg(suite))?;
    let dir = kernel_dir_of(suite);
    let image = repo_root().join(format!("build/guest-initramfs-{suite}.cpio.gz"));
    run(Command::new("bash")
        .arg("resources/build-initramfs.sh")
        .arg("--out")
        .arg(&image)
        .env("GUEST_KERNEL_DIR", &dir))?;
    Ok((dir.join("vmlinux"), image))
}

/// A guest initramfs `build/guest-NAME.cpio.gz` whose init runs the
/// repository file `script` as its test (after [`guest_images`]).
pub fn guest_image_with(name: &str, script: &str) -> Result<PathBuf, String> {
    guest_images()?;
    let image = repo_root().join(format!("build/guest-{name}.cpio.gz"));
    build_test_image(&image, script, None)?;
    Ok(image)
}

/// [`guest_image_with`] for Debian `suite`'s kernel (see
/// [`guest_images_of`]): `build/guest-NAME-SUITE.cpio.gz` with that
/// kernel's modules; returns (vmlinux, initramfs).
pub fn guest_image_of_with(
    suite: &str,
    name: &str,
    script: &str,
) -> Result<(PathBuf, PathBuf), String> {
    let (vmlinux, _) = guest_images_of(suite)?;
    let dir = vmlinux.parent().ok_or("no kernel cache")?;
    let image = repo_root().join(format!("build/guest-{name}-{suite}.cpio.gz"));
    build_test_image(&image, script, Some(dir))?;
    Ok((vmlinux, image))
}

/// Builds `image` with `script` as its `/guest-test.sh`, with the modules
/// of the kernel cache `kernel_dir` (default: the default kernel's).
fn build_test_image(image: &Path, script: &str, kernel_dir: Option<&Path>) -> Result<(), String> {
    let mut cmd = Command::new("bash");
    cmd.arg("resources/build-initramfs.sh")
        .arg("--out")
        .arg(image)
        .arg("--extra")
        .arg(format!(
            "{}:/guest-test.sh",
            repo_root().join(script).display()
        ));
    if let Some(dir) = kernel_dir {
        cmd.env("GUEST_KERNEL_DIR", dir);
    }
    run(&mut cmd).map(drop)
}

/// What an L1 run printed, and its script's exit code.
#[derive(Debug)]
pub struct L1Output {
    /// Console output of L1 (and of the guests it ran).
    pub log: String,
    /// Where the log was saved.
    pub log_path: PathBuf,
    /// The L1 script's exit code (124: timeout).
    pub code: i32,
}

impl L1Output {
    /// Fails the test with `what` and the whole log (also kept on disk).
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- log kept at {} ---\n{}",
            self.log_path.display(),
            self.log
        )
    }

    /// Fails the test unless the L1 script exited 0.
    pub fn assert_script_ok(&self) {
        if self.code != 0 {
            self.fail(&format!("the L1 script failed with {}", self.code));
        }
    }

    /// The first line containing `marker`.
    pub fn line(&self, marker: &str) -> Option<&str> {
        self.log.lines().find(|l| l.contains(marker))
    }

    /// The value of `key=` on the first line containing `marker`.
    pub fn value(&self, marker: &str, key: &str) -> Option<String> {
        let line = self.line(marker)?;
        let at = line.find(&format!("{key}="))? + key.len() + 1;
        // A kernel message can land on the same console line right after
        // the value ("MemTotal=481432[   37.53] ..."): it starts with '['.
        Some(
            line[at..]
                .split(|c: char| c.is_whitespace() || c == '[')
                .next()
                .unwrap_or("")
                .to_string(),
        )
    }
}

/// Boots an L1 carrying the `vmm` binary (as /bin/vmm), the guest kernel
/// (/guest/vmlinux), the L1 scripts' helpers (/guest/l1-lib.sh), `files`
/// (source, destination) and `script` (run as the L1's test), with a
/// wall-clock limit.
pub fn run_l1(
    name: &str,
    files: &[(PathBuf, &str)],
    script: &str,
    timeout_s: u64,
) -> Result<L1Output, String> {
    run_l1_on(None, name, files, script, timeout_s)
}

/// [`run_l1`] with the L1 itself booting the kernel in `l1_kernel` (a
/// kernel cache such as `build/kernel-trixie`) instead of the default one.
pub fn run_l1_on(
    l1_kernel: Option<&Path>,
    name: &str,
    files: &[(PathBuf, &str)],
    script: &str,
    timeout_s: u64,
) -> Result<L1Output, String> {
    let vmm = vmm_binary()?;
    let (vmlinux, _) = guest_images()?;
    let work = target_dir().join("l1-logs");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let script_path = work.join(format!("{name}.sh"));
    std::fs::write(&script_path, script).map_err(|e| e.to_string())?;
    let image = work.join(format!("{name}.cpio.gz"));
    let mut build = Command::new("bash");
    build
        .arg("resources/build-l1.sh")
        .arg("--out")
        .arg(&image)
        .arg("--script")
        .arg(&script_path)
        .arg("--add")
        .arg(format!("{}:/bin/vmm", vmm.display()))
        .arg("--add")
        .arg(format!("{}:/guest/vmlinux", vmlinux.display()))
        .arg("--add")
        .arg(format!(
            "{}:/guest/l1-lib.sh",
            repo_root().join("resources/l1-lib.sh").display()
        ));
    for (src, dst) in files {
        build.arg("--add").arg(format!("{}:{dst}", src.display()));
    }
    if let Some(dir) = l1_kernel {
        build.env("L1_KERNEL_DIR", dir);
    }
    run(&mut build)?;
    let log_path = work.join(format!("{name}.log"));
    let mut attempt = 1;
    loop {
        let mut boot = Command::new("bash");
        if let Some(dir) = l1_kernel {
            boot.env("L1_KERNEL_DIR", dir);
        }
        let out = boot
            .current_dir(repo_root())
            .arg("resources/run-l1.sh")
            .arg("--initrd")
            .arg(&image)
            .arg("--timeout")
            .arg(timeout_s.to_string())
            .arg("--log")
            .arg(&log_path)
            .output()
            .map_err(|e| format!("running run-l1.sh: {e}"))?;
        let log = std::fs::read_to_string(&log_path)
            .unwrap_or_else(|_| String::from_utf8_lossy(&out.stdout).into_owned());
        let out = L1Output {
            log,
            log_path: log_path.clone(),
            code: out.status.code().unwrap_or(-1),
        };
        if !l1_died_booting(&out) || attempt == L1_BOOT_ATTEMPTS {
            return Ok(out);
        }
        eprintln!(
            "the L1 died before it was ready (attempt {attempt} of {L1_BOOT_ATTEMPTS}); \
             booting it again. Its log:\n{}",
            tail(&out.log, 15)
        );
        attempt += 1;
    }
}

/// Boots of the L1 that end before it is ready are tried again this often
/// in all: under TCG, the L1 kernel now and then dies in its own boot
/// (seen with 6.12: `Oops: int3` in `__schedule`, code patched by one
/// vCPU while another runs it), before any test code has run.
const L1_BOOT_ATTEMPTS: u32 = 3;

/// Whether the L1 ended (crashed, or timed out) before printing
/// `L1-READY`: nothing of the test ran.
fn l1_died_booting(out: &L1Output) -> bool {
    (out.code == 124 || out.code == 125) && !out.log.contains("L1-READY")
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_l1_that_never_got_ready_is_booted_again() {
        let out = |code, log: &str| L1Output {
            log: log.into(),
            log_path: PathBuf::new(),
            code,
        };
        assert!(l1_died_booting(&out(125, "Oops: int3\nKernel panic")));
        assert!(l1_died_booting(&out(124, "L1: rng ready")));
        assert!(!l1_died_booting(&out(
            125,
            "L1-READY uptime=5\nKernel panic"
        )));
        assert!(!l1_died_booting(&out(1, "L1-READY uptime=5")));
        assert!(!l1_died_booting(&out(0, "")));
    }

    #[test]
    fn a_value_ends_where_a_kernel_message_interleaves() {
        let out = L1Output {
            log: "GUEST-SAW-UNPLUG MemTotal=481432[   37.530593] Fallback order\n\
                  RESTORED mode=lazy running_s=0.29 first\n"
                .into(),
            log_path: PathBuf::new(),
            code: 0,
        };
        assert_eq!(
            out.value("GUEST-SAW-UNPLUG", "MemTotal").as_deref(),
            Some("481432")
        );
        assert_eq!(out.value("RESTORED", "running_s").as_deref(), Some("0.29"));
        assert_eq!(out.value("RESTORED", "nope"), None);
    }
}
