//! The first boot's kernel and initramfs, copied into guest RAM while the rest of the VM is
//! made: [`Preload::start`] runs as soon as guest RAM exists, so the copy (page cache to
//! freshly faulted guest pages, the largest single step of a start) overlaps the device
//! processes' start and the KVM VM's creation. `Vm::boot` waits for it before it writes the
//! device tree and sets the boot registers. Later boots (a guest reset) copy on the main
//! thread.
//!
//! One thread: splitting the copy between two was measured to gain nothing (docs/benchmarks.md,
//! 2026-12-03: in the nested host the two copies took 1.5x the CPU of one in the same wall
//! time; on the x86 build machine 27 MB took 6-9 ms either way).

use std::fs::File;
use std::thread::JoinHandle;

use bulkhead_firmware::image::{BootLayout, KernelImage};
use vm_memory::GuestMemoryMmap;

use crate::seccomp::{self, ThreadKind};
use crate::vm::VmError;

/// The copy under way.
#[derive(Debug)]
pub struct Preload {
    thread: JoinHandle<Result<(), VmError>>,
}

impl Preload {
    /// Starts copying the kernel (`image`, in `kernel`) and the initramfs to where `layout`
    /// puts them, on a thread `load` that reads duplicates of their descriptors. It runs
    /// under the main thread's seccomp filter (it does what the main thread does on a reboot),
    /// installed first thing: it starts before the main thread's own filter is in place.
    pub fn start(
        memory: &GuestMemoryMmap,
        layout: &BootLayout,
        kernel: &File,
        image: &KernelImage,
        initramfs: Option<&File>,
    ) -> Result<Preload, VmError> {
        let spawn_error = |e| VmError::SpawnThread("load".into(), e);
        let memory = memory.clone();
        let (layout, image) = (*layout, *image);
        let kernel = kernel.try_clone().map_err(spawn_error)?;
        let initramfs = initramfs
            .map(File::try_clone)
            .transpose()
            .map_err(spawn_error)?;
        let thread = bulkhead_sandbox::thread_builder()
            .name("load".into())
            .spawn(move || {
                seccomp::apply(ThreadKind::Main)?;
                Ok(layout.load_files(&memory, &kernel, &image, initramfs.as_ref())?)
            })
            .map_err(spawn_error)?;
        Ok(Preload { thread })
    }

    /// Waits for the copy; its error, if any.
    pub fn finish(self) -> Result<(), VmError> {
        self.thread
            .join()
            .unwrap_or(Err(VmError::LoadThreadPanicked))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use bulkhead_firmware::image::{GuestArch, LoadError};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn file_of(bytes: &[u8]) -> File {
        let mut f = File::from(crate::virtio::fake_backend::memfd(0));
        f.write_all(bytes).expect("write");
        f
    }

    #[test]
    fn test_preload_copies_both_files_and_reports_a_short_one() {
        let ram = 16u64 << 20;
        let start = bulkhead_firmware::layout::RAM_START;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(start), ram as usize)])
            .expect("guest memory");
        let image = KernelImage {
            arch: GuestArch::Aarch64,
            load_offset: 0,
            footprint: 4 << 20,
            file_size: 3 << 20,
        };
        let layout = BootLayout::new(ram, &image, Some(5000)).expect("fits");
        let kernel_bytes: Vec<u8> = (0..image.file_size).map(|i| (i % 253) as u8).collect();
        let (kernel, initramfs) = (file_of(&kernel_bytes), file_of(&[7u8; 5000]));
        Preload::start(&memory, &layout, &kernel, &image, Some(&initramfs))
            .expect("started")
            .finish()
            .expect("loaded");
        let mut got = vec![0u8; kernel_bytes.len()];
        memory
            .read_slice(&mut got, GuestAddress(layout.kernel_addr))
            .expect("read");
        assert!(got == kernel_bytes);
        let mut got = [0u8; 5000];
        let (addr, _) = layout.initramfs.expect("placed");
        memory
            .read_slice(&mut got, GuestAddress(addr))
            .expect("read");
        assert_eq!(got, [7u8; 5000]);
        // A kernel file cut short after the configuration was checked: the boot fails with
        // the loader's error, nothing hangs.
        let short = file_of(&kernel_bytes[..1000]);
        let err = Preload::start(&memory, &layout, &short, &image, None)
            .expect("started")
            .finish()
            .expect_err("a short kernel");
        assert!(
            matches!(err, VmError::Load(LoadError::Kernel(..))),
            "{err:?}"
        );
    }
}
