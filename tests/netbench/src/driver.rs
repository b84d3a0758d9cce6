//! A virtio-net driver with no VM: this process is the vhost-user frontend, its "guest memory"
//! is a memfd shared with the backend, and it drives queue pair 0 (rx0 = queue 0, tx0 =
//! queue 1) the way a guest's virtio-net driver would: one descriptor per frame (the 12-byte
//! `virtio_net_hdr_v1` and the frame, contiguous), kicks through the kick eventfds unless the
//! device set `VRING_USED_F_NO_NOTIFY`, completions on the used rings, and the call eventfds
//! only when it has nothing to do (`VRING_AVAIL_F_NO_INTERRUPT` otherwise), as the block
//! benchmark's driver does for virtio-blk (`tests/bench`).
//!
//! Guest physical addresses start at 0 in the memfd; SET_VRING_ADDR takes this process's
//! virtual addresses of the rings.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use anyhow::{ensure, Context, Result};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestRegionMmap, Le16, Le32, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The 12-byte header every frame starts with (VERSION_1).
pub const HDR_LEN: usize = 12;
/// Room for a 64 KiB segment and its header (Linux's "big packets" buffer: 65562 bytes).
pub const BUF_LEN: u32 = 65562;
pub const BUF_STRIDE: u64 = 17 * 4096;

/// The features this driver asks for; it takes what the backend offers of them. What it
/// does not ask for: MRG_RXBUF and EVENT_IDX (Cloud Hypervisor's backend lacks both, and the
/// comparison is for the same features), CTRL_VQ/MQ (one queue pair), MTU, ECN, UFO.
pub fn wanted_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ]
    .iter()
    .fold(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), |a, b| {
        a | 1 << b
    })
}

/// Names of the virtio-net feature bits set in `f`, for the report.
pub fn feature_names(f: u64) -> String {
    const NAMES: &[(u32, &str)] = &[
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
        (VIRTIO_NET_F_MQ, "MQ"),
        (29, "EVENT_IDX"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| f & (1 << b) != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// One split virtqueue and its buffers (descriptor i always points at buffer i).
struct Ring {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    published: u16,
    last_used: u16,
    /// Calls the backend made on this ring (the call eventfd's counts, as read).
    calls: u64,
}

impl Ring {
    fn new(index: usize, base: u64, size: u16) -> Result<(Self, u64)> {
        let q = u64::from(size);
        let desc = base;
        let avail = desc + 16 * q;
        let used = align_up(avail + 6 + 2 * q, 4096);
        let bufs = align_up(used + 6 + 8 * q, 4096);
        let end = bufs + BUF_STRIDE * q;
        Ok((
            Ring {
                index,
                size,
                desc,
                avail,
                used,
                bufs,
                kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
                call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
                next_avail: 0,
                published: 0,
                last_used: 0,
                calls: 0,
            },
            end,
        ))
    }

    fn buf(&self, id: u16) -> u64 {
        self.bufs + BUF_STRIDE * u64::from(id)
    }
}

pub struct NetDriver {
    frontend: Frontend,
    mem: GuestRegionMmap,
    rx: Ring,
    tx: Ring,
    pub offered: u64,
    pub features: u64,
    event_idx: bool,
}

/// The virtio spec's vring_need_event: whether moving an index from `old` to `new` passes
/// the other side's `event` index.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Frames and bytes (without the virtio header) completed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Count {
    pub frames: u64,
    pub bytes: u64,
}

pub fn memfd(size: u64) -> Result<File> {
    // SAFETY: the name is a valid C string; the returned descriptor, if any, is new.
    let fd = unsafe { libc::memfd_create(c"bulkhead-net-bench-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).context("size the guest memory memfd")?;
    Ok(file)
}

impl NetDriver {
    /// Connect, agree on `(wanted_features() | extra) & offered`, set up rx0 and tx0 with
    /// `size` entries each. `extra` may hold `MRG_RXBUF` (every frame still fits one buffer)
    /// and `EVENT_IDX` (notifications by index, both ways).
    pub fn connect(socket: &Path, size: u16, extra: u64) -> Result<Self> {
        let mut frontend = Frontend::connect(socket, 2)
            .with_context(|| format!("connect to {}", socket.display()))?;
        frontend.set_owner().context("SET_OWNER")?;
        let offered = frontend.get_features().context("GET_FEATURES")?;
        ensure!(
            offered & (1 << VIRTIO_F_VERSION_1) != 0,
            "backend lacks VIRTIO_F_VERSION_1"
        );
        let features = offered & (wanted_features() | extra);
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered_pf = frontend
                .get_protocol_features()
                .context("GET_PROTOCOL_FEATURES")?;
            let pf =
                offered_pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(pf)
                .context("SET_PROTOCOL_FEATURES")?;
            if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        frontend.set_features(features).context("SET_FEATURES")?;

        let (rx, end) = Ring::new(0, 0, size)?;
        let (tx, end) = Ring::new(1, end, size)?;
        let total = align_up(end, 2 << 20);
        let mem = GuestRegionMmap::from_range(
            GuestAddress(0),
            total as usize,
            Some(FileOffset::new(memfd(total)?, 0)),
        )
        .context("map the guest memory memfd")?;
        let region = VhostUserMemoryRegionInfo::from_guest_region(&mem)
            .context("describe the guest memory region")?;
        frontend.set_mem_table(&[region]).context("SET_MEM_TABLE")?;
        let hva = |gpa: u64| mem.as_ptr() as u64 + gpa;
        for r in [&rx, &tx] {
            let i = r.index;
            frontend.set_vring_num(i, size).context("SET_VRING_NUM")?;
            frontend.set_vring_base(i, 0).context("SET_VRING_BASE")?;
            frontend
                .set_vring_addr(
                    i,
                    &VringConfigData {
                        queue_max_size: size,
                        queue_size: size,
                        flags: 0,
                        desc_table_addr: hva(r.desc),
                        used_ring_addr: hva(r.used),
                        avail_ring_addr: hva(r.avail),
                        log_addr: None,
                    },
                )
                .context("SET_VRING_ADDR")?;
            frontend
                .set_vring_kick(i, &r.kick)
                .context("SET_VRING_KICK")?;
            frontend
                .set_vring_call(i, &r.call)
                .context("SET_VRING_CALL")?;
        }
        let mut d = NetDriver {
            frontend,
            mem,
            rx,
            tx,
            offered,
            features,
            event_idx: features & (1 << 29) != 0,
        };
        d.set_interrupts(true, false)?;
        d.set_interrupts(false, false)?;
        for i in 0..2 {
            d.frontend
                .set_vring_enable(i, true)
                .context("SET_VRING_ENABLE")?;
        }
        Ok(d)
    }

    fn ring(&self, rx: bool) -> &Ring {
        if rx {
            &self.rx
        } else {
            &self.tx
        }
    }

    fn ring_mut(&mut self, rx: bool) -> &mut Ring {
        if rx {
            &mut self.rx
        } else {
            &mut self.tx
        }
    }

    fn set_interrupts(&self, rx: bool, on: bool) -> Result<()> {
        if self.event_idx {
            // used_event: the next used entry asks for a call; one behind the last, none
            // until the index wraps.
            let r = self.ring(rx);
            let event = if on {
                r.last_used
            } else {
                r.last_used.wrapping_sub(1)
            };
            self.mem
                .store(
                    event,
                    MemoryRegionAddress(r.avail + 4 + 2 * u64::from(r.size)),
                    Ordering::Release,
                )
                .context("store used_event")?;
        }
        let flags = if on {
            0u16
        } else {
            VRING_AVAIL_F_NO_INTERRUPT as u16
        };
        self.mem
            .store(
                flags,
                MemoryRegionAddress(self.ring(rx).avail),
                Ordering::Release,
            )
            .context("store avail flags")
    }

    /// Write buffer `id` of the tx ring: `hdr` then `frame`.
    pub fn write_tx(&self, id: u16, hdr: &[u8; HDR_LEN], frame: &[u8]) -> Result<()> {
        let at = self.tx.buf(id);
        self.mem
            .write_slice(hdr, MemoryRegionAddress(at))
            .context("write a tx header")?;
        self.mem
            .write_slice(frame, MemoryRegionAddress(at + HDR_LEN as u64))
            .context("write a tx frame")
    }

    /// Make descriptor `id` (its whole buffer for rx, `len` bytes for tx) available.
    pub fn push(&mut self, rx: bool, id: u16, len: u32) -> Result<()> {
        let r = self.ring(rx);
        let (addr, len, flags) = if rx {
            (r.buf(id), BUF_LEN, VRING_DESC_F_WRITE as u16)
        } else {
            (r.buf(id), len, 0)
        };
        let (desc, avail, slot) = (r.desc, r.avail, u64::from(r.next_avail) % u64::from(r.size));
        self.mem
            .write_obj(
                Descriptor::new(addr, len, flags, 0),
                MemoryRegionAddress(desc + 16 * u64::from(id)),
            )
            .context("write a descriptor")?;
        self.mem
            .write_obj(Le16::from(id), MemoryRegionAddress(avail + 4 + 2 * slot))
            .context("write an avail entry")?;
        let r = self.ring_mut(rx);
        r.next_avail = r.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publish what was pushed and kick unless the device asked not to be.
    pub fn publish(&mut self, rx: bool) -> Result<()> {
        let r = self.ring(rx);
        if r.published == r.next_avail {
            return Ok(());
        }
        let (old, new, avail, used, q) = (r.published, r.next_avail, r.avail, r.used, r.size);
        self.mem
            .store(new, MemoryRegionAddress(avail + 2), Ordering::Release)
            .context("store avail idx")?;
        self.ring_mut(rx).published = new;
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let avail_event: u16 = self
                .mem
                .load(
                    MemoryRegionAddress(used + 4 + 8 * u64::from(q)),
                    Ordering::Relaxed,
                )
                .context("load avail_event")?;
            need_event(avail_event, new, old)
        } else {
            let flags: u16 = self
                .mem
                .load(MemoryRegionAddress(used), Ordering::Relaxed)
                .context("load used flags")?;
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if notify {
            self.ring(rx).kick.write(1).context("kick")?;
        }
        Ok(())
    }

    fn used_idx(&self, rx: bool) -> Result<u16> {
        self.mem
            .load(
                MemoryRegionAddress(self.ring(rx).used + 2),
                Ordering::Acquire,
            )
            .context("load used idx")
    }

    /// Take the used entries: their ids into `ids`, frames and bytes (used length minus the
    /// header for rx, the pushed length minus the header for tx) into `count`.
    pub fn reap(&mut self, rx: bool, ids: &mut Vec<u16>, count: &mut Count) -> Result<usize> {
        let used = self.used_idx(rx)?;
        let r = self.ring(rx);
        let (q, used_at, desc, mut last) = (u64::from(r.size), r.used, r.desc, r.last_used);
        let n = used.wrapping_sub(last);
        ensure!(n <= r.size, "used idx jumped by {n}");
        while last != used {
            let at = used_at + 4 + 8 * (u64::from(last) % q);
            let id = u32::from(self.mem.read_obj::<Le32>(MemoryRegionAddress(at))?);
            ensure!(id < u32::from(r.size), "used entry names descriptor {id}");
            let id = id as u16;
            let len = if rx {
                u32::from(self.mem.read_obj::<Le32>(MemoryRegionAddress(at + 4))?)
            } else {
                u32::from(
                    self.mem
                        .read_obj::<Le32>(MemoryRegionAddress(desc + 16 * u64::from(id) + 8))?,
                )
            };
            count.frames += 1;
            count.bytes += u64::from(len.saturating_sub(HDR_LEN as u32));
            ids.push(id);
            last = last.wrapping_add(1);
        }
        self.ring_mut(rx).last_used = last;
        Ok(usize::from(n))
    }

    /// Nothing to do: ask for a call, look once more, then wait for it (at most `ms`).
    pub fn wait(&mut self, rx: bool, ms: i32) -> Result<()> {
        self.set_interrupts(rx, true)?;
        fence(Ordering::SeqCst);
        if self.used_idx(rx)? == self.ring(rx).last_used {
            let mut pfd = libc::pollfd {
                fd: self.ring(rx).call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, and the count says one.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
        if let Ok(n) = self.ring(rx).call.read() {
            self.ring_mut(rx).calls += n;
        }
        self.set_interrupts(rx, false)
    }

    /// Calls the backend has made on a ring so far (each can be a wake-up of this thread).
    pub fn calls(&self, rx: bool) -> u64 {
        self.ring(rx).calls
    }

    /// Descriptors made available and not yet used.
    pub fn in_flight(&self, rx: bool) -> u16 {
        let r = self.ring(rx);
        r.next_avail.wrapping_sub(r.last_used)
    }

    /// The driver's view of a ring, for a report when nothing moved.
    pub fn describe(&self, rx: bool) -> String {
        let r = self.ring(rx);
        let flags: u16 = self
            .mem
            .load(MemoryRegionAddress(r.used), Ordering::Relaxed)
            .unwrap_or(0xffff);
        let used: u16 = self
            .mem
            .load(MemoryRegionAddress(r.used + 2), Ordering::Acquire)
            .unwrap_or(0xffff);
        format!(
            "avail idx {} (published {}), used idx {used} (reaped {}), used flags {flags:#x}, {} in flight",
            r.next_avail,
            r.published,
            r.last_used,
            self.in_flight(rx)
        )
    }

    pub fn size(&self) -> u16 {
        self.rx.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_need_event_crossing_event_index_notifies() {
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 5, 3));
        assert!(need_event(0xffff, 2, 0xfffe));
        // used_event one behind the last index: no call until the index wraps.
        assert!(!need_event(9, 10 + 200, 10));
    }
}
