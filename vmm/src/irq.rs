//! Message-signalled interrupts: KVM GSI routes to the GICv3 ITS, and irqfds that let a device
//! process's eventfd raise them without passing through the VMM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi,
    kvm_irq_routing_msi__bindgen_ty_1, KvmIrqRouting, KVM_IRQ_ROUTING_MSI, KVM_MSI_VALID_DEVID,
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

/// One VM's MSI routes.
pub struct VmInterrupts {
    vm: Arc<VmFd>,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: AtomicU32,
}

impl VmInterrupts {
    /// No routes yet.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            routes: Mutex::new(BTreeMap::new()),
            next_gsi: AtomicU32::new(0),
        }
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// A GSI nobody else uses.
    pub fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let gsi = self.next_gsi.fetch_add(1, Ordering::Relaxed);
        if gsi >= MAX_GSIS {
            return Err(IrqError::OutOfGsis);
        }
        Ok(gsi)
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
        let entries: Vec<kvm_irq_routing_entry> = routes
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
            .collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::BuildRouting)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(IrqError::SetRouting)
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
