//! The in-kernel vGIC: a GICv3 with an ITS where the host has one, a GICv2 otherwise.

use bulkhead_firmware::fdt::GicKind;
use bulkhead_firmware::layout::*;
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_ITS_ADDR_TYPE, KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};
use log::warn;

/// Interrupt lines the GIC has: SGIs and PPIs, then 224 SPIs.
const NR_IRQS: u32 = 256;

/// Errors creating the vGIC.
#[derive(Debug, thiserror::Error)]
pub enum GicError {
    /// Neither a GICv3 nor a GICv2 could be created.
    #[error("KVM offers no in-kernel GIC (GICv3: {v3}; GICv2)")]
    Create {
        /// Why the GICv3 failed.
        v3: kvm_ioctls::Error,
        /// Why the GICv2 failed.
        #[source]
        v2: kvm_ioctls::Error,
    },
    /// The host has only a GICv2, which addresses at most 8 vCPUs.
    #[error("this host's KVM offers only a GICv2, which cannot serve {0} vCPUs (at most 8)")]
    TooManyVcpusForV2(u32),
    /// A vGIC attribute could not be set.
    #[error("setting vGIC attribute group {group} attribute {attr}")]
    SetAttr {
        /// Attribute group.
        group: u32,
        /// Attribute.
        attr: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The ITS could not be created.
    #[error("creating the GICv3 ITS")]
    CreateIts(#[source] kvm_ioctls::Error),
}

fn create_device(vm: &VmFd, type_: u32) -> Result<DeviceFd, kvm_ioctls::Error> {
    let mut dev = kvm_create_device {
        type_,
        fd: 0,
        flags: 0,
    };
    vm.create_device(&mut dev)
}

/// Sets a vGIC attribute; `value` is what the attribute's `addr` points at, if anything.
fn set_attr(dev: &DeviceFd, group: u32, attr: u64, value: Option<&u64>) -> Result<(), GicError> {
    let attr_struct = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: value.map_or(0, |v| v as *const u64 as u64),
    };
    dev.set_device_attr(&attr_struct)
        .map_err(|source| GicError::SetAttr {
            group,
            attr,
            source,
        })
}

fn set_nr_irqs_and_init(dev: &DeviceFd) -> Result<(), GicError> {
    // NR_IRQS is read as a u32 by KVM; a u64 holding it is laid out the same on little endian.
    let nr = u64::from(NR_IRQS);
    set_attr(dev, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, Some(&nr))?;
    set_attr(
        dev,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
        None,
    )
}

/// Creates the vGIC for `ncpus` vCPUs, which must all exist already.
pub fn create(vm: &VmFd, ncpus: u32) -> Result<(GicKind, Vec<DeviceFd>), GicError> {
    match create_device(vm, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3) {
        Ok(gic) => {
            set_attr(
                &gic,
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_V3_ADDR_TYPE_DIST.into(),
                Some(&GIC_DIST_START),
            )?;
            set_attr(
                &gic,
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_V3_ADDR_TYPE_REDIST.into(),
                Some(&GIC_REDIST_START),
            )?;
            set_nr_irqs_and_init(&gic)?;
            let its = create_device(vm, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS)
                .map_err(GicError::CreateIts)?;
            set_attr(
                &its,
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_ITS_ADDR_TYPE.into(),
                Some(&GIC_ITS_START),
            )?;
            set_attr(
                &its,
                KVM_DEV_ARM_VGIC_GRP_CTRL,
                KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
                None,
            )?;
            Ok((GicKind::V3 { its: true }, vec![gic, its]))
        }
        Err(v3) => {
            warn!("no in-kernel GICv3 ({v3}); falling back to GICv2");
            let gic = create_device(vm, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2)
                .map_err(|v2| GicError::Create { v3, v2 })?;
            if ncpus > MAX_VCPUS_GICV2 {
                return Err(GicError::TooManyVcpusForV2(ncpus));
            }
            set_attr(
                &gic,
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_V2_ADDR_TYPE_DIST.into(),
                Some(&GIC_DIST_START),
            )?;
            set_attr(
                &gic,
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_V2_ADDR_TYPE_CPU.into(),
                Some(&GIC_CPU_START),
            )?;
            set_nr_irqs_and_init(&gic)?;
            Ok((GicKind::V2, vec![gic]))
        }
    }
}
