//! vCPU threads: run the guest, dispatch exits, report how a vCPU stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::info;

use crate::mmio::MmioBus;

/// Why a vCPU thread ended on its own.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for power-off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest asked for a reset (PSCI SYSTEM_RESET).
    Reset,
    /// The vCPU cannot go on; the message names the exit or error.
    Failed(String),
}

/// A message to the VMM's main thread.
#[derive(Debug)]
pub enum Event {
    /// vCPU `index` stopped.
    Vcpu {
        /// Which vCPU.
        index: usize,
        /// Why.
        stop: VcpuStop,
    },
    /// A termination signal arrived.
    Signal(i32),
    /// A request from outside the VM (the API), with where to answer it.
    Control(crate::control::Request, crate::control::ReplySender),
    /// A hot-unplug under way moved on (the guest powered the slot off, or its bound ran out).
    Hotplug(crate::hotplug::HotplugEvent),
}

/// What a vCPU thread needs.
pub struct VcpuThread {
    /// Index of the vCPU.
    pub index: usize,
    /// Its KVM file.
    pub fd: VcpuFd,
    /// Devices it dispatches MMIO exits to.
    pub bus: Arc<MmioBus>,
    /// Set when the VMM wants the thread to return.
    pub stop: Arc<AtomicBool>,
    /// Where to report a stop of its own.
    pub events: Sender<Event>,
    /// Log the time of the first KVM_RUN (the boot vCPU of the first boot).
    pub log_first_run: bool,
}

/// Signal sent to a vCPU thread to get it out of KVM_RUN; its handler does nothing.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler; once per process, before any vCPU thread starts.
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

impl VcpuThread {
    /// Runs the vCPU until the guest stops it, it fails, or `stop` is set.
    pub fn run(mut self) {
        // First thing: this thread's own filter, on top of the main thread's it inherited.
        let stop = match crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
            Ok(()) => self.run_loop(),
            Err(e) => Some(VcpuStop::Failed(format!("vcpu{}: {e}", self.index))),
        };
        if let Some(stop) = stop {
            // The main thread may already be gone on its way out; nothing to do then.
            let _ = self.events.send(Event::Vcpu {
                index: self.index,
                stop,
            });
        }
    }

    fn run_loop(&mut self) -> Option<VcpuStop> {
        let index = self.index;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if std::mem::take(&mut self.log_first_run) {
                crate::milestone::log("first KVM_RUN");
            }
            match self.fd.run() {
                Ok(VcpuExit::MmioRead(addr, data)) => self.bus.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    #[cfg(feature = "seccomp-trigger")]
                    if addr == crate::seccomp::SECCOMP_TRIGGER_ADDR {
                        crate::seccomp::trigger_violation();
                    }
                    self.bus.write(addr, data)
                }
                Ok(VcpuExit::SystemEvent(kind, data)) => {
                    return Some(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => {
                            info!("vcpu{index}: guest powered off");
                            VcpuStop::PowerOff
                        }
                        KVM_SYSTEM_EVENT_RESET => {
                            info!("vcpu{index}: guest asked for a reset");
                            VcpuStop::Reset
                        }
                        KVM_SYSTEM_EVENT_CRASH => {
                            VcpuStop::Failed(format!("vcpu{index}: guest reported a crash"))
                        }
                        other => VcpuStop::Failed(format!(
                            "vcpu{index}: unhandled system event {other} (data {data:x?})"
                        )),
                    });
                }
                Ok(VcpuExit::Intr) => {}
                Ok(exit) => {
                    return Some(VcpuStop::Failed(format!(
                        "vcpu{index}: unhandled KVM exit {exit:?}"
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    let what = crate::arch::describe_run_error(e.errno())
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    return Some(VcpuStop::Failed(format!(
                        "vcpu{index}: KVM_RUN failed ({e}){what}"
                    )));
                }
            }
        }
    }
}
