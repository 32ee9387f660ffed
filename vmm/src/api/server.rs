//! The API server: a thread of its own (`api`) with an epoll over the
//! listening socket, the client connections, a stop eventfd and the balloon
//! statistics timer. Every socket is non-blocking and every connection is
//! bounded in size and in time, so a slow or stuck client costs the others
//! (and the devices, which have their own event loop) nothing.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::http::{self, Parsed, Request, Response};
use super::wait::{self, Answer, Wait};
use super::{bind_owner_only, ApiContext};

/// Limits and timers of the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Connections served at once. A connection beyond it takes the place
    /// of the connection idle the longest (no request in progress), else of
    /// the one whose request has been arriving for longest if that is over
    /// [`SLOW_REQUEST`] (it gets 408); otherwise it is answered 503 and
    /// closed at once.
    pub max_connections: usize,
    /// Largest request, head and body together: larger ones get 413 (431
    /// for a head over 8 KiB) and the connection is closed.
    pub max_request: usize,
    /// Time to deliver a whole request from its first byte, and to take a
    /// whole response: then 408 (while reading) and the connection closed.
    pub request_timeout: Duration,
    /// How long a connection may wait without a request in progress,
    /// after it was opened or its last answer, before it is closed.
    pub idle_timeout: Duration,
    /// How often the guest is asked for fresh balloon statistics (`None`:
    /// never). `GET /balloon` only reads the last ones.
    pub balloon_stats_interval: Option<Duration>,
}

impl Default for ApiConfig {
    /// 16 connections, 64 KiB requests, 5 s per request, 5 s idle,
    /// statistics every second.
    fn default() -> Self {
        ApiConfig {
            max_connections: 16,
            max_request: http::MAX_REQUEST,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            balloon_stats_interval: Some(Duration::from_secs(1)),
        }
    }
}

/// A request still arriving after this long may be cut short (408) to make
/// room for a new connection: a local client sends one in far less.
pub const SLOW_REQUEST: Duration = Duration::from_secs(1);

// Epoll tokens; connections count up from FIRST_CONN and are never reused,
// so an event for a connection closed earlier in the same batch finds
// nothing.
const LISTENER: u64 = 0;
const STOP: u64 = 1;
const STATS: u64 = 2;
/// The balloon's or virtio-mem's value changed: look at the waits.
const CHANGES: u64 = 3;
const FIRST_CONN: u64 = 4;

/// What happened to connections, for `GET /metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    accepted: u64,
    refused: u64,
    evicted_idle: u64,
    evicted_slow: u64,
    timed_out: u64,
    idle_closed: u64,
    too_large: u64,
    requests: u64,
    /// Times the API thread woke up (events or a timeout).
    wakeups: u64,
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet answered (part of a request, or
    /// requests sent ahead).
    input: Vec<u8>,
    /// The response being sent, and how much of it is out.
    output: Vec<u8>,
    written: usize,
    /// Close once the output is out.
    close_after: bool,
    /// The client closed its side.
    eof: bool,
    /// When the current phase (idle, reading a request, writing an answer)
    /// began: its deadline counts from there.
    since: Instant,
    /// Whether epoll watches for writability (else readability).
    watching_out: bool,
    /// A request waiting for the guest (`"wait_ms"`), and whether the
    /// client asked to close after it; later requests wait behind it.
    waiting: Option<(Wait, bool)>,
}

impl Conn {
    fn writing(&self) -> bool {
        self.written < self.output.len()
    }

    /// No request in progress and nothing to send: may be evicted.
    fn idle(&self) -> bool {
        self.input.is_empty() && !self.writing() && self.waiting.is_none()
    }

    /// When the current phase runs out (`None`: a timeout too large to
    /// represent, never).
    fn deadline(&self, config: &ApiConfig) -> Option<Instant> {
        if let Some((w, _)) = &self.waiting {
            // A wait ends by itself; its answer then starts a new phase.
            return w.deadline.checked_add(config.request_timeout);
        }
        let limit = if self.idle() {
            config.idle_timeout
        } else {
            config.request_timeout
        };
        self.since.checked_add(limit)
    }

    /// Reads what the socket has, up to a little over `max` buffered (the
    /// parser then refuses the request). Errors end the connection.
    fn fill(&mut self, max: usize) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        while self.input.len() <= max && !self.eof {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if self.input.is_empty() {
                        self.since = Instant::now();
                    }
                    self.input
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn queue(&mut self, resp: &Response, close: bool) {
        self.close_after |= close || self.eof;
        self.output = http::encode_response(resp, self.close_after);
        self.written = 0;
        self.since = Instant::now();
    }

    /// Sends what it can; `Ok(true)` once the whole response is out.
    fn flush(&mut self) -> std::io::Result<bool> {
        while let Some(rest) = self.output.get(self.written..).filter(|r| !r.is_empty()) {
            match send(&self.stream, rest) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        self.since = Instant::now();
        Ok(true)
    }
}

/// Writes without raising SIGPIPE when the client has gone (a library
/// cannot count on the program ignoring it).
fn send(stream: &UnixStream, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which outlives the
    // call; the fd is the stream's own, open for the borrow's duration.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends a last answer if the socket takes it at once, and closes.
fn answer_and_close(stream: UnixStream, resp: &Response) {
    let _ = send(&stream, &http::encode_response(resp, true));
    close(stream);
}

/// Closes a connection. What the client sent and we did not read is read
/// and dropped first (bounded): closing a Unix socket with unread data
/// makes the client's read end in ECONNRESET instead of the end of file.
fn close(stream: UnixStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        match (&stream).read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Copies of the change eventfds of the balloon and virtio-mem values a
/// request can wait for.
fn change_fds(ctx: &ApiContext) -> std::io::Result<Vec<EventFd>> {
    let balloon = ctx.balloon.as_ref().map(|b| &b.state.resize);
    let hotplug = ctx.hotplug.as_ref().map(|h| &h.state.resize);
    balloon
        .into_iter()
        .chain(hotplug)
        .map(|r| r.change_fd()?.try_clone())
        .collect()
}

/// The API server; [`ApiServer::spawn`] runs it on its own thread.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    ctx: Arc<ApiContext>,
    config: ApiConfig,
    epoll: Epoll,
    stop: EventFd,
    stats_timer: Option<TimerFd>,
    /// The devices' change eventfds the epoll watches, if all could be:
    /// then a waiting request is looked at when its device's value
    /// changes, else every [`wait::POLL`].
    changes: Option<Vec<EventFd>>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    counters: Counters,
}

impl ApiServer {
    /// Listens on `path` with the default limits.
    pub fn new(path: &Path, ctx: Arc<ApiContext>) -> std::io::Result<Self> {
        Self::with_config(path, ctx, ApiConfig::default())
    }

    /// Listens on `path` (see [`bind_owner_only`] for a path that exists).
    pub fn with_config(
        path: &Path,
        ctx: Arc<ApiContext>,
        config: ApiConfig,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stats_timer = match (&ctx.balloon, config.balloon_stats_interval) {
            (Some(_), Some(every)) if !every.is_zero() => {
                let mut t = TimerFd::new()?;
                t.reset(every, Some(every))?;
                Some(t)
            }
            _ => None,
        };
        let listener = bind_owner_only(path)?;
        let changes = change_fds(&ctx)
            .map_err(|e| log::warn!("api: requests that wait will poll the devices: {e}"))
            .ok();
        let mut server = ApiServer {
            listener,
            path: path.to_path_buf(),
            ctx,
            config,
            epoll,
            stop,
            stats_timer,
            changes,
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            counters: Counters::default(),
        };
        server.watch(server.listener.as_raw_fd(), LISTENER, EventSet::IN)?;
        server.watch(server.stop.as_raw_fd(), STOP, EventSet::IN)?;
        if let Some(t) = &server.stats_timer {
            server.watch(t.as_raw_fd(), STATS, EventSet::IN)?;
        }
        let watched = server.changes.as_ref().map(|fds| {
            fds.iter()
                .try_for_each(|fd| server.watch(fd.as_raw_fd(), CHANGES, EventSet::IN))
        });
        if let Some(Err(e)) = watched {
            log::warn!("api: requests that wait will poll the devices: {e}");
            // Out of the epoll set first: the device keeps its own copy of
            // each fd open, so dropping ours would leave one already
            // watched there, readable and never drained.
            for fd in server.changes.take().into_iter().flatten() {
                let _ = server.epoll.ctl(
                    ControlOperation::Delete,
                    fd.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        Ok(server)
    }

    fn watch(&self, fd: i32, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Serves on a thread named `api` until the handle is stopped or
    /// dropped; the socket is removed then.
    pub fn spawn(self) -> std::io::Result<ApiThread> {
        self.spawn_sandboxed(false)
    }

    /// Like [`spawn`](Self::spawn), with the `api` thread's seccomp filter
    /// installed first when `seccomp` is set (the server then serves under
    /// it; a filter that cannot be installed leaves the API off, logged).
    pub fn spawn_sandboxed(self, seccomp: bool) -> std::io::Result<ApiThread> {
        let stop = self.stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if seccomp {
                    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
                        log::error!("api: installing the seccomp filter: {e}; the API is off");
                        return;
                    }
                }
                self.run()
            })?;
        Ok(ApiThread {
            stop,
            handle: Some(handle),
        })
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(self.timeout_ms(), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("api: epoll_wait: {e}; the API stops");
                    return;
                }
            };
            self.counters.wakeups += 1;
            for ev in events.iter().take(n) {
                match ev.data() {
                    STOP => return,
                    LISTENER => self.accept(),
                    STATS => self.refresh_stats(),
                    CHANGES => self.drain_changes(),
                    id => self.service(id),
                }
            }
            self.poll_waits(Instant::now());
            self.expire(Instant::now());
        }
    }

    /// Answers the waits whose guest reached the target or whose deadline
    /// passed, and moves their connections along.
    fn poll_waits(&mut self, now: Instant) {
        let done: Vec<(u64, Response)> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| {
                let (w, _) = c.waiting.as_ref()?;
                w.poll(&self.ctx, now).map(|r| (id, r))
            })
            .collect();
        for (id, resp) in done {
            if let Some(conn) = self.conns.get_mut(&id) {
                if let Some((_, close)) = conn.waiting.take() {
                    conn.queue(&resp, close);
                }
            }
            self.service(id);
        }
    }

    /// Reads the change eventfds empty (the waits are looked at after
    /// every batch of events).
    fn drain_changes(&self) {
        for fd in self.changes.iter().flatten() {
            let _ = fd.read();
        }
    }

    /// Milliseconds until the first connection or wait deadline, or the
    /// next look at a waiting request where the devices' changes are not
    /// watched (-1: none).
    fn timeout_ms(&self) -> i32 {
        let waits = self.conns.values().filter_map(|c| c.waiting.as_ref());
        if self.changes.is_none() && waits.clone().next().is_some() {
            return wait::POLL.as_millis() as i32;
        }
        let Some(first) = self
            .conns
            .values()
            .filter_map(|c| c.deadline(&self.config))
            .chain(waits.map(|(w, _)| w.deadline))
            .min()
        else {
            return -1;
        };
        let wait = first.saturating_duration_since(Instant::now());
        // Rounded up, so that the deadline has passed on waking.
        i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    }

    fn refresh_stats(&mut self) {
        if let Some(t) = &mut self.stats_timer {
            // Readable: the read returns the expirations at once.
            let _ = t.wait();
        }
        if let Some(b) = &self.ctx.balloon {
            b.request_stats();
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of descriptors or memory: the listener stays
                    // readable, so pause rather than spin on it.
                    log::warn!("api: accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("api: a connection: {e}");
            return;
        }
        self.counters.accepted += 1;
        if self.conns.len() >= self.config.max_connections {
            let oldest = |slow: bool| {
                self.conns
                    .iter()
                    .filter(|(_, c)| !c.writing() && c.idle() != slow)
                    .filter(|(_, c)| !slow || c.since.elapsed() > SLOW_REQUEST)
                    .min_by_key(|(_, c)| c.since)
                    .map(|(&id, _)| id)
            };
            let idle = oldest(false);
            let victim = idle.or_else(|| oldest(true));
            match victim.and_then(|id| self.conns.remove(&id)) {
                Some(old) if idle.is_some() => {
                    self.counters.evicted_idle += 1;
                    close(old.stream);
                }
                Some(old) => {
                    self.counters.evicted_slow += 1;
                    let msg = "the request was too slow to arrive and its place was needed";
                    answer_and_close(old.stream, &Response::error(408, msg));
                }
                None => {
                    self.counters.refused += 1;
                    let msg = format!(
                        "too many connections (at most {}); try again",
                        self.config.max_connections
                    );
                    return answer_and_close(stream, &Response::error(503, msg));
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = self.watch(stream.as_raw_fd(), id, EventSet::IN) {
            log::warn!("api: watching a connection: {e}");
            return;
        }
        self.conns.insert(
            id,
            Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                written: 0,
                close_after: false,
                eof: false,
                since: Instant::now(),
                watching_out: false,
                waiting: None,
            },
        );
    }

    fn service(&mut self, id: u64) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        match self.drive(&mut conn) {
            Ok(true) => {
                let out = conn.writing();
                if out != conn.watching_out {
                    let events = if out { EventSet::OUT } else { EventSet::IN };
                    let ev = EpollEvent::new(events, id);
                    let fd = conn.stream.as_raw_fd();
                    if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, ev) {
                        log::warn!("api: watching a connection: {e}");
                        return close(conn.stream);
                    }
                    conn.watching_out = out;
                }
                self.conns.insert(id, conn);
            }
            // The fd leaves the epoll set when it is closed (never dup'ed).
            Ok(false) | Err(_) => close(conn.stream),
        }
    }

    /// Moves a connection along: sends what is pending, reads, answers
    /// the requests it has, one at a time. `Ok(false)`: close it.
    fn drive(&mut self, conn: &mut Conn) -> std::io::Result<bool> {
        if conn.writing() {
            if !conn.flush()? {
                return Ok(true);
            }
            if conn.close_after {
                return Ok(false);
            }
        }
        conn.fill(self.config.max_request)?;
        // Requests sent ahead are answered in turn, as long as the answers
        // go out at once (and none is waiting for the guest).
        loop {
            if conn.waiting.is_some() {
                return Ok(true);
            }
            if conn.input.is_empty() {
                return Ok(!conn.eof);
            }
            match http::parse_limited(&conn.input, self.config.max_request) {
                Ok(Parsed::Partial) if conn.eof => {
                    let resp = Response::error(400, "connection closed mid-request");
                    conn.queue(&resp, true);
                }
                Ok(Parsed::Partial) => return Ok(true),
                Ok(Parsed::Complete { request, len }) => {
                    conn.input.drain(..len.min(conn.input.len()));
                    // A request left behind starts its clock now.
                    conn.since = Instant::now();
                    match self.answer(&request) {
                        Answer::Now(resp) => conn.queue(&resp, request.close),
                        Answer::Wait(w) => {
                            conn.waiting = Some((w, request.close));
                            return Ok(true);
                        }
                    }
                }
                Err(resp) => {
                    if matches!(resp.status, 413 | 431) {
                        self.counters.too_large += 1;
                    }
                    log::info!("api: answered {}", resp.status);
                    conn.queue(&resp, true);
                }
            }
            if !conn.flush()? {
                return Ok(true);
            }
            if conn.close_after {
                return Ok(false);
            }
        }
    }

    fn answer(&mut self, req: &Request) -> Answer {
        self.counters.requests += 1;
        let mut resp = match wait::answer(&self.ctx, req) {
            Answer::Now(resp) => resp,
            wait => return wait,
        };
        if resp.status >= 400 {
            log::info!("api: answered {}", resp.status);
        }
        if resp.status == 200 && req.path.trim_end_matches('/') == "/metrics" {
            if let Some(Value::Object(m)) = resp.body.as_mut() {
                m.insert("api".into(), self.metrics());
            }
        }
        Answer::Now(resp)
    }

    fn metrics(&self) -> Value {
        let c = &self.counters;
        json!({
            "connections_open": self.conns.len(),
            "connections_accepted": c.accepted,
            "connections_refused": c.refused,
            "connections_evicted_idle": c.evicted_idle,
            "connections_evicted_slow": c.evicted_slow,
            "connections_closed_idle": c.idle_closed,
            "requests": c.requests,
            "requests_timed_out": c.timed_out,
            "requests_too_large": c.too_large,
            "wakeups": c.wakeups,
        })
    }

    /// Closes connections past their deadline: 408 to one in the middle of
    /// a request, nothing to an idle one or one that does not read.
    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline(&self.config).is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            let Some(conn) = self.conns.remove(&id) else {
                continue;
            };
            if conn.idle() {
                self.counters.idle_closed += 1;
                close(conn.stream);
            } else if conn.writing() {
                self.counters.timed_out += 1;
                close(conn.stream);
            } else {
                self.counters.timed_out += 1;
                let msg = format!(
                    "the request was not complete within {} ms",
                    self.config.request_timeout.as_millis()
                );
                answer_and_close(conn.stream, &Response::error(408, msg));
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The running API thread: stopping it (or dropping the handle) ends the
/// thread and removes the socket.
pub struct ApiThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl ApiThread {
    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("api: stopping the API thread: {e}");
                return;
            }
            let _ = h.join();
        }
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ctx, guest_gives_stats_buffer, hotplug_ctx, stats_used_idx};
    use super::*;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    struct Running {
        path: PathBuf,
        ctx: Arc<ApiContext>,
        _api: ApiThread,
        _dir: tempfile::TempDir,
    }

    fn start(config: ApiConfig) -> Running {
        start_with(ctx(true), config)
    }

    fn start_with(ctx: ApiContext, config: ApiConfig) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let ctx = Arc::new(ctx);
        let api = ApiServer::with_config(&path, ctx.clone(), config)
            .unwrap()
            .spawn()
            .unwrap();
        Running {
            path,
            ctx,
            _api: api,
            _dir: dir,
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Reads one response: status, head, body (by its Content-Length).
    fn response(s: &mut UnixStream) -> (u16, String, String) {
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut byte).unwrap();
            assert_eq!(n, 1, "closed mid-head: {:?}", String::from_utf8_lossy(&raw));
            raw.push(byte[0]);
        }
        let head = String::from_utf8(raw).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.parse().unwrap());
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (status, head, String::from_utf8(body).unwrap())
    }

    fn closed(s: &mut UnixStream) -> bool {
        matches!(s.read(&mut [0u8; 1]), Ok(0))
    }

    fn put_balloon(mib: u64) -> String {
        let body = format!("{{\"target_mib\": {mib}}}");
        format!(
            "PUT /balloon HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn metrics(path: &Path) -> Value {
        let mut s = connect(path);
        s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (status, _, body) = response(&mut s);
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// One client trickling a request a byte every 200 ms and 20 more
    /// holding connections open (more than the limit of 16) cost a third
    /// client's `PUT /balloon` nothing.
    #[test]
    fn a_trickling_client_and_idle_connections_do_not_delay_others() {
        let api = start(ApiConfig::default());
        let trickler = std::thread::spawn({
            let path = api.path.clone();
            move || {
                let mut s = connect(&path);
                for b in put_balloon(4).bytes().take(12) {
                    s.write_all(&[b]).unwrap();
                    std::thread::sleep(Duration::from_millis(200));
                }
                s
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let idle: Vec<UnixStream> = (0..20).map(|_| connect(&api.path)).collect();
        std::thread::sleep(Duration::from_millis(200));

        let start = Instant::now();
        let mut s = connect(&api.path);
        s.write_all(put_balloon(16).as_bytes()).unwrap();
        let (status, _, _) = response(&mut s);
        let took = start.elapsed();
        assert_eq!(status, 204);
        assert!(took < Duration::from_secs(1), "PUT /balloon took {took:?}");
        let b = api.ctx.balloon.as_ref().unwrap();
        assert_eq!(b.state.target_pages.load(Ordering::Relaxed), 16 * 256);

        let m = &metrics(&api.path)["api"];
        assert!(m["connections_evicted_idle"].as_u64().unwrap() >= 5, "{m}");
        assert!(m["connections_open"].as_u64().unwrap() <= 16, "{m}");
        drop((idle, trickler.join().unwrap()));
    }

    #[test]
    fn an_oversized_request_gets_413_and_is_closed() {
        let api = start(ApiConfig {
            max_request: 1024,
            ..ApiConfig::default()
        });
        // Refused on its head alone: the body is never sent.
        let mut s = connect(&api.path);
        s.write_all(b"PUT /balloon HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            .unwrap();
        let (status, head, _) = response(&mut s);
        assert_eq!(status, 413);
        assert!(head.contains("Connection: close"), "{head}");
        assert!(closed(&mut s));
        // Head and body together over the limit.
        let mut s = connect(&api.path);
        let mut req = b"PUT /balloon HTTP/1.1\r\nContent-Length: 1000\r\n\r\n".to_vec();
        req.extend_from_slice(&[b' '; 1000]);
        // The answer may come (and the server close) before the body is in.
        let _ = s.write_all(&req);
        assert_eq!(response(&mut s).0, 413);
        assert!(closed(&mut s));
        // A head that never ends.
        let mut s = connect(&api.path);
        s.write_all(&[b'a'; 4000]).unwrap();
        assert_eq!(response(&mut s).0, 431);
        assert!(closed(&mut s));
        assert_eq!(metrics(&api.path)["api"]["requests_too_large"], 3);
    }

    #[test]
    fn an_unfinished_request_gets_408_at_the_deadline() {
        let api = start(ApiConfig {
            request_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(200),
            ..ApiConfig::default()
        });
        let mut s = connect(&api.path);
        let start = Instant::now();
        s.write_all(b"GET /vm HTTP/1.1\r\nHost: x").unwrap();
        let (status, head, _) = response(&mut s);
        let took = start.elapsed();
        assert_eq!(status, 408);
        assert!(head.contains("Connection: close"), "{head}");
        assert!(closed(&mut s));
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // A connection that never sends anything is closed, unanswered.
        let mut idle = connect(&api.path);
        let start = Instant::now();
        assert!(closed(&mut idle));
        assert!(start.elapsed() < Duration::from_secs(2));
        let m = &metrics(&api.path)["api"];
        assert_eq!(
            (
                m["requests_timed_out"].as_u64(),
                m["connections_closed_idle"].as_u64()
            ),
            (Some(1), Some(1)),
            "{m}"
        );
    }

    /// Two clients in the middle of a request fill a limit of two: a third
    /// is answered 503 and closed, and the two are then served.
    #[test]
    fn connections_over_the_limit_are_refused_without_harm_to_the_others() {
        let api = start(ApiConfig {
            max_connections: 2,
            ..ApiConfig::default()
        });
        let mut busy: Vec<UnixStream> = (0..2).map(|_| connect(&api.path)).collect();
        for s in &mut busy {
            s.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut extra = connect(&api.path);
        let (status, _, body) = response(&mut extra);
        assert_eq!(status, 503, "{body}");
        assert!(closed(&mut extra));
        for s in &mut busy {
            s.write_all(b"Connection: close\r\n\r\n").unwrap();
            let (status, _, body) = response(s);
            assert_eq!(status, 200, "{body}");
            assert!(closed(s));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(metrics(&api.path)["api"]["connections_refused"], 1);
    }

    /// Requests trickling in for over a second give their place up to new
    /// connections when the limit is reached.
    #[test]
    fn slow_requests_make_room_for_new_connections() {
        let api = start(ApiConfig {
            max_connections: 2,
            ..ApiConfig::default()
        });
        let mut slow: Vec<UnixStream> = (0..2).map(|_| connect(&api.path)).collect();
        for s in &mut slow {
            s.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        }
        std::thread::sleep(SLOW_REQUEST + Duration::from_millis(100));
        let start = Instant::now();
        let mut s = connect(&api.path);
        s.write_all(put_balloon(4).as_bytes()).unwrap();
        assert_eq!(response(&mut s).0, 204);
        assert!(start.elapsed() < Duration::from_secs(1));
        // One was cut short; the other is still served.
        let mut statuses: Vec<u16> = slow
            .iter_mut()
            .map(|s| {
                let _ = s.write_all(b"\r\n");
                response(s).0
            })
            .collect();
        statuses.sort();
        assert_eq!(statuses, [200, 408]);
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let (_, _, body) = response(&mut s);
        let m: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(m["api"]["connections_evicted_slow"], 1, "{m}");
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let api = start(ApiConfig::default());
        let mut s = connect(&api.path);
        s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        let (status, head, body) = response(&mut s);
        assert_eq!(status, 200);
        assert!(head.contains("Connection: keep-alive"), "{head}");
        assert!(body.contains("\"vcpus\": 2"), "{body}");
        s.write_all(put_balloon(8).as_bytes()).unwrap();
        assert_eq!(response(&mut s).0, 204);
        // Two at once, the second asking to close.
        s.write_all(
            b"GET /balloon HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let (status, _, body) = response(&mut s);
        assert_eq!(status, 200);
        assert!(body.contains("\"target_mib\": 8"), "{body}");
        let (status, head, body) = response(&mut s);
        assert_eq!(status, 200);
        assert!(head.contains("Connection: close"), "{head}");
        let m: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(m["api"]["connections_accepted"], 1, "one connection: {m}");
        assert_eq!(m["api"]["requests"], 4);
        assert!(closed(&mut s));
    }

    /// The timer asks the guest for fresh statistics; nothing else does.
    #[test]
    fn balloon_statistics_are_refreshed_on_the_interval() {
        let c = ctx(true);
        guest_gives_stats_buffer(&c);
        let api = start_with(
            c,
            ApiConfig {
                balloon_stats_interval: Some(Duration::from_millis(100)),
                ..ApiConfig::default()
            },
        );
        let start = Instant::now();
        while stats_used_idx(&api.ctx) == 0 {
            assert!(start.elapsed() < Duration::from_secs(3), "never refreshed");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Off: the buffer stays with the device.
        let c = ctx(true);
        guest_gives_stats_buffer(&c);
        let api = start_with(
            c,
            ApiConfig {
                balloon_stats_interval: None,
                ..ApiConfig::default()
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(stats_used_idx(&api.ctx), 0);
    }

    fn put(path: &str, body: &str) -> String {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// `"wait_ms"`: the answer comes when the guest reaches the target,
    /// with its state; meanwhile another client is served at once.
    #[test]
    fn a_put_with_wait_ms_answers_when_the_guest_reaches_the_target() {
        let api = start(ApiConfig::default());
        let mut s = connect(&api.path);
        let asked = Instant::now();
        s.write_all(put("/balloon", r#"{"target_mib": 8, "wait_ms": 5000}"#).as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        // Another client is not held up by the waiting one.
        let other = Instant::now();
        let m = metrics(&api.path);
        assert!(other.elapsed() < Duration::from_millis(500));
        assert_eq!(m["api"]["requests"], 2);
        // The guest reaches the target.
        let b = &api.ctx.balloon.as_ref().unwrap().state;
        b.set_actual(8 * 256);
        let (status, _, body) = response(&mut s);
        let waited = asked.elapsed();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["reached"], true, "{v}");
        assert_eq!(v["actual_mib"], 8);
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(
            waited < Duration::from_secs(4),
            "answered at once it reached: {waited:?}"
        );
        // The connection carries on.
        s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(response(&mut s).0, 200);
    }

    /// A parked wait costs the API thread nothing until the device's value
    /// changes: no look every few ms (each would be a host interrupt, an
    /// exit, for a guest that runs meanwhile).
    #[test]
    fn a_waiting_request_wakes_the_api_only_on_changes() {
        let api = start_with(hotplug_ctx(), ApiConfig::default());
        let mut s = connect(&api.path);
        s.write_all(put("/memory", r#"{"requested_mib": 4, "wait_ms": 5000}"#).as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let before = metrics(&api.path)["api"]["wakeups"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let idle = metrics(&api.path)["api"]["wakeups"].as_u64().unwrap() - before;
        // The metrics request itself: accept, read, answer, close.
        assert!(idle <= 8, "{idle} wake-ups in 500 ms of waiting");
        // A change that does not reach the target wakes it, and the wait
        // goes on; the one that does is answered.
        let h = api.ctx.hotplug.as_ref().unwrap();
        h.state.plugged_size.store(2 << 20, Ordering::Relaxed);
        h.state.resize.observe(true, false);
        std::thread::sleep(Duration::from_millis(100));
        h.state.plugged_size.store(4 << 20, Ordering::Relaxed);
        let asked = Instant::now();
        h.state.resize.observe(true, true);
        let (status, _, body) = response(&mut s);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"reached\": true"), "{body}");
        assert!(asked.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_wait_that_runs_out_answers_with_the_state_at_the_deadline() {
        let api = start(ApiConfig::default());
        let mut s = connect(&api.path);
        let asked = Instant::now();
        s.write_all(put("/balloon", r#"{"target_mib": 16, "wait_ms": 300}"#).as_bytes())
            .unwrap();
        let (status, _, body) = response(&mut s);
        assert!(asked.elapsed() >= Duration::from_millis(300));
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["reached"].clone(), v["actual_mib"].clone()),
            (json!(false), json!(0))
        );
        assert_eq!(v["target_mib"], 16);
        // Already there: answered at once. Without wait_ms: 204 as before.
        s.write_all(put("/balloon", r#"{"target_mib": 0, "wait_ms": 60000}"#).as_bytes())
            .unwrap();
        let (status, _, body) = response(&mut s);
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["reached"], true, "{v}");
        s.write_all(put("/balloon", r#"{"target_mib": 1}"#).as_bytes())
            .unwrap();
        assert_eq!(response(&mut s).0, 204);
    }

    #[test]
    fn bad_wait_values_are_refused_and_change_nothing() {
        let api = start(ApiConfig::default());
        let b = &api.ctx.balloon.as_ref().unwrap().state;
        for bad in [
            r#"{"target_mib": 4, "wait_ms": -1}"#,
            r#"{"target_mib": 4, "wait_ms": "soon"}"#,
            r#"{"target_mib": 4, "wait_ms": 60001}"#,
            r#"{"target_mib": 4, "wait_ms": 1.5}"#,
        ] {
            let mut s = connect(&api.path);
            s.write_all(put("/balloon", bad).as_bytes()).unwrap();
            let (status, _, body) = response(&mut s);
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(body.contains("wait_ms"), "{body}");
        }
        assert_eq!(
            b.target_pages.load(Ordering::Relaxed),
            0,
            "target unchanged"
        );
        // The memory target the same way.
        let mut s = connect(&api.path);
        s.write_all(put("/memory", r#"{"requested_mib": 0, "wait_ms": 99999999}"#).as_bytes())
            .unwrap();
        assert_eq!(response(&mut s).0, 400);
    }
}
