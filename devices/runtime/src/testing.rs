//! Helpers for tests and fuzz targets of device processes (feature `test-utils`; never in a
//! device binary): guest-memory memfds, raw vhost-user messages sent with descriptors (for
//! what `vhost::vhost_user::Frontend` refuses to send), and the VMM's side of the control
//! channel.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::MAX_MESSAGE;

/// A memfd of `size` bytes, as a frontend's guest memory.
pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size memfd");
    file
}

/// A vhost-user message: header (request code, `flags` (1: version 1, no reply wanted), body
/// size) and body.
pub fn vhost_user_message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

/// `sendmsg` of `bytes` with `fds` as SCM_RIGHTS on socket `socket`, with `flags`
/// (MSG_DONTWAIT...); the raw result (bytes sent, or -1).
pub fn send_with_fds(socket: &impl AsRawFd, bytes: &[u8], fds: &[RawFd], flags: i32) -> isize {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE computes a size from an integer.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, enough for one header
        // and the descriptors, which are copied in below.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    // SAFETY: sendmsg reads the message and control data prepared above (the iovec's
    // pointer is only read).
    unsafe { libc::sendmsg(socket.as_raw_fd(), &hdr, flags) }
}

/// A connected `SOCK_SEQPACKET` pair, as the VMM makes for a control channel.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "socketpair");
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends one control request on the VMM's end `fd` and returns the reply.
pub fn ask(fd: &OwnedFd, request: &[u8]) -> String {
    // SAFETY: write from a valid slice on an open descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), request.as_ptr().cast(), request.len()) };
    assert_eq!(n, request.len() as isize, "control request not sent");
    let mut buf = vec![0u8; 2 * MAX_MESSAGE];
    // SAFETY: read into a valid buffer on an open descriptor.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n > 0, "no reply to the control request");
    buf.truncate(n as usize);
    String::from_utf8(buf).expect("UTF-8 reply")
}

/// The virtqueue the device fuzz targets build from their input: 16 descriptors at
/// [`fuzz_queue::DESC`], the available ring at [`fuzz_queue::AVAIL`], the used ring at
/// [`fuzz_queue::USED`], and what the input has left copied into guest memory from
/// [`fuzz_queue::PAYLOAD`] on (headers, data, indirect tables).
pub mod fuzz_queue {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    /// The queue's size.
    pub const QSIZE: u16 = 16;
    /// The descriptor table.
    pub const DESC: u64 = 0x0;
    /// The available ring.
    pub const AVAIL: u64 = 0x200;
    /// The used ring.
    pub const USED: u64 = 0x400;
    /// Where the rest of the input goes.
    pub const PAYLOAD: u64 = 0x1000;

    /// The next `N` bytes of `data` (zeros past its end), consumed.
    pub fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        let n = data.len().min(N);
        out[..n].copy_from_slice(&data[..n]);
        *data = &data[n..];
        out
    }

    /// Lays the queue out in `mem` (guest memory from address 0) from `data`: 16 descriptors of
    /// 16 bytes (address, length, flags, next) whose address is taken modulo `addr_span` and
    /// length modulo `max_len` unless its top bit is set (then it stays raw), 16 available
    /// ring entries of 2 bytes, and the available index `avail_idx` modulo `QSIZE + 2`; the
    /// rest of `data` is the payload, as much as fits. Returns the queue, ready, the available
    /// index it was given, and the payload's length.
    pub fn lay_out(
        mem: &GuestMemoryMmap,
        addr_span: u64,
        max_len: u32,
        avail_idx: u8,
        data: &mut &[u8],
    ) -> (Queue, u16, usize) {
        for i in 0..u64::from(QSIZE) {
            let raw = take::<16>(data);
            let mut addr = u64::from_le_bytes(raw[0..8].try_into().expect("8"));
            let mut len = u32::from_le_bytes(raw[8..12].try_into().expect("4"));
            if addr >> 63 == 0 {
                addr %= addr_span;
            }
            if len >> 31 == 0 {
                len %= max_len;
            }
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..16].copy_from_slice(&raw[12..16]);
            mem.write_slice(&desc, GuestAddress(DESC + 16 * i))
                .expect("desc");
        }
        let ring = take::<32>(data);
        mem.write_slice(&ring, GuestAddress(AVAIL + 4))
            .expect("avail ring");
        let avail_idx = u16::from(avail_idx % (QSIZE as u8 + 2));
        mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .expect("avail idx");
        let room = mem.last_addr().0 + 1 - PAYLOAD;
        let n = data.len().min(room as usize);
        mem.write_slice(&data[..n], GuestAddress(PAYLOAD))
            .expect("payload");

        let mut queue = Queue::new(QSIZE).expect("queue");
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        (queue, avail_idx, n)
    }
}

/// A split virtqueue in a test's guest memory, as a driver lays it out (virtio-queue's
/// `MockSplitQueue`), with chains added one after another from descriptor 0.
pub struct MockRing<'a> {
    /// The mock: its rings are laid out for four times the queue's size, because it places the
    /// used ring right after `len` bytes of available ring, which a full ring of `len` two-byte
    /// entries would overrun.
    pub vq: virtio_queue::mock::MockSplitQueue<'a, vm_memory::GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
}

impl<'a> MockRing<'a> {
    /// A ring of `size` entries in `mem`.
    pub fn new(mem: &'a vm_memory::GuestMemoryMmap, size: u16) -> MockRing<'a> {
        MockRing {
            vq: virtio_queue::mock::MockSplitQueue::new(mem, 4 * size),
            size,
            next_desc: 0,
        }
    }

    /// The device's side of the ring: a queue of `size` entries over it.
    pub fn queue(&self) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q: virtio_queue::Queue = self.vq.create_queue().expect("queue");
        q.set_size(self.size);
        q
    }

    /// Adds one chain of (address, length, device-writable) descriptors and makes it
    /// available; returns its head.
    pub fn chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        let first = self.next_desc;
        let raw: Vec<virtio_queue::desc::RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                split_desc(addr, len, flags, first + i as u16 + 1)
            })
            .collect();
        self.vq.add_desc_chains(&raw, first).expect("chain");
        self.next_desc += descs.len() as u16;
        first
    }

    /// The used ring so far: (head, length written) in order.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let n = self.vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = self
                    .vq
                    .used()
                    .ring()
                    .ref_at(i as usize)
                    .expect("used")
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }
}

/// `size` bytes of guest memory at address 0 over a memfd, as a frontend shares it with a
/// device process; the memfd too, to hand over.
pub fn memfd_memory(size: usize) -> (vm_memory::GuestMemoryMmap, File) {
    let file = memfd(size as u64);
    let mem = vm_memory::GuestMemoryMmap::from_ranges_with_files([(
        vm_memory::GuestAddress(0),
        size,
        Some(vm_memory::FileOffset::new(
            file.try_clone().expect("dup"),
            0,
        )),
    )])
    .expect("map guest memory");
    (mem, file)
}

/// Clears `FD_CLOEXEC` on `fd` so that the process started next inherits it.
pub fn inherit(fd: RawFd) {
    // SAFETY: clearing FD_CLOEXEC on our own open descriptor so the child inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
}

/// Waits up to `timeout` for `child` to exit; kills it and panics after that.
pub fn wait_exit(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!(
                "the device process {} did not exit within {timeout:?}",
                child.id()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A split-ring descriptor.
pub fn split_desc(addr: u64, len: u32, flags: u32, next: u16) -> virtio_queue::desc::RawDescriptor {
    virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        addr,
        len,
        flags as u16,
        next,
    ))
}

/// A frontend's view of one vring it set up on a device process: the rings in guest memory,
/// and the eventfds it kicks and is called on.
pub struct Vring<'a> {
    /// The descriptor table.
    pub table: virtio_queue::mock::DescriptorTable<'a, vm_memory::GuestMemoryMmap>,
    /// The available ring.
    pub avail: virtio_queue::mock::AvailRing<'a, vm_memory::GuestMemoryMmap>,
    /// The used ring.
    pub used: virtio_queue::mock::UsedRing<'a, vm_memory::GuestMemoryMmap>,
    /// The kick (the driver's notification).
    pub kick: vmm_sys_util::eventfd::EventFd,
    /// The call (the device's interrupt).
    pub call: vmm_sys_util::eventfd::EventFd,
}

/// Sets vring `index` up on the device through `frontend` and enables it: `size` entries with
/// the descriptor table at guest address `base`, the available ring 4 KiB and the used ring
/// 8 KiB after it, in `mem`, which the frontend's memory table put at `host_base`.
pub fn setup_vring<'a>(
    frontend: &mut vhost::vhost_user::Frontend,
    mem: &'a vm_memory::GuestMemoryMmap,
    host_base: u64,
    index: usize,
    base: u64,
    size: u16,
) -> Vring<'a> {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::{VhostBackend, VringConfigData};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let (desc_addr, avail_addr, used_addr) = (base, base + 0x1000, base + 0x2000);
    let vring = Vring {
        table: virtio_queue::mock::DescriptorTable::new(mem, GuestAddress(desc_addr), size),
        avail: virtio_queue::mock::AvailRing::new(mem, GuestAddress(avail_addr), size),
        used: virtio_queue::mock::UsedRing::new(mem, GuestAddress(used_addr), size),
        kick: EventFd::new(EFD_NONBLOCK).expect("kick"),
        call: EventFd::new(EFD_NONBLOCK).expect("call"),
    };
    frontend.set_vring_num(index, size).expect("vring num");
    frontend
        .set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: host_base + desc_addr,
                used_ring_addr: host_base + used_addr,
                avail_ring_addr: host_base + avail_addr,
                log_addr: None,
            },
        )
        .expect("vring addr");
    frontend.set_vring_base(index, 0).expect("vring base");
    frontend.set_vring_call(index, &vring.call).expect("call");
    frontend.set_vring_kick(index, &vring.kick).expect("kick");
    frontend.set_vring_enable(index, true).expect("enable");
    vring
}

/// The checks every device process's seccomp filter passes in its crate's unit tests (the
/// crate's own tests add what only its device may or may not do).
pub mod filter {
    use bulkhead_sandbox::seccomp::{
        check_matrix_bpf, check_matrix_real, enforcement, matrix, panic_under_filter_ends,
        BpfProgram, ChildEnd, Enforcement, Rules, SeccompError, TargetArch,
    };

    /// The device's rules are within the spawner's filter, which stays on the device process
    /// under the device's own.
    pub fn within_the_spawners(rules: &Rules) {
        let outside = crate::seccomp::outside_spawner(rules);
        assert!(
            outside.is_empty(),
            "not in the spawner's filter: {outside:?}"
        );
    }

    /// The filter compiles for x86_64 and aarch64 (more than 50 and fewer than 4096
    /// instructions), and `installed` (the running architecture's, as the process installs it)
    /// compiled.
    pub fn compiles(
        compile_for: impl Fn(TargetArch) -> Result<BpfProgram, SeccompError>,
        installed: Result<BpfProgram, SeccompError>,
    ) {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let filter = compile_for(arch).expect("filter");
            assert!(filter.len() > 50 && filter.len() < 4096);
        }
        installed.expect("native filter");
    }

    /// Every rule of `rules`, with allowed and mutated arguments, on both architectures' BPF.
    pub fn matrix_on_bpf(
        name: &str,
        rules: &Rules,
        compile_for: impl Fn(TargetArch) -> Result<BpfProgram, SeccompError>,
    ) {
        let cases = matrix(rules);
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let prog = compile_for(arch).expect("compile");
            let failures = check_matrix_bpf(&prog, arch, &cases);
            assert!(failures.is_empty(), "{failures:#?}");
        }
        println!(
            "{name} filter: {} calls checked on x86_64 and aarch64 BPF",
            cases.len()
        );
    }

    /// The same on the real kernel, each case in a forked child under `installed`, and a panic
    /// under it ends in SIGABRT. Where seccomp is not enforced (qemu-user) it says so, checks
    /// nothing and returns false.
    pub fn matrix_on_the_kernel(name: &str, rules: &Rules, installed: &BpfProgram) -> bool {
        if enforcement(installed) != Enforcement::Enforced {
            println!(
                "seccomp filters are not enforced here (qemu-user?): real-kernel matrix skipped"
            );
            return false;
        }
        let cases = matrix(rules);
        let failures = check_matrix_real(installed, &cases);
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(
            panic_under_filter_ends(installed),
            ChildEnd::Signalled(libc::SIGABRT)
        );
        println!(
            "{name} filter: {} real calls checked, panic aborts",
            cases.len()
        );
        true
    }
}
