//! A page of device registers in memory the guest reads without an exit.
//!
//! On a nested host every exit to the VMM costs about 0.3 ms. A device whose register reads
//! have no side effect can keep their values in a page of its own, given to KVM as a
//! read-only memory slot over the device's MMIO window: a read is a memory read, a write still
//! exits (KVM turns a write to a read-only slot into an MMIO exit) and reaches the emulation,
//! which stores the registers again before the exit returns. The PL011 console does this while
//! its receive FIFO is empty ([`crate::legacy::pl011`]); bus 0's configuration space has a
//! mirror of its own ([`crate::pci::mirror`]).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

/// One host page of 32-bit registers, zero until stored.
pub struct RegisterPage {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only written through `store`, one aligned 32-bit atomic store per
// register, and lives as long as the value.
unsafe impl Send for RegisterPage {}
// SAFETY: as above.
unsafe impl Sync for RegisterPage {}

impl RegisterPage {
    /// A zeroed page of the host's page size.
    pub fn new() -> io::Result<Self> {
        let len = host_page_size()?;
        let base = anonymous_mapping(len)?;
        Ok(Self { base, len })
    }

    /// The page's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the page has no bytes (never: a page is at least 4 KiB).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores each `(offset, value)` whose register holds something else, then makes the
    /// stores visible to the guest. An offset that is not 4-byte aligned or past the page is
    /// ignored. Each register is stored whole, so a guest on another vCPU reads either its
    /// old or its new value.
    pub fn store(&self, registers: &[(u64, u32)]) {
        let mut changed: Option<(usize, usize)> = None;
        for &(offset, value) in registers {
            let Ok(at) = usize::try_from(offset) else {
                continue;
            };
            if !at.is_multiple_of(4) || at + 4 > self.len {
                continue;
            }
            // SAFETY: `at` is 4-byte aligned (the mapping is page-aligned) and inside the
            // mapping.
            let cell = unsafe { &*self.base.as_ptr().add(at).cast::<AtomicU32>() };
            if cell.load(Ordering::Relaxed) != value {
                cell.store(value, Ordering::Relaxed);
                changed = Some(changed.map_or((at, at + 4), |(a, b)| (a.min(at), b.max(at + 4))));
            }
        }
        if let Some((start, end)) = changed {
            // SAFETY: the range is inside the mapping.
            clean_to_memory(unsafe { self.base.as_ptr().add(start) }, end - start);
        }
    }

    /// The register at `offset` as the guest reads it (tests).
    #[cfg(test)]
    pub(crate) fn load(&self, offset: usize) -> u32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: checked above.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }.load(Ordering::Relaxed)
    }

    fn host_address(&self) -> u64 {
        self.base.as_ptr() as u64
    }
}

impl Drop for RegisterPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A new private anonymous read-write mapping of `len` bytes, zero-filled, page-aligned; the
/// caller unmaps it.
pub(crate) fn anonymous_mapping(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a new private anonymous mapping; nothing else is at the address the kernel picks.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(addr.cast::<u8>()).ok_or_else(io::Error::last_os_error)
}

/// The host's page size.
pub fn host_page_size() -> io::Result<usize> {
    // SAFETY: sysconf has no memory effects.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Shows a register page to the guest, or takes it away so that reads exit again.
pub trait PageSlot: Send {
    /// The page whose registers the guest reads while it is mapped.
    fn page(&self) -> &RegisterPage;

    /// Maps (`true`) or unmaps the page.
    fn set_present(&mut self, present: bool) -> io::Result<()>;
}

/// A [`RegisterPage`] as a read-only KVM memory slot at a guest address.
pub struct KvmPageSlot {
    page: RegisterPage,
    vm: Arc<VmFd>,
    slot: u32,
    guest_addr: u64,
}

impl KvmPageSlot {
    /// `page` at `guest_addr` of `vm`, as memory slot `slot`; not mapped until asked.
    pub fn new(page: RegisterPage, vm: Arc<VmFd>, slot: u32, guest_addr: u64) -> Self {
        Self {
            page,
            vm,
            slot,
            guest_addr,
        }
    }
}

impl PageSlot for KvmPageSlot {
    fn page(&self) -> &RegisterPage {
        &self.page
    }

    fn set_present(&mut self, present: bool) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: self.guest_addr,
            // A size of 0 deletes the slot.
            memory_size: if present { self.page.len() as u64 } else { 0 },
            userspace_addr: self.page.host_address(),
        };
        // SAFETY: the slot's memory is the page this value owns; it is removed from the VM
        // (or the VM is gone, stopped first) before the page is unmapped: a VM is stopped
        // before the device that owns this slot is reset for the next one, and the page lives
        // as long as this value, which holds the VM.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(io::Error::from)
    }
}

/// Makes the VMM's stores in `[start, start + len)` visible to a guest that maps the page as
/// Device memory (uncached): without FEAT_S2FWB its reads go to memory, not to the VMM's
/// cache. Cleans each data cache line to the point of coherency (`DC CVAC`, which Linux lets
/// user space run), then waits for it.
#[cfg(target_arch = "aarch64")]
pub(crate) fn clean_to_memory(start: *const u8, len: usize) {
    let ctr: u64;
    // SAFETY: reads CTR_EL0 (allowed at EL0, or emulated by the kernel).
    unsafe { std::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    let line = 4usize << ((ctr >> 16) & 0xf);
    let end = start as usize + len;
    let mut p = start as usize & !(line - 1);
    while p < end {
        // SAFETY: cleans (writes back, keeps) a line of memory this process maps.
        unsafe { std::arch::asm!("dc cvac, {}", in(reg) p, options(nostack)) };
        p += line;
    }
    // SAFETY: a barrier.
    unsafe { std::arch::asm!("dsb sy", options(nostack)) };
}

/// x86 keeps caches coherent with every memory type the guest can use here.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) fn clean_to_memory(_start: *const u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_register_page_stores_aligned_registers_inside_the_page() {
        let page = RegisterPage::new().expect("page");
        assert!(page.len() >= 4096);
        page.store(&[
            (0x18, 0x90),
            (0xfe0, 0x11),
            (0x19, 7),
            (page.len() as u64, 1),
        ]);
        assert_eq!(page.load(0x18), 0x90);
        assert_eq!(page.load(0xfe0), 0x11);
        // Unaligned and out-of-page offsets are ignored.
        assert_eq!(page.load(0x1c), 0);
        page.store(&[(0x18, 0x80)]);
        assert_eq!(page.load(0x18), 0x80);
    }
}
