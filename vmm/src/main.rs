//! The `vmm` program.

use std::process::ExitCode;

use clap::Parser;
use vmm::builder::RestoreConfig;
use vmm::cli::Args;
use vmm::signals::ShutdownSignals;
use vmm::vcpu::PayloadArgs;
use vmm::vm::LinuxBoot;
use vmm::{Vm, VmConfig};

/// Where a flat payload is loaded and entered.
const PAYLOAD_LOAD: u64 = 0x10_0000;

/// Whether the host CPU advertises hardware virtualization: VMX (CPUID
/// leaf 1, ECX bit 5) or SVM (leaf 0x8000_0001, ECX bit 2), the bits
/// /proc/cpuinfo shows as `vmx` and `svm`. Asked of the CPU rather than
/// read from /proc/cpuinfo, which the kernel formats for every CPU.
fn host_has_hardware_virtualization() -> bool {
    use std::arch::x86_64::__cpuid;
    let vmx = __cpuid(1).ecx & (1 << 5) != 0;
    let svm = __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 2) != 0;
    vmx || svm
}

fn run(args: Args, signals: Option<ShutdownSignals>) -> Result<ExitCode, String> {
    log::debug!("vmm started");
    if args.kernel.is_some() && !host_has_hardware_virtualization() {
        // /dev/kvm without vmx/svm (a software-assisted KVM) runs only
        // CPL3 code at speed and fails on a stock kernel's ring-0 code; say
        // so now rather than sit silent.
        eprintln!(
            "vmm: warning: this CPU shows no vmx/svm, so /dev/kvm here cannot run a stock Linux \
             kernel (its ring-0 code is emulated and fails early). Boot Linux inside the nested \
             QEMU L1 instead: resources/demo.sh does that automatically (see README.md); \
             --payload runs CPL3 code directly."
        );
    }
    let serial = args.serial_out()?;
    let start = std::time::Instant::now();
    let mut vm = if let Some(dir) = &args.restore {
        let vm = Vm::restore(RestoreConfig {
            dir: dir.clone(),
            mode: args.restore_mode,
            fault: args.fault_config(),
            serial,
            api_socket: args.api_sock.clone(),
            seccomp: !args.no_seccomp,
        })
        .map_err(|e| e.to_string())?;
        eprintln!(
            "vmm: restored {} ({:?}) in {:.1} ms",
            dir.display(),
            args.restore_mode,
            start.elapsed().as_secs_f64() * 1e3
        );
        vm
    } else {
        let config = VmConfig {
            memory: args.memory,
            vcpus: args.vcpus,
            backend: args.mem_backend.clone(),
            fault: args.fault_config(),
            serial,
            balloon: args.balloon.then_some(vmm::BalloonOptions {
                deflate_on_oom: args.balloon_deflate_on_oom,
                free_page_reporting: args.balloon_free_page_reporting,
            }),
            hotplug: args.virtio_mem,
            api_socket: args.api_sock.clone(),
            seccomp: !args.no_seccomp,
        };
        let vm = match &args.kernel {
            // The kernel is placed while KVM creates the VM.
            Some(kernel) => Vm::new_linux(
                config,
                &LinuxBoot {
                    kernel,
                    initrd: args.initrd.as_deref(),
                    cmdline: &args.cmdline,
                    pre_fault: !args.no_pre_fault,
                },
            ),
            None => Vm::new(config),
        }
        .map_err(|e| e.to_string())?;
        if args.kernel.is_some() {
            log::info!(
                "VM created and kernel and initramfs placed in {:.1} ms",
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        vm
    };
    vm.set_api_config(args.api_config());
    if let Some(signals) = signals {
        vm.stop_on_signals(signals);
    }
    if let Some(payload) = &args.payload {
        let image = std::fs::read(payload)
            .map_err(|e| format!("reading payload {}: {e}", payload.display()))?;
        let memory = args.memory;
        let vcpus = u64::from(args.vcpus);
        vm.load_payload(&image, PAYLOAD_LOAD, !args.payload_cpl0, |id| PayloadArgs {
            entry: PAYLOAD_LOAD,
            stack: PAYLOAD_LOAD - u64::from(id) * 0x1000,
            args: [u64::from(id), vcpus, memory, 0, 0, 0],
        })
        .map_err(|e| e.to_string())?;
    }
    let mem = vm.memory().clone();
    let window = vm.hotplug().map_or(String::new(), |h| {
        format!(
            ", a {} MiB virtio-mem window guarded by {}",
            h.window.window().1 >> 20,
            h.guard.map_or("-", |g| g.name())
        )
    });
    eprintln!(
        "vmm: {} vCPU(s), {} MiB of guest RAM ({:?}, faults served by {}){window}",
        vm.vcpu_count(),
        vm.ram_size() >> 20,
        mem.regions()[0].backing().kind(),
        if mem.userfault_enabled() {
            "userfaultfd"
        } else {
            "the kernel"
        },
    );
    let outcome = vm.run().map_err(|e| e.to_string())?;
    eprintln!("vmm: guest stopped: {}", outcome.reason);
    if args.stats {
        eprintln!("{}", mem.stats());
    }
    // A stop asked for by SIGTERM or SIGINT is a clean end too.
    let stopped = matches!(outcome.reason, vmm::ExitReason::Signal(_));
    Ok(if outcome.reason.is_clean() || stopped {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    // First, while this is the only thread: every thread spawned later
    // inherits the blocked signals, so only the signalfd receives them.
    let signals = ShutdownSignals::install();
    // Warnings and errors from the VMM, guest-mem and the devices go to
    // stderr; RUST_LOG=info (or debug) shows more. virtio-queue logs every
    // bad ring index a guest writes at error level, unlimited: off by
    // default (the devices count and rate-limit those refusals themselves).
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,virtio_queue=off"),
    )
    .format_target(true)
    .format_timestamp_micros()
    .init();
    let signals = signals
        .map_err(|e| log::warn!("SIGTERM and SIGINT will not stop the VM cleanly: {e}"))
        .ok();
    let args = Args::parse();
    match run(args, signals) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
