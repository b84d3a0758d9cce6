//! arm64 hosts: vCPU initialisation, boot registers and the in-kernel GIC.

mod gic;

use bulkhead_firmware::fdt::GicKind;
use bulkhead_firmware::image::GuestArch;
use bulkhead_firmware::layout::SPI_BASE;
use kvm_bindings::{
    kvm_vcpu_init, KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI, KVM_ARM_VCPU_EL1_32BIT,
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_PTRAUTH_ADDRESS,
    KVM_ARM_VCPU_PTRAUTH_GENERIC, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM_CORE,
    KVM_REG_SIZE_U64,
};
use kvm_ioctls::{Cap, DeviceFd, Kvm, VcpuFd, VmFd};
use log::info;

use crate::config::PtrAuth;

/// Errors setting up the architecture-specific parts of a VM.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// KVM lacks something Bulkhead needs.
    #[error("KVM lacks {0}")]
    MissingCapability(&'static str),
    /// The guest kernel is 32-bit and this host's CPUs have no AArch32 at EL1.
    #[error(
        "the kernel is a 32-bit arm zImage, but this host cannot run 32-bit guests: \
         KVM_CAP_ARM_EL1_32BIT is 0 (its CPUs have no AArch32 at EL1, as Neoverse N1/N2/V1/V2 \
         and Grace have not); boot an arm64 kernel instead"
    )]
    NoAarch32El1,
    /// `--cpus pauth=on` where the guest cannot have pointer authentication.
    #[error("--cpus pauth=on: {0}")]
    NoPtrAuth(&'static str),
    /// KVM_ARM_PREFERRED_TARGET failed.
    #[error("querying KVM's preferred vCPU target")]
    PreferredTarget(#[source] kvm_ioctls::Error),
    /// KVM_ARM_VCPU_INIT failed.
    #[error("initialising vCPU {0}")]
    VcpuInit(usize, #[source] kvm_ioctls::Error),
    /// A register could not be read.
    #[error("reading register {0:#x}")]
    GetReg(u64, #[source] kvm_ioctls::Error),
    /// A register could not be written.
    #[error("writing register {0:#x}")]
    SetReg(u64, #[source] kvm_ioctls::Error),
    /// The interrupt controller could not be set up.
    #[error(transparent)]
    Gic(#[from] gic::GicError),
}

/// The interrupt controller and vCPU facts of a created machine.
#[derive(Debug)]
pub struct Machine {
    /// MPIDR of each vCPU.
    pub mpidrs: Vec<u64>,
    /// The GIC the guest got.
    pub gic: GicKind,
    /// The KVM devices behind the GIC; they live as long as the VM.
    _devices: Vec<DeviceFd>,
}

/// `KVM_REG_ARM_CORE` register id of the 64-bit field at `offset` bytes into `struct kvm_regs`.
const fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4)
}

/// Register id of a system register from its encoding.
const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

/// x0: `regs.regs[0]`, the first field of `struct kvm_regs`.
const REG_X0: u64 = core_reg(0);
/// x1 (r1 of a 32-bit guest).
const REG_X1: u64 = core_reg(8);
/// x2 (r2 of a 32-bit guest).
const REG_X2: u64 = core_reg(16);
/// `regs.pc`, after 31 general registers and sp.
const REG_PC: u64 = core_reg(32 * 8);
/// `regs.pstate`.
const REG_PSTATE: u64 = core_reg(33 * 8);
/// MPIDR_EL1.
const REG_MPIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 5);

/// EL1h with D, A, I and F masked, as booting.rst requires.
const PSTATE_BOOT: u64 = 0x3c5;

/// AArch32 SVC mode with A, I and F masked, as Documentation/arch/arm/booting.rst requires.
const PSTATE_BOOT_AARCH32: u64 = 0x1d3;
/// r1 of a 32-bit boot: the machine type, all ones when a device tree is passed.
const MACHINE_TYPE_DT: u64 = 0xffff_ffff;

impl ArchError {
    /// Whether the error is the user's to fix (a guest this host cannot run), not a failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::NoAarch32El1 | Self::NoPtrAuth(_))
    }
}

/// Checks that KVM offers what an arm64 VM needs, and a 32-bit guest's EL1 if it is one.
pub fn check_kvm(kvm: &Kvm, guest: GuestArch) -> Result<(), ArchError> {
    if !kvm.check_extension(Cap::ArmPsci02) {
        return Err(ArchError::MissingCapability(
            "PSCI 0.2 (KVM_CAP_ARM_PSCI_0_2)",
        ));
    }
    if guest == GuestArch::Arm && !kvm.check_extension(Cap::ArmEl132bit) {
        return Err(ArchError::NoAarch32El1);
    }
    Ok(())
}

/// Whether the guest's vCPUs get pointer authentication (address and generic keys), as
/// `ptrauth` asks and the host allows, said once at `-v`; `--cpus pauth=on` where it cannot be
/// had is an error. Where the host's CPUs have it, the guest's kernel and programs sign return
/// addresses, as under QEMU (Firecracker gives it only through a custom CPU template, Cloud
/// Hypervisor not at all). Without it PACIASP and AUTIASP are no-ops and the instructions that
/// combine authentication with a branch or load (RETAA, LDRAA) are undefined.
pub fn resolve_ptrauth(kvm: &Kvm, guest: GuestArch, ptrauth: PtrAuth) -> Result<bool, ArchError> {
    let offered =
        kvm.check_extension(Cap::ArmPtrAuthAddress) && kvm.check_extension(Cap::ArmPtrAuthGeneric);
    let (with, how) = match (ptrauth, guest) {
        (PtrAuth::On, GuestArch::Arm) => {
            return Err(ArchError::NoPtrAuth(
                "a 32-bit guest has no pointer authentication",
            ))
        }
        (PtrAuth::On, _) if !offered => {
            return Err(ArchError::NoPtrAuth(
                "this host's KVM does not offer it (KVM_CAP_ARM_PTRAUTH_ADDRESS and \
                 KVM_CAP_ARM_PTRAUTH_GENERIC)",
            ))
        }
        (_, GuestArch::Arm) => (false, "off (a 32-bit guest)"),
        (PtrAuth::Off, _) => (false, "off (--cpus pauth=off)"),
        _ if offered => (true, "on"),
        _ => (false, "off (KVM does not offer it on this host)"),
    };
    info!("vCPUs: pointer authentication {how}");
    Ok(with)
}

/// Initialises every vCPU (the boot CPU running, the others powered off until PSCI CPU_ON;
/// AArch32 at EL1 for a 32-bit guest; pointer authentication if `ptrauth`, from
/// [`resolve_ptrauth`]) and creates the interrupt controller. All vCPUs must exist before this
/// is called.
pub fn create_machine(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    guest: GuestArch,
    ptrauth: bool,
) -> Result<Machine, ArchError> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(ArchError::PreferredTarget)?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if guest == GuestArch::Arm {
        kvi.features[0] |= 1 << KVM_ARM_VCPU_EL1_32BIT;
    }
    if ptrauth {
        kvi.features[0] |= PTRAUTH_FEATURES;
    }
    let mut mpidrs = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in vcpus.iter().enumerate() {
        let mut init = kvi;
        if index > 0 {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.vcpu_init(&init)
            .map_err(|e| ArchError::VcpuInit(index, e))?;
        mpidrs.push(get_reg(vcpu, REG_MPIDR_EL1)?);
    }
    let (gic, devices) = gic::create(vm, vcpus.len() as u32)?;
    info!("created {gic:?} for {} vCPUs", vcpus.len());
    Ok(Machine {
        mpidrs,
        gic,
        _devices: devices,
    })
}

/// Both pointer authentication features: KVM takes them only together.
const PTRAUTH_FEATURES: u32 =
    (1 << KVM_ARM_VCPU_PTRAUTH_ADDRESS) | (1 << KVM_ARM_VCPU_PTRAUTH_GENERIC);

fn get_reg(vcpu: &VcpuFd, id: u64) -> Result<u64, ArchError> {
    let mut bytes = [0u8; 8];
    vcpu.get_one_reg(id, &mut bytes)
        .map_err(|e| ArchError::GetReg(id, e))?;
    Ok(u64::from_le_bytes(bytes))
}

fn set_reg(vcpu: &VcpuFd, id: u64, value: u64) -> Result<(), ArchError> {
    vcpu.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|e| ArchError::SetReg(id, e))
}

/// Points the boot vCPU at the kernel with interrupts masked. arm64: PC at its entry, x0 at
/// the FDT, EL1h. 32-bit arm: SVC mode, r0 = 0, r1 = the "device tree" machine type, r2 at the
/// FDT (KVM maps r0-r2 onto x0-x2).
pub fn set_boot_regs(
    vcpu: &VcpuFd,
    guest: GuestArch,
    entry: u64,
    fdt: u64,
) -> Result<(), ArchError> {
    match guest {
        GuestArch::Aarch64 => {
            set_reg(vcpu, REG_PSTATE, PSTATE_BOOT)?;
            set_reg(vcpu, REG_X0, fdt)?;
        }
        GuestArch::Arm => {
            set_reg(vcpu, REG_PSTATE, PSTATE_BOOT_AARCH32)?;
            set_reg(vcpu, REG_X0, 0)?;
            set_reg(vcpu, REG_X1, MACHINE_TYPE_DT)?;
            set_reg(vcpu, REG_X2, fdt)?;
        }
    }
    set_reg(vcpu, REG_PC, entry)
}

/// The `KVM_IRQ_LINE` number of an SPI.
pub fn spi_irq_line(spi: u32) -> u32 {
    (KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | (SPI_BASE + spi)
}

/// What a KVM_RUN error means on arm64, where it means something specific.
pub fn describe_run_error(errno: i32) -> Option<&'static str> {
    match errno {
        // kvm_handle_mmio_return / io_mem_abort: a data abort outside RAM whose syndrome
        // does not describe the access, so KVM cannot turn it into an MMIO exit.
        libc::ENOSYS => Some(
            "the guest accessed MMIO with an instruction KVM cannot decode \
             (a data abort without instruction syndrome, e.g. a load/store pair)",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_register_ids_match_kvm_encoding() {
        // Values as KVM_GET_REG_LIST reports them on arm64.
        assert_eq!(REG_X0, 0x6030_0000_0010_0000);
        assert_eq!(REG_X1, 0x6030_0000_0010_0002);
        assert_eq!(REG_X2, 0x6030_0000_0010_0004);
        assert_eq!(REG_PC, 0x6030_0000_0010_0040);
        assert_eq!(REG_PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(REG_MPIDR_EL1, 0x6030_0000_0013_c005);
    }

    #[test]
    fn test_spi_irq_line_encoding() {
        // KVM_ARM_IRQ_TYPE_SPI in bits 24-27, the GIC interrupt ID (SPI + 32) below.
        assert_eq!(spi_irq_line(1), 0x0100_0021);
    }
}
