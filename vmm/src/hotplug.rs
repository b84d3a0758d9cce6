//! PCIe hot-plug of devices into a running guest, and their removal (`vm.add-disk`,
//! `vm.add-net`, `vm.remove-device`). See `docs/hotplug.md`.
//!
//! Plug: the device process is spawned and jailed through the device manager, the vhost-user
//! handshake is done, its virtio-pci function goes into the first free root port, whose slot
//! then reports presence and link up together (one MSI): Linux's pciehp powers the slot on
//! and enumerates the function at once.
//!
//! Unplug: the slot's attention button is pressed. pciehp waits its 5 s abort window, removes
//! its driver and powers the slot off; that write (on a vCPU thread) is sent to the main loop
//! as [`HotplugEvent::PoweredOff`], which removes the function and ends its process. A guest
//! that has not powered the slot off within [`UNPLUG_BOUND`] gets a surprise removal
//! ([`HotplugEvent::Deadline`], from a timer thread): presence and link go down under it. The
//! caller's answer is sent once the device process has ended (bounded), from a thread, so
//! the main loop never waits on the guest or on a device.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::control::{PlugRequest, Reply, ReplySender, RequestError, UnplugOutcome};
use crate::device::spawner::Spawner;
use crate::device::{self, DeviceEnv, DeviceKind, DeviceSpec};
use crate::vcpu::Event;
use crate::vm::Vm;

/// How long an unplug waits for the guest to power the slot off before removing the device
/// by surprise: pciehp's 5 s attention-button window, its driver removal, and margin for a
/// slow (nested) guest.
pub const UNPLUG_BOUND: Duration = Duration::from_secs(10);

/// How long a plug into a slot settling from a power-off waits for the guest to turn the
/// slot's power indicator off before it is announced anyway: Linux does it 1 s after the
/// power-off; margin for a slow (nested) guest.
pub const SETTLE_BOUND: Duration = Duration::from_secs(5);

/// How long a removed device's process gets to exit on its disconnect before it is killed.
pub const REMOVE_GRACE: Duration = Duration::from_secs(2);

/// What the main loop hears about unplugs under way.
#[derive(Debug)]
pub enum HotplugEvent {
    /// The guest powered off slot `.0`, whose unplug was requested.
    PoweredOff(usize),
    /// The bound of unplug `token` in slot `slot` ran out.
    Deadline {
        /// The slot.
        slot: usize,
        /// Which unplug request (a later one in the same slot has another).
        token: u64,
    },
    /// A plug into settling slot `.0` waited [`SETTLE_BOUND`].
    Settled(usize),
}

/// A device in a slot, as `vm.info` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluggedDevice {
    /// Its id.
    pub id: String,
    /// Its kind.
    pub kind: DeviceKind,
    /// Its slot (root port `00:<slot + 1>.0`).
    pub slot: usize,
    /// An unplug of it is under way.
    pub removing: bool,
}

/// A device in a slot.
#[derive(Debug)]
struct Occupant {
    id: String,
    kind: DeviceKind,
    /// The unplug under way.
    unplug: Option<Unplug>,
}

/// An unplug under way.
#[derive(Debug)]
struct Unplug {
    /// Which request it is (a deadline of an earlier one in the same slot is stale).
    token: u64,
    /// Where its answer goes.
    reply: ReplySender,
    /// Dropped when the unplug ends: its timer thread then ends at once instead of living
    /// out [`UNPLUG_BOUND`].
    cancel_timer: Option<std::sync::mpsc::Sender<()>>,
}

/// The VM's slots as hot-plug sees them: which device is where, and what is needed to start
/// one more.
pub struct Hotplug {
    slots: Vec<Option<Occupant>>,
    next_token: u64,
    spawner: Arc<Spawner>,
    cgroup: Option<PathBuf>,
    sandbox: bool,
    events: std::sync::mpsc::Sender<Event>,
}

impl std::fmt::Debug for Hotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hotplug")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl Hotplug {
    /// `slots` slots holding the cold-plugged devices `specs`.
    pub fn new(
        slots: usize,
        specs: &[DeviceSpec],
        spawner: Arc<Spawner>,
        cgroup: Option<PathBuf>,
        sandbox: bool,
        events: std::sync::mpsc::Sender<Event>,
    ) -> Self {
        let mut table: Vec<Option<Occupant>> = (0..slots).map(|_| None).collect();
        for spec in specs {
            if let Some(s) = table.get_mut(spec.slot) {
                *s = Some(Occupant {
                    id: spec.id.clone(),
                    kind: spec.kind,
                    unplug: None,
                });
            }
        }
        Self {
            slots: table,
            next_token: 0,
            spawner,
            cgroup,
            sandbox,
            events,
        }
    }

    /// The slot of device `id`.
    fn slot_of(&self, id: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|o| o.as_ref().is_some_and(|o| o.id == id))
    }

    /// The first name `<prefix><n>` no device has.
    fn free_name(&self, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|name| self.slot_of(name).is_none())
            .expect("fewer devices than names")
    }

    /// The devices in the slots, in slot order (for `vm.info`).
    pub fn devices(&self) -> Vec<PluggedDevice> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, o)| {
                o.as_ref().map(|o| PluggedDevice {
                    id: o.id.clone(),
                    kind: o.kind,
                    slot,
                    removing: o.unplug.is_some(),
                })
            })
            .collect()
    }
}

impl Vm {
    /// `vm.add-disk`, `vm.add-net`: starts the device and plugs it into a free slot; answers
    /// `Plugged { id, bdf }`, or 409 (no free slot, a duplicate id),
    /// 400 (the configuration cannot be used: image missing or locked, bad tap), 500.
    pub(crate) fn plug(&mut self, request: PlugRequest, reply: ReplySender) {
        let result = self.try_plug(request);
        if let Err(e) = &result {
            warn!("hot-plug refused: {} ({})", e.message, e.status);
        }
        drop(reply.send(result));
    }

    fn try_plug(&mut self, request: PlugRequest) -> Result<Reply, RequestError> {
        let hp = &self.hotplug;
        let (requested, prefix) = match &request {
            PlugRequest::Disk(d) => (d.id.clone(), "disk"),
            PlugRequest::Net(n) => (n.id.clone(), "net"),
        };
        if let Some(id) = &requested {
            if hp.slot_of(id).is_some() {
                return Err(RequestError::new(409, format!("a device {id} exists")));
            }
        }
        let Some(slot) = self.pcie.free_slot().filter(|&s| hp.slots[s].is_none()) else {
            return Err(RequestError::new(
                409,
                format!("all {} PCIe slots are taken", hp.slots.len()),
            ));
        };
        let id = requested.unwrap_or_else(|| hp.free_name(prefix));
        let mut spec = match &request {
            PlugRequest::Disk(d) => device::disk_spec(d, 0, slot, hp.sandbox),
            PlugRequest::Net(n) => device::net_spec(n, 0, slot, hp.sandbox),
        };
        spec.id = id.clone();
        let env = DeviceEnv {
            memory: &self.memory,
            bus: &self.bus,
            spawner: &hp.spawner,
            cgroup: hp.cgroup.as_deref(),
            device_ids: self.config.device_ids,
            ram_size: self.config.ram_size,
        };
        let transport = self.devices.add(&spec, &env).map_err(|e| {
            let status = if e.is_bad_input() { 400 } else { 500 };
            RequestError::new(status, error_chain(&e))
        })?;
        let held = match self.pcie.hot_plug(slot, Box::new(transport)) {
            Ok(held) => held,
            Err(e) => {
                self.end_device(&id, None);
                return Err(RequestError::new(409, e.to_string()));
            }
        };
        if held {
            info!(
                "{id}: slot {} was powered off just now: announced once the guest is done with it",
                slot + 1
            );
            let events = self.hotplug.events.clone();
            let timer = bulkhead_sandbox::thread_builder()
                .name("settle-timer".into())
                .spawn(move || {
                    std::thread::sleep(SETTLE_BOUND);
                    drop(events.send(Event::Hotplug(HotplugEvent::Settled(slot))));
                });
            if let Err(e) = timer {
                warn!("{id}: no settle timer ({e}); announcing it now");
                self.pcie.release(slot);
            }
        }
        self.hotplug.slots[slot] = Some(Occupant {
            id: id.clone(),
            kind: spec.kind,
            unplug: None,
        });
        let bdf = self
            .pcie
            .bdf(slot)
            .unwrap_or_else(|| format!("0000:00:{:02x}.0 (its port has no bus yet)", slot + 1));
        info!("{id}: hot-plugged in slot {} at {bdf}", slot + 1);
        Ok(Reply::Plugged { id, bdf })
    }

    /// `vm.remove-device`: presses the slot's attention button; the answer comes when the
    /// guest has powered the slot off, or after [`UNPLUG_BOUND`] by surprise removal.
    /// 404 for an unknown id, 409 for an unplug already under way.
    pub(crate) fn unplug(&mut self, id: String, reply: ReplySender) {
        let Some(slot) = self.hotplug.slot_of(&id) else {
            drop(reply.send(Err(RequestError::new(404, format!("no device {id}")))));
            return;
        };
        let token = self.hotplug.next_token;
        self.hotplug.next_token += 1;
        let Some(occupant) = self.hotplug.slots[slot].as_mut() else {
            return;
        };
        if occupant.unplug.is_some() {
            drop(reply.send(Err(RequestError::new(
                409,
                format!("{id} is already being removed"),
            ))));
            return;
        }
        occupant.unplug = Some(Unplug {
            token,
            reply,
            cancel_timer: None,
        });
        info!(
            "{id}: unplug requested (attention button of slot {}); surprise removal after {} s",
            slot + 1,
            UNPLUG_BOUND.as_secs()
        );
        if !self.pcie.request_unplug(slot) {
            self.finish_unplug(slot, UnplugOutcome::Surprise);
            return;
        }
        let events = self.hotplug.events.clone();
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let timer = bulkhead_sandbox::thread_builder()
            .name("unplug-timer".into())
            .spawn(move || {
                // Nothing is ever sent: the unplug's end drops the sender (Disconnected).
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    cancelled.recv_timeout(UNPLUG_BOUND)
                {
                    drop(events.send(Event::Hotplug(HotplugEvent::Deadline { slot, token })));
                }
            });
        match timer {
            Ok(_) => {
                if let Some(u) = self.hotplug.slots[slot]
                    .as_mut()
                    .and_then(|o| o.unplug.as_mut())
                {
                    u.cancel_timer = Some(cancel);
                }
            }
            Err(e) => {
                warn!("{id}: no unplug timer ({e}); removing it now");
                self.finish_unplug(slot, UnplugOutcome::Surprise);
            }
        }
    }

    /// A power-off or deadline of an unplug under way, or the end of a held plug's wait.
    pub(crate) fn hotplug_event(&mut self, event: HotplugEvent) {
        let (slot, outcome, token) = match event {
            HotplugEvent::PoweredOff(slot) => (slot, UnplugOutcome::Orderly, None),
            HotplugEvent::Deadline { slot, token } => (slot, UnplugOutcome::Surprise, Some(token)),
            HotplugEvent::Settled(slot) => {
                self.pcie.release(slot);
                return;
            }
        };
        let pending = self
            .hotplug
            .slots
            .get(slot)
            .and_then(|o| o.as_ref())
            .and_then(|o| o.unplug.as_ref())
            .map(|u| u.token);
        match (pending, token) {
            (Some(_), None) => self.finish_unplug(slot, outcome),
            (Some(p), Some(t)) if p == t => self.finish_unplug(slot, outcome),
            _ => {}
        }
    }

    /// Removes the device in `slot`: its function goes (its BAR, doorbells, GSIs and irqfds
    /// with it; a guest that did not power the slot off sees presence and link go down),
    /// its process ends, its id and slot are free; the answer goes out once the process
    /// has ended.
    fn finish_unplug(&mut self, slot: usize, outcome: UnplugOutcome) {
        let Some(occupant) = self.hotplug.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        drop(self.pcie.remove(slot));
        info!(
            "{}: removed from slot {} ({})",
            occupant.id,
            slot + 1,
            match outcome {
                UnplugOutcome::Orderly => "the guest powered the slot off",
                UnplugOutcome::Surprise => "surprise removal: the guest did not answer in time",
            }
        );
        let _ = occupant.kind;
        let reply = occupant.unplug.map(|u| {
            // Its timer thread ends at once.
            drop(u.cancel_timer);
            u.reply
        });
        self.end_device(&occupant.id, reply.map(|r| (r, outcome)));
    }

    /// Forgets device `id` and ends its process from a thread; then answers `reply`.
    fn end_device(&mut self, id: &str, reply: Option<(ReplySender, UnplugOutcome)>) {
        let answer = move || {
            if let Some((r, outcome)) = reply {
                drop(r.send(Ok(Reply::Unplugged(outcome))));
            }
        };
        let Some((pid, monitor)) = self.devices.remove(id) else {
            answer();
            return;
        };
        let name = id.to_string();
        let spawned = bulkhead_sandbox::thread_builder()
            .name("unplug-end".into())
            .spawn(move || {
                device::end_process(&monitor, pid, REMOVE_GRACE);
                info!("{name}: device process {pid} ended");
                answer();
            });
        if let Err(e) = spawned {
            warn!("{id}: no thread to end its process {pid} ({e}); it ends with the VMM");
        }
    }

    /// The devices in the slots (for `vm.info`).
    pub fn plugged_devices(&self) -> Vec<PluggedDevice> {
        self.hotplug.devices()
    }
}

/// An error and its causes on one line, for an API answer.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ids: &[(&str, usize)]) -> Hotplug {
        let spawner = Arc::new(Spawner::fork(device::spawner_policy(false)).expect("spawner"));
        let specs: Vec<DeviceSpec> = ids
            .iter()
            .map(|(id, slot)| DeviceSpec {
                id: id.to_string(),
                kind: DeviceKind::Block,
                slot: *slot,
                queues: 1,
                queue_size: 128,
                backend: device::Backend::Socket("/nonexistent".into()),
                policy: DeviceKind::Block.policy(1, false),
            })
            .collect();
        Hotplug::new(
            4,
            &specs,
            spawner,
            None,
            false,
            std::sync::mpsc::channel().0,
        )
    }

    #[test]
    fn test_hotplug_names_and_slots_of_cold_plugged_devices() {
        let hp = table(&[("disk0", 0), ("data", 2)]);
        assert_eq!(hp.slot_of("data"), Some(2));
        assert_eq!(hp.slot_of("disk1"), None);
        assert_eq!(hp.free_name("disk"), "disk1");
        assert_eq!(hp.free_name("net"), "net0");
        let listed: Vec<_> = hp.devices().into_iter().map(|d| (d.id, d.slot)).collect();
        assert_eq!(listed, [("disk0".to_string(), 0), ("data".to_string(), 2)]);
    }

    #[test]
    fn test_error_chain_joins_causes() {
        let e = crate::device::DeviceError::Descriptors(
            "disk3".into(),
            std::io::Error::other("no fds left"),
        );
        assert_eq!(
            error_chain(&e),
            "disk3: setting up its descriptors: no fds left"
        );
    }
}
