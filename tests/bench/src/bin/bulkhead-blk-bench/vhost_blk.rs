//! A virtio-blk driver with no VM: this process is the vhost-user frontend, its "guest memory"
//! is a memfd shared with the backend, and it drives one split virtqueue in that memory the
//! way a guest's virtio-blk driver would: header, data and status descriptors per request, a
//! kick through the kick eventfd, completions on the used ring and the call eventfd.
//!
//! Guest physical addresses start at 0 in the memfd. SET_VRING_ADDR takes this process's
//! virtual addresses of the rings (the backend translates them through the `userspace_addr` of
//! SET_MEM_TABLE's region, as it does for QEMU); descriptors hold guest physical addresses.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, ensure, Context, Result};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestRegionMmap, Le16, Le32, Le64, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::workload::{Engine, Op};

const SECTOR: u64 = 512;
/// A completion that takes longer than this means the backend is stuck or gone.
const REAP_TIMEOUT_MS: i32 = 10_000;

/// What the backend offered and what was agreed.
#[derive(Debug)]
pub struct DeviceInfo {
    pub capacity: u64,
    pub offered_features: u64,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub queues: u64,
    pub size_max: Option<u32>,
    pub seg_max: Option<u32>,
    pub blk_size: Option<u32>,
    pub event_idx: bool,
    pub read_only: bool,
}

/// Where things are in guest memory (guest physical addresses).
struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    headers: u64,
    data: u64,
    data_stride: u64,
    size: u64,
}

const HEADER_STRIDE: u64 = 32;
const STATUS_OFFSET: u64 = 16;

/// The virtio spec's vring_need_event: whether moving an index from `old` to `new` passes
/// the other side's `event` index.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    fn new(queue_size: u16, slots: usize, max_len: u32) -> Self {
        let q = u64::from(queue_size);
        let desc = 0;
        let avail = desc + 16 * q;
        let used = align_up(avail + 6 + 2 * q, 4096);
        let headers = align_up(used + 6 + 8 * q, 4096);
        let data = align_up(headers + HEADER_STRIDE * slots as u64, 4096);
        let data_stride = align_up(u64::from(max_len), 4096);
        let size = align_up(data + data_stride * slots as u64, 2 << 20);
        Layout {
            desc,
            avail,
            used,
            headers,
            data,
            data_stride,
            size,
        }
    }
}

pub struct VhostUserBlk {
    frontend: Frontend,
    mem: GuestRegionMmap,
    kick: EventFd,
    call: EventFd,
    layout: Layout,
    queue_size: u16,
    descs_per_slot: u16,
    seg_len: u32,
    max_len: u32,
    /// Next free avail ring index, and the one last published to the device.
    next_avail: u16,
    published_avail: u16,
    last_used: u16,
    /// Per slot: the used length the request in flight should complete with.
    in_flight: Vec<Option<u32>>,
    /// Completions whose used length was not what the spec asks for.
    pub odd_used_len: u64,
    pub info: DeviceInfo,
    /// Busy-poll the used ring instead of waiting for the call eventfd (see `set_poll`).
    poll: bool,
    /// Yield the CPU between looks at the used ring while polling: the backend shares it.
    poll_yield: bool,
}

fn memfd(name: &std::ffi::CStr, size: u64) -> Result<File> {
    // SAFETY: `name` is a valid C string; the returned descriptor, if any, is new and owned
    // by nobody else.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).context("size the guest memory memfd")?;
    Ok(file)
}

impl VhostUserBlk {
    /// Connect to the backend at `socket`, agree on features and set up queue 0 with
    /// `queue_size` entries, `slots` requests of at most `max_len` bytes each.
    pub fn connect(
        socket: &Path,
        queue_size: u16,
        slots: usize,
        max_len: u32,
        want_event_idx: bool,
    ) -> Result<Self> {
        let mut frontend = Frontend::connect(socket, 1)
            .with_context(|| format!("connect to {}", socket.display()))?;
        frontend.set_owner().context("SET_OWNER")?;
        let offered = frontend.get_features().context("GET_FEATURES")?;
        let bit = |b: u32| 1u64 << b;
        ensure!(
            offered & bit(VIRTIO_F_VERSION_1) != 0,
            "backend lacks VIRTIO_F_VERSION_1"
        );
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        ensure!(
            offered & protocol_bit != 0,
            "backend lacks VHOST_USER_F_PROTOCOL_FEATURES"
        );

        // What a Linux guest's driver would take of what this driver uses.
        let mut wanted = bit(VIRTIO_F_VERSION_1)
            | protocol_bit
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_RO);
        if want_event_idx {
            wanted |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let features = offered & wanted;

        let protocol_offered = frontend
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        ensure!(
            protocol_offered.contains(VhostUserProtocolFeatures::CONFIG),
            "backend lacks VHOST_USER_PROTOCOL_F_CONFIG (no capacity without it)"
        );
        let protocol_features = protocol_offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        frontend
            .set_protocol_features(protocol_features)
            .context("SET_PROTOCOL_FEATURES")?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request without a reply of its own gets an ack, so a backend's refusal
            // surfaces here instead of as a hang.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().context("GET_QUEUE_NUM")?
        } else {
            1
        };

        // capacity, size_max, seg_max, geometry, blk_size.
        let (_, config) = frontend
            .get_config(0, 24, VhostUserConfigFlags::empty(), &[0u8; 24])
            .context("GET_CONFIG")?;
        ensure!(
            config.len() == 24,
            "GET_CONFIG returned {} bytes",
            config.len()
        );
        let le32 = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().expect("4 bytes"));
        let capacity = u64::from_le_bytes(config[0..8].try_into().expect("8 bytes")) * SECTOR;
        let has = |b: u32| features & bit(b) != 0;
        let info = DeviceInfo {
            capacity,
            offered_features: offered,
            features,
            protocol_features,
            queues,
            size_max: has(VIRTIO_BLK_F_SIZE_MAX).then(|| le32(8)),
            seg_max: has(VIRTIO_BLK_F_SEG_MAX).then(|| le32(12)),
            blk_size: has(VIRTIO_BLK_F_BLK_SIZE).then(|| le32(20)),
            event_idx: has(VIRTIO_RING_F_EVENT_IDX),
            read_only: has(VIRTIO_BLK_F_RO),
        };

        frontend.set_features(features).context("SET_FEATURES")?;

        // One data descriptor per `seg_len` bytes, as a guest splits at size_max.
        let seg_len = match info.size_max {
            Some(s) if s > 0 => (s.min(max_len) / SECTOR as u32 * SECTOR as u32).max(SECTOR as u32),
            _ => max_len,
        };
        let segs = max_len.div_ceil(seg_len);
        if let Some(seg_max) = info.seg_max {
            ensure!(
                segs <= seg_max,
                "{max_len}-byte requests need {segs} segments > seg_max {seg_max}"
            );
        }
        let descs_per_slot = 2 + segs as u16;
        ensure!(
            slots * usize::from(descs_per_slot) <= usize::from(queue_size),
            "queue size {queue_size} too small for {slots} requests of {descs_per_slot} descriptors"
        );

        let layout = Layout::new(queue_size, slots, max_len);
        let file = memfd(c"bulkhead-blk-bench-guest-ram", layout.size)?;
        let mem = GuestRegionMmap::from_range(
            GuestAddress(0),
            layout.size as usize,
            Some(FileOffset::new(file, 0)),
        )
        .context("map the guest memory memfd")?;
        let region = VhostUserMemoryRegionInfo::from_guest_region(&mem)
            .context("describe the guest memory region")?;
        frontend.set_mem_table(&[region]).context("SET_MEM_TABLE")?;

        let hva = |gpa: u64| mem.as_ptr() as u64 + gpa;
        let kick = EventFd::new(EFD_NONBLOCK).context("kick eventfd")?;
        let call = EventFd::new(EFD_NONBLOCK).context("call eventfd")?;
        frontend
            .set_vring_num(0, queue_size)
            .context("SET_VRING_NUM")?;
        frontend.set_vring_base(0, 0).context("SET_VRING_BASE")?;
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: queue_size,
                    queue_size,
                    flags: 0,
                    desc_table_addr: hva(layout.desc),
                    used_ring_addr: hva(layout.used),
                    avail_ring_addr: hva(layout.avail),
                    log_addr: None,
                },
            )
            .context("SET_VRING_ADDR")?;
        frontend
            .set_vring_kick(0, &kick)
            .context("SET_VRING_KICK")?;
        frontend
            .set_vring_call(0, &call)
            .context("SET_VRING_CALL")?;
        frontend
            .set_vring_enable(0, true)
            .context("SET_VRING_ENABLE")?;

        Ok(VhostUserBlk {
            frontend,
            mem,
            kick,
            call,
            layout,
            queue_size,
            descs_per_slot,
            seg_len,
            max_len,
            next_avail: 0,
            published_avail: 0,
            last_used: 0,
            in_flight: vec![None; slots],
            odd_used_len: 0,
            info,
            poll: false,
            poll_yield: false,
        })
    }

    fn write<T: vm_memory::ByteValued>(&self, v: T, gpa: u64) -> Result<()> {
        self.mem
            .write_obj(v, MemoryRegionAddress(gpa))
            .with_context(|| format!("write guest memory at {gpa:#x}"))
    }

    fn read<T: vm_memory::ByteValued>(&self, gpa: u64) -> Result<T> {
        self.mem
            .read_obj(MemoryRegionAddress(gpa))
            .with_context(|| format!("read guest memory at {gpa:#x}"))
    }

    fn used_idx(&self) -> Result<u16> {
        self.mem
            .load(MemoryRegionAddress(self.layout.used + 2), Ordering::Acquire)
            .context("load used idx")
    }

    fn slot_data(&self, slot: usize) -> u64 {
        self.layout.data + self.layout.data_stride * slot as u64
    }

    /// Wait for the call eventfd (or for the timeout).
    fn wait_call(&self) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, and the count says one.
        let n = unsafe { libc::poll(&mut pfd, 1, REAP_TIMEOUT_MS) };
        match n {
            0 => bail!(
                "no completion within {} s: backend stuck or gone",
                REAP_TIMEOUT_MS / 1000
            ),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("poll the call eventfd");
                }
            }
            _ => {
                // Nonblocking: another wake-up may have consumed it already.
                let _ = self.call.read();
            }
        }
        Ok(())
    }
}

impl Engine for VhostUserBlk {
    fn slots(&self) -> usize {
        self.in_flight.len()
    }

    fn queue(&mut self, slot: usize, op: Op, offset: u64, len: u32) -> Result<()> {
        ensure!(
            slot < self.in_flight.len() && self.in_flight[slot].is_none(),
            "slot {slot} busy"
        );
        let (kind, data_len) = match op {
            Op::Read => (VIRTIO_BLK_T_IN, len),
            Op::Write => (VIRTIO_BLK_T_OUT, len),
            Op::Flush => (VIRTIO_BLK_T_FLUSH, 0),
        };
        ensure!(
            data_len <= self.max_len,
            "request of {len} bytes > {}",
            self.max_len
        );
        ensure!(
            offset.is_multiple_of(SECTOR) && u64::from(data_len).is_multiple_of(SECTOR),
            "unaligned request at {offset:#x}+{len:#x}"
        );
        let header = self.layout.headers + HEADER_STRIDE * slot as u64;
        let status = header + STATUS_OFFSET;
        // struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
        self.write(Le32::from(kind), header)?;
        self.write(Le32::from(0), header + 4)?;
        self.write(
            Le64::from(if op == Op::Flush { 0 } else { offset / SECTOR }),
            header + 8,
        )?;
        // Anything but VIRTIO_BLK_S_OK/IOERR/UNSUPP, so a status never written shows.
        self.write(0xffu8, status)?;

        let head = slot as u16 * self.descs_per_slot;
        let mut idx = head;
        let mut put = |s: &Self, addr: u64, len: u32, flags: u32| -> Result<()> {
            let flags = flags as u16;
            let next = if flags & VRING_DESC_F_NEXT as u16 != 0 {
                idx + 1
            } else {
                0
            };
            s.write(
                Descriptor::new(addr, len, flags, next),
                s.layout.desc + 16 * u64::from(idx),
            )?;
            idx += 1;
            Ok(())
        };
        put(self, header, 16, VRING_DESC_F_NEXT)?;
        let data = self.slot_data(slot);
        let mut done = 0;
        while done < data_len {
            let n = self.seg_len.min(data_len - done);
            let dir = if op == Op::Read {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            put(self, data + u64::from(done), n, VRING_DESC_F_NEXT | dir)?;
            done += n;
        }
        put(self, status, 1, VRING_DESC_F_WRITE)?;

        let q = u64::from(self.queue_size);
        let ring_slot = u64::from(self.next_avail) % q;
        self.write(Le16::from(head), self.layout.avail + 4 + 2 * ring_slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // The device writes the data (reads) and the status byte.
        self.in_flight[slot] = Some(if op == Op::Read { data_len + 1 } else { 1 });
        Ok(())
    }

    fn kick(&mut self) -> Result<()> {
        let old = self.published_avail;
        let new = self.next_avail;
        if old == new {
            return Ok(());
        }
        // Ring entries before the index that publishes them.
        self.mem
            .store(
                new,
                MemoryRegionAddress(self.layout.avail + 2),
                Ordering::Release,
            )
            .context("store avail idx")?;
        self.published_avail = new;
        // The index store before the read of the device's suppression state; pairs with the
        // device's barrier between its used-ring update and its read of the avail index.
        fence(Ordering::SeqCst);
        let notify = if self.info.event_idx {
            let avail_event: u16 = self
                .mem
                .load(
                    MemoryRegionAddress(self.layout.used + 4 + 8 * u64::from(self.queue_size)),
                    Ordering::Relaxed,
                )
                .context("load avail_event")?;
            need_event(avail_event, new, old)
        } else {
            let flags: u16 = self
                .mem
                .load(MemoryRegionAddress(self.layout.used), Ordering::Relaxed)
                .context("load used flags")?;
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if notify {
            self.kick.write(1).context("write the kick eventfd")?;
        }
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let q = u64::from(self.queue_size);
        if self.poll {
            return self.reap_polling(done);
        }
        loop {
            let mut used = self.used_idx()?;
            if used == self.last_used && self.info.event_idx {
                // Ask for a call at the next completion, then look again: one may have
                // landed before the device could see the request.
                self.mem
                    .store(
                        self.last_used,
                        MemoryRegionAddress(self.layout.avail + 4 + 2 * q),
                        Ordering::Relaxed,
                    )
                    .context("store used_event")?;
                fence(Ordering::SeqCst);
                used = self.used_idx()?;
            }
            if used == self.last_used {
                self.wait_call()?;
                continue;
            }
            return self.take_used(used, done);
        }
    }

    fn set_poll(&mut self, poll: bool, same_cpu: bool) -> Result<()> {
        self.poll = poll;
        self.poll_yield = same_cpu;
        self.suppress_calls(poll)?;
        // A call that was already made is drained, so a later wait is not woken by it.
        let _ = self.call.read();
        Ok(())
    }

    fn fill_buffer(&mut self, slot: usize, data: &[u8]) -> Result<()> {
        ensure!(self.in_flight[slot].is_none(), "slot {slot} busy");
        self.mem
            .write_slice(data, MemoryRegionAddress(self.slot_data(slot)))
            .context("write a data buffer")
    }

    fn read_buffer(&self, slot: usize, data: &mut [u8]) -> Result<()> {
        ensure!(self.in_flight[slot].is_none(), "slot {slot} busy");
        self.mem
            .read_slice(data, MemoryRegionAddress(self.slot_data(slot)))
            .context("read a data buffer")
    }

    /// Stop the queue with GET_VRING_BASE; the index the backend would resume from must be
    /// the number of requests made.
    fn close(&mut self) -> Result<Vec<String>> {
        let mut remarks = Vec::new();
        let base = self.frontend.get_vring_base(0).context("GET_VRING_BASE")?;
        if base != u32::from(self.published_avail) {
            remarks.push(format!(
                "GET_VRING_BASE returned {base}, but {} requests were made (mod 2^16)",
                self.published_avail
            ));
        }
        if self.odd_used_len > 0 {
            remarks.push(format!(
                "{} completions had a used length other than the bytes written (data + status)",
                self.odd_used_len
            ));
        }
        Ok(remarks)
    }
}

impl VhostUserBlk {
    /// Completions up to used index `used`: check each and append its slot.
    fn take_used(&mut self, used: u16, done: &mut Vec<usize>) -> Result<()> {
        let q = u64::from(self.queue_size);
        let pending = used.wrapping_sub(self.last_used);
        ensure!(
            usize::from(pending) <= self.in_flight.len(),
            "used idx jumped by {pending} with at most {} requests in flight",
            self.in_flight.len()
        );
        while self.last_used != used {
            let at = self.layout.used + 4 + 8 * (u64::from(self.last_used) % q);
            // struct virtq_used_elem { le32 id; le32 len; }
            let id = u32::from(self.read::<Le32>(at)?);
            let used_len = u32::from(self.read::<Le32>(at + 4)?);
            let slot = (id / u32::from(self.descs_per_slot)) as usize;
            ensure!(
                id % u32::from(self.descs_per_slot) == 0 && slot < self.in_flight.len(),
                "used ring entry names descriptor {id}, which heads no request"
            );
            let Some(want_len) = self.in_flight[slot].take() else {
                bail!("used ring entry for descriptor {id}, which is not in flight");
            };
            let status: u8 =
                self.read(self.layout.headers + HEADER_STRIDE * slot as u64 + STATUS_OFFSET)?;
            ensure!(
                u32::from(status) == VIRTIO_BLK_S_OK,
                "request on slot {slot} completed with status {status:#x}"
            );
            if used_len != want_len {
                self.odd_used_len += 1;
            }
            done.push(slot);
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(())
    }

    /// Spin on the used ring until something completed, as a polling guest driver does
    /// (calls suppressed, so the backend makes none; see `suppress_calls`).
    fn reap_polling(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let start = std::time::Instant::now();
        let mut spins = 0u32;
        loop {
            let used = self.used_idx()?;
            if used != self.last_used {
                self.take_used(used, done)?;
                return self.suppress_calls(true);
            }
            spins = spins.wrapping_add(1);
            if self.poll_yield {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            if spins.is_multiple_of(4096)
                && start.elapsed() > std::time::Duration::from_millis(REAP_TIMEOUT_MS as u64)
            {
                bail!(
                    "no completion within {} s: backend stuck or gone",
                    REAP_TIMEOUT_MS / 1000
                );
            }
        }
    }

    /// With `off`, ask the device for no call: `used_event` half the ring index space ahead
    /// (EVENT_IDX) or VRING_AVAIL_F_NO_INTERRUPT. Without, ask for a call at every used entry
    /// again (the interrupt-driven mode sets `used_event` itself before it waits).
    fn suppress_calls(&mut self, off: bool) -> Result<()> {
        let q = u64::from(self.queue_size);
        if self.info.event_idx {
            let event = if off {
                self.last_used.wrapping_add(0x7fff)
            } else {
                self.last_used
            };
            self.mem
                .store(
                    event,
                    MemoryRegionAddress(self.layout.avail + 4 + 2 * q),
                    Ordering::Relaxed,
                )
                .context("store used_event")?;
        } else {
            let flags: u16 = if off {
                VRING_AVAIL_F_NO_INTERRUPT as u16
            } else {
                0
            };
            self.mem
                .store(
                    flags,
                    MemoryRegionAddress(self.layout.avail),
                    Ordering::Relaxed,
                )
                .context("store avail flags")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_need_event_crossing_event_index_notifies() {
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 9, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Across the 16-bit wrap.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(3, 2, 0xfffe));
    }

    #[test]
    fn test_layout_regions_ordered_and_aligned() {
        let l = Layout::new(256, 32, 128 * 1024);
        assert!(l.desc + 16 * 256 <= l.avail);
        assert!(l.avail + 6 + 2 * 256 <= l.used);
        assert!(l.used + 6 + 8 * 256 <= l.headers);
        assert!(l.headers + HEADER_STRIDE * 32 <= l.data);
        assert!(l.data + l.data_stride * 32 <= l.size);
        assert_eq!(l.used % 4, 0);
        assert_eq!(l.data % 4096, 0);
        assert_eq!(l.data_stride, 128 * 1024);
    }
}
