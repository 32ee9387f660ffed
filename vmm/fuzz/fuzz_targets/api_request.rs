//! Fuzzes the control API: the raw bytes of a request go through the HTTP
//! parser and, when complete, the router, against a VM context with a
//! balloon. The properties: no panic; every error is a 4xx/5xx with a JSON
//! message; a balloon target is only ever set within guest RAM.
#![no_main]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::balloon::{Balloon, BalloonConfig, BALLOON_PAGE};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::Interrupt;
use guest_mem::{GuestMem, RegionConfig};
use libfuzzer_sys::fuzz_target;
use vmm::api::http::{parse, Parsed};
use vmm::api::{handle, ApiContext, BalloonHandle};
use vmm_sys_util::eventfd::EventFd;

const MEMORY: u64 = 64 << 20;

fn context() -> &'static ApiContext {
    static CTX: OnceLock<ApiContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let mem = Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, MEMORY))
                .build()
                .expect("guest memory"),
        );
        let dev = Balloon::new(mem.clone(), BalloonConfig::default());
        let state = dev.state();
        let irq = Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            Box::new(dev),
            mem.device_memory(),
            irq,
        )));
        ApiContext {
            mem,
            vcpus: 2,
            memory: MEMORY,
            backend: "Memfd".into(),
            balloon: Some(BalloonHandle { state, transport }),
            hotplug: None,
            virtio: Vec::new(),
            control: None,
        }
    })
}

fn assert_error_shape(status: u16, body: &Option<serde_json::Value>) {
    assert!((400..600).contains(&status), "error status {status}");
    let msg = body
        .as_ref()
        .and_then(|b| b.get("error"))
        .and_then(|e| e.as_str());
    assert!(
        msg.is_some_and(|m| !m.is_empty()),
        "error without a message"
    );
}

fuzz_target!(|data: &[u8]| {
    let req = match parse(data) {
        Ok(Parsed::Complete { request, .. }) => request,
        Ok(Parsed::Partial) => return,
        Err(resp) => return assert_error_shape(resp.status, &resp.body),
    };
    let ctx = context();
    let resp = handle(ctx, &req);
    if resp.status >= 400 {
        assert_error_shape(resp.status, &resp.body);
    }
    let balloon = ctx.balloon.as_ref().expect("balloon");
    let target = u64::from(balloon.state.target_pages.load(Ordering::Relaxed)) * BALLOON_PAGE;
    assert!(target <= MEMORY, "balloon target {target:#x} beyond RAM");
});
