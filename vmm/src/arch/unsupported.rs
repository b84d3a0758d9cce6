//! Hosts Bulkhead cannot run VMs on yet (x86_64 support comes later): everything builds and
//! the configuration is checked, but creating a machine is a clear error.

use bulkhead_firmware::fdt::GicKind;
use bulkhead_firmware::image::GuestArch;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::config::PtrAuth;

/// Errors setting up the architecture-specific parts of a VM.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// This host architecture is not supported.
    #[error("Bulkhead runs VMs on arm64 hosts only, for now (this host is {0})")]
    UnsupportedHost(&'static str),
}

impl ArchError {
    /// Whether the error is the user's to fix (a guest this host cannot run), not a failure.
    pub fn is_bad_input(&self) -> bool {
        false
    }
}

/// The interrupt controller and vCPU facts of a created machine.
#[derive(Debug)]
pub struct Machine {
    /// MPIDR of each vCPU.
    pub mpidrs: Vec<u64>,
    /// The GIC the guest got.
    pub gic: GicKind,
}

/// Always fails: no VM can be built on this host.
pub fn check_kvm(_kvm: &Kvm, _guest: GuestArch) -> Result<(), ArchError> {
    Err(ArchError::UnsupportedHost(std::env::consts::ARCH))
}

/// Always fails: no VM can be built on this host.
pub fn resolve_ptrauth(
    _kvm: &Kvm,
    _guest: GuestArch,
    _ptrauth: PtrAuth,
) -> Result<bool, ArchError> {
    Err(ArchError::UnsupportedHost(std::env::consts::ARCH))
}

/// Always fails: no VM can be built on this host.
pub fn create_machine(
    _vm: &VmFd,
    _vcpus: &[VcpuFd],
    _guest: GuestArch,
    _ptrauth: bool,
) -> Result<Machine, ArchError> {
    Err(ArchError::UnsupportedHost(std::env::consts::ARCH))
}

/// Always fails: no VM can be built on this host.
pub fn set_boot_regs(
    _vcpu: &VcpuFd,
    _guest: GuestArch,
    _entry: u64,
    _fdt: u64,
) -> Result<(), ArchError> {
    Err(ArchError::UnsupportedHost(std::env::consts::ARCH))
}

/// The `KVM_IRQ_LINE` number of an SPI (never used on this host).
pub fn spi_irq_line(spi: u32) -> u32 {
    spi
}

/// What a KVM_RUN error means on this architecture, where it means something specific.
pub fn describe_run_error(_errno: i32) -> Option<&'static str> {
    None
}
