//! The two CFI flash banks of QEMU's `virt` machine, which edk2's ArmVirtQemu firmware runs
//! from (bank 0, executed in place) and keeps its UEFI variables in (bank 1).
//!
//! Both banks are host memory mapped into the guest as read-only KVM memory slots, so the
//! firmware's instruction fetches and its reads of the variable store (`CopyMem`, with
//! load-pair instructions an MMIO exit could not decode) never leave the guest. A write to a
//! read-only slot is an MMIO exit: that is how the flash's commands arrive. Bank 1 follows the
//! Intel/Sharp command set (CFI command set 0001, as QEMU's `pflash_cfi01` and edk2's
//! VirtNorFlashDxe speak it): read array, read status, clear status, read identifier, CFI
//! query, word program, buffered program, block erase, block (un)lock. While the bank is in
//! any mode but read array its memory slot is removed, so that the guest's reads exit to the
//! VMM and get the status register, the identifier or the query table (as QEMU does with its
//! "romd" mode); back in read-array mode the slot returns.
//!
//! Program and erase act on the bank's mapping; with `--firmware-vars` that mapping is the
//! vars file itself (`MAP_SHARED`), so what the guest programs is in the file as soon as the
//! command completes, and survives the VMM. Bank 0 ignores writes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bulkhead_firmware::image::GuestArch;

use bulkhead_firmware::layout::{
    FLASH_BANK_SIZE, FLASH_BANK_WIDTH, FLASH_CODE_START, FLASH_SECTOR_SIZE, FLASH_VARS_START,
};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use log::{debug, error, info, warn};

use crate::mmio::MmioDevice;

/// KVM memory slot of the code bank (slot 0 is guest RAM).
const CODE_SLOT: u32 = 1;
/// KVM memory slot of the variable bank.
const VARS_SLOT: u32 = 2;

/// Errors setting up the flash banks.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// A file could not be opened, created or read.
    #[error("{what} {path:?}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than a flash bank, or a vars file is not a bank's size.
    #[error("{what} {path:?} is {size} bytes; {expected}")]
    Size {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// What was expected.
        expected: String,
    },
    /// The bank's memory could not be mapped.
    #[error("mapping a flash bank")]
    Map(#[source] std::io::Error),
    /// KVM refused a memory slot.
    #[error("registering flash bank memory with KVM")]
    SetMemoryRegion(#[source] kvm_ioctls::Error),
}

/// A bank's host mapping: `FLASH_BANK_SIZE` bytes.
struct BankMemory {
    ptr: NonNull<u8>,
}

// SAFETY: the mapping is owned by this value and lives until it is dropped; accesses from the
// VMM go through the bank's mutex (the guest's own accesses are the guest's business).
unsafe impl Send for BankMemory {}
// SAFETY: as above.
unsafe impl Sync for BankMemory {}

impl BankMemory {
    fn map(
        prot: libc::c_int,
        flags: libc::c_int,
        fd: Option<&File>,
        len: u64,
    ) -> Result<*mut libc::c_void, FlashError> {
        // SAFETY: a new mapping at an address the kernel chooses; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                flags,
                fd.map_or(-1, |f| f.as_raw_fd()),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(FlashError::Map(std::io::Error::last_os_error()));
        }
        Ok(p)
    }

    /// Zeroed anonymous memory (an in-memory variable store; edk2 formats it).
    fn anonymous() -> Result<Self, FlashError> {
        let p = Self::map(
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            FLASH_BANK_SIZE,
        )?;
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or(FlashError::Map(std::io::ErrorKind::Other.into()))?,
        })
    }

    /// The firmware file, private and read only, followed by zeros up to the bank's size.
    fn firmware(file: &File, size: u64) -> Result<Self, FlashError> {
        let base = Self::map(
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            FLASH_BANK_SIZE,
        )?;
        let this = Self {
            ptr: NonNull::new(base.cast())
                .ok_or(FlashError::Map(std::io::ErrorKind::Other.into()))?,
        };
        if size > 0 {
            // SAFETY: replaces the start of our own mapping (MAP_FIXED inside it) with the
            // file; the bytes of the last page past the end of the file read as zeros.
            let p = unsafe {
                libc::mmap(
                    base,
                    size as usize,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(FlashError::Map(std::io::Error::last_os_error()));
            }
        }
        Ok(this)
    }

    /// The vars file itself, shared: what is programmed lands in the file.
    fn shared(file: &File) -> Result<Self, FlashError> {
        let p = Self::map(
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            Some(file),
            FLASH_BANK_SIZE,
        )?;
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or(FlashError::Map(std::io::ErrorKind::Other.into()))?,
        })
    }

    fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn get(&self, offset: u64) -> u8 {
        if offset >= FLASH_BANK_SIZE {
            return 0;
        }
        // SAFETY: in bounds of the mapping; volatile because the guest may read it meanwhile.
        unsafe { self.ptr.as_ptr().add(offset as usize).read_volatile() }
    }

    /// NOR programming: bits go from 1 to 0 only.
    fn program(&self, offset: u64, byte: u8) {
        if offset >= FLASH_BANK_SIZE {
            return;
        }
        // SAFETY: in bounds of a writable mapping (only the vars bank is programmed).
        unsafe {
            let p = self.ptr.as_ptr().add(offset as usize);
            p.write_volatile(p.read_volatile() & byte);
        }
    }

    fn erase(&self, start: u64, len: u64) {
        let end = (start + len).min(FLASH_BANK_SIZE);
        if start >= end {
            return;
        }
        // SAFETY: in bounds of a writable mapping.
        unsafe {
            std::ptr::write_bytes(
                self.ptr.as_ptr().add(start as usize),
                0xff,
                (end - start) as usize,
            )
        };
    }
}

impl Drop for BankMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps what `map` mapped; no KVM VM uses it any more (VMs are dropped first).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), FLASH_BANK_SIZE as usize) };
    }
}

/// The command state of a CFI flash (Intel command set), apart from its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Reads return the array.
    ReadArray,
    /// Reads return the status register.
    Status,
    /// Reads return the manufacturer and device codes.
    Identifier,
    /// Reads return the CFI query table.
    Query,
    /// The next write is the word to program (0x40/0x10 given).
    Program,
    /// The next write is the word count of a buffered program (0xe8 given).
    BufferCount,
    /// This many more data writes of a buffered program.
    BufferData(u32),
    /// The next write must confirm the buffered program (0xd0).
    BufferConfirm,
    /// The next write must confirm a block erase (0x20 given).
    EraseConfirm,
    /// The next write confirms a block lock or unlock (0x60 given).
    LockConfirm,
}

/// Status register: write state machine ready.
const SR_READY: u8 = 0x80;
/// Status register: erase error.
const SR_ERASE_ERROR: u8 = 0x20;
/// Status register: program error.
const SR_PROGRAM_ERROR: u8 = 0x10;

/// Manufacturer code (Intel) and device code QEMU's `virt` flash reports.
const MANUFACTURER_ID: u8 = 0x89;
const DEVICE_ID: u8 = 0x18;

/// Bytes per device: the bank is two 16-bit devices side by side.
const DEVICE_WIDTH: u64 = 2;

/// The CFI query table of one of the two devices (addresses in device words).
fn query_table(index: u64) -> u8 {
    // Each device holds half the bank and half of each erase block.
    let device_size_log2 = (FLASH_BANK_SIZE / 2).trailing_zeros() as u8;
    let device_block = FLASH_SECTOR_SIZE / 2;
    let blocks = (FLASH_BANK_SIZE / FLASH_SECTOR_SIZE - 1) as u16;
    match index {
        0x10 => b'Q',
        0x11 => b'R',
        0x12 => b'Y',
        // Primary command set 0x0001 (Intel/Sharp extended), its table at 0x31.
        0x13 => 0x01,
        0x15 => 0x31,
        // Vcc 4.5-5.5 V.
        0x1b => 0x45,
        0x1c => 0x55,
        // Typical times: word program 2^7 us, buffer program 2^7 us, block erase 2^10 ms;
        // maxima 2^4 times those.
        0x1f => 0x07,
        0x20 => 0x07,
        0x21 => 0x0a,
        0x23..=0x25 => 0x04,
        0x27 => device_size_log2,
        // x16 interface.
        0x28 => 0x01,
        // Write buffer: 2^6 bytes per device (edk2 sends at most 128 bytes per bank).
        0x2a => 0x06,
        // One erase block region: `blocks + 1` blocks of `device_block` bytes.
        0x2c => 0x01,
        0x2d => blocks as u8,
        0x2e => (blocks >> 8) as u8,
        0x2f => ((device_block >> 8) & 0xff) as u8,
        0x30 => (device_block >> 16) as u8,
        // Primary extended query table, version 1.0.
        0x31 => b'P',
        0x32 => b'R',
        0x33 => b'I',
        0x34 => b'1',
        0x35 => b'0',
        _ => 0,
    }
}

/// One CFI flash bank: its memory, command state and KVM memory slot.
pub struct FlashBank {
    name: &'static str,
    start: u64,
    slot: u32,
    writable: bool,
    /// Before `memory`: the VM that maps the memory is dropped before it is unmapped.
    inner: Mutex<Inner>,
    memory: BankMemory,
}

struct Inner {
    mode: Mode,
    status: u8,
    /// The current VM, while its slot is to be kept in step with the mode.
    vm: Option<Arc<VmFd>>,
    /// Whether the bank's memory slot is registered.
    mapped: bool,
    /// Writes reported so far on a read-only bank.
    ignored_writes: u32,
}

impl FlashBank {
    fn new(name: &'static str, start: u64, slot: u32, writable: bool, memory: BankMemory) -> Self {
        Self {
            name,
            start,
            slot,
            writable,
            inner: Mutex::new(Inner {
                mode: Mode::ReadArray,
                status: SR_READY,
                vm: None,
                mapped: false,
                ignored_writes: 0,
            }),
            memory,
        }
    }

    /// Where the bank is in the guest.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.start..self.start + FLASH_BANK_SIZE
    }

    fn region(&self, mapped: bool) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: self.start,
            memory_size: if mapped { FLASH_BANK_SIZE } else { 0 },
            userspace_addr: self.memory.host_addr(),
        }
    }

    /// Puts the bank in read-array mode and maps it into a freshly created VM.
    pub fn reset(&self, vm: &Arc<VmFd>) -> Result<(), FlashError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.mode = Mode::ReadArray;
        inner.status = SR_READY;
        // SAFETY: the region is this bank's mapping, which lives as long as the bank, and the
        // bank outlives every VM it is mapped into (the Vm owns both, VMs are dropped first).
        unsafe { vm.set_user_memory_region(self.region(true)) }
            .map_err(FlashError::SetMemoryRegion)?;
        inner.vm = Some(vm.clone());
        inner.mapped = true;
        Ok(())
    }

    /// Maps or unmaps the bank's slot so that reads reach the array only in read-array mode.
    fn sync_slot(&self, inner: &mut Inner) {
        let want = inner.mode == Mode::ReadArray;
        if want == inner.mapped {
            return;
        }
        let Some(vm) = inner.vm.as_ref() else {
            return;
        };
        // SAFETY: as in `reset`; a size of 0 deletes the slot.
        match unsafe { vm.set_user_memory_region(self.region(want)) } {
            Ok(()) => inner.mapped = want,
            Err(e) => error!("{}: switching the flash's memory slot: {e}", self.name),
        }
    }

    fn handle_write(&self, inner: &mut Inner, offset: u64, data: &[u8]) {
        let mut value = [0u8; 8];
        value[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let value = u64::from_le_bytes(value);
        let cmd = value as u8;
        match inner.mode {
            Mode::Program => {
                for (i, b) in data.iter().enumerate() {
                    self.memory.program(offset + i as u64, *b);
                }
                inner.status |= SR_READY;
                inner.mode = Mode::Status;
            }
            Mode::BufferCount => {
                // The count of bank-wide writes to come, minus one, per device.
                let count = (value & 0xffff) as u32;
                inner.mode = Mode::BufferData(count + 1);
            }
            Mode::BufferData(left) => {
                for (i, b) in data.iter().enumerate() {
                    self.memory.program(offset + i as u64, *b);
                }
                inner.mode = if left <= 1 {
                    Mode::BufferConfirm
                } else {
                    Mode::BufferData(left - 1)
                };
            }
            Mode::BufferConfirm => {
                if cmd != 0xd0 {
                    warn!("{}: buffered program not confirmed ({cmd:#x})", self.name);
                    inner.status |= SR_PROGRAM_ERROR;
                }
                inner.status |= SR_READY;
                inner.mode = Mode::Status;
            }
            Mode::EraseConfirm => {
                if cmd == 0xd0 {
                    let block = offset & !(FLASH_SECTOR_SIZE - 1);
                    self.memory.erase(block, FLASH_SECTOR_SIZE);
                    debug!("{}: erased block {block:#x}", self.name);
                } else {
                    warn!("{}: block erase not confirmed ({cmd:#x})", self.name);
                    inner.status |= SR_ERASE_ERROR;
                }
                inner.status |= SR_READY;
                inner.mode = Mode::Status;
            }
            Mode::LockConfirm => {
                // 0x01 locks, 0xd0 unlocks: blocks are never locked here.
                inner.status |= SR_READY;
                inner.mode = Mode::Status;
            }
            Mode::ReadArray | Mode::Status | Mode::Identifier | Mode::Query => {
                inner.mode = match cmd {
                    0x00 | 0xf0 | 0xff => Mode::ReadArray,
                    0x10 | 0x40 => Mode::Program,
                    0x20 => Mode::EraseConfirm,
                    0x50 => {
                        inner.status = SR_READY;
                        Mode::ReadArray
                    }
                    0x60 => Mode::LockConfirm,
                    0x70 => Mode::Status,
                    0x90 => Mode::Identifier,
                    0x98 => Mode::Query,
                    0xe8 => {
                        inner.status |= SR_READY;
                        Mode::BufferCount
                    }
                    other => {
                        warn!(
                            "{}: unknown command {other:#x} at {offset:#x}; back to read array",
                            self.name
                        );
                        Mode::ReadArray
                    }
                };
            }
        }
    }

    fn handle_read(&self, inner: &Inner, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let addr = offset + i as u64;
            // Each device answers in the low byte of its 16-bit lane.
            let low_byte = addr.is_multiple_of(DEVICE_WIDTH);
            let word = addr / u64::from(FLASH_BANK_WIDTH);
            *b = match inner.mode {
                Mode::ReadArray => self.memory.get(addr),
                Mode::Identifier if low_byte => match word & 0xff {
                    0 => MANUFACTURER_ID,
                    1 => DEVICE_ID,
                    _ => 0,
                },
                Mode::Query if low_byte => query_table(word),
                Mode::Identifier | Mode::Query => 0,
                _ if low_byte => inner.status,
                _ => 0,
            };
        }
    }
}

impl MmioDevice for FlashBank {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.handle_read(&inner, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !self.writable {
            if inner.ignored_writes < 10 {
                warn!(
                    "{}: the guest wrote {:x?} at {offset:#x} of a read-only flash bank; ignored",
                    self.name, data
                );
            }
            inner.ignored_writes = inner.ignored_writes.saturating_add(1);
            return;
        }
        self.handle_write(&mut inner, offset, data);
        self.sync_slot(&mut inner);
    }
}

/// What backs the variable bank.
#[derive(Debug)]
pub enum VarsStore {
    /// Memory for the VM's life.
    Memory,
    /// A file of exactly one bank's size, written as the guest programs it.
    File(File),
}

/// The two banks: firmware code and variables.
pub struct Flash {
    /// Bank 0, the firmware.
    pub code: Arc<FlashBank>,
    /// Bank 1, the variable store.
    pub vars: Arc<FlashBank>,
}

impl Flash {
    /// Maps the firmware file (read only, executed in place) and the variable store.
    pub fn new(firmware: &File, vars: &VarsStore) -> Result<Self, FlashError> {
        let size = firmware
            .metadata()
            .map_err(|source| FlashError::File {
                what: "firmware",
                path: PathBuf::new(),
                source,
            })?
            .len();
        let code = BankMemory::firmware(firmware, size.min(FLASH_BANK_SIZE))?;
        let vars_mem = match vars {
            VarsStore::Memory => BankMemory::anonymous()?,
            VarsStore::File(f) => BankMemory::shared(f)?,
        };
        Ok(Self {
            code: Arc::new(FlashBank::new(
                "flash0 (firmware)",
                FLASH_CODE_START,
                CODE_SLOT,
                false,
                code,
            )),
            vars: Arc::new(FlashBank::new(
                "flash1 (variables)",
                FLASH_VARS_START,
                VARS_SLOT,
                true,
                vars_mem,
            )),
        })
    }

    /// Maps both banks into a freshly created VM, in read-array mode.
    pub fn reset(&self, vm: &Arc<VmFd>) -> Result<(), FlashError> {
        self.code.reset(vm)?;
        self.vars.reset(vm)
    }
}

/// Checks the firmware file: it must fit in a bank.
pub fn check_firmware(path: &Path) -> Result<File, FlashError> {
    let file = File::open(path).map_err(|source| FlashError::File {
        what: "cannot open firmware",
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| FlashError::File {
            what: "cannot read firmware",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size == 0 || size > FLASH_BANK_SIZE {
        return Err(FlashError::Size {
            what: "firmware",
            path: path.to_path_buf(),
            size,
            expected: format!("expected 1 to {FLASH_BANK_SIZE} bytes (one flash bank)"),
        });
    }
    Ok(file)
}

/// The distribution's variable store template for `firmware`: `AAVMF_VARS.fd` beside it
/// (Debian's /usr/share/AAVMF), or in /usr/share/AAVMF for QEMU_EFI.fd; `AAVMF32_VARS.fd`
/// for the 32-bit build (qemu-efi-arm).
pub fn vars_template(firmware: &Path, arch: GuestArch) -> Option<PathBuf> {
    let name = match arch {
        GuestArch::Aarch64 => "AAVMF_VARS.fd",
        GuestArch::Arm => "AAVMF32_VARS.fd",
    };
    let beside = firmware.parent().map(|d| d.join(name));
    [beside, Some(Path::new("/usr/share/AAVMF").join(name))]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// Opens the vars file read-write; creates it when it does not exist, as a copy of `template`
/// padded to a bank's size, or (no template) one bank of zeros, which is what Debian's
/// template holds and what edk2 formats as an empty store on its first boot.
pub fn open_vars(path: &Path, template: Option<&Path>) -> Result<File, FlashError> {
    let file_err = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| FlashError::File {
            what,
            path: p,
            source,
        }
    };
    match File::options().read(true).write(true).open(path) {
        Ok(file) => {
            let size = file
                .metadata()
                .map_err(file_err("cannot read vars file", path))?
                .len();
            if size != FLASH_BANK_SIZE {
                return Err(FlashError::Size {
                    what: "vars file",
                    path: path.to_path_buf(),
                    size,
                    expected: format!(
                        "a variable store is one flash bank, {FLASH_BANK_SIZE} bytes \
                         (a copy of AAVMF_VARS.fd)"
                    ),
                });
            }
            Ok(file)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(file_err("cannot create vars file", path))?;
            if let Some(t) = template {
                let mut src = File::open(t).map_err(file_err("cannot open vars template", t))?;
                let size = src
                    .metadata()
                    .map_err(file_err("cannot read vars template", t))?
                    .len();
                if size > FLASH_BANK_SIZE {
                    return Err(FlashError::Size {
                        what: "vars template",
                        path: t.to_path_buf(),
                        size,
                        expected: format!("at most {FLASH_BANK_SIZE} bytes"),
                    });
                }
                std::io::copy(&mut src, &mut &file)
                    .map_err(file_err("cannot copy the vars template into", path))?;
                info!("created {path:?} from {t:?}");
            } else {
                info!("created {path:?} as an empty variable store");
            }
            file.set_len(FLASH_BANK_SIZE)
                .map_err(file_err("cannot size vars file", path))?;
            Ok(file)
        }
        Err(e) => Err(FlashError::File {
            what: "cannot open vars file",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bank() -> FlashBank {
        let mem = BankMemory::anonymous().expect("anonymous bank");
        FlashBank::new("test", FLASH_VARS_START, VARS_SLOT, true, mem)
    }

    fn cmd(b: &FlashBank, offset: u64, c: u8) {
        let v = u32::from(c) | (u32::from(c) << 16);
        b.write(offset, &v.to_le_bytes());
    }

    fn read32(b: &FlashBank, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        b.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn test_flash_erase_program_read_array() {
        let b = bank();
        assert_eq!(read32(&b, 0x100), 0);
        // Block erase of the block holding 0x40100.
        cmd(&b, 0x40100, 0x20);
        assert_eq!(
            read32(&b, 0x40100) & 0x00ff_00ff,
            0x0080_0080,
            "status while erasing"
        );
        cmd(&b, 0x40100, 0xd0);
        assert_eq!(read32(&b, 0), 0x0080_0080, "status after the erase");
        cmd(&b, 0, 0xff);
        assert_eq!(read32(&b, 0x40000), 0xffff_ffff);
        assert_eq!(read32(&b, 0x7fffc), 0xffff_ffff);
        assert_eq!(read32(&b, 0x3fffc), 0, "the block before is untouched");
        assert_eq!(read32(&b, 0x80000), 0, "the block after is untouched");
        // Word program clears bits only.
        cmd(&b, 0x40000, 0x40);
        b.write(0x40000, &0x1234_5678u32.to_le_bytes());
        assert_eq!(read32(&b, 0x40000), 0x0080_0080);
        cmd(&b, 0x40000, 0xff);
        assert_eq!(read32(&b, 0x40000), 0x1234_5678);
        cmd(&b, 0x40000, 0x40);
        b.write(0x40000, &0xffff_0000u32.to_le_bytes());
        cmd(&b, 0x40000, 0xff);
        assert_eq!(read32(&b, 0x40000), 0x1234_0000);
    }

    #[test]
    fn test_flash_buffered_program() {
        let b = bank();
        cmd(&b, 0x40000, 0x20);
        cmd(&b, 0x40000, 0xd0);
        cmd(&b, 0x40000, 0xe8);
        assert_eq!(read32(&b, 0x40000) & 0x80, 0x80, "ready for the buffer");
        // Three 32-bit writes: count 2 in each device.
        b.write(0x40000, &0x0002_0002u32.to_le_bytes());
        for i in 0..3u32 {
            b.write(0x40010 + 4 * u64::from(i), &(0xa0 + i).to_le_bytes());
        }
        cmd(&b, 0x40000, 0xd0);
        assert_eq!(read32(&b, 0x40000), 0x0080_0080);
        cmd(&b, 0x40000, 0xff);
        assert_eq!(read32(&b, 0x40010), 0xa0);
        assert_eq!(read32(&b, 0x40018), 0xa2);
        assert_eq!(read32(&b, 0x4001c), 0xffff_ffff);
    }

    #[test]
    fn test_flash_query_and_identifier() {
        let b = bank();
        cmd(&b, 0, 0x98);
        let q: Vec<u32> = (0x10..0x13).map(|i| read32(&b, 4 * i)).collect();
        assert_eq!(
            q,
            vec![
                u32::from(b'Q') * 0x1_0001,
                u32::from(b'R') * 0x1_0001,
                u32::from(b'Y') * 0x1_0001
            ]
        );
        // Device size 2^25 (each of two devices holds half of 64 MiB).
        assert_eq!(read32(&b, 4 * 0x27), 25 * 0x1_0001);
        cmd(&b, 0, 0x90);
        assert_eq!(read32(&b, 0), 0x89 * 0x1_0001);
        assert_eq!(read32(&b, 4), 0x18 * 0x1_0001);
        cmd(&b, 0, 0xff);
        assert_eq!(read32(&b, 0), 0);
    }

    #[test]
    fn test_flash_clear_status_and_unknown_command_return_to_read_array() {
        let b = bank();
        cmd(&b, 0, 0x70);
        assert_eq!(read32(&b, 0), 0x0080_0080);
        cmd(&b, 0, 0x50);
        assert_eq!(read32(&b, 0), 0, "read array after clear status");
        cmd(&b, 0, 0x60);
        cmd(&b, 0, 0xd0);
        assert_eq!(read32(&b, 0), 0x0080_0080, "status after unlock");
        cmd(&b, 0, 0x42);
        assert_eq!(read32(&b, 0), 0);
    }

    #[test]
    fn test_flash_code_bank_ignores_writes() {
        let mem = BankMemory::anonymous().expect("anonymous bank");
        let b = FlashBank::new("code", FLASH_CODE_START, CODE_SLOT, false, mem);
        cmd(&b, 0, 0x20);
        cmd(&b, 0, 0xd0);
        assert_eq!(read32(&b, 0), 0, "no erase, no status: still the array");
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("bulkhead-flash-{}-{name}", std::process::id()))
    }

    #[test]
    fn test_vars_file_created_from_template_and_written_back() {
        let template = temp_path("template");
        std::fs::write(&template, b"TEMPLATE").expect("template");
        let path = temp_path("vars");
        let _ = std::fs::remove_file(&path);
        let file = open_vars(&path, Some(&template)).expect("created");
        assert_eq!(file.metadata().expect("meta").len(), FLASH_BANK_SIZE);
        {
            let mem = BankMemory::shared(&file).expect("shared");
            let b = FlashBank::new("vars", FLASH_VARS_START, VARS_SLOT, true, mem);
            assert_eq!(read32(&b, 0), u32::from_le_bytes(*b"TEMP"));
            cmd(&b, 0x40000, 0x20);
            cmd(&b, 0x40000, 0xd0);
            cmd(&b, 0x40000, 0x40);
            b.write(0x40000, b"VAR!");
        }
        let bytes = std::fs::read(&path).expect("read back");
        assert_eq!(&bytes[..8], b"TEMPLATE");
        assert_eq!(&bytes[0x40000..0x40008], b"VAR!\xff\xff\xff\xff");
        // Opened again, not created again.
        let again = open_vars(&path, None).expect("exists");
        assert_eq!(again.metadata().expect("meta").len(), FLASH_BANK_SIZE);
        std::fs::write(&path, b"short").expect("truncate");
        assert!(matches!(
            open_vars(&path, None),
            Err(FlashError::Size { .. })
        ));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&template);
    }

    #[test]
    fn test_firmware_bank_maps_file_then_zeros() {
        let path = temp_path("fw");
        std::fs::write(&path, vec![0xabu8; 5000]).expect("fw");
        let file = check_firmware(&path).expect("fits");
        let mem = BankMemory::firmware(&file, 5000).expect("mapped");
        assert_eq!(mem.get(0), 0xab);
        assert_eq!(mem.get(4999), 0xab);
        assert_eq!(mem.get(5000), 0);
        assert_eq!(mem.get(FLASH_BANK_SIZE - 1), 0);
        std::fs::write(&path, b"").expect("empty");
        assert!(check_firmware(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
