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

use bulkhead_firmware::image::{BootLayout, KernelImage, LoadError};
use vm_memory::GuestMemoryMmap;

use crate::seccomp::{self, ThreadKind};
use crate::vm::VmError;

/// The copy under way.
#[derive(Debug)]
pub struct Preload {
    thread: JoinHandle<Result<(), LoadError>>,
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
                if !seccomp::apply_or_end_thread(ThreadKind::Main) {
                    return Err(LoadError::Confine);
                }
                layout.load_files(&memory, &kernel, &image, initramfs.as_ref())
            })
            .map_err(spawn_error)?;
        Ok(Preload { thread })
    }

    /// Waits for the copy; its error, if any.
    pub fn finish(self) -> Result<(), VmError> {
        self.thread
            .join()
            .unwrap_or(Err(LoadError::LoaderPanicked))
            .map_err(VmError::Load)
    }
}
