//! The ceiling: the same requests as plain io_uring reads and writes on the image file, no
//! virtio and no second process.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use io_uring::{opcode, types, IoUring};

pub struct UringFile {
    ring: IoUring,
    file: File,
    /// One buffer per slot; never reallocated while a request on it may be in flight.
    buffers: Vec<Box<[u8]>>,
    /// Expected result of each slot's request.
    expect: Vec<Option<u32>>,
}

impl UringFile {
    /// With `nonblock`, the file is opened O_NONBLOCK, which makes io_uring try each read
    /// inline first (a read that would block still goes to an io-wq worker); without it, a
    /// file system that does not declare FMODE_NOWAIT (tmpfs) has every request handed to a
    /// worker thread.
    /// `worker_cpu`: where io_uring's io-wq workers run.
    pub fn open(
        path: &Path,
        slots: usize,
        max_len: u32,
        nonblock: bool,
        worker_cpu: Option<usize>,
    ) -> Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(if nonblock { libc::O_NONBLOCK } else { 0 })
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        let entries = (slots as u32).next_power_of_two().max(8);
        let ring = IoUring::new(entries).context("io_uring_setup")?;
        if let Some(cpu) = worker_cpu {
            ring.submitter()
                .register_iowq_aff(&crate::pin::cpu_set(cpu))
                .context("IORING_REGISTER_IOWQ_AFF")?;
        }
        Ok(UringFile {
            file,
            ring,
            buffers: (0..slots)
                .map(|_| vec![0u8; max_len as usize].into_boxed_slice())
                .collect(),
            expect: vec![None; slots],
        })
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        // The kernel may still write into a buffer of a request in flight (after an error
        // ended a run early): wait for those before the buffers go.
        let mut left = self.expect.iter().filter(|e| e.is_some()).count();
        while left > 0 && self.ring.submit_and_wait(1).is_ok() {
            left -= self.ring.completion().count().min(left);
        }
    }
}

impl crate::workload::Engine for UringFile {
    fn slots(&self) -> usize {
        self.buffers.len()
    }

    fn queue(&mut self, slot: usize, op: crate::workload::Op, offset: u64, len: u32) -> Result<()> {
        use crate::workload::Op;
        ensure!(self.expect[slot].is_none(), "slot {slot} is busy");
        let buf = &mut self.buffers[slot];
        ensure!(len as usize <= buf.len(), "request of {len} bytes > buffer");
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match op {
            Op::Read => opcode::Read::new(fd, buf.as_mut_ptr(), len)
                .offset(offset)
                .build(),
            Op::Write => opcode::Write::new(fd, buf.as_ptr(), len)
                .offset(offset)
                .build(),
            Op::Flush => opcode::Fsync::new(fd).build(),
        }
        .user_data(slot as u64);
        // SAFETY: the buffer is owned by `self.buffers`, which is never reallocated and is
        // dropped only after `Drop` waited for every request in flight; `expect` keeps the
        // slot from being reused before its completion is reaped.
        unsafe { self.ring.submission().push(&entry) }.context("submission queue full")?;
        self.expect[slot] = Some(if op == Op::Flush { 0 } else { len });
        Ok(())
    }

    fn kick(&mut self) -> Result<()> {
        self.ring.submit().context("io_uring_enter")?;
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<usize>) -> Result<()> {
        loop {
            let before = done.len();
            for cqe in self.ring.completion() {
                let slot = cqe.user_data() as usize;
                let Some(want) = self.expect.get_mut(slot).and_then(Option::take) else {
                    bail!("completion for idle slot {slot}");
                };
                if cqe.result() < 0 || cqe.result() as u32 != want {
                    bail!(
                        "request on slot {slot}: result {} ({}), want {want}",
                        cqe.result(),
                        std::io::Error::from_raw_os_error(-cqe.result().min(0))
                    );
                }
                done.push(slot);
            }
            if done.len() > before {
                return Ok(());
            }
            self.ring.submit_and_wait(1).context("io_uring_enter")?;
        }
    }

    fn fill_buffer(&mut self, slot: usize, data: &[u8]) -> Result<()> {
        ensure!(self.expect[slot].is_none(), "slot {slot} is busy");
        self.buffers[slot][..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_buffer(&self, slot: usize, data: &mut [u8]) -> Result<()> {
        ensure!(self.expect[slot].is_none(), "slot {slot} is busy");
        data.copy_from_slice(&self.buffers[slot][..data.len()]);
        Ok(())
    }
}
