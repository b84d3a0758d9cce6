//! The virtio 1.x PCI transport in front of a vhost-user device process.
//!
//! BAR 0 (64 KiB, 32-bit memory) holds the common configuration, ISR, device configuration
//! and notification structures and the MSI-X table and PBA. Queue notifications are KVM
//! ioeventfds that the device process polls, and its completion eventfds are KVM irqfds on
//! the queues' MSI-X vectors: the VMM handles configuration, never the data path.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use log::{error, info, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vhost_user::{RingConfig, VhostUserDevice};
use crate::irq::VmInterrupts;
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
    active: bool,
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
        device_type: u16,
        class: u32,
        max_queue_size: u16,
        backend: VhostUserDevice,
        memory: GuestMemoryMmap,
        mmio: Arc<MmioBus>,
    ) -> Result<Self, VirtioPciError> {
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
        let backend_config_irq = backend.config_change.irq.clone();
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
                    warn!("{}: releasing ioeventfd: {e}", self.name);
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
            warn!("{}: BAR 0 at {base:#x}: {e}", self.name);
            return;
        }
        for (q, kick) in self.kicks.iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + NOTIFY_OFFSET + 4 * q as u64);
            if let Err(e) = irq.vm().register_ioevent(kick.as_ref(), &addr, NoDatamatch) {
                error!("{}: ioeventfd for queue {q}: {e}", self.name);
            }
        }
        self.mapped = Some(base);
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
            self.msix.set_sources(v, fds);
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
        let rings = self.rings();
        if let Some(bad) = self.queues.iter().position(|q| {
            q.enabled && (q.size == 0 || !q.size.is_power_of_two() || q.size > self.max_queue_size)
        }) {
            warn!(
                "{}: queue {bad} has an invalid size; device needs reset",
                self.name
            );
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let features = self.driver_features;
        match self
            .backend
            .activate(&self.memory, features, &rings, &self.kicks, &self.calls)
        {
            Ok(()) => {
                self.active = true;
                info!(
                    "{}: activated, {} of {} queues, features {features:#x}",
                    self.name,
                    rings.iter().flatten().count(),
                    rings.len()
                );
            }
            Err(e) => {
                error!("{}: activating the device process: {e}", self.name);
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    /// Device reset: the data path stops, the transport's state goes back to its reset values.
    fn reset_device(&mut self) {
        if self.active {
            if let Err(e) = self.backend.deactivate(&self.rings()) {
                error!("{}: stopping the device process: {e}", self.name);
            }
            self.active = false;
        }
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
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // The driver must accept VERSION_1 and only features on offer.
            let ok = self.driver_features & F_VERSION_1 != 0
                && self.driver_features & !self.features_offered == 0;
            if !ok {
                warn!(
                    "{}: driver features {:#x} refused",
                    self.name, self.driver_features
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value | (self.status & STATUS_NEEDS_RESET);
        if newly_ok && self.status & STATUS_FEATURES_OK != 0 {
            self.activate();
        } else if newly_ok {
            warn!("{}: DRIVER_OK without FEATURES_OK", self.name);
            self.status |= STATUS_NEEDS_RESET;
        }
        let _ = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FAILED);
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
        b[0x14] = self.status;
        b[0x15] = self
            .backend
            .config_change
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
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
                    .read_config((o - DEVICE_CFG_OFFSET) as u32, data)
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
                self.backend
                    .write_config((o - DEVICE_CFG_OFFSET) as u32, data)
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
                self.msix.table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
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
            t.msix.set_devid(requester_id(bus, 0));
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
            t.msix.set_control(ctrl);
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
        if let Err(e) = t.msix.attach(vm.clone()) {
            error!("{}: MSI-X: {e}", t.name);
        }
        let _ = t.device_type;
    }

    fn name(&self) -> String {
        lock(&self.inner).name.clone()
    }
}
