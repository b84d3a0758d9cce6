//! Requests to a running VM from outside it (the REST API, and so `bulkhead-ctl`): what they
//! ask and what they get back. The API server parses a request, sends it with a reply channel
//! to the VM's main loop as [`crate::vcpu::Event::Control`], and waits a bounded time for the
//! answer; the main loop (or a thread it hands the request to, for work that waits on the
//! guest, such as an unplug) answers exactly once.

use std::sync::mpsc::Sender;

use crate::config::{DiskConfig, NetConfig};

/// A device to hot-plug.
#[derive(Debug)]
pub enum PlugRequest {
    /// `vm.add-disk`.
    Disk(DiskConfig),
    /// `vm.add-net`.
    Net(NetConfig),
}

/// One request to the VM.
#[derive(Debug)]
pub enum Request {
    /// `vm.create`: the VM a VMM started without `--kernel` waits for, in command-line form
    /// (checked by the VMM as its command line is).
    Create(Box<crate::api::vm_config::VmSpec>),
    /// `vm.boot`: start the VM `vm.create` described.
    Boot,
    /// `vm.info`: the VM's configuration, state and devices.
    Info,
    /// `vm.shutdown` / `vmm.shutdown`: stop the guest and exit as on SIGTERM.
    Shutdown,
    /// `vm.reboot`: reset the guest in place, as a guest PSCI SYSTEM_RESET does.
    Reboot,
    /// `vm.add-disk`, `vm.add-net`: spawn and jail the device process, connect it, place it in
    /// a free root port and announce it to the guest.
    Plug(PlugRequest),
    /// `vm.resize` with `desired_balloon`: the balloon's new target, in bytes.
    ResizeBalloon {
        /// Bytes the guest should give back.
        desired_balloon: u64,
    },
    /// `vm.balloon-statistics`: the balloon's target and actual size and the guest's memory
    /// statistics (Firecracker's fields).
    BalloonStatistics,
    /// `vm.remove-device`: ask the guest to release the device (attention button), remove it
    /// when the guest powers the slot off, or by surprise after the documented bound.
    Unplug {
        /// The device's id.
        id: String,
    },
    /// `vm.pause`: every vCPU out of KVM_RUN and parked (the devices go on).
    Pause,
    /// `vm.resume`.
    Resume,
    /// `vm.counters`: per device, the counters its process reports and its restarts.
    Counters,
    /// `vm.inject-fault`: `fault FAULT` on device `id`'s control channel
    /// (docs/fault-injection.md).
    InjectFault {
        /// The device's id.
        id: String,
        /// The fault, checked by [`crate::config::check_fault`].
        fault: String,
    },
    /// `vm.power-button`: pulse the PL061's power-button line (docs/power.md).
    PowerButton,
    /// `vm.resize-console`: the virtio console's size (`None`: the VMM's terminal's, on
    /// SIGWINCH with `--console tty`).
    ResizeConsole {
        /// Columns and rows.
        size: Option<(u16, u16)>,
    },
}

/// How an unplug ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnplugOutcome {
    /// The guest powered the slot off in time.
    Orderly,
    /// The guest did not answer within the bound; the device was removed anyway.
    Surprise,
}

/// A successful answer.
#[derive(Debug)]
pub enum Reply {
    /// Done, nothing to report.
    Done,
    /// `vm.info`: a JSON document.
    Info(String),
    /// A device was plugged: its id and the guest's view of it.
    Plugged {
        /// The device's id.
        id: String,
        /// Its PCI address as the guest will enumerate it ("0000:01:00.0").
        bdf: String,
    },
    /// A device was removed.
    Unplugged(UnplugOutcome),
}

/// Why a request failed; `status` is the HTTP status the API answers with.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestError {
    /// 400 for bad input, 404 for an unknown device, 409 for a conflict with the VM's state
    /// (no free slot, a duplicate id, an unplug already under way), 500 for a VMM failure.
    pub status: u16,
    /// A message for the caller.
    pub message: String,
}

impl RequestError {
    /// An error with an HTTP status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Where the answer goes.
pub type ReplySender = Sender<Result<Reply, RequestError>>;
