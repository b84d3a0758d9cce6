//! Message-signalled interrupts: KVM GSI routes to the GICv3 ITS (or, on a GICv2, to the SPI
//! a GICv2m frame would raise), and irqfds that let a device process's eventfd raise them
//! without passing through the VMM.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bulkhead_firmware::layout::{
    GIC_V2M_SETSPI_NS, GIC_V2M_SPI_COUNT, GIC_V2M_SPI_FIRST, GIC_V2M_START, SPI_BASE,
};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_irq_routing_msi__bindgen_ty_1, kvm_msi, KvmIrqRouting,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MSI_VALID_DEVID,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// Most GSIs KVM routes (KVM_MAX_IRQ_ROUTES).
const MAX_GSIS: u32 = 4096;

/// Errors programming interrupts.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// Every GSI is taken.
    #[error("out of interrupt routes ({MAX_GSIS} in use)")]
    OutOfGsis,
    /// KVM_SET_GSI_ROUTING failed.
    #[error("setting KVM interrupt routes")]
    SetRouting(#[source] kvm_ioctls::Error),
    /// The routing table could not be built.
    #[error("building the KVM routing table")]
    BuildRouting,
    /// KVM_SIGNAL_MSI failed.
    #[error("sending an MSI")]
    SignalMsi(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("{} irqfd for GSI {gsi}", if *assign { "assigning" } else { "releasing" })]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// Assigning or releasing.
        assign: bool,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An MSI message and the requester it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Doorbell address (the ITS's GITS_TRANSLATER).
    pub address: u64,
    /// Event ID.
    pub data: u32,
    /// Device ID at the ITS: the PCI requester ID (the FDT's msi-map is the identity).
    pub devid: u32,
}

/// Hands out GSIs and takes them back: a freed GSI is reused (lowest first) before a new one
/// is taken, so hot-plug and unplug cycles never run out of routes.
#[derive(Debug)]
pub struct GsiAllocator {
    next: u32,
    free: BTreeSet<u32>,
    max: u32,
}

impl GsiAllocator {
    /// GSIs `0..max`.
    pub fn new(max: u32) -> Self {
        Self {
            next: 0,
            free: BTreeSet::new(),
            max,
        }
    }

    /// A GSI nobody holds.
    pub fn allocate(&mut self) -> Result<u32, IrqError> {
        if let Some(gsi) = self.free.pop_first() {
            return Ok(gsi);
        }
        if self.next >= self.max {
            return Err(IrqError::OutOfGsis);
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Gives `gsi` back. Freeing a GSI that is not held is ignored (and reported false).
    pub fn free(&mut self, gsi: u32) -> bool {
        if gsi >= self.next || self.free.contains(&gsi) {
            return false;
        }
        if gsi + 1 == self.next {
            self.next -= 1;
            // Fold a free tail back into `next`.
            while self.next > 0 && self.free.remove(&(self.next - 1)) {
                self.next -= 1;
            }
        } else {
            self.free.insert(gsi);
        }
        true
    }

    /// GSIs held now.
    pub fn in_use(&self) -> usize {
        self.next as usize - self.free.len()
    }
}

/// The SPI (relative to the first SPI) a GICv2m MSI raises: `msg` must be a write to the
/// frame's doorbell of an interrupt ID the frame hands out; anything else raises nothing.
pub fn gicv2m_spi(msg: &MsiMessage) -> Option<u32> {
    let first = SPI_BASE + GIC_V2M_SPI_FIRST;
    (msg.address == GIC_V2M_START + GIC_V2M_SETSPI_NS
        && (first..first + GIC_V2M_SPI_COUNT).contains(&msg.data))
    .then(|| msg.data - SPI_BASE)
}

/// One VM's MSI routes.
pub struct VmInterrupts {
    vm: Arc<VmFd>,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
    gsis: Mutex<GsiAllocator>,
    /// A GICv2 VM: MSIs are GICv2m writes, routed to their SPIs (KVM's GICv2 takes no MSI).
    gicv2m: bool,
}

impl VmInterrupts {
    /// No routes yet; MSIs go to the GICv3 ITS.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            routes: Mutex::new(BTreeMap::new()),
            gsis: Mutex::new(GsiAllocator::new(MAX_GSIS)),
            gicv2m: false,
        }
    }

    /// For a GICv2 VM: MSIs are writes to the GICv2m frame, each raising an SPI; routes
    /// become KVM irqchip routes to those SPIs and [`VmInterrupts::signal_msi`] pulses the SPI.
    pub fn with_gicv2m(mut self) -> Self {
        self.gicv2m = true;
        self
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// A GSI nobody else uses.
    pub fn allocate_gsi(&self) -> Result<u32, IrqError> {
        self.gsis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
    }

    /// GSIs held now and MSI routes set now (`vm.info`: hot-plug cycles must not grow them).
    pub fn usage(&self) -> (usize, usize) {
        let gsis = self.gsis.lock().unwrap_or_else(|e| e.into_inner()).in_use();
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner()).len();
        (gsis, routes)
    }

    /// Releases `gsis`: their routes are removed and the numbers go back to the pool.
    pub fn free_gsis(&self, gsis: &[u32]) -> Result<(), IrqError> {
        let updates: Vec<_> = gsis.iter().map(|&g| (g, None)).collect();
        let routed = self.set_routes(&updates);
        let mut pool = self.gsis.lock().unwrap_or_else(|e| e.into_inner());
        for &g in gsis {
            pool.free(g);
        }
        routed
    }

    /// Sets (or with `None` removes) the routes of some GSIs, in one KVM_SET_GSI_ROUTING.
    pub fn set_routes(&self, updates: &[(u32, Option<MsiMessage>)]) -> Result<(), IrqError> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for &(gsi, msg) in updates {
            let old = match msg {
                Some(m) => routes.insert(gsi, m),
                None => routes.remove(&gsi),
            };
            changed |= old != msg;
        }
        if !changed {
            return Ok(());
        }
        let entries: Vec<kvm_irq_routing_entry> = if self.gicv2m {
            // A message that is no GICv2m SPI gets no route: its irqfd raises nothing.
            routes
                .iter()
                .filter_map(|(&gsi, m)| {
                    Some(kvm_irq_routing_entry {
                        gsi,
                        type_: KVM_IRQ_ROUTING_IRQCHIP,
                        flags: 0,
                        pad: 0,
                        u: kvm_irq_routing_entry__bindgen_ty_1 {
                            irqchip: kvm_irq_routing_irqchip {
                                irqchip: 0,
                                pin: gicv2m_spi(m)?,
                            },
                        },
                    })
                })
                .collect()
        } else {
            routes
                .iter()
                .map(|(&gsi, m)| kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    flags: KVM_MSI_VALID_DEVID,
                    pad: 0,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: m.address as u32,
                            address_hi: (m.address >> 32) as u32,
                            data: m.data,
                            __bindgen_anon_1: kvm_irq_routing_msi__bindgen_ty_1 { devid: m.devid },
                        },
                    },
                })
                .collect()
        };
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::BuildRouting)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(IrqError::SetRouting)
    }

    /// Sends one MSI now (KVM_SIGNAL_MSI), as a root port does for its hot-plug events.
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<(), IrqError> {
        if self.gicv2m {
            // An edge on the SPI the GICv2m frame would raise (its SPIs are edge-triggered).
            let Some(spi) = gicv2m_spi(&msg) else {
                return Ok(());
            };
            let line = crate::arch::spi_irq_line(spi);
            return self
                .vm
                .set_irq_line(line, true)
                .and_then(|()| self.vm.set_irq_line(line, false))
                .map_err(IrqError::SignalMsi);
        }
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            flags: KVM_MSI_VALID_DEVID,
            devid: msg.devid,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(drop)
            .map_err(IrqError::SignalMsi)
    }

    /// Lets `fd` raise `gsi`; a signal already pending on `fd` is delivered now.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|source| IrqError::Irqfd {
                gsi,
                assign: true,
                source,
            })
    }

    /// Stops `fd` raising `gsi`; signals on it then wait in the eventfd.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|source| IrqError::Irqfd {
                gsi,
                assign: false,
                source,
            })
    }
}

impl crate::pci::root_port::MsiSignal for VmInterrupts {
    fn signal_msi(&self, msg: MsiMessage) -> Result<(), IrqError> {
        VmInterrupts::signal_msi(self, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gicv2m_spi_only_for_the_frame_doorbell_and_its_spis() {
        let msg = |address, data| MsiMessage {
            address,
            data,
            devid: 0x100,
        };
        let doorbell = GIC_V2M_START + GIC_V2M_SETSPI_NS;
        let first = SPI_BASE + GIC_V2M_SPI_FIRST;
        assert_eq!(gicv2m_spi(&msg(doorbell, first)), Some(GIC_V2M_SPI_FIRST));
        let last = first + GIC_V2M_SPI_COUNT - 1;
        assert_eq!(gicv2m_spi(&msg(doorbell, last)), Some(last - SPI_BASE));
        assert_eq!(
            gicv2m_spi(&msg(doorbell, last + 1)),
            None,
            "past the frame's SPIs"
        );
        assert_eq!(
            gicv2m_spi(&msg(doorbell, SPI_BASE + 1)),
            None,
            "the UART's SPI"
        );
        assert_eq!(gicv2m_spi(&msg(doorbell, 0)), None);
        assert_eq!(
            gicv2m_spi(&msg(GIC_V2M_START, first)),
            None,
            "not the doorbell"
        );
        assert_eq!(gicv2m_spi(&msg(0x0809_0040, first)), None, "the ITS");
    }

    #[test]
    fn test_gsi_allocator_freed_gsis_are_reused() {
        let mut a = GsiAllocator::new(4);
        let g: Vec<u32> = (0..4).map(|_| a.allocate().expect("gsi")).collect();
        assert_eq!(g, [0, 1, 2, 3]);
        assert!(matches!(a.allocate(), Err(IrqError::OutOfGsis)));
        assert!(a.free(1));
        assert!(!a.free(1), "double free is refused");
        assert!(!a.free(9), "a GSI never handed out is refused");
        assert_eq!(a.allocate().expect("reused"), 1);
        assert!(a.free(3));
        assert!(a.free(2));
        assert_eq!(a.in_use(), 2);
        assert_eq!(a.allocate().expect("gsi"), 2);
    }

    #[test]
    fn test_gsi_allocator_hotplug_cycles_never_run_out() {
        let mut a = GsiAllocator::new(8);
        for _ in 0..10_000 {
            let held: Vec<u32> = (0..5).map(|_| a.allocate().expect("gsi")).collect();
            for g in held {
                assert!(a.free(g));
            }
        }
        assert_eq!(a.in_use(), 0);
    }
}
