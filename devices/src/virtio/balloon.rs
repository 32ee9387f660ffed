//! virtio-balloon (work in progress; see the transport in `mmio`).
