//! `PUT /balloon` and `PUT /memory` with `"wait_ms"`: the answer comes when
//! the guest has reached the target (or with the state at the deadline),
//! so orchestration needs no polling loop and benchmarks time the guest
//! exactly. The API thread keeps serving other clients meanwhile: a
//! waiting request parks its connection, and the server looks at it again
//! when the device's value changes (its change eventfd) or the deadline
//! comes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devices::virtio::balloon::BALLOON_PAGE;
use serde_json::json;

use super::http::{Request, Response};
use super::{body_json, handle, ApiContext};

/// The longest wait a request may ask for.
pub const MAX_WAIT_MS: u64 = 60_000;

/// How often a parked request looks at the device again where the
/// devices' change eventfds could not be watched.
pub const POLL: Duration = Duration::from_millis(5);

/// What a request gets: its answer now, or a wait for the guest.
pub enum Answer {
    /// The answer.
    Now(Response),
    /// Answer once the guest reached the target or the deadline passed.
    Wait(Wait),
}

#[derive(Debug, Clone, Copy)]
enum Target {
    BalloonPages(u32),
    MemoryBytes(u64),
}

/// A request waiting for the guest.
#[derive(Debug)]
pub struct Wait {
    target: Target,
    started: Instant,
    /// When the answer goes out whatever the guest did.
    pub deadline: Instant,
}

impl Wait {
    /// The answer, once the guest reached the target or at the deadline.
    pub fn poll(&self, ctx: &ApiContext, now: Instant) -> Option<Response> {
        let waited_ms = now.duration_since(self.started).as_secs_f64() * 1e3;
        let (reached, body) = match self.target {
            Target::BalloonPages(target) => {
                let b = ctx.balloon.as_ref()?;
                let actual = b.state.actual_pages.load(Ordering::Relaxed);
                let mib = |p: u32| (u64::from(p) * BALLOON_PAGE) >> 20;
                (
                    actual == target,
                    json!({
                        "target_mib": mib(target),
                        "actual_mib": mib(actual),
                        "target_pages": target,
                        "actual_pages": actual,
                    }),
                )
            }
            Target::MemoryBytes(target) => {
                let h = ctx.hotplug.as_ref()?;
                let plugged = h.state.plugged_size.load(Ordering::Relaxed);
                (
                    plugged == target,
                    json!({
                        "requested_mib": target >> 20,
                        "plugged_mib": plugged >> 20,
                    }),
                )
            }
        };
        if !reached && now < self.deadline {
            return None;
        }
        let mut body = body;
        body["reached"] = json!(reached);
        body["waited_ms"] = json!(waited_ms);
        Some(Response::json(200, body))
    }
}

/// The body's optional `"wait_ms"`: a non-negative integer of at most
/// [`MAX_WAIT_MS`]; otherwise a 400.
fn wait_ms(req: &Request) -> Result<Option<u64>, Response> {
    let Ok(body) = body_json(req) else {
        return Ok(None); // the handler answers the malformed body
    };
    match body.get("wait_ms") {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= MAX_WAIT_MS => Ok(Some(ms)),
            _ => Err(Response::error(
                400,
                format!("wait_ms must be an integer from 0 to {MAX_WAIT_MS}"),
            )),
        },
    }
}

/// Answers one request; a successful `PUT /balloon` or `PUT /memory` with
/// `"wait_ms"` becomes a [`Wait`].
pub fn answer(ctx: &ApiContext, req: &Request) -> Answer {
    let path = req.path.trim_end_matches('/');
    let waits = req.method == "PUT" && (path == "/balloon" || path == "/memory");
    // Checked before anything changes: a bad wait_ms leaves the target.
    let wait = if waits {
        match wait_ms(req) {
            Ok(w) => w,
            Err(r) => return Answer::Now(r),
        }
    } else {
        None
    };
    let resp = handle(ctx, req);
    let (Some(ms), 204) = (wait, resp.status) else {
        return Answer::Now(resp);
    };
    let target = if path == "/balloon" {
        match &ctx.balloon {
            Some(b) => Target::BalloonPages(b.state.target_pages.load(Ordering::Relaxed)),
            None => return Answer::Now(resp),
        }
    } else {
        match &ctx.hotplug {
            Some(h) => Target::MemoryBytes(h.state.requested_size.load(Ordering::Relaxed)),
            None => return Answer::Now(resp),
        }
    };
    let now = Instant::now();
    let wait = Wait {
        target,
        started: now,
        deadline: now + Duration::from_millis(ms),
    };
    match wait.poll(ctx, now) {
        Some(r) => Answer::Now(r),
        None => Answer::Wait(wait),
    }
}
