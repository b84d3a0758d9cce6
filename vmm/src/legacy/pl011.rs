//! ARM PrimeCell UART (PL011), the guest's always-there console.
//!
//! Complete enough for Linux's `amba-pl011` driver and its earlycon: PrimeCell identification,
//! flag register, line/control registers kept as written, interrupt mask/raw/masked status
//! and clear, and a receive FIFO fed from the host. Transmission is immediate, so the transmit
//! FIFO is always empty and the TX interrupt is raised after every write to the data register.
//! Received bytes wait in the FIFO; a host writer blocks while it is full, so no input is lost.
//!
//! Linux's `amba-pl011` reads the flag register before every character it prints outside its
//! interrupt handler: about a thousand exits on a guest's way to init, 0.3 ms each on a nested
//! host. While the receive FIFO is empty no register read has a side effect (the data register
//! reads as 0), so the UART can keep its registers in a
//! [`RegisterPage`](crate::regpage::RegisterPage) the guest reads as a
//! read-only memory slot ([`Pl011::attach_mirror`]): every change is stored there before the
//! exit that made it returns and before the interrupt line moves. When a byte arrives the slot
//! is removed first, so reads exit again and the data register pops the FIFO; the read that
//! empties it puts the slot back.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{error, warn};

use crate::regpage::PageSlot;

const DR: u64 = 0x000;
const RSR_ECR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;
const ID_BASE: u64 = 0xfe0;

/// PeriphID0-3 then PCellID0-3: a PL011 revision r1p3 (16-entry FIFOs), PrimeCell class.
const ID: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;

const INT_RX: u32 = 1 << 4;
const INT_TX: u32 = 1 << 5;
const INT_RT: u32 = 1 << 6;
const INT_ALL: u32 = 0x7ff;

const LCR_H_FEN: u32 = 1 << 4;
const CR_RESET: u32 = 0x300;
const IFLS_RESET: u32 = 0x12;
const FIFO_DEPTH: usize = 16;

/// The registers a read returns something for (the rest read as 0): what the mirror holds.
const READABLE: [u64; 21] = [
    DR,
    RSR_ECR,
    FR,
    ILPR,
    IBRD,
    FBRD,
    LCR_H,
    CR,
    IFLS,
    IMSC,
    RIS,
    MIS,
    DMACR,
    ID_BASE,
    ID_BASE + 4,
    ID_BASE + 8,
    ID_BASE + 12,
    ID_BASE + 16,
    ID_BASE + 20,
    ID_BASE + 24,
    ID_BASE + 28,
];

/// The wire from the UART to the interrupt controller.
pub trait IrqLine: Send {
    /// Drives the (level-triggered) line.
    fn set_level(&self, high: bool);
}

/// The register model of one PL011.
pub struct Pl011 {
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    /// Latched interrupt causes other than the receive ones, which follow the FIFO.
    ris_latched: u32,
    dmacr: u32,
    rx: VecDeque<u8>,
    out: Option<Box<dyn Write + Send>>,
    /// Transmitted bytes not yet written to `out` (only while [`Pl011::write_queued`] plays
    /// a batch).
    tx_held: Vec<u8>,
    holding: bool,
    irq: Box<dyn IrqLine>,
    irq_level: bool,
    /// The registers in guest-readable memory, present while the receive FIFO is empty.
    mirror: Option<Mirror>,
}

/// The UART's register page and whether the guest reads it now.
struct Mirror {
    slot: Box<dyn PageSlot>,
    present: bool,
}

impl Pl011 {
    /// A UART in its reset state writing to `out` (or nowhere) and signalling on `irq`.
    pub fn new(out: Option<Box<dyn Write + Send>>, irq: Box<dyn IrqLine>) -> Self {
        Self {
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            imsc: 0,
            ris_latched: 0,
            dmacr: 0,
            rx: VecDeque::with_capacity(FIFO_DEPTH),
            out,
            tx_held: Vec::new(),
            holding: false,
            irq,
            irq_level: false,
            mirror: None,
        }
    }

    /// Back to the reset state, wired to a new interrupt line (the output and any received
    /// bytes not yet read are kept). The register mirror is dropped with the VM it was in:
    /// attach the next VM's with [`Pl011::attach_mirror`].
    pub fn reset(&mut self, irq: Box<dyn IrqLine>) {
        let out = self.out.take();
        let rx = std::mem::take(&mut self.rx);
        *self = Self::new(out, irq);
        self.rx = rx;
    }

    /// Serves register reads from `slot`'s page while the receive FIFO is empty (see the
    /// module documentation). The slot starts unmapped; it is mapped here if the FIFO is
    /// empty.
    pub fn attach_mirror(&mut self, slot: Box<dyn PageSlot>) {
        self.mirror = Some(Mirror {
            slot,
            present: false,
        });
        self.sync_mirror();
    }

    /// Whether the guest reads the registers from the mirror now.
    pub fn mirrored(&self) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.present)
    }

    /// Stores the registers in the mirror and maps it if the FIFO is empty; unmaps it if not.
    fn sync_mirror(&mut self) {
        if self.mirror.is_none() {
            return;
        }
        let want = self.rx.is_empty();
        let registers = want.then(|| READABLE.map(|offset| (offset, self.register(offset))));
        let Some(mirror) = self.mirror.as_mut() else {
            return;
        };
        if let Some(registers) = registers {
            mirror.slot.page().store(&registers);
        }
        if want != mirror.present {
            match mirror.slot.set_present(want) {
                Ok(()) => mirror.present = want,
                // KVM refusing to add or remove a slot it has held is not expected. Still
                // mapped with bytes waiting, the guest sees none until a later change gets
                // the slot removed: the bytes are kept, not lost.
                Err(e) => error!(
                    "serial: {} the register page: {e}",
                    if want { "cannot map" } else { "cannot unmap" }
                ),
            }
        }
    }

    fn fifo_depth(&self) -> usize {
        if self.lcr_h & LCR_H_FEN != 0 {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// Bytes the receive FIFO can take now.
    pub fn rx_room(&self) -> usize {
        self.fifo_depth().saturating_sub(self.rx.len())
    }

    /// Queues received bytes, as many as fit; returns how many were taken.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_room());
        self.rx.extend(&bytes[..n]);
        self.update_irq();
        n
    }

    fn ris(&self) -> u32 {
        let rx = if self.rx.is_empty() {
            0
        } else {
            INT_RX | INT_RT
        };
        self.ris_latched | rx
    }

    /// Publishes the registers (mirror) and drives the interrupt line: the mirror first, so a
    /// guest that takes the interrupt reads the registers that raised it.
    fn update_irq(&mut self) {
        self.sync_mirror();
        let level = self.ris() & self.imsc != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    fn flags(&self) -> u32 {
        let mut fr = FR_TXFE;
        if self.rx.is_empty() {
            fr |= FR_RXFE;
        }
        if self.rx.len() >= self.fifo_depth() {
            fr |= FR_RXFF;
        }
        debug_assert_eq!(fr & FR_TXFF, 0);
        fr
    }

    fn transmit(&mut self, byte: u8) {
        if self.holding {
            if self.out.is_some() {
                self.tx_held.push(byte);
            }
        } else {
            send(&mut self.out, &[byte]);
        }
        self.ris_latched |= INT_TX;
    }

    /// Guest writes KVM queued without an exit (coalesced MMIO: the data register), in the
    /// guest's order, as (register offset, bytes); the characters among them go out in one
    /// write.
    pub fn write_queued<'a>(&mut self, writes: impl Iterator<Item = (u64, &'a [u8])>) {
        self.holding = true;
        for (offset, data) in writes {
            self.write(offset, data);
        }
        self.holding = false;
        if !self.tx_held.is_empty() {
            send(&mut self.out, &self.tx_held);
            self.tx_held.clear();
        }
    }

    /// A guest read of the register at `offset`; `data` is 1, 2 or 4 bytes.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == DR {
            let byte = self.rx.pop_front().map_or(0, u32::from);
            self.update_irq();
            byte
        } else {
            self.register(offset)
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    /// The value a read of `offset` returns, without its side effect (a data register read
    /// pops the receive FIFO; here it only looks at it).
    fn register(&self, offset: u64) -> u32 {
        match offset {
            DR => self.rx.front().map_or(0, |&b| u32::from(b)),
            RSR_ECR => 0,
            FR => self.flags(),
            ILPR => self.ilpr,
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            RIS => self.ris(),
            MIS => self.ris() & self.imsc,
            DMACR => self.dmacr,
            ID_BASE..=0xffc if offset.is_multiple_of(4) => {
                u32::from(ID[((offset - ID_BASE) / 4) as usize])
            }
            _ => 0,
        }
    }

    /// A guest write of the register at `offset`; `data` is 1, 2 or 4 bytes.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            DR => self.transmit(value as u8),
            RSR_ECR => {} // Clears error flags; no errors are ever raised.
            ILPR => self.ilpr = value & 0xff,
            IBRD => self.ibrd = value & 0xffff,
            FBRD => self.fbrd = value & 0x3f,
            LCR_H => {
                if (value ^ self.lcr_h) & LCR_H_FEN != 0 {
                    // Switching FIFOs on or off flushes them.
                    self.rx.clear();
                }
                self.lcr_h = value & 0xff;
            }
            CR => self.cr = value & 0xffff,
            IFLS => self.ifls = value & 0x3f,
            IMSC => self.imsc = value & INT_ALL,
            ICR => self.ris_latched &= !value,
            DMACR => self.dmacr = value & 0x7,
            _ => {} // Read-only or reserved: ignored.
        }
        self.update_irq();
    }
}

/// Writes `bytes` to the UART's output; a failed output is dropped (and said once).
fn send(out: &mut Option<Box<dyn Write + Send>>, bytes: &[u8]) {
    if let Some(o) = out.as_mut() {
        if let Err(e) = o.write_all(bytes).and_then(|()| o.flush()) {
            warn!("serial output failed, discarding further output: {e}");
            *out = None;
        }
    }
}

/// A PL011 shared between vCPU threads and the thread feeding it host input.
pub struct SharedPl011 {
    uart: Mutex<Pl011>,
    room: Condvar,
}

impl SharedPl011 {
    /// Shares `uart`.
    pub fn new(uart: Pl011) -> Self {
        Self {
            uart: Mutex::new(uart),
            room: Condvar::new(),
        }
    }

    /// Locks the UART; a thread that panicked while holding it left valid register state.
    pub fn lock(&self) -> MutexGuard<'_, Pl011> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest register read.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let mut uart = self.lock();
        uart.read(offset, data);
        if offset == DR {
            self.room.notify_all();
        }
    }

    /// A guest register write.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let mut uart = self.lock();
        uart.write(offset, data);
        if offset == LCR_H {
            self.room.notify_all();
        }
    }

    /// Hands `bytes` to the guest, waiting while the receive FIFO is full. Returns early, with
    /// the bytes not delivered, once `stop` is set.
    pub fn feed(&self, mut bytes: &[u8], stop: &AtomicBool) {
        let mut uart = self.lock();
        while !bytes.is_empty() && !stop.load(Ordering::Acquire) {
            let n = uart.receive(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                uart = self
                    .room
                    .wait_timeout(uart, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regpage::RegisterPage;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Line(Arc<Mutex<Vec<bool>>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().expect("lock").push(high);
        }
    }
    impl Line {
        fn last(&self) -> Option<bool> {
            self.0.lock().expect("lock").last().copied()
        }
    }

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Pl011, Line, Out) {
        let line = Line::default();
        let out = Out::default();
        (
            Pl011::new(Some(Box::new(out.clone())), Box::new(line.clone())),
            line,
            out,
        )
    }

    fn rd(u: &mut Pl011, off: u64) -> u32 {
        let mut d = [0u8; 4];
        u.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(u: &mut Pl011, off: u64, v: u32) {
        u.write(off, &v.to_le_bytes());
    }

    #[test]
    fn test_pl011_primecell_id_registers() {
        let (mut u, _, _) = uart();
        let ids: Vec<u32> = (0..8).map(|i| rd(&mut u, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, vec![0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn test_pl011_reset_values() {
        let (mut u, _, _) = uart();
        assert_eq!(rd(&mut u, CR), 0x300);
        assert_eq!(rd(&mut u, IFLS), 0x12);
        assert_eq!(rd(&mut u, FR), FR_TXFE | FR_RXFE);
        assert_eq!(rd(&mut u, RIS), 0);
    }

    #[test]
    fn test_pl011_tx_writes_output_and_raises_tx_interrupt() {
        let (mut u, line, out) = uart();
        wr(&mut u, DR, u32::from(b'h'));
        u.write(DR, b"i"); // byte-wide access
        assert_eq!(&*out.0.lock().expect("lock"), b"hi");
        assert_eq!(rd(&mut u, RIS) & INT_TX, INT_TX);
        assert_eq!(line.last(), None, "masked: line stays low");
        wr(&mut u, IMSC, INT_TX);
        assert_eq!(line.last(), Some(true));
        assert_eq!(rd(&mut u, MIS), INT_TX);
        wr(&mut u, ICR, INT_TX);
        assert_eq!(line.last(), Some(false));
        assert_eq!(rd(&mut u, RIS), 0);
    }

    #[test]
    fn test_pl011_queued_writes_send_their_characters_in_one_write() {
        #[derive(Clone, Default)]
        struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Writes {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (line, out) = (Line::default(), Writes::default());
        let mut u = Pl011::new(Some(Box::new(out.clone())), Box::new(line.clone()));
        let imsc = INT_TX.to_le_bytes();
        u.write_queued([(DR, &b"o"[..]), (DR, b"k"), (IMSC, &imsc[..]), (DR, b"!")].into_iter());
        assert_eq!(*out.0.lock().expect("lock"), vec![b"ok!".to_vec()]);
        assert_eq!(line.last(), Some(true), "TX interrupt raised once unmasked");
        // Outside a batch, each character goes out as it is written.
        wr(&mut u, DR, u32::from(b'.'));
        assert_eq!(out.0.lock().expect("lock").len(), 2);
    }

    #[test]
    fn test_pl011_rx_fifo_flags_and_interrupt_follow_data() {
        let (mut u, line, _) = uart();
        wr(&mut u, LCR_H, LCR_H_FEN | 0x60);
        wr(&mut u, IMSC, INT_RX | INT_RT);
        assert_eq!(u.receive(b"ab"), 2);
        assert_eq!(line.last(), Some(true));
        assert_eq!(rd(&mut u, FR) & FR_RXFE, 0);
        // Clearing does not drop the level while data is waiting.
        wr(&mut u, ICR, INT_ALL);
        assert_eq!(rd(&mut u, MIS), INT_RX | INT_RT);
        assert_eq!(rd(&mut u, DR), u32::from(b'a'));
        assert_eq!(rd(&mut u, DR), u32::from(b'b'));
        assert_eq!(rd(&mut u, FR) & FR_RXFE, FR_RXFE);
        assert_eq!(line.last(), Some(false));
        assert_eq!(rd(&mut u, DR), 0, "empty FIFO reads as 0");
    }

    #[test]
    fn test_pl011_rx_fifo_full_refuses_more() {
        let (mut u, _, _) = uart();
        // FIFOs off: a one-byte holding register.
        assert_eq!(u.receive(b"xyz"), 1);
        assert_eq!(rd(&mut u, FR) & FR_RXFF, FR_RXFF);
        assert_eq!(u.rx_room(), 0);
        assert_eq!(rd(&mut u, DR), u32::from(b'x'));
        wr(&mut u, LCR_H, LCR_H_FEN);
        assert_eq!(u.receive(&[0u8; 20]), 16);
        assert_eq!(rd(&mut u, FR) & FR_RXFF, FR_RXFF);
    }

    #[test]
    fn test_pl011_registers_keep_written_values() {
        let (mut u, _, _) = uart();
        for (reg, v) in [
            (IBRD, 0x1a),
            (FBRD, 0x3),
            (LCR_H, 0x70),
            (CR, 0x301),
            (IFLS, 0x9),
        ] {
            wr(&mut u, reg, v);
            assert_eq!(rd(&mut u, reg), v, "register {reg:#x}");
        }
        // Read-only and reserved registers ignore writes.
        wr(&mut u, FR, 0);
        wr(&mut u, 0xfe0, 0);
        wr(&mut u, 0x800, 0xdead);
        assert_eq!(rd(&mut u, 0xfe0), 0x11);
        assert_eq!(rd(&mut u, 0x800), 0);
    }

    #[test]
    fn test_pl011_shared_feed_blocks_until_guest_reads() {
        let (u, _, _) = uart();
        let shared = Arc::new(SharedPl011::new(u));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        let feeder = std::thread::spawn(move || s.feed(b"0123", &st));
        let mut got = Vec::new();
        while got.len() < 4 {
            let mut d = [0u8; 4];
            shared.mmio_read(FR, &mut d);
            if u32::from_le_bytes(d) & FR_RXFE == 0 {
                shared.mmio_read(DR, &mut d);
                got.push(d[0]);
            }
            std::thread::yield_now();
        }
        feeder.join().expect("feeder");
        assert_eq!(got, b"0123");
    }

    /// A register page whose mapping is only recorded: `Some(true)` mapped, `Some(false)`
    /// unmapped, in order.
    struct FakeSlot {
        page: RegisterPage,
        changes: Arc<Mutex<Vec<bool>>>,
        fail: Arc<AtomicBool>,
    }
    impl PageSlot for FakeSlot {
        fn page(&self) -> &RegisterPage {
            &self.page
        }
        fn set_present(&mut self, present: bool) -> std::io::Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.changes.lock().expect("lock").push(present);
            Ok(())
        }
    }

    /// A UART with a recorded register page.
    struct Mirrored {
        uart: Pl011,
        line: Line,
        changes: Arc<Mutex<Vec<bool>>>,
        fail: Arc<AtomicBool>,
        /// Valid as long as `uart`, whose slot owns the page.
        page: *const RegisterPage,
    }

    fn mirrored_uart() -> Mirrored {
        let (mut uart, line, _) = uart();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(AtomicBool::new(false));
        let slot = Box::new(FakeSlot {
            page: RegisterPage::new().expect("page"),
            changes: changes.clone(),
            fail: fail.clone(),
        });
        let page: *const RegisterPage = slot.page();
        uart.attach_mirror(slot);
        Mirrored {
            uart,
            line,
            changes,
            fail,
            page,
        }
    }

    #[test]
    fn test_pl011_mirror_holds_what_reads_return() {
        let Mirrored {
            uart: mut u,
            changes,
            page,
            ..
        } = mirrored_uart();
        // SAFETY: the page lives in the slot `u` owns.
        let page = unsafe { &*page };
        assert_eq!(*changes.lock().expect("lock"), vec![true]);
        assert!(u.mirrored());
        wr(&mut u, LCR_H, LCR_H_FEN | 0x60);
        wr(&mut u, IBRD, 0x1a);
        wr(&mut u, IMSC, INT_TX);
        u.write_queued([(DR, &b"x"[..])].into_iter());
        for offset in READABLE {
            assert_eq!(
                u64::from(page.load(offset as usize)),
                u64::from(rd(&mut u, offset)),
                "register {offset:#x}"
            );
        }
        assert_eq!(page.load(FR as usize), FR_TXFE | FR_RXFE);
        assert_eq!(page.load(MIS as usize), INT_TX);
        assert_eq!(page.load(0xfe0), 0x11);
        // Nothing arrived: the page stayed mapped throughout.
        assert_eq!(*changes.lock().expect("lock"), vec![true]);
    }

    #[test]
    fn test_pl011_mirror_goes_while_input_waits_and_returns_when_it_is_read() {
        let Mirrored {
            uart: mut u,
            line,
            changes,
            page,
            ..
        } = mirrored_uart();
        // SAFETY: the page lives in the slot `u` owns.
        let page = unsafe { &*page };
        wr(&mut u, LCR_H, LCR_H_FEN);
        wr(&mut u, IMSC, INT_RX);
        assert_eq!(u.receive(b"ab"), 2);
        // Unmapped before the line went up: the interrupt handler's reads exit.
        assert_eq!(*changes.lock().expect("lock"), vec![true, false]);
        assert!(!u.mirrored());
        assert_eq!(line.last(), Some(true));
        assert_eq!(rd(&mut u, DR), u32::from(b'a'));
        assert!(!u.mirrored(), "a byte still waits");
        assert_eq!(rd(&mut u, DR), u32::from(b'b'));
        assert_eq!(*changes.lock().expect("lock"), vec![true, false, true]);
        assert_eq!(line.last(), Some(false));
        // Back with the registers as they are now.
        assert_eq!(page.load(FR as usize), FR_TXFE | FR_RXFE);
        assert_eq!(page.load(IMSC as usize), INT_RX);
        assert_eq!(page.load(DR as usize), 0);
        // Switching the FIFOs off flushes them: the page returns too.
        assert_eq!(u.receive(b"c"), 1);
        assert!(!u.mirrored());
        wr(&mut u, LCR_H, 0);
        assert!(u.mirrored());
    }

    #[test]
    fn test_pl011_mirror_kvm_refusal_keeps_the_bytes() {
        let Mirrored {
            uart: mut u,
            changes,
            fail,
            ..
        } = mirrored_uart();
        fail.store(true, Ordering::Relaxed);
        assert_eq!(u.receive(b"z"), 1);
        assert!(u.mirrored(), "still mapped: the slot could not be removed");
        // The byte is kept; the next change tries again.
        fail.store(false, Ordering::Relaxed);
        wr(&mut u, IMSC, INT_RX);
        assert!(!u.mirrored());
        assert_eq!(rd(&mut u, DR), u32::from(b'z'));
        assert!(u.mirrored());
        assert_eq!(*changes.lock().expect("lock"), vec![true, false, true]);
    }

    #[test]
    fn test_pl011_reset_drops_the_mirror() {
        let mut u = mirrored_uart().uart;
        u.reset(Box::new(Line::default()));
        assert!(!u.mirrored());
    }

    #[test]
    fn test_pl011_shared_feed_returns_on_stop() {
        let (u, _, _) = uart();
        let shared = SharedPl011::new(u);
        let stop = AtomicBool::new(true);
        shared.feed(b"never read", &stop);
        assert_eq!(shared.lock().rx.len(), 0);
    }
}
