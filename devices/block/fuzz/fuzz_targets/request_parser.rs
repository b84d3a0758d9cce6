//! Arbitrary descriptor chains in guest memory, run through the virtio-blk request parser and
//! executor against a small temporary image. The process must never panic.
//!
//! Input layout: byte 0 chooses options, byte 1 the available index; then 16 descriptors of
//! 16 bytes (address, length, flags, next), 16 available ring entries of 2 bytes, and the rest
//! is copied into guest memory at `PAYLOAD` (headers, data, segment lists, indirect tables).
//!
//! Options (bits of byte 0): 1 event index, 2 read-only, 4 discard, 8 write-zeroes, 16 io_uring
//! (else synchronous), 32 a small size_max, 64 small batch and bounce budgets (so batches are
//! cut and requests wait for the next one), 128 an O_DIRECT image (bounce buffers).
//!
//! The queue is drained the way the backend does it, batch after batch. Checked: no chain is
//! answered twice or beyond what the driver made available, every batch makes progress, and
//! unless the queue was marked broken nothing is left in the ring.

#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use bulkhead_block::engine::Engine;
use bulkhead_block::queue::{Budgets, QueueWorker, SIZE_MAX};
use bulkhead_block::request::Limits;
use bulkhead_block::{DiskImage, OpenMode, Serial};
use bulkhead_device_runtime::testing::fuzz_queue::{lay_out, take, QSIZE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 0x1_0000;
const SECTORS: u64 = 64;

struct Fixture {
    _image: TempFile,
    disk_sectors: u64,
    sync_worker: Mutex<QueueWorker>,
    uring_worker: Mutex<QueueWorker>,
    /// Same image opened with O_DIRECT (misaligned guest buffers are bounced), if it can be.
    direct_worker: Option<Mutex<QueueWorker>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let image = TempFile::new().expect("temp image");
        image
            .as_file()
            .write_all(&vec![0x5a; (SECTORS * 512) as usize])
            .expect("fill image");
        let disk = Arc::new(DiskImage::open(image.as_path(), OpenMode::default()).expect("open"));
        let mut serial = Serial::default();
        serial.0[..4].copy_from_slice(b"fuzz");
        let direct = DiskImage::open(
            image.as_path(),
            OpenMode {
                read_only: false,
                direct: true,
            },
        )
        .ok()
        .map(|d| {
            Mutex::new(QueueWorker::new(
                Arc::new(d),
                serial,
                Engine::new(u32::from(QSIZE)).0,
            ))
        });
        Fixture {
            direct_worker: direct,
            disk_sectors: disk.capacity_sectors(),
            sync_worker: Mutex::new(QueueWorker::new(disk.clone(), serial, Engine::Sync)),
            uring_worker: Mutex::new(QueueWorker::new(
                disk,
                serial,
                Engine::new(u32::from(QSIZE)).0,
            )),
            _image: image,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let fx = fixture();
    let mut data = input;
    let [options, avail_idx] = take::<2>(&mut data);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");

    // Descriptors with addresses and lengths mostly inside guest memory, sometimes raw.
    let (mut queue, avail_idx, _) = lay_out(&mem, MEM_SIZE + 0x200, 0x2400, avail_idx, &mut data);
    queue.set_event_idx(options & 1 != 0);

    let limits = Limits {
        capacity_sectors: fx.disk_sectors,
        seg_max: u32::from(QSIZE) - 2,
        size_max: if options & 32 != 0 { 0x800 } else { SIZE_MAX },
        max_discard_sectors: 32,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 32,
        max_write_zeroes_seg: 4,
        read_only: options & 2 != 0,
        discard: options & 4 != 0,
        write_zeroes: options & 8 != 0,
    };
    let worker = match (options & 128 != 0, &fx.direct_worker) {
        (true, Some(direct)) => direct,
        _ if options & 16 != 0 => &fx.uring_worker,
        _ => &fx.sync_worker,
    };
    let mut worker = worker.lock().expect("worker lock");
    // Each input is a freshly set-up queue: forget that an earlier one was broken.
    worker.reset();
    worker.set_budgets(if options & 64 != 0 {
        Budgets {
            bounce: 0x1000,
            batch_bytes: 0x800,
        }
    } else {
        Budgets::default()
    });

    // Batch after batch, as the backend does. Every batch takes at least one request (the
    // first request of a batch is never deferred), so this ends.
    let mut rounds = 0u32;
    loop {
        let batch = worker.process_queue(&mut queue, &mem, &limits);
        rounds += 1;
        assert!(rounds <= u32::from(QSIZE) + 2, "a batch made no progress");
        if !batch.more {
            break;
        }
    }

    // No chain is answered twice, and none beyond what the driver made available. The device's
    // own counters are compared: the used ring in memory may have been overwritten by the
    // requests themselves (a guest may point its buffers at its own rings), which is the
    // guest's business. Chains whose head is not a descriptor index cannot be answered.
    assert!(queue.next_used() <= queue.next_avail());
    assert!(queue.next_avail() <= avail_idx);
    // Nothing is lost: a queue not marked broken was drained.
    if worker.broken().is_none() {
        assert_eq!(queue.next_avail(), avail_idx);
    }
});
