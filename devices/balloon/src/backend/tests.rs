//! The backend: features, configuration space, control commands, and the queues end to end
//! through `handle_event` on a memfd-backed guest (as a frontend's memory table gives it),
//! including the stats timer giving the guest its buffer back.

use super::*;
use crate::BalloonControl;
use bulkhead_device_runtime::testing::memfd;
use bulkhead_device_runtime::ControlHandler;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress};

const MIB: u64 = 1 << 20;
const RAM: u64 = 32 * MIB;

fn params() -> BalloonParams {
    BalloonParams {
        size: 0,
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_interval_s: 1,
        queue_size: 256,
    }
}

struct Setup {
    mem: GuestMemoryMmap,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    file: Arc<File>,
}

fn setup() -> Setup {
    let file = Arc::new(memfd(RAM));
    file.write_all_at(&vec![1u8; RAM as usize], 0)
        .expect("touch");
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        RAM as usize,
        Some(FileOffset::from_arc(file.clone(), 0)),
    )])
    .expect("memory");
    Setup {
        atomic: GuestMemoryAtomic::new(mem.clone()),
        mem,
        file,
    }
}

fn allocated(file: &File) -> u64 {
    file.metadata().expect("metadata").blocks() * 512
}

fn vrings_at<'a>(
    mem: &'a GuestMemoryMmap,
    atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    bases: &[u64],
) -> (Vec<MockSplitQueue<'a, GuestMemoryMmap>>, Vec<VringRwLock>) {
    let vqs: Vec<_> = bases
        .iter()
        .map(|b| MockSplitQueue::create(mem, GuestAddress(*b), 256))
        .collect();
    let vrings = vqs
        .iter()
        .map(|vq| {
            let v = VringRwLock::new(atomic.clone(), 256).expect("vring");
            v.set_queue_size(64);
            v.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .expect("addresses");
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        })
        .collect();
    (vqs, vrings)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_features_follow_params() {
    let b = BalloonBackend::new(params()).expect("backend");
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        F_STATS_VQ,
        F_DEFLATE_ON_OOM,
        F_REPORTING,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(b.num_queues(), 4);
    assert_eq!(b.queues_per_thread(), vec![0b1111]);
    let plain = BalloonBackend::new(BalloonParams {
        deflate_on_oom: false,
        free_page_reporting: false,
        stats_interval_s: 0,
        ..params()
    })
    .expect("backend");
    let f = plain.features();
    for bit in [F_STATS_VQ, F_DEFLATE_ON_OOM, F_REPORTING] {
        assert_eq!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(plain.num_queues(), 2);
}

#[test]
fn test_config_space_target_and_actual() {
    let b = BalloonBackend::new(BalloonParams {
        size: 64 * MIB,
        ..params()
    })
    .expect("backend");
    assert_eq!(b.get_config(0, 4), (16384u32).to_le_bytes().to_vec());
    b.set_config(4, &100u32.to_le_bytes()).expect("actual");
    assert_eq!(b.actual_pages(), 100);
    assert_eq!(b.get_config(4, 4), 100u32.to_le_bytes().to_vec());
    // num_pages is not the driver's to write.
    b.set_config(0, &7u32.to_le_bytes()).expect("ignored");
    assert_eq!(b.target_pages(), 16384);
    assert_eq!(b.get_config(0, 16).len(), 16);
    assert!(
        b.get_config(0xfff, 2).is_empty(),
        "beyond the config size limit"
    );
}

#[test]
fn test_control_resize_statistics_and_bad_input() {
    let s = setup();
    let b = BalloonBackend::new(params()).expect("backend");
    let control = BalloonControl { backend: b.clone() };
    // Before the memory table, any target is taken.
    assert_eq!(
        control.command("resize", &(1u64 << 40).to_string()),
        Some(Ok(format!("target_pages={}", (1u64 << 40) / 4096)))
    );
    b.update_memory(s.atomic.clone()).expect("memory");
    assert_eq!(
        control.command("resize", &(16 * MIB).to_string()),
        Some(Ok("target_pages=4096".into()))
    );
    assert_eq!(b.get_config(0, 4), 4096u32.to_le_bytes().to_vec());
    let e = control.command("resize", &(RAM + 4096).to_string());
    assert!(
        matches!(&e, Some(Err(m)) if m.contains("larger than guest RAM")),
        "{e:?}"
    );
    assert!(matches!(control.command("resize", "lots"), Some(Err(_))));
    assert_eq!(b.target_pages(), 4096, "a refused target changes nothing");
    let stats = control
        .command("statistics", "")
        .expect("known")
        .expect("ok");
    assert_eq!(
        stats,
        "target_pages=4096 actual_pages=0 target_mib=16 actual_mib=0"
    );
    assert!(control.command("nope", "").is_none());
    b.stop_timer();
}

#[test]
fn test_queues_end_to_end_inflate_report_stats() {
    let s = setup();
    let b = BalloonBackend::new(params()).expect("backend");
    b.acked_features(b.features());
    b.update_memory(s.atomic.clone()).expect("memory");
    // inflate, deflate, stats, reporting rings at 0, 1, 2, 3 MiB.
    let (vqs, vrings) = vrings_at(&s.mem, &s.atomic, &[0, MIB, 2 * MIB, 3 * MIB]);
    let before = allocated(&s.file);

    // Inflate 16..20 MiB (1024 pages) in 4 chains of 256.
    for i in 0..4u16 {
        let pfns: Vec<u8> = (0..256u32)
            .flat_map(|p| ((16 * MIB / 4096) as u32 + u32::from(i) * 256 + p).to_le_bytes())
            .collect();
        let at = 8 * MIB + u64::from(i) * 0x1000;
        s.mem.write_slice(&pfns, GuestAddress(at)).expect("pfns");
        vqs[0]
            .add_desc_chains(&[RawDescriptor::from(Descriptor::new(at, 1024, 0, 0))], i)
            .expect("chain");
    }
    b.handle_event(0, EventSet::IN, &vrings, 0)
        .expect("inflate");
    assert_eq!(vqs[0].used().idx().load(), 4);
    assert_eq!(before - allocated(&s.file), 4 * MIB);

    // A report of 24..28 MiB.
    vqs[3]
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                24 * MIB,
                (4 * MIB) as u32,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .expect("report");
    b.handle_event(3, EventSet::IN, &vrings, 0).expect("report");
    assert_eq!(vqs[3].used().idx().load(), 1);
    assert_eq!(before - allocated(&s.file), 8 * MIB);

    // Stats: the buffer is held, then given back by the timer (1 s).
    let mut buf = Vec::new();
    for (tag, value) in [(4u16, 1000u64), (5, 2000)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&value.to_le_bytes());
    }
    s.mem
        .write_slice(&buf, GuestAddress(9 * MIB))
        .expect("stats");
    vqs[2]
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(9 * MIB, 20, 0, 0))],
            0,
        )
        .expect("stats chain");
    b.handle_event(2, EventSet::IN, &vrings, 0).expect("stats");
    assert_eq!(vqs[2].used().idx().load(), 0, "held");
    let line = b.statistics_line();
    assert!(
        line.contains(" free_memory=1000 total_memory=2000"),
        "{line}"
    );
    wait_until("the stats buffer given back", || {
        vqs[2].used().idx().load() == 1
    });

    let stats = b.stats_line();
    assert!(
        stats.contains("inflated_pages=1024 deflated_pages=0 released_bytes=8388608 reported_bytes=4194304 reports=1 stats_updates=1 bad_requests=0"),
        "{stats}"
    );
    // A queue that does not exist fails cleanly.
    assert!(b.handle_event(9, EventSet::IN, &vrings, 0).is_err());
    b.stop_timer();
}

#[test]
fn test_queue_roles_without_stats() {
    // Reporting acked, stats not: the reporting queue is index 2.
    let s = setup();
    let b = BalloonBackend::new(params()).expect("backend");
    b.acked_features(b.features() & !(1 << F_STATS_VQ));
    b.update_memory(s.atomic.clone()).expect("memory");
    let (vqs, vrings) = vrings_at(&s.mem, &s.atomic, &[0, MIB, 2 * MIB]);
    vqs[2]
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                24 * MIB,
                MIB as u32,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .expect("report");
    let before = allocated(&s.file);
    b.handle_event(2, EventSet::IN, &vrings, 0).expect("report");
    assert_eq!(before - allocated(&s.file), MIB);
    assert!(b.handle_event(3, EventSet::IN, &vrings, 0).is_err());
    b.stop_timer();
}
