//! MSI-X: the vector table and the capability's enable and function-mask bits, turned into
//! KVM routes and irqfds.
//!
//! A vector is live when MSI-X is enabled, the function is not masked, the vector is not
//! masked and it holds a message. While live, each eventfd bound to it is a KVM irqfd, so a
//! device process raises the interrupt without the VMM. A masked vector's eventfds are
//! released from KVM: signals wait in the eventfd, and KVM delivers one pending signal when
//! the irqfd is assigned again on unmask, which is the pending-bit behaviour MSI-X asks for.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::irq::{IrqError, MsiMessage, VmInterrupts};

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes of one table entry.
pub const ENTRY_SIZE: usize = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Bits of the message control register a guest may write.
pub const CTRL_WRITABLE: u16 = CTRL_ENABLE | CTRL_FUNCTION_MASK;
const VECTOR_MASKED: u32 = 1;

/// One function's MSI-X state.
pub struct Msix {
    /// Address low, address high, data, vector control of each vector.
    table: Vec<[u32; 4]>,
    enabled: bool,
    function_masked: bool,
    devid: u32,
    /// Eventfds bound to each vector.
    sources: Vec<Vec<Arc<EventFd>>>,
    /// What is registered with KVM now: the GSI of each vector and its live irqfds.
    wiring: Option<Wiring>,
}

struct Wiring {
    irq: Arc<VmInterrupts>,
    gsis: Vec<u32>,
    live: Vec<Vec<Arc<EventFd>>>,
}

impl Msix {
    /// `vectors` vectors, all masked, for the function with requester ID `devid`.
    pub fn new(vectors: u16, devid: u32) -> Self {
        let n = usize::from(vectors);
        Self {
            table: vec![[0, 0, 0, VECTOR_MASKED]; n],
            enabled: false,
            function_masked: false,
            devid,
            sources: vec![Vec::new(); n],
            wiring: None,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Bytes of the vector table.
    pub fn table_size(&self) -> usize {
        self.table.len() * ENTRY_SIZE
    }

    /// The capability's body (after ID and next pointer): message control, then table and
    /// PBA offsets in BAR `bar`.
    pub fn capability_body(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut b = [0u8; 10];
        let size = (self.table.len() as u16).saturating_sub(1);
        b[0..2].copy_from_slice(&size.to_le_bytes());
        b[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        b
    }

    /// The guest wrote the message control register. An error means KVM refused a route or
    /// an irqfd: the function's interrupts are broken and its device must be failed.
    pub fn set_control(&mut self, control: u16) -> Result<(), IrqError> {
        self.enabled = control & CTRL_ENABLE != 0;
        self.function_masked = control & CTRL_FUNCTION_MASK != 0;
        self.sync()
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A guest read of the vector table.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (Ok(len), Some(v), Some(word)) = (
            u64::try_from(data.len()),
            self.table.get((offset / ENTRY_SIZE as u64) as usize),
            usize::try_from((offset % ENTRY_SIZE as u64) / 4).ok(),
        ) else {
            return;
        };
        // 4- and 8-byte aligned accesses, as the spec allows.
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            if let Some(w) = v.get(word + i) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
        }
    }

    /// A guest write to the vector table (errors as for [`Msix::set_control`]).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Result<(), IrqError> {
        let index = (offset / ENTRY_SIZE as u64) as usize;
        let word = ((offset % ENTRY_SIZE as u64) / 4) as usize;
        let len = data.len() as u64;
        if index >= self.table.len() || !(len == 4 || len == 8) || !offset.is_multiple_of(len) {
            return Ok(());
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w.copy_from_slice(chunk);
            if let Some(slot) = self.table[index].get_mut(word + i) {
                *slot = u32::from_le_bytes(w);
            }
        }
        self.sync()
    }

    /// A guest read of the pending bit array: pending signals wait in eventfds, so no bit is
    /// ever shown set.
    pub fn pba_read(&self, data: &mut [u8]) {
        data.fill(0);
    }

    /// Binds eventfds to `vector` (replacing what was bound).
    pub fn set_sources(&mut self, vector: usize, fds: Vec<Arc<EventFd>>) -> Result<(), IrqError> {
        if let Some(s) = self.sources.get_mut(vector) {
            *s = fds;
        }
        self.sync()
    }

    /// Unbinds `fd` from every vector.
    pub fn remove_source(&mut self, fd: &Arc<EventFd>) -> Result<(), IrqError> {
        for s in &mut self.sources {
            s.retain(|f| !Arc::ptr_eq(f, fd));
        }
        self.sync()
    }

    /// The requester ID changed (the guest renumbered the bus).
    pub fn set_devid(&mut self, devid: u32) -> Result<(), IrqError> {
        if devid != self.devid {
            self.devid = devid;
            return self.sync();
        }
        Ok(())
    }

    /// Releases what is registered with KVM: irqfds, routes, and the GSIs themselves, which
    /// go back to the VM's pool for the next function.
    fn detach(&mut self) -> Result<(), IrqError> {
        let Some(w) = self.wiring.take() else {
            return Ok(());
        };
        let mut first_error = None;
        for (v, fds) in w.live.iter().enumerate() {
            for fd in fds {
                if let Err(e) = w.irq.unregister_irqfd(fd, w.gsis[v]) {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = w.irq.free_gsis(&w.gsis) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Wires the vectors to a (new) VM: fresh GSIs (the old ones are freed); the table is back
    /// to its reset state.
    pub fn attach(&mut self, irq: Arc<VmInterrupts>) -> Result<(), IrqError> {
        // The old VM's routes go; failing to release them there does not stop the new wiring.
        let _ = self.detach();
        let mut gsis = Vec::with_capacity(self.table.len());
        for _ in 0..self.table.len() {
            match irq.allocate_gsi() {
                Ok(g) => gsis.push(g),
                Err(e) => {
                    let _ = irq.free_gsis(&gsis);
                    return Err(e);
                }
            }
        }
        for v in &mut self.table {
            *v = [0, 0, 0, VECTOR_MASKED];
        }
        for s in &mut self.sources {
            s.clear();
        }
        self.enabled = false;
        self.function_masked = false;
        let n = self.table.len();
        self.wiring = Some(Wiring {
            irq,
            gsis,
            live: vec![Vec::new(); n],
        });
        Ok(())
    }

    fn message(table: &[[u32; 4]], devid: u32, v: usize) -> Option<MsiMessage> {
        let [lo, hi, data, _] = table[v];
        let address = (u64::from(hi) << 32) | u64::from(lo);
        (address != 0).then_some(MsiMessage {
            address,
            data,
            devid,
        })
    }

    /// Brings KVM's routes and irqfds in line with the table; goes as far as it can and
    /// returns the first error.
    fn sync(&mut self) -> Result<(), IrqError> {
        let Some(w) = self.wiring.as_mut() else {
            return Ok(());
        };
        let updates: Vec<_> = (0..self.table.len())
            .map(|v| (w.gsis[v], Self::message(&self.table, self.devid, v)))
            .collect();
        let mut first_error = w.irq.set_routes(&updates).err();
        for v in 0..self.table.len() {
            let live = self.enabled
                && !self.function_masked
                && self.table[v][3] & VECTOR_MASKED == 0
                && Self::message(&self.table, self.devid, v).is_some();
            let want: &[Arc<EventFd>] = if live { &self.sources[v] } else { &[] };
            let gsi = w.gsis[v];
            let have = &mut w.live[v];
            have.retain(|fd| {
                if want.iter().any(|f| Arc::ptr_eq(f, fd)) {
                    return true;
                }
                if let Err(e) = w.irq.unregister_irqfd(fd, gsi) {
                    first_error.get_or_insert(e);
                }
                false
            });
            for fd in want {
                if !have.iter().any(|f| Arc::ptr_eq(f, fd)) {
                    match w.irq.register_irqfd(fd, gsi) {
                        Ok(()) => have.push(fd.clone()),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        // An unplugged function gives its GSIs back (errors: the VM is going away).
        let _ = self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_msix_table_roundtrip_and_bounds() {
        let mut m = Msix::new(3, 0x100);
        m.table_write(16, &0xfee0_0000u32.to_le_bytes())
            .expect("no wiring");
        m.table_write(16 + 8, &42u32.to_le_bytes())
            .expect("no wiring");
        let mut d = [0u8; 4];
        m.table_read(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0000);
        m.table_read(16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vectors start masked");
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        // Out of range, misaligned and odd-sized accesses are ignored.
        m.table_write(3 * 16, &[1, 2, 3, 4]).expect("ignored");
        m.table_write(17, &[1, 2, 3, 4]).expect("ignored");
        m.table_write(16, &[1, 2]).expect("ignored");
        m.table_read(1000, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(
            Msix::message(&m.table, m.devid, 1).map(|x| (x.address, x.data, x.devid)),
            Some((0xfee0_0000, 42, 0x100))
        );
    }

    #[test]
    fn test_msix_capability_body() {
        let m = Msix::new(4, 0);
        let b = m.capability_body(0, 0x4000, 0x6000);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 3);
        assert_eq!(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 0x4000);
        assert_eq!(u32::from_le_bytes([b[6], b[7], b[8], b[9]]), 0x6000);
    }
}
