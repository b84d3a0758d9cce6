//! Runs in a guest: maps an unassigned MMIO page through /dev/mem and reads it with a load
//! pair. A load pair's data abort carries no instruction syndrome, so KVM cannot hand the
//! access to the VMM as an MMIO exit: KVM_RUN fails, and the VMM must end the VM with a
//! non-zero status and an error that names what happened, not hang or ignore it.
//!
//! Usage: mmio-nisv [PHYS_ADDR_HEX] (default 0x0a000000, a hole in Bulkhead's memory map).

fn main() {
    let addr = std::env::args()
        .nth(1)
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x0a00_0000);
    // SAFETY: opening a path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/mem".as_ptr(), libc::O_RDWR | libc::O_SYNC) };
    if fd < 0 {
        eprintln!(
            "mmio-nisv: open /dev/mem: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // SAFETY: a fresh shared mapping of one page of /dev/mem; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            addr as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        eprintln!(
            "mmio-nisv: mmap {addr:#x}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    println!("mmio-nisv: load pair from {addr:#x}");
    let (a, b): (u64, u64);
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `p` maps a readable page; the load pair reads its first 16 bytes.
    unsafe {
        std::arch::asm!("ldp {a}, {b}, [{p}]", p = in(reg) p, a = out(reg) a, b = out(reg) b);
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        // SAFETY: `p` maps a readable page of at least 16 bytes.
        unsafe {
            a = std::ptr::read_volatile(p as *const u64);
            b = std::ptr::read_volatile((p as *const u64).add(1));
        }
    }
    println!("mmio-nisv: survived, read {a:#x} {b:#x}");
}
