//! The first boot's kernel and initramfs, copied into guest RAM while the rest of the VM is
//! made: [`Preload::start`] runs as soon as guest RAM exists, so the copy overlaps the device
//! processes' start and the KVM VM's creation, and it is split between up to
//! [`MAX_LOADERS`] threads (the copy, page cache to freshly faulted guest pages, is the
//! largest single step of a start). `Vm::boot` waits for it before it writes the device tree
//! and sets the boot registers. Later boots (a guest reset) copy on the main thread.

use std::fs::File;
use std::thread::JoinHandle;

use bulkhead_firmware::image::{load_pieces, BootLayout, KernelImage, LoadError};
use vm_memory::GuestMemoryMmap;

use crate::seccomp::{self, ThreadKind};
use crate::vm::VmError;

/// At most this many threads copy at once: the copy is bound by memory bandwidth, which two
/// copies mostly use up.
pub const MAX_LOADERS: usize = 2;

/// The copy under way.
#[derive(Debug)]
pub struct Preload {
    threads: Vec<JoinHandle<Result<(), LoadError>>>,
}

impl Preload {
    /// Starts copying the kernel (`image`, in `kernel`) and the initramfs to where `layout`
    /// puts them, on one thread per available CPU up to [`MAX_LOADERS`]. Each thread runs
    /// under the main thread's seccomp filter (it does what the main thread does on a reboot),
    /// installed first thing: they start before the main thread's own filter is in place.
    pub fn start(
        memory: &GuestMemoryMmap,
        layout: &BootLayout,
        kernel: &File,
        image: &KernelImage,
        initramfs: Option<&File>,
    ) -> Result<Preload, VmError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = Vec::new();
        for (i, pieces) in layout
            .pieces(image, cpus.min(MAX_LOADERS))
            .into_iter()
            .enumerate()
        {
            let name = format!("load{i}");
            let spawn_error = |e| VmError::SpawnThread(name.clone(), e);
            let memory = memory.clone();
            let kernel = kernel.try_clone().map_err(spawn_error)?;
            let initramfs = initramfs
                .map(File::try_clone)
                .transpose()
                .map_err(spawn_error)?;
            let thread = bulkhead_sandbox::thread_builder()
                .name(name.clone())
                .spawn(move || {
                    if !seccomp::apply_or_end_thread(ThreadKind::Main) {
                        return Err(LoadError::Confine);
                    }
                    load_pieces(&memory, &kernel, initramfs.as_ref(), &pieces)
                })
                .map_err(spawn_error)?;
            threads.push(thread);
        }
        Ok(Preload { threads })
    }

    /// Waits for every thread; the first error, if any.
    pub fn finish(self) -> Result<(), VmError> {
        let mut result = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or(Err(LoadError::LoaderPanicked))
                .map_err(VmError::Load);
            result = result.and(r);
        }
        result
    }
}
