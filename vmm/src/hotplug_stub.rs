//! Placeholder for `Vm::plug` / `Vm::unplug` until native PCIe hot-plug (vmm/src/hotplug.rs,
//! the hotplug branch) is merged; the coordinator deletes this file then. Both answer 501,
//! so `vm.add-disk`, `vm.add-net` and `vm.remove-device` say plainly that they are not there.

use crate::control::{PlugRequest, ReplySender, RequestError};
use crate::vm::Vm;

impl Vm {
    /// `vm.add-disk`, `vm.add-net`: not in this build.
    pub(crate) fn plug(&mut self, request: PlugRequest, reply: ReplySender) {
        log::debug!("plug {request:?}: hot-plug is not in this build");
        drop(reply.send(Err(RequestError::new(
            501,
            "hot-plug is not in this build of Bulkhead",
        ))));
    }

    /// `vm.remove-device`: not in this build.
    pub(crate) fn unplug(&mut self, id: String, reply: ReplySender) {
        log::debug!("unplug {id:?}: hot-plug is not in this build");
        drop(reply.send(Err(RequestError::new(
            501,
            "hot-unplug is not in this build of Bulkhead",
        ))));
    }
}
