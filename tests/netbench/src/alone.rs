//! The tx rows' ceiling: one thread of this process writing the same frames into a tap of its
//! own, one `write` a frame, with no virtqueue and no backend in between. That is the least
//! work any backend that writes each frame into a tap does (the kernel's copy of the frame
//! into a socket buffer and its way into the stack), so no such backend on one thread can move
//! more frames than this: where a peer is already close to it, no backend can be much faster
//! than that peer (docs/benchmarks.md, "Network").
//!
//! The frames sit where the driver's do: in a memfd mapping (shmem pages, as guest memory is),
//! one buffer per ring entry at the driver's stride, the 12-byte header and the frame
//! contiguous, written in ring order.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_net::Tap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MemoryRegionAddress};

use crate::driver::{memfd, BUF_STRIDE, HDR_LEN};
use crate::peer;

/// What one measurement gave.
pub struct Moved {
    pub frames: u64,
    pub bytes: u64,
    /// The writing thread's CPU time over the window, in seconds.
    pub cpu: f64,
    /// Frames the tap counted over the window.
    pub tap_received: u64,
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Writes `frame` (after the tx rows' vnet header) into a new tap `name` from `ring` buffers
/// in turn for a warm-up of 0.3 s and then `secs` seconds, counting the second part.
pub fn tx(name: &str, tso: bool, ring: u16, secs: f64) -> Result<Moved> {
    let frame = if tso {
        peer::tso_frame(false)
    } else {
        peer::small_frame(false)
    };
    let tap = Tap::open_named(name, 1)
        .with_context(|| format!("open tap {name}"))?
        .pop()
        .context("no tap queue")?;
    crate::ip(&["addr", "add", "10.98.0.1/24", "dev", name])?;
    crate::ip(&["link", "set", name, "up"])?;
    let mut hdr = [0u8; HDR_LEN];
    hdr[..10].copy_from_slice(&peer::vnet_header(tso));
    let len = HDR_LEN + frame.len();
    let stride = BUF_STRIDE as usize;
    anyhow::ensure!(len <= stride, "a {len}-byte frame does not fit a buffer");
    anyhow::ensure!(ring > 0, "no buffers: the ring size is 0");
    let size = BUF_STRIDE * u64::from(ring);
    let bufs = GuestRegionMmap::<()>::from_range(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(memfd(size)?, 0)),
    )
    .context("map the frames' memfd")?;
    for i in 0..u64::from(ring) {
        let at = i * BUF_STRIDE;
        bufs.write_slice(&hdr, MemoryRegionAddress(at))
            .and_then(|()| bufs.write_slice(&frame, MemoryRegionAddress(at + HDR_LEN as u64)))
            .context("write a frame")?;
    }
    let base = bufs.as_ptr();
    let start = Instant::now();
    let from = start + Duration::from_millis(300);
    let until = from + Duration::from_secs_f64(secs);
    let (mut frames, mut counting) = (0u64, false);
    let (mut cpu0, mut tap0) = (0.0, 0);
    let mut i = 0usize;
    loop {
        // The clock is read once per 16 frames: it is not free next to a 64-byte frame.
        if i.is_multiple_of(16) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            if !counting && now >= from {
                counting = true;
                cpu0 = thread_cpu();
                tap0 = peer::tap_counters(name)?.0;
            }
        }
        // SAFETY: buffer `i % ring` of the mapping, `len` <= BUF_STRIDE bytes into it; the
        // mapping outlives the loop.
        let buf =
            unsafe { std::slice::from_raw_parts(base.add((i % usize::from(ring)) * stride), len) };
        match tap.write(buf) {
            Ok(n) if n == len => {
                if counting {
                    frames += 1;
                }
            }
            Ok(n) => bail!("tap {name} took {n} bytes of a {len}-byte frame"),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
            Err(e) => return Err(e).with_context(|| format!("write a frame into tap {name}")),
        }
        i += 1;
    }
    let cpu = thread_cpu() - cpu0;
    let tap_received = peer::tap_counters(name)?.0 - tap0;
    Ok(Moved {
        frames,
        bytes: frames * frame.len() as u64,
        cpu,
        tap_received,
    })
}
