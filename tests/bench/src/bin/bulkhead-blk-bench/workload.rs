//! What the benchmark asks of a block path, independent of the path: the workloads, the
//! timed loop that keeps a fixed number of requests in flight, and the data check that runs
//! before any figure is taken.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Seed of the pattern the image is prefilled with.
pub const PREFILL_SEED: u64 = 0x6275_6c6b_6865_6164;
/// Seed of the pattern the data check writes.
const WRITE_SEED: u64 = 0x7772_6974_652d_6368;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

/// A block path the benchmark drives: a fixed set of slots, each with its own data buffer of
/// `max_len` bytes; at most one request per slot is in flight.
pub trait Engine {
    /// Number of slots.
    fn slots(&self) -> usize;
    /// Make a request on `slot`'s buffer ready; the path sees it at the next `kick`.
    /// `offset` and `len` are in bytes; both are ignored for `Op::Flush`.
    fn queue(&mut self, slot: usize, op: Op, offset: u64, len: u32) -> Result<()>;
    /// Hand every queued request to the path.
    fn kick(&mut self) -> Result<()>;
    /// Wait until at least one request completed and append the slots of all that did.
    /// A request that did not succeed is an error.
    fn reap(&mut self, done: &mut Vec<usize>) -> Result<()>;
    /// Copy `data` into the start of `slot`'s buffer.
    fn fill_buffer(&mut self, slot: usize, data: &[u8]) -> Result<()>;
    /// Copy the start of `slot`'s buffer into `data`.
    fn read_buffer(&self, slot: usize, data: &mut [u8]) -> Result<()>;
    /// Wait for completions by busy-polling (`poll`) or by sleeping until notified. With
    /// `same_cpu`, the path's other side runs on this CPU: the poll loop yields to it.
    fn set_poll(&mut self, poll: bool, same_cpu: bool) -> Result<()> {
        let _ = (poll, same_cpu);
        Ok(())
    }
    /// Stop the path with nothing in flight; return remarks on anything odd it saw.
    fn close(&mut self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub op: Op,
    pub pattern: Pattern,
    pub block: u32,
    pub depth: usize,
}

/// What one timed run measured.
pub struct Figures {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per-request latency, from `queue` to the `reap` that returned it, sorted.
    pub latencies_ns: Vec<u64>,
}

impl Figures {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / (1024.0 * 1024.0)
    }

    pub fn latency_us(&self, quantile: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_ns.len() - 1) as f64 * quantile).round() as usize;
        self.latencies_ns[i] as f64 / 1000.0
    }

    pub fn mean_latency_us(&self) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.iter().sum::<u64>() as f64 / self.latencies_ns.len() as f64 / 1000.0
    }
}

/// xorshift64*: the same offsets for every path.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Offsets of a workload's requests, in bytes.
struct Offsets {
    pattern: Pattern,
    block: u64,
    blocks: u64,
    next_block: u64,
    rng: Rng,
}

impl Offsets {
    fn new(w: &Workload, image_size: u64) -> Self {
        Offsets {
            pattern: w.pattern,
            block: u64::from(w.block),
            blocks: image_size / u64::from(w.block),
            next_block: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
        }
    }

    fn next(&mut self) -> u64 {
        let block = match self.pattern {
            Pattern::Random => self.rng.next() % self.blocks,
            Pattern::Sequential => {
                let b = self.next_block;
                self.next_block = (b + 1) % self.blocks;
                b
            }
        };
        block * self.block
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` with the pattern `seed` has at byte `offset` of the image: every 8-byte word is
/// a hash of its own offset, so a block read from the wrong place, or a buffer returned to the
/// wrong request, cannot match.
pub fn fill_pattern(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let v = splitmix64((offset + 8 * i as u64) ^ seed);
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// Create (or overwrite) the image: `size` bytes of the prefill pattern.
pub fn prefill(path: &Path, size: u64) -> Result<()> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    file.set_len(size).context("size the image")?;
    const CHUNK: usize = 4 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let n = CHUNK.min((size - off) as usize);
        fill_pattern(&mut buf[..n], off, PREFILL_SEED);
        file.write_all_at(&buf[..n], off)
            .context("prefill the image")?;
        off += n as u64;
    }
    Ok(())
}

/// Run `w` for `duration`, keeping `w.depth` requests in flight.
pub fn run(
    engine: &mut dyn Engine,
    w: &Workload,
    image_size: u64,
    duration: Duration,
) -> Result<Figures> {
    ensure!(
        w.depth <= engine.slots(),
        "depth {} > {} slots",
        w.depth,
        engine.slots()
    );
    let mut offsets = Offsets::new(w, image_size);
    let mut latencies_ns = Vec::with_capacity(1 << 20);
    let mut started = vec![Instant::now(); w.depth];
    let start = Instant::now();
    let deadline = start + duration;
    for (slot, t) in started.iter_mut().enumerate() {
        engine.queue(slot, w.op, offsets.next(), w.block)?;
        *t = Instant::now();
    }
    engine.kick()?;
    let mut in_flight = w.depth;
    let mut ops = 0u64;
    let mut done = Vec::with_capacity(w.depth);
    let mut last = start;
    while in_flight > 0 {
        done.clear();
        engine.reap(&mut done)?;
        let now = Instant::now();
        last = now;
        let mut requeued = false;
        for &slot in &done {
            ops += 1;
            in_flight -= 1;
            latencies_ns.push((now - started[slot]).as_nanos() as u64);
            if now < deadline {
                engine.queue(slot, w.op, offsets.next(), w.block)?;
                started[slot] = Instant::now();
                in_flight += 1;
                requeued = true;
            }
        }
        if requeued {
            engine.kick()?;
        }
    }
    latencies_ns.sort_unstable();
    Ok(Figures {
        ops,
        bytes: ops * u64::from(w.block),
        elapsed: last - start,
        latencies_ns,
    })
}

/// Run `reqs` (slot, op, offset, len), all in flight at once, and wait for all of them.
fn batch(engine: &mut dyn Engine, reqs: &[(usize, Op, u64, u32)]) -> Result<()> {
    for &(slot, op, off, len) in reqs {
        engine.queue(slot, op, off, len)?;
    }
    engine.kick()?;
    let mut seen = vec![false; engine.slots()];
    let mut left = reqs.len();
    let mut done = Vec::new();
    while left > 0 {
        done.clear();
        engine.reap(&mut done)?;
        for &slot in &done {
            ensure!(
                reqs.iter().any(|r| r.0 == slot) && !seen[slot],
                "completion for slot {slot}, which has no request in flight"
            );
            seen[slot] = true;
            left -= 1;
        }
    }
    Ok(())
}

fn compare(what: &str, got: &[u8], offset: u64, seed: u64) -> Result<()> {
    let mut want = vec![0u8; got.len()];
    fill_pattern(&mut want, offset, seed);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        bail!(
            "DATA MISMATCH: {what} at image offset {offset:#x} + {i:#x} ({} bytes): got {:02x?}, want {:02x?}",
            got.len(),
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
    Ok(())
}

/// Check that the path moves the right bytes to and from the right places before timing it:
/// reads of the prefilled image (small and large, first and last blocks, all slots in flight
/// at once), then writes of a second pattern, a flush, and reads of it back, both through the
/// path and straight from the image file. Leaves the written blocks in the image.
pub fn verify(engine: &mut dyn Engine, image: &Path, image_size: u64, large: u32) -> Result<()> {
    let slots = engine.slots();
    let small = 4096u32;
    let large_blocks = image_size / u64::from(large);
    ensure!(
        large_blocks >= 2 * slots as u64,
        "image too small for the check"
    );
    let mut rng = Rng(0x1234_5678_9abc_def1);

    // Reads: slot i reads either a 4 KiB or a `large` block; first and last blocks included.
    let mut reqs = Vec::new();
    for slot in 0..slots {
        let (len, off) = match slot {
            0 => (small, 0),
            1 => (small, image_size - u64::from(small)),
            2 => (large, 0),
            3 => (large, image_size - u64::from(large)),
            s if s % 2 == 0 => (
                small,
                rng.next() % (image_size / u64::from(small)) * u64::from(small),
            ),
            _ => (large, rng.next() % large_blocks * u64::from(large)),
        };
        reqs.push((slot, Op::Read, off, len));
    }
    for round in 0..2 {
        // Poison the buffers so a read that does not land is seen.
        for slot in 0..slots {
            engine.fill_buffer(slot, &vec![0xa5; large as usize])?;
        }
        batch(engine, &reqs).with_context(|| format!("read check, round {round}"))?;
        for &(slot, _, off, len) in &reqs {
            let mut got = vec![0u8; len as usize];
            engine.read_buffer(slot, &mut got)?;
            compare("read of prefilled image", &got, off, PREFILL_SEED)?;
        }
        // Second round: the same blocks on rotated slots.
        let n = reqs.len();
        for r in &mut reqs {
            r.0 = (r.0 + 1) % n;
        }
    }

    // Writes: distinct `large`-aligned blocks, so no two requests overlap.
    let mut picked: Vec<u64> = Vec::new();
    while picked.len() < slots {
        let b = rng.next() % large_blocks;
        if !picked.contains(&b) {
            picked.push(b);
        }
    }
    let reqs: Vec<_> = picked
        .iter()
        .enumerate()
        .map(|(slot, &b)| {
            let len = if slot % 2 == 0 { small } else { large };
            (slot, Op::Write, b * u64::from(large), len)
        })
        .collect();
    for &(slot, _, off, len) in &reqs {
        let mut data = vec![0u8; len as usize];
        fill_pattern(&mut data, off, WRITE_SEED);
        engine.fill_buffer(slot, &data)?;
    }
    batch(engine, &reqs).context("write check")?;
    batch(engine, &[(0, Op::Flush, 0, 0)]).context("flush")?;

    let file = File::open(image).with_context(|| format!("open {}", image.display()))?;
    for &(_, _, off, len) in &reqs {
        let mut got = vec![0u8; len as usize];
        file.read_exact_at(&mut got, off)
            .context("read the image file")?;
        compare("image file after write", &got, off, WRITE_SEED)?;
        // The byte after a small write must be untouched.
        if len < large {
            let mut next = vec![0u8; 8];
            file.read_exact_at(&mut next, off + u64::from(len))
                .context("read the image file")?;
            compare(
                "image file next to a write",
                &next,
                off + u64::from(len),
                PREFILL_SEED,
            )?;
        }
    }
    for slot in 0..slots {
        engine.fill_buffer(slot, &vec![0x5a; large as usize])?;
    }
    // Read back on other slots than the ones that wrote.
    let back: Vec<_> = reqs
        .iter()
        .map(|&(slot, _, off, len)| ((slot + 3) % slots, Op::Read, off, len))
        .collect();
    batch(engine, &back).context("read-back check")?;
    for &(slot, _, off, len) in &back {
        let mut got = vec![0u8; len as usize];
        engine.read_buffer(slot, &mut got)?;
        compare("read-back of written data", &got, off, WRITE_SEED)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fill_pattern_same_offset_same_bytes() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 8192];
        fill_pattern(&mut a, 4096, PREFILL_SEED);
        fill_pattern(&mut b, 0, PREFILL_SEED);
        assert_eq!(a[..], b[4096..]);
        assert_ne!(a[..], b[..4096]);
        fill_pattern(&mut b[..4096], 4096, WRITE_SEED);
        assert_ne!(a[..], b[..4096]);
    }

    #[test]
    fn test_offsets_sequential_wraps_at_image_end() {
        let w = Workload {
            name: "t",
            op: Op::Read,
            pattern: Pattern::Sequential,
            block: 4096,
            depth: 1,
        };
        let mut o = Offsets::new(&w, 3 * 4096);
        let got: Vec<u64> = (0..4).map(|_| o.next()).collect();
        assert_eq!(got, [0, 4096, 8192, 0]);
    }

    #[test]
    fn test_offsets_random_aligned_and_in_range() {
        let w = Workload {
            name: "t",
            op: Op::Read,
            pattern: Pattern::Random,
            block: 4096,
            depth: 1,
        };
        let mut o = Offsets::new(&w, 1 << 20);
        for _ in 0..1000 {
            let off = o.next();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= 1 << 20);
        }
    }
}
