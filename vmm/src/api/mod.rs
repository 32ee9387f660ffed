//! The control API: HTTP on a Unix socket (`curl --unix-socket`), created
//! owner-only. `GET|PUT /vm` (state, pause and resume), `PUT /snapshot`,
//! `GET|PUT /balloon`, `GET|PUT /memory`, `GET /metrics`. The server runs on
//! its own thread (see [`server`]).

pub mod http;
pub mod server;
pub mod wait;

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::memory::HotplugBackend;
use devices::virtio::balloon::{BalloonState, BALLOON_PAGE, STAT_NAMES};
use devices::virtio::mem::{MemState, BLOCK_SIZE};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::resize_timer::ResizeTimer;
use guest_mem::GuestMem;
use serde_json::{json, Value};

use crate::control::{ControlError, ControlRequest, RunState};
use http::{Request, Response};
pub use server::{ApiConfig, ApiServer, ApiThread};

/// Tells a device's driver that its configuration changed.
fn config_changed(transport: &Mutex<MmioTransport>) {
    transport
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .config_changed();
}

/// How the guest followed the last target change, on the device's clock
/// (milliseconds from the request; null until it happened).
fn resize_json(timer: &ResizeTimer) -> Value {
    let t = timer.get();
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    json!({
        "first_change_ms": ms(t.first_change),
        "settled_ms": ms(t.settled),
        "updates": t.updates,
    })
}

/// The VMM side of the balloon: its shared state and its transport.
#[derive(Clone)]
pub struct BalloonHandle {
    /// Target, actual, guest statistics and counters.
    pub state: Arc<BalloonState>,
    /// The transport, to signal configuration changes.
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl BalloonHandle {
    /// Asks the guest to hold `pages` balloon pages.
    pub fn set_target_pages(&self, pages: u32) {
        self.state.set_target(pages);
        config_changed(&self.transport);
    }

    /// Hands the statistics buffer back to the guest so that it refills
    /// it (the API server does so on a timer).
    pub fn request_stats(&self) {
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh();
    }

    /// The balloon as JSON, with the guest's last statistics. Only reads:
    /// the guest sees nothing of it.
    pub fn describe(&self) -> Value {
        let active = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_activated();
        let s = &self.state;
        let mib = |pages: u32| (u64::from(pages) * BALLOON_PAGE) >> 20;
        let target = s.target_pages.load(Ordering::Relaxed);
        let actual = s.actual_pages.load(Ordering::Relaxed);
        let stats: serde_json::Map<String, Value> = s
            .guest_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(tag, v)| {
                let name = STAT_NAMES
                    .get(usize::from(*tag))
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| format!("tag_{tag}"));
                (name, json!(v))
            })
            .collect();
        let c = &s.counters;
        json!({
            "driver_active": active,
            "target_mib": mib(target),
            "actual_mib": mib(actual),
            "target_pages": target,
            "actual_pages": actual,
            "guest_stats": stats,
            "last_resize": resize_json(&s.resize),
            "counters": {
                "inflated_pages": c.inflated_pages.load(Ordering::Relaxed),
                "deflated_pages": c.deflated_pages.load(Ordering::Relaxed),
                "reported_bytes": c.reported_bytes.load(Ordering::Relaxed),
                "freed_bytes": c.freed_bytes.load(Ordering::Relaxed),
                "reports_kept_for_poison": c.reports_kept_for_poison.load(Ordering::Relaxed),
                "discards": c.discards.load(Ordering::Relaxed),
                "rejected_pfns": c.rejected_pfns.load(Ordering::Relaxed),
                "rejected_chains": c.rejected_chains.load(Ordering::Relaxed),
                "discard_errors": c.discard_errors.load(Ordering::Relaxed),
                "stray_ranges": c.stray_ranges.load(Ordering::Relaxed),
                "unused_queue_notifies": c.unused_queue_notifies.load(Ordering::Relaxed),
                "yields": c.yields.load(Ordering::Relaxed),
                "inflate_batches": c.inflate_batches.load(Ordering::Relaxed),
                "inflate_us": c.inflate_us.load(Ordering::Relaxed),
            }
        })
    }
}

/// The VMM side of virtio-mem: its shared state, its transport and the
/// window's backing.
#[derive(Clone)]
pub struct HotplugHandle {
    /// Requested and plugged sizes, counters.
    pub state: Arc<MemState>,
    /// The transport, to signal configuration changes.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The window, for its file size and host allocation.
    pub window: Arc<dyn HotplugBackend>,
    /// How the window keeps the guest off unplugged blocks, when a VM
    /// maps it.
    pub guard: Option<crate::hotplug_window::WindowGuard>,
}

impl HotplugHandle {
    /// Asks the guest to have `bytes` plugged.
    pub fn set_requested(&self, bytes: u64) {
        self.state.request(bytes);
        config_changed(&self.transport);
    }

    /// The window as JSON.
    pub fn describe(&self, boot_ram: u64) -> Value {
        let s = &self.state;
        let c = &s.counters;
        let (base, size) = self.window.window();
        let active = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_activated();
        json!({
            "driver_active": active,
            "boot_mib": boot_ram >> 20,
            "window_base": base.0,
            "window_mib": size >> 20,
            "block_size": BLOCK_SIZE,
            "requested_mib": s.requested_size.load(Ordering::Relaxed) >> 20,
            "plugged_mib": s.plugged_size.load(Ordering::Relaxed) >> 20,
            "backing_file_mib": self.window.backed_size() >> 20,
            "window_guard": self.guard.map(|g| g.name()),
            "host_allocated_mib": self.window.allocated_bytes() >> 20,
            "last_resize": resize_json(&s.resize),
            "counters": {
                "plugs": c.plugs.load(Ordering::Relaxed),
                "unplugs": c.unplugs.load(Ordering::Relaxed),
                "refused": c.refused.load(Ordering::Relaxed),
                "rejected_chains": c.rejected_chains.load(Ordering::Relaxed),
                "backend_errors": c.backend_errors.load(Ordering::Relaxed),
                "self_unplug_refused": c.self_unplug_refused.load(Ordering::Relaxed),
                "unused_queue_notifies": c.unused_queue_notifies.load(Ordering::Relaxed),
            }
        })
    }
}

/// A virtio-mmio transport, for its refusal counter.
#[derive(Clone)]
pub struct VirtioTransport {
    /// The device's name (`balloon`, `virtio-mem`).
    pub name: String,
    /// Guest-physical base of its MMIO window.
    pub mmio_base: u64,
    /// The transport.
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioTransport {
    /// The usual name of a virtio device type.
    pub fn device_name(device_type: u32) -> String {
        match device_type {
            5 => "balloon".into(),
            24 => "virtio-mem".into(),
            t => format!("virtio-{t}"),
        }
    }
}

/// What the API can see and change.
pub struct ApiContext {
    /// Guest memory.
    pub mem: Arc<GuestMem>,
    /// vCPUs.
    pub vcpus: u8,
    /// Boot RAM in bytes.
    pub memory: u64,
    /// The memory backend, as given.
    pub backend: String,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonHandle>,
    /// The virtio-mem window, if the VM has one.
    pub hotplug: Option<HotplugHandle>,
    /// Every virtio-mmio transport.
    pub virtio: Vec<VirtioTransport>,
    /// Pause, resume and snapshot, if the VM takes them.
    pub control: Option<Arc<crate::control::VmControl>>,
}

/// How long a pause or resume may take before the client hears of it.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot may take (the memory file of a large guest).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

fn control(ctx: &ApiContext, req: ControlRequest, timeout: Duration) -> Response {
    let Some(c) = &ctx.control else {
        return Response::error(404, "this VM cannot be paused or saved");
    };
    match c.request(req, timeout) {
        Ok(()) => Response::empty(204),
        Err(e @ ControlError::Conflict(_)) => Response::error(409, e.to_string()),
        Err(e @ ControlError::Invalid(_)) => Response::error(400, e.to_string()),
        Err(e @ ControlError::Failed(_)) => Response::error(500, e.to_string()),
    }
}

const NO_HOTPLUG: &str = "this VM has no virtio-mem window (start it with --virtio-mem SIZE)";

fn body_json(req: &Request) -> Result<Value, Response> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("the body is not valid JSON: {e}")))
}

/// The body's `{"KEY": N}`, N a non-negative integer; otherwise a 400.
fn u64_field(req: &Request, key: &str) -> Result<u64, Response> {
    body_json(req)?
        .get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            Response::error(
                400,
                format!("expected {{\"{key}\": N}} with N a non-negative integer"),
            )
        })
}

/// Answers one request.
pub fn handle(ctx: &ApiContext, req: &Request) -> Response {
    match (req.method.as_str(), req.path.trim_end_matches('/')) {
        ("GET", "/vm") => Response::json(
            200,
            json!({
                "state": ctx.control.as_ref().map_or(RunState::Running, |c| c.state()),
                "vcpus": ctx.vcpus,
                "memory_mib": ctx.memory >> 20,
                "mem_backend": ctx.backend,
                "userfaultfd": ctx.mem.userfault_enabled(),
                "plugged_mib": ctx.mem.mapped_bytes() >> 20,
                "host_allocated_mib": ctx.mem.allocated_bytes() >> 20,
                "balloon": ctx.balloon.is_some(),
                "virtio_mem": ctx.hotplug.is_some(),
            }),
        ),
        ("GET", "/metrics") => {
            let stats = serde_json::to_value(ctx.mem.stats()).unwrap_or(Value::Null);
            // The transports log the first refusals only; the counts stay.
            let virtio: Vec<Value> = ctx
                .virtio
                .iter()
                .map(|v| {
                    let t = v.transport.lock().unwrap_or_else(|p| p.into_inner());
                    json!({
                        "device": v.name,
                        "mmio_base": v.mmio_base,
                        "rejected_accesses": t.rejected(),
                    })
                })
                .collect();
            Response::json(
                200,
                json!({
                    "guest_mem": stats,
                    "host_allocated_bytes": ctx.mem.allocated_bytes(),
                    "balloon": ctx.balloon.as_ref().map(|b| b.describe()["counters"].clone()),
                    "virtio": virtio,
                    // Guest-triggered log lines the rate limiter held back.
                    "guest_log_held_back": devices::guest_log::held_back_total(),
                    "fault_failures": ctx.mem.fault_failure().map(|f| f.count()),
                    // Pages that could not be served and are poisoned now
                    // (guest_mem.pages_poisoned counts every poisoning).
                    "poisoned_pages": ctx.mem.poisoned_pages(),
                    // Each one an interrupt; an idle VM's loop sleeps.
                    "event_loop_wakeups": ctx.control.as_ref().map(|c| c.event_loop_wakeups()),
                }),
            )
        }
        ("GET", "/balloon") => match &ctx.balloon {
            Some(b) => Response::json(200, b.describe()),
            None => Response::error(404, "this VM has no balloon (start it with --balloon)"),
        },
        ("PUT", "/balloon") => {
            let Some(b) = &ctx.balloon else {
                return Response::error(404, "this VM has no balloon (start it with --balloon)");
            };
            let mib = match u64_field(req, "target_mib") {
                Ok(mib) => mib,
                Err(r) => return r,
            };
            let max = ctx.memory >> 20;
            if mib > max {
                return Response::error(
                    400,
                    format!("target_mib {mib} is larger than the guest's {max} MiB"),
                );
            }
            b.set_target_pages(((mib << 20) / BALLOON_PAGE) as u32);
            Response::empty(204)
        }
        ("GET", "/memory") => match &ctx.hotplug {
            Some(h) => Response::json(200, h.describe(ctx.memory)),
            None => Response::error(404, NO_HOTPLUG),
        },
        ("PUT", "/memory") => {
            let Some(h) = &ctx.hotplug else {
                return Response::error(404, NO_HOTPLUG);
            };
            let mib = match u64_field(req, "requested_mib") {
                Ok(mib) => mib,
                Err(r) => return r,
            };
            let window = h.window.window().1;
            let bytes = mib.saturating_mul(1 << 20);
            if bytes > window {
                return Response::error(
                    400,
                    format!(
                        "requested_mib {mib} is larger than the virtio-mem window ({} MiB)",
                        window >> 20
                    ),
                );
            }
            if bytes % BLOCK_SIZE != 0 {
                return Response::error(
                    400,
                    format!(
                        "requested_mib {mib} is not a multiple of the {} MiB block size",
                        BLOCK_SIZE >> 20
                    ),
                );
            }
            h.set_requested(bytes);
            Response::empty(204)
        }
        ("PUT", "/vm") => {
            let state = match body_json(req) {
                Ok(v) => v.get("state").and_then(Value::as_str).map(str::to_owned),
                Err(r) => return r,
            };
            let req = match state.as_deref() {
                Some("paused") => ControlRequest::Pause,
                Some("running") => ControlRequest::Resume,
                _ => {
                    return Response::error(
                        400,
                        "expected {\"state\": \"paused\"} or {\"state\": \"running\"}",
                    )
                }
            };
            control(ctx, req, CONTROL_TIMEOUT)
        }
        ("PUT", "/snapshot") => {
            let dir = match body_json(req) {
                Ok(v) => v.get("dir").and_then(Value::as_str).map(PathBuf::from),
                Err(r) => return r,
            };
            match dir {
                Some(d) if !d.as_os_str().is_empty() => {
                    control(ctx, ControlRequest::Snapshot(d), SNAPSHOT_TIMEOUT)
                }
                _ => Response::error(400, "expected {\"dir\": PATH}, PATH a new directory"),
            }
        }
        (_, "/vm" | "/metrics" | "/balloon" | "/memory" | "/snapshot") => Response::error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
        _ => Response::error(404, format!("no such resource: {}", req.path)),
    }
}

/// Creates `path` as a Unix socket only the owner can use. A socket left
/// there by a VMM that died (nobody accepts on it: ECONNREFUSED) is
/// replaced; a socket someone serves, or anything else at `path`, is
/// refused.
pub fn bind_owner_only(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(std::io::Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} already exists and is not a socket; remove it or choose another path",
                    path.display()
                ),
            ));
        }
        Ok(_) => match UnixStream::connect(path) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                log::warn!("api: replacing the stale socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    format!(
                        "{} is in use: another process serves it (is another VMM running?)",
                        path.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{} exists and cannot be checked: {e}", path.display()),
                ))
            }
        },
    }
    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after the bind, before other threads create files.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::balloon::{Balloon, BalloonConfig};
    use devices::virtio::mem::VirtioMem;
    use devices::virtio::Interrupt;
    use guest_mem::backend::HotplugRegion;
    use guest_mem::RegionConfig;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EventFd;

    pub(super) fn ctx(with_balloon: bool) -> ApiContext {
        let mem = Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, 64 << 20))
                .build()
                .unwrap(),
        );
        let balloon = with_balloon.then(|| {
            let dev = Balloon::new(mem.clone(), BalloonConfig::default());
            let state = dev.state();
            let transport = transport(Box::new(dev), &mem);
            BalloonHandle { state, transport }
        });
        let virtio = balloon
            .iter()
            .map(|b| VirtioTransport {
                name: "balloon".into(),
                mmio_base: 0xd000_0000,
                transport: b.transport.clone(),
            })
            .collect();
        ApiContext {
            mem,
            vcpus: 2,
            memory: 64 << 20,
            backend: "Memfd".into(),
            balloon,
            hotplug: None,
            virtio,
            control: None,
        }
    }

    /// `dev` behind a virtio-mmio transport, as the VMM attaches it.
    pub(super) fn transport(
        dev: Box<dyn devices::virtio::VirtioDevice>,
        mem: &GuestMem,
    ) -> Arc<Mutex<MmioTransport>> {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Arc::new(Mutex::new(MmioTransport::new(
            dev,
            mem.device_memory(),
            irq,
        )))
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            close: false,
        }
    }

    #[test]
    fn vm_and_metrics_describe_the_guest() {
        let c = ctx(false);
        let r = handle(&c, &req("GET", "/vm", ""));
        assert_eq!(r.status, 200);
        let b = r.body.unwrap();
        assert_eq!(
            (b["vcpus"].as_u64(), b["memory_mib"].as_u64()),
            (Some(2), Some(64))
        );
        assert_eq!(b["userfaultfd"], true);
        let m = handle(&c, &req("GET", "/metrics", "")).body.unwrap();
        assert!(m["guest_mem"]["faults"].is_u64());
        assert!(m["guest_mem"]["fault_latency"]["p99_ns"].is_u64());
    }

    #[test]
    fn balloon_target_is_set_and_validated() {
        let c = ctx(true);
        assert_eq!(
            handle(&c, &req("PUT", "/balloon", r#"{"target_mib": 32}"#)).status,
            204
        );
        let b = &c.balloon.as_ref().unwrap().state;
        assert_eq!(b.target_pages.load(Ordering::Relaxed), 32 * 256);
        let g = handle(&c, &req("GET", "/balloon", "")).body.unwrap();
        assert_eq!(g["target_mib"], 32);
        for bad in [
            "",
            "{",
            r#"{"target_mib": -1}"#,
            r#"{"target_mib": "big"}"#,
            r#"{"target": 1}"#,
            r#"{"target_mib": 65}"#,
        ] {
            let r = handle(&c, &req("PUT", "/balloon", bad));
            assert_eq!(r.status, 400, "{bad:?}");
            assert!(r.body.unwrap()["error"].is_string());
        }
        assert_eq!(
            b.target_pages.load(Ordering::Relaxed),
            32 * 256,
            "unchanged"
        );
    }

    /// A context with 64 MiB of boot RAM and a 256 MiB virtio-mem window
    /// at 4 GiB, nothing plugged.
    pub(super) fn hotplug_ctx() -> ApiContext {
        let mut hot = RegionConfig::new(4 << 30, 0);
        hot.max_size = Some(256 << 20);
        let mem = Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, 64 << 20))
                .region(hot)
                .build()
                .unwrap(),
        );
        let window = Arc::new(HotplugRegion::new(mem.clone(), guest_mem::RegionIndex(1)).unwrap());
        let dev = VirtioMem::new(window.clone()).unwrap();
        let state = dev.state();
        let transport = transport(Box::new(dev), &mem);
        ApiContext {
            hotplug: Some(HotplugHandle {
                state,
                transport,
                window,
                guard: None,
            }),
            mem,
            ..ctx(false)
        }
    }

    #[test]
    fn memory_request_is_set_and_validated() {
        let c = hotplug_ctx();
        let state = c.hotplug.as_ref().unwrap().state.clone();
        let put = |body: &str| handle(&c, &req("PUT", "/memory", body));
        assert_eq!(put(r#"{"requested_mib": 128}"#).status, 204);
        assert_eq!(state.requested_size.load(Ordering::Relaxed), 128 << 20);
        let g = handle(&c, &req("GET", "/memory", "")).body.unwrap();
        assert_eq!(
            (
                &g["requested_mib"],
                &g["plugged_mib"],
                &g["window_mib"],
                &g["boot_mib"]
            ),
            (&json!(128), &json!(0), &json!(256), &json!(64))
        );
        assert_eq!(g["window_base"], json!(4u64 << 30));
        for bad in [
            "{}",
            r#"{"requested_mib": 257}"#,
            r#"{"requested_mib": 3}"#,
            r#"{"requested_mib": 18446744073709551615}"#,
        ] {
            let r = put(bad);
            assert_eq!(r.status, 400, "{bad:?}");
            assert!(r.body.unwrap()["error"].is_string());
        }
        assert_eq!(state.requested_size.load(Ordering::Relaxed), 128 << 20);
        let vm = handle(&c, &req("GET", "/vm", "")).body.unwrap();
        assert_eq!(vm["virtio_mem"], json!(true));
        let none = ctx(false);
        assert_eq!(handle(&none, &req("GET", "/memory", "")).status, 404);
        assert_eq!(handle(&none, &req("DELETE", "/memory", "")).status, 405);
    }

    /// An event loop's stand-in: pauses and resumes, saves only paused.
    fn serve_control(inbox: crate::control::ControlInbox) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut paused = false;
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                let Some((req, answer)) = inbox.next() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let r = match req {
                    ControlRequest::Pause => {
                        paused = true;
                        Ok(())
                    }
                    ControlRequest::Resume => {
                        paused = false;
                        Ok(())
                    }
                    ControlRequest::Snapshot(_) if !paused => {
                        Err(ControlError::Conflict("running".into()))
                    }
                    ControlRequest::Snapshot(d) if d.exists() => {
                        Err(ControlError::Invalid("exists".into()))
                    }
                    ControlRequest::Snapshot(_) | ControlRequest::Stop => Ok(()),
                };
                inbox.set_state(if paused {
                    RunState::Paused
                } else {
                    RunState::Running
                });
                answer.send(r);
            }
        })
    }

    #[test]
    fn vm_pause_resume_and_snapshot_requests() {
        let mut c = ctx(false);
        let put =
            |c: &ApiContext, path: &str, body: &str| handle(c, &req("PUT", path, body)).status;
        assert_eq!(put(&c, "/vm", r#"{"state":"paused"}"#), 404, "no control");
        let (control, inbox) = crate::control::channel().unwrap();
        c.control = Some(control);
        let _loop = serve_control(inbox);
        let state =
            |c: &ApiContext| handle(c, &req("GET", "/vm", "")).body.unwrap()["state"].clone();
        assert_eq!(state(&c), "running");
        assert_eq!(put(&c, "/snapshot", r#"{"dir":"/tmp/x"}"#), 409, "running");
        assert_eq!(put(&c, "/vm", r#"{"state":"paused"}"#), 204);
        assert_eq!(state(&c), "paused");
        assert_eq!(put(&c, "/snapshot", r#"{"dir":"/"}"#), 400, "exists");
        for bad in ["", "{}", r#"{"dir":""}"#, r#"{"dir":7}"#] {
            assert_eq!(put(&c, "/snapshot", bad), 400, "{bad}");
        }
        let fresh = std::env::temp_dir().join(format!("api-snap-{}", std::process::id()));
        let body = json!({ "dir": fresh }).to_string();
        assert_eq!(put(&c, "/snapshot", &body), 204);
        for bad in ["", "{}", r#"{"state":"stopped"}"#, r#"{"state":1}"#] {
            assert_eq!(put(&c, "/vm", bad), 400, "{bad}");
        }
        assert_eq!(put(&c, "/vm", r#"{"state":"running"}"#), 204);
        assert_eq!(state(&c), "running");
        assert_eq!(handle(&c, &req("GET", "/snapshot", "")).status, 405);
    }

    #[test]
    fn unknown_paths_methods_and_missing_devices() {
        let c = ctx(false);
        assert_eq!(handle(&c, &req("GET", "/nope", "")).status, 404);
        assert_eq!(handle(&c, &req("DELETE", "/vm", "")).status, 405);
        assert_eq!(handle(&c, &req("GET", "/balloon", "")).status, 404);
        assert_eq!(
            handle(&c, &req("PUT", "/balloon", r#"{"target_mib":1}"#)).status,
            404
        );
    }

    /// virtio-mmio registers (virtio 1.x, 4.2.2), as a driver writes them.
    const STATUS: u64 = 0x70;
    const DRIVER_FEATURES: u64 = 0x20;
    const DRIVER_FEATURES_SEL: u64 = 0x24;
    const QUEUE_SEL: u64 = 0x30;
    const QUEUE_NUM: u64 = 0x38;
    const QUEUE_READY: u64 = 0x44;
    const QUEUE_DESC_LOW: u64 = 0x80;
    const QUEUE_DRIVER_LOW: u64 = 0x90;
    const QUEUE_DEVICE_LOW: u64 = 0xa0;
    /// The stats queue's rings: descriptors, driver ring at +4 KiB, device
    /// (used) ring at +8 KiB.
    const STATS_RING: u64 = 3 << 20;
    const STATS_BUF: u64 = 7 << 20;

    /// Plays the guest driver of `c`'s balloon: negotiates VERSION_1 and
    /// STATS_VQ, sets up queues 0-2 (16 entries at 1, 2, 3 MiB), starts the
    /// device and hands it a stats buffer (tag 4 = 123, tag 5 = 456).
    pub(super) fn guest_gives_stats_buffer(c: &ApiContext) {
        use devices::bus::BusDevice;
        use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
        let ram = c.mem.memory().memory();
        let b = c.balloon.as_ref().unwrap();
        let mut t = b.transport.lock().unwrap();
        let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
        w(STATUS, 1);
        w(STATUS, 3);
        w(DRIVER_FEATURES_SEL, 1);
        w(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1, bit 32
        w(DRIVER_FEATURES_SEL, 0);
        w(DRIVER_FEATURES, 1 << 1); // VIRTIO_BALLOON_F_STATS_VQ
        w(STATUS, 0xb);
        for q in 0..3u32 {
            let base = u64::from(q + 1) << 20;
            w(QUEUE_SEL, q);
            w(QUEUE_NUM, 16);
            w(QUEUE_DESC_LOW, base as u32);
            w(QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            w(QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            w(QUEUE_READY, 1);
        }
        w(STATUS, 0xf);
        assert!(t.is_activated());
        let mut buf = Vec::new();
        for (tag, val) in [(4u16, 123u64), (5, 456)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&val.to_le_bytes());
        }
        ram.write_slice(&buf, GuestAddress(STATS_BUF)).unwrap();
        // Descriptor 0: the buffer, device-readable; driver ring: idx 1.
        ram.write_obj(STATS_BUF, GuestAddress(STATS_RING)).unwrap();
        ram.write_obj(buf.len() as u32, GuestAddress(STATS_RING + 8))
            .unwrap();
        ram.write_obj(0u32, GuestAddress(STATS_RING + 12)).unwrap();
        ram.write_obj(0u16, GuestAddress(STATS_RING + 0x1004))
            .unwrap();
        ram.write_obj(1u16, GuestAddress(STATS_RING + 0x1002))
            .unwrap();
        t.queue_notified(2);
    }

    /// How many buffers the device has given back on the stats queue.
    pub(super) fn stats_used_idx(c: &ApiContext) -> u16 {
        use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
        c.mem
            .memory()
            .memory()
            .read_obj(GuestAddress(STATS_RING + 0x2002))
            .unwrap()
    }

    /// `GET /balloon` only reads: the guest keeps waiting for its stats
    /// buffer however often the host looks (the refresh is the timer's).
    #[test]
    fn get_balloon_does_not_hand_the_stats_buffer_back() {
        let c = ctx(true);
        guest_gives_stats_buffer(&c);
        assert_eq!(stats_used_idx(&c), 0, "the device holds the buffer");
        for _ in 0..3 {
            let g = handle(&c, &req("GET", "/balloon", "")).body.unwrap();
            assert_eq!(g["guest_stats"]["total_memory"], 456, "{g}");
            assert_eq!(g["driver_active"], true);
        }
        handle(&c, &req("GET", "/metrics", ""));
        assert_eq!(stats_used_idx(&c), 0, "a GET returned the buffer");
        c.balloon.as_ref().unwrap().request_stats();
        assert_eq!(stats_used_idx(&c), 1, "an explicit refresh does");
    }

    #[test]
    fn metrics_count_each_transports_refused_accesses() {
        use devices::bus::BusDevice;
        let c = ctx(true);
        let t = &c.balloon.as_ref().unwrap().transport;
        let v =
            |c: &ApiContext| handle(c, &req("GET", "/metrics", "")).body.unwrap()["virtio"].clone();
        assert_eq!(v(&c)[0]["rejected_accesses"], 0);
        assert_eq!(v(&c)[0]["device"], "balloon");
        // More than the transport logs: the count keeps going.
        for _ in 0..40 {
            t.lock().unwrap().write(0x70, &[1, 0]); // a 2-byte status write
        }
        t.lock().unwrap().queue_notified(9); // no such queue
        assert_eq!(v(&c)[0]["rejected_accesses"], 41);
    }

    #[test]
    fn socket_is_owner_only_and_answers_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = ApiServer::new(&path, Arc::new(ctx(true))).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        let api = server.spawn().unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"PUT /balloon HTTP/1.1\r\nConnection: close\r\nContent-Length: 16\r\n\r\n{\"target_mib\":8}",
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 204"), "{out}");
        api.stop();
        assert!(!path.exists(), "socket removed when the server stops");
    }

    /// A socket file left by a VMM that died is replaced; one that a live
    /// process serves, or a file that is not a socket, is refused.
    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists(), "the file outlives its listener");
        let server = ApiServer::new(&stale, Arc::new(ctx(false))).unwrap();
        assert!(UnixStream::connect(&stale).is_ok(), "listening again");

        let e = ApiServer::new(&stale, Arc::new(ctx(false))).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(UnixStream::connect(&stale).is_ok(), "the live socket kept");
        drop(server);

        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let e = ApiServer::new(&file, Arc::new(ctx(false))).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
