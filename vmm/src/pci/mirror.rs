//! Bus 0's configuration space in memory the guest reads without an exit.
//!
//! Linux reads the host bridge's and the root ports' configuration registers about 180 times
//! per port at boot (enumeration, bridge windows, the pciehp and PME services) and writes them
//! about 60 times; on a nested host every exit to the VMM costs about 0.3 ms, so the reads of
//! eight empty root ports cost the guest about 0.4 s. Their registers are plain state: a read
//! has no side effect and returns what the last change left. So the VMM keeps a copy of each
//! function-0 configuration space of bus 0 in its own memory, given to KVM as a read-only
//! memory slot over that part of the ECAM window: reads are memory reads, writes still exit
//! (KVM turns a write to a read-only slot into an MMIO exit) and reach the emulation, which
//! publishes the registers again before the exit returns.
//!
//! The copy is published after every change and before any interrupt that tells the guest to
//! look (a hot-plug MSI): [`super::root_port::RootPort`] and [`super::host::PcieHost`] call
//! [`EcamMirror::publish`]. Each changed 32-bit register is stored whole, so a guest on
//! another vCPU reads either the old or the new value of a register, as on hardware.
//! Functions 1 to 7 and devices past the last root port are not in a slot on hosts with 4 KiB
//! pages (their reads exit and read as all ones); with larger pages the slots cover them and
//! they are all ones in the copy too. Devices behind the root ports stay trapped: a virtio
//! function's configuration reads can have side effects (its PCI configuration access
//! capability reads a BAR).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use super::config::CONFIG_SIZE;
use crate::regpage::{anonymous_mapping, clean_to_memory, host_page_size};

/// The first KVM memory slot of the copy (guest RAM is slot 0, the flash banks 1 and 2).
pub const FIRST_SLOT: u32 = 8;

/// ECAM bytes per device number (8 functions of 4 KiB).
const DEVICE_STRIDE: usize = 8 * CONFIG_SIZE;

/// The copy of bus 0's function-0 configuration spaces, devices 0 to `devices - 1`.
pub struct EcamMirror {
    base: NonNull<u8>,
    len: usize,
    page: usize,
    devices: usize,
}

// SAFETY: the mapping is only written through `publish`, one aligned 32-bit atomic store per
// register, and lives as long as the value.
unsafe impl Send for EcamMirror {}
// SAFETY: as above.
unsafe impl Sync for EcamMirror {}

impl EcamMirror {
    /// A copy for devices 0 to `devices - 1` of bus 0, all registers all ones until published.
    pub fn new(devices: usize) -> io::Result<Self> {
        let page = host_page_size()?;
        let len = (devices * DEVICE_STRIDE).div_ceil(page) * page;
        let base = anonymous_mapping(len)?;
        let mirror = Self {
            base,
            len,
            page,
            devices,
        };
        for (start, size) in mirror.pages() {
            // SAFETY: a page range inside the mapping.
            unsafe { std::ptr::write_bytes(base.as_ptr().add(start), 0xff, size) };
        }
        Ok(mirror)
    }

    /// The host pages of the copy that hold a device's function 0: (offset, length), merged
    /// where they touch.
    fn pages(&self) -> Vec<(usize, usize)> {
        let mut pages: Vec<(usize, usize)> = Vec::new();
        for d in 0..self.devices {
            let start = d * DEVICE_STRIDE / self.page * self.page;
            let end = (d * DEVICE_STRIDE + CONFIG_SIZE).div_ceil(self.page) * self.page;
            match pages.last_mut() {
                Some((s, l)) if *s + *l >= start => *l = (*l).max(end - *s),
                _ => pages.push((start, end - start)),
            }
        }
        pages
    }

    /// Publishes device `device`'s function-0 registers; a device number the copy does not
    /// hold is ignored.
    pub fn publish(&self, device: usize, regs: &[u8; CONFIG_SIZE]) {
        if device >= self.devices {
            return;
        }
        let offset = device * DEVICE_STRIDE;
        let mut changed: Option<(usize, usize)> = None;
        for (i, word) in regs.chunks_exact(4).enumerate() {
            let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            // SAFETY: `offset + 4 * i` is inside the device's function 0, inside the mapping,
            // and 4-byte aligned (the mapping is page-aligned).
            let cell = unsafe { &*self.base.as_ptr().add(offset + 4 * i).cast::<AtomicU32>() };
            if cell.load(Ordering::Relaxed) != value {
                cell.store(value, Ordering::Relaxed);
                let at = offset + 4 * i;
                changed = Some(changed.map_or((at, at + 4), |(a, _)| (a, at + 4)));
            }
        }
        if let Some((start, end)) = changed {
            // SAFETY: the range is inside the mapping.
            clean_to_memory(unsafe { self.base.as_ptr().add(start) }, end - start);
        }
    }

    /// The registers of device `device` as the guest reads them (tests).
    #[cfg(test)]
    pub(crate) fn published(&self, device: usize) -> &[u8] {
        // SAFETY: inside the mapping, alive as long as `self`.
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(device * DEVICE_STRIDE), CONFIG_SIZE)
        }
    }

    /// Gives the copy to `vm` as read-only memory slots over bus 0 of the ECAM window at
    /// `ecam`. Returns how many slots.
    pub fn map(&self, vm: &VmFd, ecam: u64) -> Result<usize, kvm_ioctls::Error> {
        let pages = self.pages();
        for (i, (start, size)) in pages.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: FIRST_SLOT + i as u32,
                flags: KVM_MEM_READONLY,
                guest_phys_addr: ecam + *start as u64,
                memory_size: *size as u64,
                // SAFETY: inside the mapping.
                userspace_addr: unsafe { self.base.as_ptr().add(*start) } as u64,
            };
            // SAFETY: the slot's memory is this mapping, which outlives the VM (the PCIe host
            // that owns it lives as long as the `Vm`, and each boot's VmFd goes before it).
            unsafe { vm.set_user_memory_region(region) }?;
        }
        Ok(pages.len())
    }
}

impl Drop for EcamMirror {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mirror_publishes_registers_and_leaves_the_rest_all_ones() {
        let m = EcamMirror::new(3).expect("mirror");
        assert!(m.published(2).iter().all(|&b| b == 0xff));
        let mut regs = [0u8; CONFIG_SIZE];
        regs[0..4].copy_from_slice(&0x000c_1b36u32.to_le_bytes());
        regs[0x44] = 0x5a;
        m.publish(1, &regs);
        assert_eq!(m.published(1), &regs[..]);
        assert!(m.published(0).iter().all(|&b| b == 0xff));
        regs[0x44] = 0;
        m.publish(1, &regs);
        assert_eq!(m.published(1)[0x44], 0);
        // Out of range: ignored.
        m.publish(3, &regs);
    }

    #[test]
    fn test_mirror_pages_hold_every_function_zero() {
        let m = EcamMirror::new(9).expect("mirror");
        let pages = m.pages();
        for d in 0..9 {
            let (a, b) = (d * DEVICE_STRIDE, d * DEVICE_STRIDE + CONFIG_SIZE);
            assert!(
                pages.iter().any(|&(s, l)| s <= a && b <= s + l),
                "device {d} in {pages:x?}"
            );
        }
        for &(s, l) in &pages {
            assert_eq!(s % m.page, 0);
            assert_eq!(l % m.page, 0);
            assert!(s + l <= m.len);
        }
        if m.page == 4096 {
            // One page per function 0; functions 1 to 7 left to exits.
            assert_eq!(pages.len(), 9);
            assert!(pages.iter().all(|&(_, l)| l == 4096));
        }
    }
}
