//! The VMM: KVM VM and vCPUs, boot, buses, event loop, API.
