//! KVM's coalesced MMIO: guest writes to a registered zone that KVM queues in a ring page
//! shared with the VMM, instead of leaving KVM_RUN for each of them.
//!
//! The PL011's data register is the one zone: a guest's console output then costs no exit per
//! character (on a nested host an exit to the VMM costs about half a millisecond). The queued
//! writes are played to the device, in order, before the VMM serves any other MMIO exit of any
//! vCPU (so a guest that writes characters and then reads the flag or interrupt registers sees
//! them sent), when a vCPU stops, and at least every [`DRAIN_PERIOD`] from the main loop (for a
//! guest that writes and then does nothing a VMM sees).
//!
//! kvm-ioctls maps the ring (`VcpuFd::map_coalesced_mmio_ring`) and reads it, but its reader
//! belongs to one `VcpuFd` and reads the kernel's indexes as plain memory: the ring is one per
//! VM, filled by every vCPU, and drained here by every vCPU thread and the main thread, so it
//! needs one consumer lock and acquire loads of the index the kernel publishes. Hence this
//! reader of its own.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;
use std::os::fd::AsRawFd;

use crate::mmio::{MmioBus, QueuedWrite};

/// How often the main loop plays queued writes at the latest.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(50);

/// The VM's coalesced MMIO ring, mapped from one of its vCPUs.
pub struct CoalescedRing {
    page: NonNull<u8>,
    page_size: usize,
    /// Entries in the ring (KVM's `KVM_COALESCED_MMIO_MAX` for this page size).
    entries: u32,
    /// One consumer at a time, and the queued writes played in order.
    consumer: Mutex<()>,
    /// The kernel's indexes were found out of range (logged once).
    broken: AtomicBool,
}

// SAFETY: the page is only read through atomics and volatile reads of entries the kernel has
// published, and `first` (the consumer's index) is written under `consumer`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring page of `vcpu`'s VM (KVM_CAP_COALESCED_MMIO must be there).
    pub fn map(vcpu: &VcpuFd) -> io::Result<Self> {
        // SAFETY: sysconf has no memory effects.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(io::Error::last_os_error()),
        };
        let offset = libc::off_t::try_from(KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of one page of the vCPU file, which KVM backs with the
        // VM's ring page; nothing else is at the address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entries = ((page_size - header) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(Self {
            page,
            page_size,
            entries,
            consumer: Mutex::new(()),
            broken: AtomicBool::new(false),
        })
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `first` (offset 0) and `last` (offset 4) of the ring header are aligned u32s
        // inside the mapped page, which lives as long as `self`.
        unsafe { &*self.page.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// Whether writes are queued (one atomic load: called before every MMIO exit is served).
    pub fn is_empty(&self) -> bool {
        self.index(0).load(Ordering::Relaxed) == self.index(4).load(Ordering::Acquire)
    }

    /// Plays every queued write to `bus`, in the order the guest made them.
    pub fn drain(&self, bus: &MmioBus) {
        if self.is_empty() {
            return;
        }
        let _consumer = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (self.index(0), self.index(4));
        let mut next = first.load(Ordering::Relaxed);
        // Acquire: the entries before `last` are written before the kernel publishes it.
        let end = last.load(Ordering::Acquire);
        if next >= self.entries || end >= self.entries {
            // Not an index KVM writes; plays nothing rather than read outside the page, and
            // says so once (this is checked before every exit is served).
            if !self.broken.swap(true, Ordering::Relaxed) {
                log::error!("coalesced MMIO ring indexes out of range ({next}, {end}): queued console output is lost");
            }
            return;
        }
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        // Played in chunks, each handed to its devices at once (the PL011 sends a chunk's
        // characters in one write).
        let mut chunk = [QueuedWrite::default(); 64];
        while next != end {
            let mut n = 0;
            while next != end && n < chunk.len() {
                // SAFETY: entry `next` is below `entries`, so inside the page; the kernel
                // wrote it before publishing `last` (acquired above) and does not touch it
                // until `first` moves past it.
                let entry = unsafe {
                    self.page
                        .as_ptr()
                        .add(header + next as usize * std::mem::size_of::<kvm_coalesced_mmio>())
                        .cast::<kvm_coalesced_mmio>()
                        .read_volatile()
                };
                chunk[n] = QueuedWrite {
                    addr: entry.phys_addr,
                    len: entry.len.min(8) as u8,
                    bytes: entry.data,
                };
                n += 1;
                next = (next + 1) % self.entries;
            }
            // Release: the entries are read before the kernel may reuse their slots.
            first.store(next, Ordering::Release);
            bus.write_queued(&chunk[..n]);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page mapped in `map`, not used after this.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::mmio::MmioDevice;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit};
    use std::sync::Arc;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl MmioDevice for Recorder {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().expect("lock").push((offset, data.to_vec()));
        }
    }

    /// A 16-bit guest (the build machine's KVM runs a few hundred instructions fine) writes
    /// 300 bytes to a coalesced register, more than the ring holds, reads the next register
    /// and halts: the device sees every byte, in order, and only then the read.
    #[test]
    fn test_queued_writes_are_played_in_order_before_the_next_exit() {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                assert!(
                    std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
                    "cannot open /dev/kvm ({e}; BULKHEAD_TEST_STRICT is set, so this fails)"
                );
                eprintln!("skipped: cannot open /dev/kvm: {e}");
                return;
            }
        };
        const ZONE: u64 = 0x2000;
        #[rustfmt::skip]
        let code: [u8; 18] = [
            0xb9, 0x2c, 0x01,  // mov cx, 300
            0xb0, 0x00,        // mov al, 0
            0xa2, 0x00, 0x20,  // l: mov [0x2000], al
            0xfe, 0xc0,        // inc al
            0x49,              // dec cx
            0x75, 0xf8,        // jnz l
            0xa0, 0x04, 0x20,  // mov al, [0x2004]
            0xf4,              // hlt
            0xf4,
        ];
        let vm = kvm.create_vm().expect("VM");
        assert!(kvm.check_extension(kvm_ioctls::Cap::CoalescedMmio));
        // The code at 0x1000, in a 4 KiB slot of its own (page-aligned host memory).
        let layout = std::alloc::Layout::from_size_align(0x1000, 0x1000).expect("layout");
        // SAFETY: a non-zero size.
        let host = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!host.is_null());
        // SAFETY: `host` is 0x1000 bytes, freed at the end of the test after the VM is gone.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), host, code.len()) };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0x1000,
            memory_size: 0x1000,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is live memory of this test's for as long as the VM.
        unsafe { vm.set_user_memory_region(region) }.expect("memory");
        vm.register_coalesced_mmio(IoEventAddress::Mmio(ZONE), 4)
            .expect("zone");
        let mut vcpu = vm.create_vcpu(0).expect("vCPU");
        let ring = CoalescedRing::map(&vcpu).expect("ring");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("sregs");
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).expect("regs");

        let dev = Arc::new(Recorder::default());
        let bus = MmioBus::default();
        bus.insert(ZONE..ZONE + 8, dev.clone()).expect("insert");
        let (mut exits, mut read_after) = (0, None);
        loop {
            let exit = vcpu.run().expect("KVM_RUN");
            ring.drain(&bus);
            exits += 1;
            match exit {
                VcpuExit::MmioWrite(addr, data) => bus.write(addr, data),
                VcpuExit::MmioRead(addr, data) => {
                    assert_eq!(addr, ZONE + 4);
                    read_after = Some(dev.0.lock().expect("lock").len());
                    bus.read(addr, data);
                }
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
            assert!(exits < 300, "every write exited");
        }
        assert!(ring.is_empty());
        let seen = dev.0.lock().expect("lock").clone();
        let want: Vec<(u64, Vec<u8>)> = (0..300).map(|i| (0, vec![i as u8])).collect();
        assert_eq!(seen, want);
        assert_eq!(
            read_after,
            Some(300),
            "the read came after every write was played"
        );
        // More writes than the ring holds: at least one exited when it was full.
        assert!(exits >= 3, "{exits} exits");
        drop(ring);
        drop(vcpu);
        drop(vm);
        // SAFETY: allocated above with this layout; the VM that mapped it is gone.
        unsafe { std::alloc::dealloc(host, layout) };
    }
}
