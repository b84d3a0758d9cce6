//! One virtqueue's worth of request processing: take every available request, run their disk
//! operations as one batch, then publish all the used entries together.

use std::sync::Arc;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{AlignedBuf, DiskImage, MAX_IOVECS, SECTOR_SHIFT};
use crate::engine::{Engine, Op, OpKind};
use crate::request::{Action, Limits, Request, Segment, ID_BYTES, STATUS_IOERR, STATUS_OK};

/// Largest request that may go through an O_DIRECT bounce buffer.
pub const MAX_BOUNCE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot add an entry to the used ring")]
    AddUsed(#[source] virtio_queue::Error),
    #[error("cannot read the used event index")]
    NeedsNotification(#[source] virtio_queue::Error),
}

/// A device serial as returned by GET_ID: up to 20 bytes, NUL-padded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Serial(pub [u8; ID_BYTES]);

/// Processes the requests of one virtqueue; owned by that queue's worker thread.
pub struct QueueWorker {
    disk: Arc<DiskImage>,
    serial: Serial,
    engine: Engine,
}

/// The outcome of one request, before it is published.
struct Completion {
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    /// Bytes written into guest buffers other than the status byte, when the request succeeds.
    written: u32,
}

impl QueueWorker {
    pub fn new(disk: Arc<DiskImage>, serial: Serial, engine: Engine) -> QueueWorker {
        QueueWorker {
            disk,
            serial,
            engine,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Handles every request available in `queue` as one batch and adds their used entries.
    /// Returns whether the driver must be notified.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        limits: &Limits,
    ) -> Result<bool, QueueError> {
        let mut requests = Vec::new();
        // A well-behaved driver never has more than the queue size outstanding.
        let max_batch = usize::from(queue.size()).max(1);
        while requests.len() < max_batch {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            requests.push(Request::parse(chain, limits));
        }
        if requests.is_empty() {
            return Ok(false);
        }
        for (head, len) in self.execute(mem, requests) {
            // A head the driver put in its avail ring that is not a descriptor index cannot be
            // returned; the rest of the batch still is (debug only: the guest controls how often).
            if let Err(e) = queue.add_used(mem, head, len) {
                debug!(
                    "returning descriptor chain {head}: {}",
                    QueueError::AddUsed(e)
                );
            }
        }
        queue
            .needs_notification(mem)
            .map_err(QueueError::NeedsNotification)
    }

    /// Executes parsed requests and writes their status bytes. Returns `(head, used length)`
    /// for each request, in order.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, requests: Vec<Request>) -> Vec<(u16, u32)> {
        let mut completions = Vec::with_capacity(requests.len());
        let mut ops: Vec<Op> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();

        for (index, request) in requests.into_iter().enumerate() {
            let mut completion = Completion {
                head: request.head,
                status_addr: request.status,
                status: STATUS_OK,
                written: 0,
            };
            if request.status.is_none() {
                debug!("request {}: no status byte, dropped", request.head);
                completion.status = STATUS_IOERR;
                completions.push(completion);
                continue;
            }
            let stats = &self.disk.stats;
            let count = |c: &std::sync::atomic::AtomicU64, n: u64| {
                c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            };
            match &request.action {
                Action::Fail(_) => {}
                Action::Read { len, .. } => {
                    count(&stats.reads, 1);
                    count(&stats.read_bytes, *len);
                }
                Action::Write { len, .. } => {
                    count(&stats.writes, 1);
                    count(&stats.write_bytes, *len);
                }
                Action::Flush => count(&stats.flushes, 1),
                Action::GetId { .. } => count(&stats.get_ids, 1),
                Action::Discard(_) => count(&stats.discards, 1),
                Action::WriteZeroes(_) => count(&stats.write_zeroes, 1),
            }
            let new_ops: Result<Vec<Op>, ()> = match request.action {
                Action::Fail(e) => {
                    debug!("request {}: {e}", request.head);
                    completion.status = e.status();
                    Ok(Vec::new())
                }
                Action::Read { sector, data, len } => {
                    completion.written = u32::try_from(len).unwrap_or(u32::MAX);
                    self.prepare_rw(mem, false, sector, &data, len)
                }
                Action::Write { sector, data, len } => {
                    self.prepare_rw(mem, true, sector, &data, len)
                }
                Action::Flush => Ok(vec![Op::new(OpKind::Flush)]),
                Action::GetId { data } => {
                    completion.written = ID_BYTES as u32;
                    write_serial(mem, &data, &self.serial).map(|()| Vec::new())
                }
                Action::Discard(ranges) => Ok(ranges
                    .iter()
                    .filter(|r| r.num_sectors > 0)
                    .map(|r| {
                        let (offset, len) = r.byte_range();
                        Op::new(OpKind::Discard { offset, len })
                    })
                    .collect()),
                Action::WriteZeroes(ranges) => self.prepare_write_zeroes(&ranges),
            };
            match new_ops {
                Ok(new_ops) => {
                    owners.extend(std::iter::repeat_n(index, new_ops.len()));
                    ops.extend(new_ops);
                }
                Err(()) => completion.status = STATUS_IOERR,
            }
            completions.push(completion);
        }

        self.engine.run(&self.disk, &mut ops);

        for (op, owner) in ops.iter().zip(owners) {
            let Some(completion) = completions.get_mut(owner) else {
                continue;
            };
            if let Err(e) = &op.result {
                warn!("request {}: disk I/O failed: {e}", completion.head);
                completion.status = STATUS_IOERR;
                continue;
            }
            if let Some(bounce) = &op.bounce {
                if copy_to_guest(mem, bounce, &op.copy_back).is_err() {
                    completion.status = STATUS_IOERR;
                }
            }
        }

        let errors = completions.iter().filter(|c| c.status != STATUS_OK).count();
        self.disk
            .stats
            .errors
            .fetch_add(errors as u64, std::sync::atomic::Ordering::Relaxed);
        completions
            .into_iter()
            .map(|c| (c.head, publish(mem, &c)))
            .collect()
    }

    fn prepare_write_zeroes(&self, ranges: &[crate::request::SectorRange]) -> Result<Vec<Op>, ()> {
        let mut ops = Vec::with_capacity(ranges.len());
        for r in ranges.iter().filter(|r| r.num_sectors > 0) {
            let (offset, len) = r.byte_range();
            if let Some(align) = self.disk.direct_alignment() {
                let a = u64::from(align.offset_align);
                if !offset.is_multiple_of(a) || !len.is_multiple_of(a) {
                    debug!("write-zeroes range not aligned for O_DIRECT");
                    return Err(());
                }
            }
            ops.push(Op::new(OpKind::WriteZeroes {
                offset,
                len,
                unmap: r.unmap,
            }));
        }
        Ok(ops)
    }

    /// Builds the read or write op for guest buffers `data` (`len` bytes at `sector`), with a
    /// bounce buffer where O_DIRECT cannot use the guest buffers directly.
    fn prepare_rw(
        &self,
        mem: &GuestMemoryMmap,
        write: bool,
        sector: u64,
        data: &[Segment],
        len: u64,
    ) -> Result<Vec<Op>, ()> {
        if len == 0 {
            return Ok(Vec::new());
        }
        // `Request::parse` checked sector + len against the capacity, so this cannot overflow.
        let offset = sector << SECTOR_SHIFT;
        let mut iovecs = Vec::with_capacity(data.len());
        for seg in data {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let slice = slice.map_err(|_| ())?;
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        if iovecs.len() > MAX_IOVECS {
            debug!("request has more than {MAX_IOVECS} buffers");
            return Err(());
        }
        let mut bounce = None;
        let mut copy_back = Vec::new();
        if let Some(align) = self.disk.direct_alignment() {
            let offset_align = u64::from(align.offset_align);
            if !offset.is_multiple_of(offset_align) || !len.is_multiple_of(offset_align) {
                debug!("request at {offset:#x}+{len:#x} not aligned for O_DIRECT");
                return Err(());
            }
            let misaligned = iovecs.iter().any(|v| {
                !(v.iov_base as usize).is_multiple_of(align.mem_align as usize)
                    || !v.iov_len.is_multiple_of(align.offset_align as usize)
            });
            if misaligned {
                if len > MAX_BOUNCE_BYTES {
                    debug!("misaligned O_DIRECT request of {len} bytes is too large to bounce");
                    return Err(());
                }
                let size = usize::try_from(len).map_err(|_| ())?;
                let mut buf =
                    AlignedBuf::new(size, (align.mem_align as usize).max(512)).map_err(|_| ())?;
                if write {
                    copy_from_guest(mem, &mut buf, data)?;
                } else {
                    copy_back = data.to_vec();
                }
                iovecs = vec![libc::iovec {
                    iov_base: buf.as_ptr().cast(),
                    iov_len: size,
                }];
                bounce = Some(buf);
            }
        }
        let kind = if write {
            OpKind::Write {
                iovecs,
                offset,
                len,
            }
        } else {
            OpKind::Read {
                iovecs,
                offset,
                len,
            }
        };
        let mut op = Op::new(kind);
        op.bounce = bounce;
        op.copy_back = copy_back;
        Ok(vec![op])
    }
}

/// Writes the status byte and returns the used length to report.
fn publish(mem: &GuestMemoryMmap, c: &Completion) -> u32 {
    let Some(addr) = c.status_addr else {
        return 0;
    };
    if mem.write_obj(c.status, addr).is_err() {
        return 0;
    }
    if c.status == STATUS_OK {
        c.written.saturating_add(1)
    } else {
        1
    }
}

fn write_serial(mem: &GuestMemoryMmap, data: &[Segment], serial: &Serial) -> Result<(), ()> {
    let mut pos = 0usize;
    for seg in data {
        let rest = serial.0.get(pos..).unwrap_or_default();
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(seg.len as usize);
        let src = rest.get(..n).ok_or(())?;
        mem.write_slice(src, seg.addr).map_err(|_| ())?;
        pos += n;
    }
    Ok(())
}

fn copy_from_guest(
    mem: &GuestMemoryMmap,
    buf: &mut AlignedBuf,
    data: &[Segment],
) -> Result<(), ()> {
    let dst = buf.as_mut_slice();
    let mut pos = 0usize;
    for seg in data {
        let end = pos.checked_add(seg.len as usize).ok_or(())?;
        let chunk = dst.get_mut(pos..end).ok_or(())?;
        mem.read_slice(chunk, seg.addr).map_err(|_| ())?;
        pos = end;
    }
    Ok(())
}

fn copy_to_guest(mem: &GuestMemoryMmap, buf: &AlignedBuf, data: &[Segment]) -> Result<(), ()> {
    let src = buf.as_slice();
    let mut pos = 0usize;
    for seg in data {
        let end = pos.checked_add(seg.len as usize).ok_or(())?;
        let chunk = src.get(pos..end).ok_or(())?;
        mem.write_slice(chunk, seg.addr).map_err(|_| ())?;
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskImage, OpenMode};
    use crate::request::{SEGMENT_LEN, STATUS_UNSUPP};
    use std::io::Write;
    use virtio_bindings::bindings::virtio_blk::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::tempfile::TempFile;

    const QSIZE: u16 = 32;
    const SECTORS: u64 = 64;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM_SIZE: usize = 0x100_0000;

    #[derive(Clone, Copy)]
    struct D {
        addr: u64,
        len: u32,
        write: bool,
    }

    fn r(addr: u64, len: u32) -> D {
        D {
            addr,
            len,
            write: false,
        }
    }

    fn w(addr: u64, len: u32) -> D {
        D {
            addr,
            len,
            write: true,
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        image: TempFile,
        worker: QueueWorker,
        limits: Limits,
    }

    fn sector_pattern(sector: u64) -> u8 {
        (sector as u8).wrapping_mul(3).wrapping_add(1)
    }

    impl Harness {
        fn with(read_only: bool, direct: bool, uring: bool) -> Harness {
            let image = TempFile::new().expect("temp file");
            let mut content = Vec::new();
            for s in 0..SECTORS {
                content.extend(std::iter::repeat_n(sector_pattern(s), 512));
            }
            image.as_file().write_all(&content).expect("fill image");
            let disk = DiskImage::open(image.as_path(), OpenMode { read_only, direct })
                .expect("open image");
            let disk = Arc::new(disk);
            let engine = if uring {
                Engine::new(u32::from(QSIZE)).0
            } else {
                Engine::Sync
            };
            let mut serial = Serial::default();
            serial.0[..15].copy_from_slice(b"bulkhead-serial");
            let limits = Limits {
                capacity_sectors: disk.capacity_sectors(),
                seg_max: u32::from(QSIZE) - 2,
                max_discard_sectors: 16,
                max_discard_seg: 4,
                max_write_zeroes_sectors: 16,
                max_write_zeroes_seg: 4,
                read_only,
                discard: true,
                write_zeroes: true,
            };
            Harness {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
                    .expect("guest memory"),
                image,
                worker: QueueWorker::new(disk, serial, engine),
                limits,
            }
        }

        fn new() -> Harness {
            Harness::with(false, false, true)
        }

        fn header(&self, addr: u64, request_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(addr))
                .expect("header");
        }

        fn fill(&self, addr: u64, len: usize, byte: u8) {
            self.mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .expect("fill");
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem
                .read_slice(&mut v, GuestAddress(addr))
                .expect("read");
            v
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).expect("status")
        }

        fn image(&self) -> Vec<u8> {
            std::fs::read(self.image.as_path()).expect("image")
        }

        /// Lays the chains out in the descriptor table, processes the queue and returns the
        /// used ring entries (head, length) and whether a notification is due.
        fn run_chains(&mut self, chains: &[Vec<D>]) -> (Vec<(u32, u32)>, bool) {
            let vq = MockSplitQueue::new(&self.mem, QSIZE);
            let mut descs = Vec::new();
            for chain in chains {
                let start = descs.len();
                for (i, d) in chain.iter().enumerate() {
                    let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
                    if i + 1 < chain.len() {
                        flags |= VRING_DESC_F_NEXT;
                    }
                    descs.push(RawDescriptor::from(SplitDescriptor::new(
                        d.addr,
                        d.len,
                        flags as u16,
                        (start + i + 1) as u16,
                    )));
                }
            }
            vq.add_desc_chains(&descs, 0).expect("add chains");
            let mut queue: Queue = vq.create_queue().expect("queue");
            let notify = self
                .worker
                .process_queue(&mut queue, &self.mem, &self.limits)
                .expect("process");
            let used = vq.used().idx().load();
            let entries = (0..used)
                .map(|i| {
                    let e = vq
                        .used()
                        .ring()
                        .ref_at(usize::from(i))
                        .expect("used")
                        .load();
                    (e.id(), e.len())
                })
                .collect();
            (entries, notify)
        }

        /// Runs one chain; returns its used length.
        fn run(&mut self, chain: &[D]) -> u32 {
            self.fill(STATUS, 1, 0xff);
            let (used, _) = self.run_chains(&[chain.to_vec()]);
            assert_eq!(used.len(), 1);
            assert_eq!(used[0].0, 0);
            used[0].1
        }
    }

    fn engines() -> [bool; 2] {
        [false, true]
    }

    #[test]
    fn test_read_two_sectors_data_and_status_ok() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_IN, 3);
            h.fill(DATA, 1024, 0);
            let used = h.run(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
            assert_eq!(used, 1025);
            assert_eq!(h.status(), STATUS_OK);
            let data = h.read(DATA, 1024);
            assert!(data[..512].iter().all(|&b| b == sector_pattern(3)));
            assert!(data[512..].iter().all(|&b| b == sector_pattern(4)));
        }
    }

    #[test]
    fn test_write_scattered_buffers_image_updated() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_OUT, 10);
            h.fill(DATA, 512, 0x11);
            h.fill(DATA + 0x1000, 1024, 0x22);
            let used = h.run(&[
                r(HDR, 16),
                r(DATA, 512),
                r(DATA + 0x1000, 1024),
                w(STATUS, 1),
            ]);
            assert_eq!(used, 1);
            assert_eq!(h.status(), STATUS_OK);
            let img = h.image();
            assert!(img[10 * 512..11 * 512].iter().all(|&b| b == 0x11));
            assert!(img[11 * 512..13 * 512].iter().all(|&b| b == 0x22));
            assert!(img[13 * 512..14 * 512]
                .iter()
                .all(|&b| b == sector_pattern(13)));
        }
    }

    #[test]
    fn test_flush_no_data_ok() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
            assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_OK);
        }
    }

    #[test]
    fn test_flush_with_data_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_get_id_serial_padded_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        h.fill(DATA, 20, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), 21);
        assert_eq!(h.status(), STATUS_OK);
        let id = h.read(DATA, 20);
        assert_eq!(&id[..15], b"bulkhead-serial");
        assert!(id[15..].iter().all(|&b| b == 0));
    }

    #[test]
    fn test_get_id_oversize_buffer_writes_only_twenty_bytes() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        h.fill(DATA, 4096, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]), 21);
        assert_eq!(h.status(), STATUS_OK);
        let buf = h.read(DATA, 4096);
        assert_eq!(&buf[..15], b"bulkhead-serial");
        assert!(buf[20..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn test_get_id_short_buffer_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        h.fill(DATA, 64, 0xee);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 10), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert!(h.read(DATA, 64).iter().all(|&b| b == 0xee));
    }

    #[test]
    fn test_unknown_type_unsupp() {
        let mut h = Harness::new();
        for t in [2, VIRTIO_BLK_T_SECURE_ERASE, 10, 0xdead_beef] {
            h.header(HDR, t, 0);
            assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_UNSUPP, "type {t}");
        }
    }

    #[test]
    fn test_read_with_readable_data_wrong_direction_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_write_with_writable_data_wrong_direction_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA, 512, 0x55);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
    }

    #[test]
    fn test_short_header_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 8), w(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_header_split_across_descriptors_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 5);
        // Move the second half of the header elsewhere.
        let tail = h.read(HDR + 8, 8);
        h.mem
            .write_slice(&tail, GuestAddress(HDR + 0x100))
            .expect("tail");
        assert_eq!(
            h.run(&[r(HDR, 8), r(HDR + 0x100, 8), w(DATA, 512), w(STATUS, 1)]),
            513
        );
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(5)));
    }

    #[test]
    fn test_status_in_data_descriptor_any_layout_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 2);
        // One writable descriptor holding the data and, as its last byte, the status.
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 513)]), 513);
        assert_eq!(h.read(DATA + 512, 1)[0], STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(2)));
    }

    #[test]
    fn test_missing_status_used_len_zero() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA, 512, 0x77);
        // The last descriptor is readable: there is nowhere to put a status.
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512)]), 0);
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
        // A header alone.
        assert_eq!(h.run(&[r(HDR, 16)]), 0);
        // A zero-length writable "status".
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 0)]), 0);
        assert_eq!(h.status(), 0xff);
    }

    #[test]
    fn test_readable_after_writable_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            h.run(&[r(HDR, 16), w(DATA, 512), r(DATA + 0x1000, 16), w(STATUS, 1)]),
            1
        );
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_out_of_range_sector_ioerr() {
        let mut h = Harness::new();
        for (t, sector, len) in [
            (VIRTIO_BLK_T_IN, SECTORS, 512),
            (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
            (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_OUT, u64::MAX - 1, 1024),
            (VIRTIO_BLK_T_IN, 1 << 55, 512),
        ] {
            h.header(HDR, t, sector);
            h.fill(DATA, 1024, 0x99);
            let data = if t == VIRTIO_BLK_T_IN {
                w(DATA, len)
            } else {
                r(DATA, len)
            };
            assert_eq!(h.run(&[r(HDR, 16), data, w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_IOERR, "type {t} sector {sector}");
        }
        let img = h.image();
        assert!(img[(SECTORS as usize - 1) * 512..]
            .iter()
            .all(|&b| b == sector_pattern(SECTORS - 1)));
    }

    #[test]
    fn test_last_sector_read_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, SECTORS - 1);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_unaligned_length_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 500), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 513), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
    }

    #[test]
    fn test_zero_length_read_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_buffer_outside_guest_memory_ioerr() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        let beyond = MEM_SIZE as u64 - 256;
        assert_eq!(h.run(&[r(HDR, 16), w(beyond, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert_eq!(h.run(&[r(HDR, 16), w(u64::MAX - 10, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        // Header outside memory.
        assert_eq!(h.run(&[r(u64::MAX - 4, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        // Status outside memory: nothing can be reported.
        assert_eq!(h.run(&[r(HDR, 16), w(MEM_SIZE as u64, 1)]), 0);
    }

    #[test]
    fn test_too_many_descriptors_ioerr() {
        let mut h = Harness::new();
        h.limits.seg_max = 4;
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        let mut chain = vec![r(HDR, 16)];
        // seg_max + 1 data descriptors: refused, but the status is still reported.
        for i in 0..5 {
            chain.push(w(DATA + i * 512, 512));
        }
        chain.push(w(STATUS, 1));
        assert_eq!(h.run(&chain), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        chain.remove(1);
        assert_eq!(h.run(&chain), 4 * 512 + 1);
        assert_eq!(h.status(), STATUS_OK);
    }

    #[test]
    fn test_read_only_write_ioerr_image_unchanged() {
        let mut h = Harness::with(true, false, true);
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA, 512, 0x42);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
        // Reads still work.
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
        assert_eq!(h.status(), STATUS_OK);
    }

    fn segments(h: &Harness, addr: u64, segs: &[(u64, u32, u32)]) -> u32 {
        for (i, (sector, num, flags)) in segs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num.to_le_bytes());
            raw[12..].copy_from_slice(&flags.to_le_bytes());
            h.mem
                .write_slice(&raw, GuestAddress(addr + i as u64 * SEGMENT_LEN))
                .expect("segment");
        }
        (segs.len() as u64 * SEGMENT_LEN) as u32
    }

    #[test]
    fn test_discard_and_write_zeroes_ranges_read_zero() {
        for uring in engines() {
            let mut h = Harness::with(false, false, uring);
            h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
            let len = segments(&h, DATA, &[(8, 8, 0), (32, 1, 0)]);
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_OK);

            h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            let len = segments(
                &h,
                DATA,
                &[(1, 2, 0), (40, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
            );
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_OK);

            let img = h.image();
            for s in 0..SECTORS {
                let zeroed =
                    (8..16).contains(&s) || s == 32 || (1..3).contains(&s) || (40..43).contains(&s);
                let expected = if zeroed { 0 } else { sector_pattern(s) };
                let at = s as usize * 512;
                assert!(
                    img[at..at + 512].iter().all(|&b| b == expected),
                    "sector {s} (uring {uring})"
                );
            }
        }
    }

    #[test]
    fn test_discard_bad_segment_lists_rejected() {
        let mut h = Harness::new();
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        type Case<'a> = (u32, &'a [(u64, u32, u32)], u32, u8);
        let cases: &[Case] = &[
            // unmap is not allowed on discard
            (VIRTIO_BLK_T_DISCARD, &[(0, 1, unmap)], 0, STATUS_UNSUPP),
            // unknown flag
            (VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)], 0, STATUS_UNSUPP),
            // beyond the capacity
            (
                VIRTIO_BLK_T_DISCARD,
                &[(SECTORS - 1, 2, 0)],
                0,
                STATUS_IOERR,
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(u64::MAX, 1, 0)],
                0,
                STATUS_IOERR,
            ),
            // more sectors than max_*_sectors
            (VIRTIO_BLK_T_DISCARD, &[(0, 17, 0)], 0, STATUS_IOERR),
            // more segments than max_*_seg
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(0, 1, 0), (1, 1, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0)],
                0,
                STATUS_IOERR,
            ),
            // a list that is not a whole number of segments
            (VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)], 1, STATUS_IOERR),
        ];
        for (i, (t, segs, extra, status)) in cases.iter().enumerate() {
            h.header(HDR, *t, 0);
            let len = segments(&h, DATA, segs) + extra;
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), *status, "case {i}");
        }
        // No segment at all.
        h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        // Segments in a writable buffer.
        let len = segments(&h, DATA, &[(0, 1, 0)]);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, len), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_IOERR);
        // Nothing was zeroed.
        let img = h.image();
        for s in 0..SECTORS {
            let at = s as usize * 512;
            assert!(img[at..at + 512].iter().all(|&b| b == sector_pattern(s)));
        }
    }

    #[test]
    fn test_discard_not_negotiated_unsupp() {
        let mut h = Harness::new();
        h.limits.discard = false;
        h.limits.write_zeroes = false;
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            h.header(HDR, t, 0);
            let len = segments(&h, DATA, &[(0, 1, 0)]);
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_UNSUPP);
        }
    }

    #[test]
    fn test_read_only_discard_and_write_zeroes_ioerr() {
        let mut h = Harness::with(true, false, true);
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            h.header(HDR, t, 0);
            let len = segments(&h, DATA, &[(0, 1, 0)]);
            assert_eq!(h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]), 1);
            assert_eq!(h.status(), STATUS_IOERR);
        }
        assert!(h.image()[..512].iter().all(|&b| b == sector_pattern(0)));
    }

    #[test]
    fn test_batch_of_requests_all_completed_once() {
        let mut h = Harness::new();
        let mut chains = Vec::new();
        for i in 0..8u64 {
            let hdr = HDR + i * 0x100;
            h.header(hdr, VIRTIO_BLK_T_IN, i);
            chains.push(vec![
                r(hdr, 16),
                w(DATA + i * 0x1000, 512),
                w(STATUS + i, 1),
            ]);
        }
        let (used, notify) = h.run_chains(&chains);
        assert!(notify);
        assert_eq!(used.len(), 8);
        for (i, (head, len)) in used.iter().enumerate() {
            assert_eq!(*head, 3 * i as u32);
            assert_eq!(*len, 513);
            let i = i as u64;
            assert_eq!(h.read(STATUS + i, 1)[0], STATUS_OK);
            assert!(h
                .read(DATA + i * 0x1000, 512)
                .iter()
                .all(|&b| b == sector_pattern(i)));
        }
    }

    #[test]
    fn test_indirect_chain_read_ok() {
        let mut h = Harness::new();
        h.header(HDR, VIRTIO_BLK_T_IN, 7);
        let table = 0x40_0000u64;
        let descs = [
            SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                2,
            ),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            h.mem
                .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
                .expect("indirect descriptor");
        }
        let vq = MockSplitQueue::new(&h.mem, QSIZE);
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        vq.add_desc_chains(&[head], 0).expect("chain");
        let mut queue: Queue = vq.create_queue().expect("queue");
        h.worker
            .process_queue(&mut queue, &h.mem, &h.limits)
            .expect("process");
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).expect("used").load().len(), 513);
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(7)));
    }

    #[test]
    fn test_direct_misaligned_buffers_bounced() {
        let mut h = Harness::with(false, true, true);
        // Odd guest addresses cannot go to O_DIRECT as they are.
        h.header(HDR, VIRTIO_BLK_T_OUT, 0);
        h.fill(DATA + 1, 4096, 0x5a);
        assert_eq!(h.run(&[r(HDR, 16), r(DATA + 1, 4096), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), STATUS_OK);
        h.header(HDR, VIRTIO_BLK_T_IN, 0);
        h.fill(DATA + 0x10001, 4096, 0);
        assert_eq!(
            h.run(&[r(HDR, 16), w(DATA + 0x10001, 4096), w(STATUS, 1)]),
            4097
        );
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA + 0x10001, 4096).iter().all(|&b| b == 0x5a));
        // Aligned buffers go straight through.
        h.header(HDR, VIRTIO_BLK_T_IN, 8);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]), 4097);
        assert_eq!(h.status(), STATUS_OK);
        assert!(h.read(DATA, 512).iter().all(|&b| b == sector_pattern(8)));
    }
}
