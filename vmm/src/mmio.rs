//! The guest's MMIO address space as the VMM sees it: which device answers which range.

use std::ops::Range;
use std::sync::{Arc, RwLock};

use log::warn;

/// A device that answers MMIO accesses in a range.
pub trait MmioDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset` into the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's range.
    fn write(&self, offset: u64, data: &[u8]);
    /// Writes KVM queued without an exit (coalesced MMIO), in the guest's order; `base` is
    /// where the device's range starts. One by one unless the device can do better.
    fn write_queued(&self, base: u64, writes: &[QueuedWrite]) {
        for w in writes {
            self.write(w.addr - base, w.data());
        }
    }
}

/// A guest write KVM queued instead of exiting (see [`crate::coalesced`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct QueuedWrite {
    /// Guest physical address.
    pub addr: u64,
    /// Bytes written, at most 8.
    pub len: u8,
    /// The bytes, `len` of them.
    pub bytes: [u8; 8],
}

impl QueuedWrite {
    /// The bytes written.
    pub fn data(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(8)]
    }
}

/// Accesses to addresses no device claims, reported so many times before going quiet.
const UNASSIGNED_WARNINGS: u32 = 10;

/// The MMIO devices of a VM, by guest physical range.
/// A device and the guest physical range it answers.
type Mapping = (Range<u64>, Arc<dyn MmioDevice>);

/// Devices are looked up under a read lock and called after it is released, so a device
/// may change the map (a BAR move) while other vCPUs use it.
#[derive(Default)]
pub struct MmioBus {
    devices: RwLock<Vec<Mapping>>,
    unassigned: std::sync::atomic::AtomicU32,
}

/// Two devices were given overlapping ranges.
#[derive(Debug, thiserror::Error)]
#[error("MMIO range {new:#x?} overlaps {existing:#x?}")]
pub struct OverlapError {
    new: Range<u64>,
    existing: Range<u64>,
}

impl MmioBus {
    /// Adds `device` at `range`.
    pub fn insert(
        &self,
        range: Range<u64>,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), OverlapError> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some((existing, _)) = devices
            .iter()
            .find(|(r, _)| r.start < range.end && range.start < r.end)
        {
            return Err(OverlapError {
                new: range,
                existing: existing.clone(),
            });
        }
        devices.push((range, device));
        Ok(())
    }

    /// Removes the device whose range starts at `start`.
    pub fn remove(&self, start: u64) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(r, _)| r.start != start);
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, Arc<dyn MmioDevice>)> {
        self.find_range(addr, len).map(|(r, d)| (addr - r.start, d))
    }

    fn find_range(&self, addr: u64, len: usize) -> Option<(Range<u64>, Arc<dyn MmioDevice>)> {
        let end = addr.checked_add(len as u64)?;
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(r, _)| r.start <= addr && end <= r.end)
            .map(|(r, d)| (r.clone(), d.clone()))
    }

    /// Serves writes KVM queued, in order: each run of them that one device answers is
    /// handed to it at once.
    pub fn write_queued(&self, mut writes: &[QueuedWrite]) {
        while let Some(first) = writes.first() {
            let Some((range, dev)) = self.find_range(first.addr, first.data().len()) else {
                self.unassigned("write", first.addr, first.data().len());
                writes = &writes[1..];
                continue;
            };
            let run = writes
                .iter()
                .take_while(|w| {
                    range.start <= w.addr
                        && w.addr
                            .checked_add(w.data().len() as u64)
                            .is_some_and(|end| end <= range.end)
                })
                .count();
            dev.write_queued(range.start, &writes[..run]);
            writes = &writes[run..];
        }
    }

    fn unassigned(&self, kind: &str, addr: u64, len: usize) {
        let n = self
            .unassigned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < UNASSIGNED_WARNINGS {
            warn!("guest {kind} of {len} bytes at unassigned address {addr:#x} (reads as zero, writes ignored)");
        }
    }

    /// Serves a guest read; unassigned addresses read as zero.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => dev.read(offset, data),
            None => {
                self.unassigned("read", addr, data.len());
                data.fill(0);
            }
        }
    }

    /// Serves a guest write; writes to unassigned addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => dev.write(offset, data),
            None => self.unassigned("write", addr, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().expect("lock").push((offset, data.to_vec()));
        }
    }

    #[test]
    fn test_mmio_bus_dispatches_by_range_with_offsets() {
        let dev = Arc::new(Recorder::default());
        let bus = MmioBus::default();
        bus.insert(0x1000..0x2000, dev.clone()).expect("insert");
        let mut d = [0u8; 4];
        bus.read(0x1010, &mut d);
        assert_eq!(d, [0x10; 4]);
        bus.write(0x1ffc, &[1, 2, 3, 4]);
        assert_eq!(dev.0.lock().expect("lock")[0], (0xffc, vec![1, 2, 3, 4]));
    }

    #[test]
    fn test_mmio_bus_unassigned_and_straddling_accesses_are_harmless() {
        let dev = Arc::new(Recorder::default());
        let bus = MmioBus::default();
        bus.insert(0x1000..0x2000, dev.clone()).expect("insert");
        let mut d = [0xffu8; 8];
        bus.read(0x1ffc, &mut d); // crosses the end of the range
        assert_eq!(d, [0; 8]);
        bus.read(u64::MAX - 2, &mut d); // would overflow
        bus.write(0x5000, &[1]);
        assert!(dev.0.lock().expect("lock").is_empty());
    }

    #[test]
    fn test_mmio_bus_refuses_overlaps() {
        let bus = MmioBus::default();
        bus.insert(0x1000..0x2000, Arc::new(Recorder::default()))
            .expect("insert");
        assert!(bus
            .insert(0x1800..0x1900, Arc::new(Recorder::default()))
            .is_err());
        assert!(bus
            .insert(0x2000..0x3000, Arc::new(Recorder::default()))
            .is_ok());
        bus.remove(0x1000);
        assert!(bus
            .insert(0x1800..0x1900, Arc::new(Recorder::default()))
            .is_ok());
    }
}
