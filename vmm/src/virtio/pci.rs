//! The virtio 1.x PCI transport in front of a vhost-user device process.
//!
//! BAR 0 (64 KiB, 32-bit memory) holds the common configuration, ISR, device configuration
//! and notification structures and the MSI-X table and PBA. Queue notifications are KVM
//! ioeventfds that the device process polls, and its completion eventfds are KVM irqfds on
//! the queues' MSI-X vectors: the VMM handles configuration, never the data path.
//!
//! A guest access never waits for the device process: configuration reads come from the
//! cache ([`super::DeviceShared`]), configuration writes, activation and reset are jobs for
//! the device's worker thread. While a reset is pending the status register reads non-zero,
//! as the driver expects. A failed device shows DEVICE_NEEDS_RESET and refuses FEATURES_OK.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use log::{info, Level};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vhost_user::{Job, RingConfig, VhostUserDevice};
use super::FailureHandle;
use crate::irq::VmInterrupts;
use crate::log_limited;
use crate::mmio::{MmioBus, MmioDevice};
use crate::pci::config::*;
use crate::pci::msix::{Msix, CAP_ID_MSIX, CTRL_WRITABLE};
use crate::pci::{requester_id, PciDevice};

const VENDOR_VIRTIO: u16 = 0x1af4;
/// Modern virtio device IDs are 0x1040 + the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;

const BAR_SIZE: u32 = 0x1_0000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Each queue notifies at its own 4-byte slot, so an ioeventfd needs no data match.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

const CAP_ID_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CAP_ID_PCIE: u8 = 0x10;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;
const STATUS_FAILED: u8 = 128;
/// No MSI-X vector.
const NO_VECTOR: u16 = 0xffff;

const F_VERSION_1: u64 = 1 << 32;
/// Transport feature bits a backend's offer may keep: device-specific bits 0-23, indirect
/// descriptors, event index, VERSION_1. Anything else (packed rings, IOMMU platform, ...)
/// this transport does not implement.
const TRANSPORT_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | F_VERSION_1;

#[derive(Clone, Copy)]
struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl Queue {
    fn reset(max: u16) -> Self {
        Queue {
            size: max,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

struct Transport {
    name: String,
    config: ConfigSpace,
    bar: Bar,
    msix_cap: usize,
    msix: Msix,
    bus: u8,
    /// Where BAR 0 is mapped now.
    mapped: Option<u64>,
    device_type: u16,
    backend: VhostUserDevice,
    features_offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    /// Largest queue the device process takes.
    max_queue_size: u16,
    queues: Vec<Queue>,
    /// Activation handed to the worker and not undone by a reset.
    active: bool,
    /// The status before the last reset, shown while the worker still carries it out.
    status_before_reset: u8,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
    config_irq: Arc<EventFd>,
    memory: GuestMemoryMmap,
    mmio: Arc<MmioBus>,
    irq: Option<Arc<VmInterrupts>>,
    /// The BAR's MMIO handler, registered on the bus while the BAR is mapped.
    handler: Option<Arc<dyn MmioDevice>>,
}

/// A virtio-pci function fronting a vhost-user device process.
pub struct VirtioPci {
    inner: Arc<Mutex<Transport>>,
}

/// The MMIO side of BAR 0. It holds the transport weakly: the function's owner is the slot
/// it is plugged into, not the bus map.
struct BarHandler(Weak<Mutex<Transport>>);

fn lock(t: &Mutex<Transport>) -> MutexGuard<'_, Transport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors creating the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// An eventfd could not be created.
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The virtio device type is not one (they are below 64).
    #[error("virtio device type {0} is out of range")]
    DeviceType(u32),
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// A function for `backend` (a virtio device of type `device_type` whose queues hold at
    /// most `max_queue_size` entries), not yet wired to a VM.
    pub fn new(
        device_type: u32,
        class: u32,
        max_queue_size: u16,
        backend: VhostUserDevice,
        memory: GuestMemoryMmap,
        mmio: Arc<MmioBus>,
    ) -> Result<Self, VirtioPciError> {
        let device_type = u16::try_from(device_type)
            .ok()
            .filter(|&t| t < 0x40)
            .ok_or(VirtioPciError::DeviceType(device_type))?;
        let nq = backend.num_queues;
        let mut config = ConfigSpace::new();
        config.header(VENDOR_VIRTIO, DEVICE_ID_BASE + device_type, class, 1, 0);
        config.set_u16(SUBSYSTEM_VENDOR_ID, VENDOR_VIRTIO);
        config.set_u16(SUBSYSTEM_VENDOR_ID + 2, 0x1100);
        let bar = Bar {
            index: 0,
            size: BAR_SIZE,
        };
        bar.declare(&mut config);
        // PCI Express endpoint: version 2, type 0.
        let mut pcie = [0u8; 0x3c - 2];
        pcie[0] = 0x2;
        pcie[0x0c - 2..0x0c + 2].copy_from_slice(&(0x1u32 | (1 << 4)).to_le_bytes());
        pcie[0x12 - 2..0x12].copy_from_slice(&(0x1u16 | (1 << 4)).to_le_bytes());
        let pcie_cap = config.add_capability(CAP_ID_PCIE, &pcie);
        config.writable_u16(pcie_cap + 0x08, 0xffff);
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, None),
        );
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                u64::from(NOTIFY_MULTIPLIER) * nq as u64,
                Some(NOTIFY_MULTIPLIER),
            ),
        );
        config.add_capability(CAP_ID_VENDOR, &virtio_cap(CFG_ISR, ISR_OFFSET, 1, None));
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, None),
        );
        let msix = Msix::new(nq as u16 + 1, 0);
        let msix_cap = config.add_capability(
            CAP_ID_MSIX,
            &msix.capability_body(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32),
        );
        config.writable_u16(msix_cap + 2, CTRL_WRITABLE);

        let eventfd = || {
            EventFd::new(EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(VirtioPciError::EventFd)
        };
        let kicks = (0..nq).map(|_| eventfd()).collect::<Result<Vec<_>, _>>()?;
        let calls = (0..nq).map(|_| eventfd()).collect::<Result<Vec<_>, _>>()?;
        let features_offered = (backend.features & TRANSPORT_FEATURES) | F_VERSION_1;
        let backend_config_irq = backend.shared.config_irq.clone();
        let transport = Transport {
            name: backend.name.clone(),
            config,
            bar,
            msix_cap,
            msix,
            bus: 0,
            mapped: None,
            device_type,
            backend,
            features_offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            max_queue_size,
            queues: vec![Queue::reset(max_queue_size); nq],
            active: false,
            status_before_reset: 0,
            kicks,
            calls,
            config_irq: backend_config_irq,
            memory,
            mmio,
            irq: None,
            handler: None,
        };
        let inner = Arc::new(Mutex::new(transport));
        lock(&inner).handler = Some(Arc::new(BarHandler(Arc::downgrade(&inner))));
        Ok(Self { inner })
    }

    #[doc(hidden)]
    /// For the fuzz targets: a guest read of BAR 0 at `offset`.
    pub fn bar_read_for_fuzzing(&self, offset: u64, data: &mut [u8]) {
        lock(&self.inner).bar_read(offset, data)
    }

    #[doc(hidden)]
    /// For the fuzz targets: a guest write of BAR 0 at `offset`.
    pub fn bar_write_for_fuzzing(&self, offset: u64, data: &[u8]) {
        lock(&self.inner).bar_write(offset, data)
    }

    /// A handle that fails this device from any thread (the device manager calls it when the
    /// device process ends): socket shut down, DEVICE_NEEDS_RESET, configuration interrupt.
    pub fn failure_handle(&self) -> FailureHandle {
        lock(&self.inner).backend.failure_handle()
    }

    /// The handle that re-reads the device's configuration and raises the configuration
    /// interrupt, after the VMM changed the configuration over the device's control channel
    /// (the balloon's target, the console's size).
    pub fn config_refresh(&self) -> super::vhost_user::ConfigRefresh {
        lock(&self.inner).backend.config_refresh()
    }

    /// The handle the device monitor restarts this device's process through.
    pub fn restart_handle(&self) -> RestartHandle {
        RestartHandle {
            transport: Arc::downgrade(&self.inner),
            shared: lock(&self.inner).backend.shared.clone(),
        }
    }

    /// What the device monitor watches for the queues the backend stopped because the driver
    /// broke them (the backend's VHOST_USER_SET_VRING_ERR eventfds).
    pub fn queue_error_watch(&self) -> std::io::Result<super::QueueErrorWatch> {
        lock(&self.inner).backend.queue_error_watch()
    }
}

/// The device monitor's side of a restartable device: it marks the device down when its
/// process ends, hands it a new process's connection, or gives up. Holds the transport weakly:
/// a device unplugged or shut down is never restarted.
#[derive(Clone)]
pub struct RestartHandle {
    transport: Weak<Mutex<Transport>>,
    shared: Arc<super::DeviceShared>,
}

impl std::fmt::Debug for RestartHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartHandle")
            .field("device", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl RestartHandle {
    /// Makes the device restartable: a process that misses a deadline or breaks the protocol
    /// is killed with `kill` (and then restarted) instead of failing the device.
    pub fn set_kill_hook(&self, kill: super::KillHook) {
        self.shared.set_kill_hook(kill);
    }

    /// The process ended: the device is down until a new one is connected or the monitor
    /// gives up. Nothing the guest sees changes.
    pub fn lost(&self) {
        self.shared.lost();
    }

    /// Whether a restart makes sense: the transport is there, the VMM did not let go of the
    /// device, and it has not failed for good.
    pub fn wanted(&self) -> bool {
        self.transport.strong_count() > 0 && !self.shared.is_disconnected() && !self.shared.failed()
    }

    /// Hands the connected stream of a new process to the device's worker thread.
    pub fn reconnect(
        &self,
        stream: std::os::unix::net::UnixStream,
        died_at: Option<std::time::Instant>,
    ) -> Result<(), super::vhost_user::VhostUserError> {
        let Some(t) = self.transport.upgrade() else {
            return Err(super::vhost_user::VhostUserError::Failed);
        };
        let t = lock(&t);
        t.backend.reconnect(stream, died_at)
    }

    /// Whether the device is down (its process ended, a restart may come).
    pub fn is_down(&self) -> bool {
        self.shared.down()
    }

    /// The process does not answer (the liveness probe): killed for a restart, as a process
    /// that misses a vhost-user deadline.
    pub fn unresponsive(&self, reason: &str) {
        self.shared.process_failed(reason);
    }

    /// No more restarts: DEVICE_NEEDS_RESET and a configuration interrupt, for good.
    pub fn give_up(&self, reason: &str) {
        self.shared.give_up(reason);
    }
}

impl Transport {
    /// Unmaps BAR 0 and releases its ioeventfds.
    fn unmap(&mut self) {
        let Some(base) = self.mapped.take() else {
            return;
        };
        self.mmio.remove(base);
        if let Some(irq) = &self.irq {
            for (q, kick) in self.kicks.iter().enumerate() {
                let addr = IoEventAddress::Mmio(base + NOTIFY_OFFSET + 4 * q as u64);
                if let Err(e) = irq
                    .vm()
                    .unregister_ioevent(kick.as_ref(), &addr, NoDatamatch)
                {
                    self.backend
                        .shared
                        .fail(&format!("releasing the ioeventfd of queue {q}: {e}"));
                }
            }
        }
    }

    /// Maps BAR 0 where the guest put it (if decoding is on) with an ioeventfd per queue.
    fn remap(&mut self) {
        let want = self.bar.address(&self.config);
        if want == self.mapped {
            return;
        }
        self.unmap();
        let (Some(base), Some(irq), Some(handler)) = (want, self.irq.clone(), self.handler.clone())
        else {
            return;
        };
        if let Err(e) = self.mmio.insert(base..base + u64::from(BAR_SIZE), handler) {
            // The guest put the BAR somewhere unusable: its accesses go nowhere.
            log_limited!(
                self.backend.shared.log_limit,
                Level::Warn,
                "{}: BAR 0 at {base:#x}: {e}",
                self.name
            );
            return;
        }
        self.mapped = Some(base);
        for (q, kick) in self.kicks.iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + NOTIFY_OFFSET + 4 * q as u64);
            if let Err(e) = irq.vm().register_ioevent(kick.as_ref(), &addr, NoDatamatch) {
                // Notifications of this queue would never reach the device.
                self.backend
                    .shared
                    .fail(&format!("the ioeventfd of queue {q}: {e}"));
            }
        }
    }

    /// An MSI-X operation's outcome: KVM refusing a route or an irqfd breaks the device's
    /// interrupts, so the device fails.
    fn msix_result(&self, r: Result<(), crate::irq::IrqError>) {
        if let Err(e) = r {
            self.backend.shared.fail(&format!("MSI-X: {e}"));
        }
    }

    fn bind_vectors(&mut self) {
        let n = self.msix.len();
        let mut per_vector: Vec<Vec<Arc<EventFd>>> = vec![Vec::new(); n];
        if let Some(v) = per_vector.get_mut(usize::from(self.config_vector)) {
            v.push(self.config_irq.clone());
        }
        for (q, queue) in self.queues.iter().enumerate() {
            if let Some(v) = per_vector.get_mut(usize::from(queue.vector)) {
                v.push(self.calls[q].clone());
            }
        }
        for (v, fds) in per_vector.into_iter().enumerate() {
            let r = self.msix.set_sources(v, fds);
            self.msix_result(r);
        }
    }

    fn rings(&self) -> Vec<Option<RingConfig>> {
        self.queues
            .iter()
            .map(|q| {
                q.enabled.then_some(RingConfig {
                    size: q.size,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
            })
            .collect()
    }

    fn activate(&mut self) {
        if self.active {
            // Activation is idempotent.
            return;
        }
        if self.backend.shared.failed() {
            self.backend.shared.set_needs_reset();
            return;
        }
        if let Some(bad) = self.queues.iter().position(|q| {
            q.enabled && (q.size == 0 || !q.size.is_power_of_two() || q.size > self.max_queue_size)
        }) {
            log_limited!(
                self.backend.shared.log_limit,
                Level::Warn,
                "{}: queue {bad} has an invalid size; device needs reset",
                self.name
            );
            self.backend.shared.set_needs_reset();
            return;
        }
        self.active = true;
        self.backend.submit(Job::Activate {
            memory: self.memory.clone(),
            features: self.driver_features,
            rings: self.rings(),
            kicks: self.kicks.clone(),
            calls: self.calls.clone(),
        });
    }

    /// Device reset: the data path stops (the worker does it; the status reads non-zero
    /// until it has), the transport's state goes back to its reset values.
    fn reset_device(&mut self) {
        if self.active {
            self.backend.shared.reset_started();
            self.status_before_reset = self.status.max(STATUS_ACKNOWLEDGE);
            self.backend.submit(Job::Deactivate);
            self.active = false;
        }
        self.backend.shared.clear_needs_reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = Queue::reset(self.max_queue_size);
        }
        // Kicks the old rings left behind must not reach new ones.
        for k in &self.kicks {
            let _ = k.read();
        }
        self.bind_vectors();
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            info!("{}: reset by the driver", self.name);
            self.reset_device();
            return;
        }
        let mut value = value & !STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 && value & self.status != self.status {
            // Clearing bits of a live device is not a reset: the device needs one.
            log_limited!(
                self.backend.shared.log_limit,
                Level::Warn,
                "{}: status {value:#x} clears bits of {:#x} after DRIVER_OK; device needs reset",
                self.name,
                self.status
            );
            self.backend.shared.set_needs_reset();
            return;
        }
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // The driver must accept VERSION_1 and only features on offer; a failed device
            // takes no driver at all.
            let ok = self.driver_features & F_VERSION_1 != 0
                && self.driver_features & !self.features_offered == 0
                && !self.backend.shared.failed();
            if !ok {
                log_limited!(
                    self.backend.shared.log_limit,
                    Level::Warn,
                    "{}: driver features {:#x} refused{}",
                    self.name,
                    self.driver_features,
                    if self.backend.shared.failed() {
                        " (the device has failed)"
                    } else {
                        ""
                    }
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value;
        if newly_ok && self.status & STATUS_FEATURES_OK != 0 {
            self.activate();
        } else if newly_ok {
            log_limited!(
                self.backend.shared.log_limit,
                Level::Warn,
                "{}: DRIVER_OK without FEATURES_OK",
                self.name
            );
            self.backend.shared.set_needs_reset();
        }
        let _ = (STATUS_DRIVER, STATUS_FAILED);
    }

    /// The status register as the driver reads it.
    fn status_image(&self) -> u8 {
        let shared = &self.backend.shared;
        if self.status == 0 {
            // Zero only once the reset is done; never NEEDS_RESET alone, which would keep a
            // driver polling for the reset forever.
            return if shared.resetting() {
                self.status_before_reset
            } else {
                0
            };
        }
        self.status
            | if shared.needs_reset() {
                STATUS_NEEDS_RESET
            } else {
                0
            }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The common configuration structure as the driver reads it.
    fn common_image(&self) -> [u8; COMMON_SIZE as usize] {
        let mut b = [0u8; COMMON_SIZE as usize];
        let put = |b: &mut [u8], off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        let df = match self.device_feature_select {
            0 => self.features_offered as u32,
            1 => (self.features_offered >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x04, &df.to_le_bytes());
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let drf = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x0c, &drf.to_le_bytes());
        put(&mut b, 0x10, &self.config_vector.to_le_bytes());
        put(&mut b, 0x12, &(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status_image();
        b[0x15] = self.backend.shared.generation();
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(&mut b, 0x18, &q.size.to_le_bytes());
            put(&mut b, 0x1a, &q.vector.to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.enabled).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc.to_le_bytes());
            put(&mut b, 0x28, &q.driver.to_le_bytes());
            put(&mut b, 0x30, &q.device.to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= COMMON_SIZE)
        else {
            return;
        };
        let mut img = self.common_image();
        img[offset as usize..end as usize].copy_from_slice(data);
        let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let touches = |o: u64, len: u64| offset < o + len && o < end;
        let can_change_features = self.status & STATUS_FEATURES_OK == 0;
        if touches(0x00, 4) {
            self.device_feature_select = u32_at(0x00);
        }
        if touches(0x08, 4) {
            self.driver_feature_select = u32_at(0x08);
        }
        if touches(0x0c, 4) && can_change_features {
            let v = u64::from(u32_at(0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touches(0x10, 2) {
            let v = u16_at(0x10);
            self.config_vector = if usize::from(v) < self.msix.len() {
                v
            } else {
                NO_VECTOR
            };
            self.bind_vectors();
        }
        if touches(0x16, 2) {
            self.queue_select = u16_at(0x16);
        }
        let live = self.active;
        let nvec = self.msix.len();
        if let Some(q) = self.queue() {
            if touches(0x18, 2) && !q.enabled && !live {
                q.size = u16_at(0x18);
            }
            if touches(0x1a, 2) {
                let v = u16_at(0x1a);
                q.vector = if usize::from(v) < nvec { v } else { NO_VECTOR };
            }
            if touches(0x1c, 2) && u16_at(0x1c) == 1 && !live {
                q.enabled = true;
            }
            if !q.enabled && !live {
                if touches(0x20, 8) {
                    q.desc = u64_at(0x20);
                }
                if touches(0x28, 8) {
                    q.driver = u64_at(0x28);
                }
                if touches(0x30, 8) {
                    q.device = u64_at(0x30);
                }
            }
            if touches(0x1a, 2) {
                self.bind_vectors();
            }
        }
        // Status last: a write of the whole structure acts on the other fields first.
        if touches(0x14, 1) {
            self.set_status(img[0x14]);
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_SIZE => {
                let img = self.common_image();
                data.copy_from_slice(&img[o as usize..(o + len) as usize]);
            }
            ISR_OFFSET => {} // MSI-X only: the ISR is never set.
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o)
                && o + len <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE =>
            {
                self.backend
                    .shared
                    .read_config((o - DEVICE_CFG_OFFSET) as usize, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size() as u64)
                .contains(&o) =>
            {
                self.msix.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + 0x800).contains(&o) => {
                self.msix.pba_read(data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        match offset {
            o if o < COMMON_SIZE => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o)
                && o + len <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE =>
            {
                let offset = (o - DEVICE_CFG_OFFSET) as usize;
                self.backend.shared.write_config_cache(offset, data);
                self.backend.submit(Job::WriteConfig {
                    offset: offset as u32,
                    data: data.to_vec(),
                });
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + 4 * self.queues.len() as u64).contains(&o) => {
                // Only reached while no ioeventfd covers the address.
                let q = ((o - NOTIFY_OFFSET) / 4) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size() as u64)
                .contains(&o) =>
            {
                let r = self.msix.table_write(o - MSIX_TABLE_OFFSET, data);
                self.msix_result(r);
            }
            _ => log_limited!(
                self.backend.shared.log_limit,
                Level::Debug,
                "{}: write of {len} bytes at BAR 0 + {offset:#x} ignored",
                self.name
            ),
        }
    }
}

impl MmioDevice for BarHandler {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.0.upgrade() {
            Some(t) => lock(&t).bar_read(offset, data),
            None => data.fill(0),
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(t) = self.0.upgrade() {
            lock(&t).bar_write(offset, data)
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        // Leave no mapping behind that points at nothing.
        self.unmap();
        // The worker thread and the deadline keeper hold the connection too: shut it down so
        // the device process sees the frontend leave now (and exits with its report).
        self.backend.shared.disconnect();
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, _bus: u8, offset: usize, data: &mut [u8]) {
        lock(&self.inner).config.read(offset, data)
    }

    fn config_write(&mut self, bus: u8, offset: usize, data: &[u8]) {
        let mut t = lock(&self.inner);
        if bus != t.bus {
            t.bus = bus;
            let r = t.msix.set_devid(requester_id(bus, 0));
            t.msix_result(r);
        }
        t.config.write(offset, data);
        let end = offset + data.len();
        let overlaps = |start: usize, len: usize| offset < start + len && start < end;
        if overlaps(COMMAND, 2) || overlaps(BAR0, 4) {
            t.remap();
        }
        let msix_ctrl = t.msix_cap + 2;
        if overlaps(msix_ctrl, 2) {
            let ctrl = t.config.u16(msix_ctrl);
            let r = t.msix.set_control(ctrl);
            t.msix_result(r);
        }
    }

    fn reset(&mut self, vm: &Arc<VmInterrupts>) {
        let mut t = lock(&self.inner);
        t.reset_device();
        t.unmap();
        t.irq = Some(vm.clone());
        let bar = t.bar;
        let cfg = &mut t.config;
        cfg.write(COMMAND, &0u16.to_le_bytes());
        cfg.set_u32(BAR0 + 4 * bar.index, 0);
        let ctrl = t.msix_cap + 2;
        let value = t.config.u16(ctrl) & !CTRL_WRITABLE;
        t.config.set_u16(ctrl, value);
        t.bus = 0;
        let r = t.msix.attach(vm.clone());
        t.msix_result(r);
        let _ = t.device_type;
    }

    fn name(&self) -> String {
        lock(&self.inner).name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_backend::*;
    use super::*;
    use std::time::{Duration, Instant};
    use vm_memory::{FileOffset, GuestAddress};

    const CONFIG: [u8; 4] = [0xaa, 0xbb, 0xcc, 0xdd];

    fn device(script: impl FnMut(&Msg) -> Action + Send + 'static) -> (VirtioPci, Fake) {
        let mut fake = Fake::start(script);
        let backend = VhostUserDevice::handshake_with_timeout(
            "vd".into(),
            fake.frontend.take().expect("frontend"),
            1,
            Duration::from_millis(500),
        )
        .expect("handshake");
        let file = std::fs::File::from(memfd(0x10000));
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            0x10000,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("memory");
        let pci = VirtioPci::new(
            2,
            0x018000,
            256,
            backend,
            memory,
            Arc::new(MmioBus::default()),
        )
        .expect("transport");
        (pci, fake)
    }

    fn honest_device() -> (VirtioPci, Fake) {
        device(|m| honest(&CONFIG, 1, m))
    }

    fn write8(p: &VirtioPci, off: u64, v: u8) {
        lock(&p.inner).bar_write(off, &[v]);
    }

    fn status(p: &VirtioPci) -> u8 {
        let mut b = [0u8];
        lock(&p.inner).bar_read(0x14, &mut b);
        b[0]
    }

    /// ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, DRIVER_OK.
    fn bring_up(p: &VirtioPci) {
        write8(p, 0x14, 1);
        write8(p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(p, 0x14, 0xb);
        write8(p, 0x14, 0xf);
    }

    fn count(fake: &Fake, code: u32) -> usize {
        fake.codes().iter().filter(|&&c| c == code).count()
    }

    #[test]
    fn test_virtio_pci_status_clearing_bits_after_driver_ok_sets_needs_reset() {
        let (p, _fake) = honest_device();
        bring_up(&p);
        assert_eq!(status(&p), 0xf);
        write8(&p, 0x14, 0x3);
        assert_eq!(
            status(&p) & STATUS_NEEDS_RESET,
            STATUS_NEEDS_RESET,
            "clearing FEATURES_OK|DRIVER_OK of a live device needs a reset"
        );
        // A reset answers it.
        write8(&p, 0x14, 0);
        let start = Instant::now();
        while status(&p) != 0 && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status(&p), 0);
    }

    #[test]
    fn test_virtio_pci_activation_idempotent_and_reset_tears_backend_down() {
        let (p, fake) = honest_device();
        bring_up(&p);
        assert!(fake.wait_for(SET_MEM_TABLE), "activated");
        write8(&p, 0x14, 0xf);
        lock(&p.inner).bar_write(0x14, &[0xf]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count(&fake, SET_FEATURES), 1, "activation is idempotent");
        write8(&p, 0x14, 0);
        assert!(
            fake.wait_for(RESET_DEVICE),
            "reset uses VHOST_USER_RESET_DEVICE"
        );
        let start = Instant::now();
        while status(&p) != 0 && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status(&p), 0, "status reads 0 once the reset is done");
        assert_eq!(count(&fake, GET_VRING_BASE), 0);
    }

    /// A queue the device process stopped because the driver broke it reaches the guest:
    /// activation hands the backend the queue's error eventfd (SET_VRING_ERR), the backend
    /// signals it, the device monitor sets DEVICE_NEEDS_RESET; the device has not failed.
    #[test]
    fn test_virtio_pci_broken_queue_reaches_guest_as_needs_reset() {
        const SET_VRING_ERR: u32 = 14;
        let (p, fake) = honest_device();
        write8(&p, 0x14, 1);
        write8(&p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(&p, 0x14, 0xb);
        lock(&p.inner).bar_write(0x20, &0x1000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x28, &0x3000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x30, &0x4000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x1c, &1u16.to_le_bytes());
        write8(&p, 0x14, 0xf);
        assert!(fake.wait_for(SET_VRING_ERR), "{:?}", fake.codes());
        let monitor = crate::device::monitor::Monitor::new(None).expect("monitor");
        monitor
            .watch_queue_errors("disk0", p.queue_error_watch().expect("watch"))
            .expect("watch");
        monitor.start().expect("monitor thread");
        assert_eq!(status(&p) & STATUS_NEEDS_RESET, 0);
        // What the device process does with the eventfd it was handed.
        lock(&p.inner).backend.shared.queue_errors[0]
            .write(1)
            .expect("signal");
        let start = Instant::now();
        while status(&p) & STATUS_NEEDS_RESET == 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(status(&p) & STATUS_NEEDS_RESET, 0, "no DEVICE_NEEDS_RESET");
        assert!(!p.failure_handle().is_failed());
        println!(
            "broken queue: DEVICE_NEEDS_RESET {:?} after the backend's error eventfd",
            start.elapsed()
        );
    }

    #[test]
    fn test_virtio_pci_removed_device_queue_errors_forgotten() {
        const SET_VRING_ERR: u32 = 14;
        let (p, fake) = honest_device();
        write8(&p, 0x14, 1);
        write8(&p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(&p, 0x14, 0xb);
        lock(&p.inner).bar_write(0x20, &0x1000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x28, &0x3000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x30, &0x4000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x1c, &1u16.to_le_bytes());
        write8(&p, 0x14, 0xf);
        assert!(fake.wait_for(SET_VRING_ERR), "{:?}", fake.codes());
        let monitor = crate::device::monitor::Monitor::new(None).expect("monitor");
        monitor
            .watch_queue_errors("disk0", p.queue_error_watch().expect("watch"))
            .expect("watch");
        monitor.start().expect("monitor thread");
        assert_eq!(monitor.queue_errors_watched(), 1);
        monitor.forget_device("disk1");
        assert_eq!(monitor.queue_errors_watched(), 1, "another device's stay");
        monitor.forget_device("disk0");
        assert_eq!(monitor.queue_errors_watched(), 0, "closed with its device");
        lock(&p.inner).backend.shared.queue_errors[0]
            .write(1)
            .expect("signal");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(status(&p) & STATUS_NEEDS_RESET, 0, "no longer watched");
    }

    #[test]
    fn test_virtio_pci_half_done_activation_is_torn_down_without_reset_device() {
        // A backend without RESET_DEVICE; the driver's ring lies outside guest RAM, which
        // the VMM finds after SET_FEATURES and SET_MEM_TABLE went out.
        let (p, fake) = device(|m| match m.code {
            GET_PROTOCOL_FEATURES => reply(m.code, &(1u64 | (1 << 9)).to_le_bytes()),
            _ => honest(&CONFIG, 1, m),
        });
        write8(&p, 0x14, 1);
        write8(&p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(&p, 0x14, 0xb);
        lock(&p.inner).bar_write(0x20, &0xffff_0000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x1c, &1u16.to_le_bytes());
        write8(&p, 0x14, 0xf);
        assert!(fake.wait_for(GET_VRING_BASE), "{:?}", fake.codes());
        let start = Instant::now();
        while status(&p) & STATUS_NEEDS_RESET == 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_ne!(status(&p) & STATUS_NEEDS_RESET, 0, "{:?}", fake.codes());
        assert!(fake.codes().contains(&SET_MEM_TABLE));
        assert!(
            !p.failure_handle().is_failed(),
            "a refused activation needs a reset; the device has not failed"
        );
    }

    #[test]
    fn test_virtio_pci_failed_device_needs_reset_and_refuses_features_ok() {
        let (p, _fake) = honest_device();
        let irq = lock(&p.inner).config_irq.clone();
        let _ = irq.read();
        p.failure_handle().fail("test");
        assert!(irq.read().is_ok(), "configuration interrupt");
        assert_eq!(
            status(&p),
            0,
            "a reset device reads 0, never NEEDS_RESET alone"
        );
        write8(&p, 0x14, 1);
        assert_eq!(status(&p), 1 | STATUS_NEEDS_RESET);
        write8(&p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(&p, 0x14, 0xb);
        assert_eq!(status(&p) & STATUS_FEATURES_OK, 0, "FEATURES_OK refused");
    }

    #[test]
    fn test_virtio_pci_guest_access_never_waits_on_a_hung_backend() {
        // The backend answers the handshake, then nothing. It offers no RESET_DEVICE, so the
        // reset below must end the enabled ring with GET_VRING_BASE, which waits for a reply
        // that never comes: the reset stays pending (for the request's deadline) however fast
        // the worker thread runs.
        let mut handshake_done = false;
        let (p, _fake) = device(move |m| {
            if m.code == GET_PROTOCOL_FEATURES {
                return reply(m.code, &(PROTOCOL & !(1 << 13)).to_le_bytes());
            }
            if m.code == GET_CONFIG {
                handshake_done = true;
                return honest(&CONFIG, 1, m);
            }
            if handshake_done {
                Action::Nothing
            } else {
                honest(&CONFIG, 1, m)
            }
        });
        let start = Instant::now();
        write8(&p, 0x14, 1);
        write8(&p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(&p, 0x14, 0xb);
        // Queue 0: 16 entries, rings inside guest memory, enabled.
        lock(&p.inner).bar_write(0x18, &16u16.to_le_bytes());
        lock(&p.inner).bar_write(0x20, &0x1000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x28, &0x2000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x30, &0x3000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x1c, &1u16.to_le_bytes());
        write8(&p, 0x14, 0xf);
        let mut b = [0u8; 4];
        lock(&p.inner).bar_read(DEVICE_CFG_OFFSET, &mut b);
        lock(&p.inner).bar_write(DEVICE_CFG_OFFSET, &[1]);
        write8(&p, 0x14, 0);
        let pending = status(&p);
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "guest accesses waited {:?}",
            start.elapsed()
        );
        assert_eq!(b, CONFIG);
        assert_ne!(pending, 0, "the reset is still pending");
    }

    /// Queue 0 of 16 entries at 0x1000/0x3000/0x4000, enabled, then DRIVER_OK.
    fn bring_up_with_ring(p: &VirtioPci) {
        write8(p, 0x14, 1);
        write8(p, 0x14, 3);
        lock(&p.inner).bar_write(0x08, &1u32.to_le_bytes());
        lock(&p.inner).bar_write(0x0c, &1u32.to_le_bytes());
        write8(p, 0x14, 0xb);
        lock(&p.inner).bar_write(0x18, &16u16.to_le_bytes());
        lock(&p.inner).bar_write(0x20, &0x1000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x28, &0x3000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x30, &0x4000u64.to_le_bytes());
        lock(&p.inner).bar_write(0x1c, &1u16.to_le_bytes());
        write8(p, 0x14, 0xf);
    }

    /// A restart: the device is marked down (no request goes out, the guest sees nothing),
    /// then a new process's connection is handed over and the worker replays the session:
    /// handshake, features, memory table, ring size, addresses, the base taken from the used
    /// index in guest memory, the kick; the guest still sees no DEVICE_NEEDS_RESET.
    #[test]
    fn test_virtio_pci_restart_replays_session_with_base_from_used_index() {
        use vm_memory::Bytes;
        let (p, fake) = honest_device();
        bring_up_with_ring(&p);
        assert!(fake.wait_for(SET_VRING_KICK), "{:?}", fake.codes());
        let first = fake.messages(SET_VRING_BASE);
        assert_eq!(
            first[0].body[4..8],
            0u32.to_le_bytes(),
            "a fresh ring starts at 0"
        );
        // The old process completed 5 requests (used index 5 in guest memory), then died.
        lock(&p.inner)
            .memory
            .write_obj(5u16, GuestAddress(0x4000 + 2))
            .expect("used idx");
        let handle = p.restart_handle();
        handle.set_kill_hook(Arc::new(|| {}));
        handle.lost();
        assert!(handle.wanted());
        let before = fake.codes().len();
        // A configuration write while it is down is kept for the new process.
        lock(&p.inner).bar_write(DEVICE_CFG_OFFSET + 1, &[0x77]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            fake.codes().len(),
            before,
            "a request went to a dead process"
        );
        let (fake2, stream) = Fake::start_on_stream(|m| honest(&CONFIG, 1, m));
        handle
            .reconnect(stream, Some(Instant::now()))
            .expect("reconnect");
        assert!(fake2.wait_for(SET_VRING_KICK), "{:?}", fake2.codes());
        let base = fake2.messages(SET_VRING_BASE);
        assert_eq!(base.len(), 1);
        assert_eq!(
            base[0].body[..8],
            [0, 0, 0, 0, 5, 0, 0, 0],
            "base = used index"
        );
        let codes = fake2.codes();
        for code in [GET_FEATURES, SET_FEATURES, SET_MEM_TABLE] {
            assert!(codes.contains(&code), "{code} not replayed: {codes:?}");
        }
        let set_config = 25;
        let w = fake2.messages(set_config);
        assert!(
            w.iter()
                .any(|m| m.body[0..4] == 1u32.to_le_bytes() && m.body.ends_with(&[0x77])),
            "configuration write not replayed: {codes:?}"
        );
        assert_eq!(
            status(&p) & STATUS_NEEDS_RESET,
            0,
            "the guest saw the restart"
        );
        assert!(!p.failure_handle().is_failed());
        println!("restart replayed: {codes:?}");
    }

    /// A restartable device whose process misses a deadline is killed (for a restart), not
    /// failed; once the monitor gives up, it fails for good.
    #[test]
    fn test_virtio_pci_restartable_deadline_kills_then_give_up_fails() {
        let mut n = 0;
        let (p, _fake) = device(move |m| {
            if m.code == GET_CONFIG {
                n += 1;
                if n > 1 {
                    return Action::Nothing;
                }
            }
            honest(&CONFIG, 1, m)
        });
        let kills = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let k = kills.clone();
        let handle = p.restart_handle();
        handle.set_kill_hook(Arc::new(move || {
            k.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        lock(&p.inner).backend.submit(Job::RefreshConfig);
        let start = Instant::now();
        while kills.load(std::sync::atomic::Ordering::SeqCst) == 0
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            kills.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "not killed"
        );
        assert!(!p.failure_handle().is_failed());
        write8(&p, 0x14, 1);
        assert_eq!(status(&p) & STATUS_NEEDS_RESET, 0);
        handle.give_up("test");
        assert!(p.failure_handle().is_failed());
        assert!(!handle.wanted());
        assert_ne!(status(&p) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn test_virtio_pci_device_type_out_of_range_refused() {
        let mut fake = Fake::start(|m| honest(&CONFIG, 1, m));
        let backend =
            VhostUserDevice::handshake("vd".into(), fake.frontend.take().expect("frontend"), 1)
                .expect("handshake");
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        assert!(matches!(
            VirtioPci::new(
                0x1_0002,
                0,
                256,
                backend,
                memory,
                Arc::new(MmioBus::default())
            ),
            Err(VirtioPciError::DeviceType(0x1_0002))
        ));
    }
}
