//! Seccomp filters for the VMM's own threads, one per thread type (docs/vmm-seccomp.md).
//!
//! Every thread installs its filter itself, for itself only (no TSYNC), when it starts:
//! helper threads (`signals`, `serial-in`, device watchers, `*-backend-req`) first thing in
//! their body; the main thread once the device processes are started and before the first
//! boot; vCPU threads first thing in their body. vCPU threads are started by the main thread
//! after its filter is in place, so both filters apply to them: the main thread's filter
//! therefore allows everything the vCPU filter does, plus what a new thread does before it
//! installs its own filter. A syscall outside a thread's filter kills the whole process
//! (SIGSYS, exit status 159 from a shell).
//!
//! Syscall numbers are per architecture (the sandbox crate's table), so every filter can be compiled, and
//! tested, for x86_64 and aarch64 from either host.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bulkhead_sandbox::seccomp::{self, BpfProgram, Cond, Rules, TargetArch};

/// The VMM's thread types, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: VM creation, boot, reboot, shutdown.
    Main,
    /// A vCPU thread: KVM_RUN and MMIO exits.
    Vcpu,
    /// `signals`: turns SIGTERM/SIGINT/SIGHUP into events.
    Signals,
    /// `serial-in`: copies stdin to the guest console.
    SerialIn,
    /// `watch-<device>`: waits for a device process to end.
    DeviceWatcher,
    /// `<device>-backend-req`: serves a vhost-user backend's requests.
    BackendReq,
    /// `<device>-vhost`: a device's worker, the only thread that sends it vhost-user requests
    /// after the handshake.
    VhostWorker,
    /// `apiN`: serves the REST API's connections (vmm/src/api).
    Api,
}

impl ThreadKind {
    /// Every thread type.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Signals,
        ThreadKind::SerialIn,
        ThreadKind::DeviceWatcher,
        ThreadKind::BackendReq,
        ThreadKind::VhostWorker,
        ThreadKind::Api,
    ];

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Signals => "signals",
            ThreadKind::SerialIn => "serial-in",
            ThreadKind::DeviceWatcher => "device watcher",
            ThreadKind::BackendReq => "backend-req",
            ThreadKind::VhostWorker => "vhost worker",
            ThreadKind::Api => "api",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter of a thread type could not be built.
    #[error("building the seccomp filter of the {0} thread")]
    Build(
        &'static str,
        #[source] bulkhead_sandbox::seccomp::SeccompError,
    ),
    /// The filter could not be installed.
    #[error("installing the seccomp filter of the {0} thread")]
    Install(
        &'static str,
        #[source] bulkhead_sandbox::seccomp::SeccompError,
    ),
    /// [`init`] was called twice.
    #[error("the seccomp filters were already set up")]
    AlreadyInitialised,
}

pub use bulkhead_sandbox::seccomp::native_arch;

// ioctl request numbers (asm-generic encoding, the same on x86_64 and aarch64).
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xae;

const fn kvm_ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (KVMIO << 8) | nr
}

/// KVM_CHECK_EXTENSION, `_IO(KVMIO, 0x03)`.
pub const KVM_CHECK_EXTENSION: u64 = kvm_ioc(IOC_NONE, 0x03, 0);
/// KVM_CREATE_VM, `_IO(KVMIO, 0x01)`.
pub const KVM_CREATE_VM: u64 = kvm_ioc(IOC_NONE, 0x01, 0);
/// KVM_GET_VCPU_MMAP_SIZE, `_IO(KVMIO, 0x04)`.
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = kvm_ioc(IOC_NONE, 0x04, 0);
/// KVM_CREATE_VCPU, `_IO(KVMIO, 0x41)`.
pub const KVM_CREATE_VCPU: u64 = kvm_ioc(IOC_NONE, 0x41, 0);
/// KVM_SET_USER_MEMORY_REGION, `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
pub const KVM_SET_USER_MEMORY_REGION: u64 = kvm_ioc(IOC_WRITE, 0x46, 32);
/// KVM_REGISTER_COALESCED_MMIO, `_IOW(KVMIO, 0x67, struct kvm_coalesced_mmio_zone)`.
pub const KVM_REGISTER_COALESCED_MMIO: u64 = kvm_ioc(IOC_WRITE, 0x67, 16);
/// KVM_IRQ_LINE, `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
pub const KVM_IRQ_LINE: u64 = kvm_ioc(IOC_WRITE, 0x61, 8);
/// KVM_SET_GSI_ROUTING, `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`.
pub const KVM_SET_GSI_ROUTING: u64 = kvm_ioc(IOC_WRITE, 0x6a, 8);
/// KVM_IRQFD, `_IOW(KVMIO, 0x76, struct kvm_irqfd)`.
pub const KVM_IRQFD: u64 = kvm_ioc(IOC_WRITE, 0x76, 32);
/// KVM_IOEVENTFD, `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`.
pub const KVM_IOEVENTFD: u64 = kvm_ioc(IOC_WRITE, 0x79, 64);
/// KVM_RUN, `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = kvm_ioc(IOC_NONE, 0x80, 0);
/// KVM_SIGNAL_MSI, `_IOW(KVMIO, 0xa5, struct kvm_msi)`.
pub const KVM_SIGNAL_MSI: u64 = kvm_ioc(IOC_WRITE, 0xa5, 32);
/// KVM_GET_ONE_REG, `_IOW(KVMIO, 0xab, struct kvm_one_reg)`.
pub const KVM_GET_ONE_REG: u64 = kvm_ioc(IOC_WRITE, 0xab, 16);
/// KVM_SET_ONE_REG, `_IOW(KVMIO, 0xac, struct kvm_one_reg)`.
pub const KVM_SET_ONE_REG: u64 = kvm_ioc(IOC_WRITE, 0xac, 16);
/// KVM_ARM_VCPU_INIT, `_IOW(KVMIO, 0xae, struct kvm_vcpu_init)`.
pub const KVM_ARM_VCPU_INIT: u64 = kvm_ioc(IOC_WRITE, 0xae, 32);
/// KVM_ARM_PREFERRED_TARGET, `_IOR(KVMIO, 0xaf, struct kvm_vcpu_init)`.
pub const KVM_ARM_PREFERRED_TARGET: u64 = kvm_ioc(IOC_READ, 0xaf, 32);
/// KVM_CREATE_DEVICE, `_IOWR(KVMIO, 0xe0, struct kvm_create_device)`.
pub const KVM_CREATE_DEVICE: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0xe0, 12);
/// KVM_SET_DEVICE_ATTR, `_IOW(KVMIO, 0xe1, struct kvm_device_attr)`.
pub const KVM_SET_DEVICE_ATTR: u64 = kvm_ioc(IOC_WRITE, 0xe1, 24);
/// KVM_HAS_DEVICE_ATTR, `_IOW(KVMIO, 0xe3, struct kvm_device_attr)`.
pub const KVM_HAS_DEVICE_ATTR: u64 = kvm_ioc(IOC_WRITE, 0xe3, 24);
/// TCGETS (asm-generic termbits).
const TCGETS: u64 = 0x5401;
/// TCSETS.
const TCSETS: u64 = 0x5402;
/// TIOCGWINSZ.
const TIOCGWINSZ: u64 = 0x5413;

/// What every thread does: memory, locks, logging, ending itself, and aborting on a panic.
fn common_rules(abort_signal: u64) -> Rules {
    let mut r = Rules::default();
    // Mutex, Condvar, mpsc channels, thread join (std's futex-based locks).
    r.allow("futex");
    // The allocator (musl mallocng and glibc malloc alike: brk/mmap/mremap for blocks,
    // madvise/munmap to give them back, mprotect for glibc's per-thread arenas and thread
    // stack guards). Never executable memory: mmap and mprotect with PROT_EXEC kill.
    r.allow("brk")
        .allow("munmap")
        .allow("mremap")
        .allow("madvise");
    seccomp::allow_mappings_no_exec(&mut r);
    // Log lines on stderr (env_logger) and their timestamps (vDSO fallback); eventfd writes
    // (configuration interrupts, DeviceShared::set_needs_reset).
    r.allow("write").allow("writev").allow("clock_gettime");
    // std's HashMap keys, seeded per thread on first use.
    r.allow("getrandom");
    // Spin-then-yield in std's locks.
    r.allow("sched_yield");
    // Returning from a signal handler (the vCPU kick) and restarting what it interrupted.
    r.allow("rt_sigreturn").allow("restart_syscall");
    // Thread exit: musl's pthread_exit blocks signals, Rust removes its sigaltstack, glibc
    // unregisters rseq and advises its stack away (madvise above), then exit.
    r.allow("rt_sigprocmask")
        .allow("sigaltstack")
        .allow("rseq")
        .allow("exit");
    // Process exit, and abort() on a panic (panic = "abort"): raise(SIGABRT) is
    // getpid + gettid + tgkill on glibc, tkill on musl.
    r.allow("exit_group").allow("getpid").allow("gettid");
    r.allow_arg("tgkill", 2, &[abort_signal]);
    r.allow_arg("tkill", 1, &[abort_signal]);
    // isatty() on stderr (env_logger's colour choice): TCGETS on glibc, TIOCGWINSZ on musl.
    r.allow_ioctls(&[TCGETS, TIOCGWINSZ]);
    r
}

/// `shutdown(fd, SHUT_RDWR)`: FailureHandle::fail shuts a failed device's socket down.
fn allow_fail_device(r: &mut Rules) {
    r.allow_arg("shutdown", 1, &[libc::SHUT_RDWR as u64]);
}

/// `pidfd_send_signal(pidfd, SIGKILL)`: a restartable device's process that missed a deadline
/// or broke the protocol is killed, then restarted (device::restart).
fn allow_kill_device(r: &mut Rules) {
    r.allow_arg("pidfd_send_signal", 1, &[libc::SIGKILL as u64]);
}

/// The vCPU thread: KVM_RUN and the devices its MMIO exits reach.
fn vcpu_rules(r: &mut Rules) {
    r.allow_ioctls(&[
        // VcpuThread::run_loop.
        KVM_RUN,
        // Pl011 output and receive interrupts (KvmIrqLine::set_level).
        KVM_IRQ_LINE,
        // virtio-pci BAR 0 moves (Transport::remap/unmap): an ioeventfd per queue notify.
        KVM_IOEVENTFD,
        // MSI-X vector mask/unmask and table writes (Msix): irqfds and GSI routes.
        KVM_IRQFD,
        KVM_SET_GSI_ROUTING,
        KVM_SIGNAL_MSI,
        // The UEFI variable flash (legacy::cfi_flash::FlashBank::sync_slot) removes its
        // read-only memory slot when a command leaves read-array mode and restores it after;
        // the PL011 restores its register page when a read empties its receive FIFO
        // (Pl011::sync_mirror).
        KVM_SET_USER_MEMORY_REGION,
    ]);
    // PL011 output to stdout or the --serial file (write), queue notifies without an
    // ioeventfd (eventfd write), logs.
    r.allow("write");
    // Draining stale kicks on a device reset (Transport::reset_device, eventfd read).
    r.allow("read");
    // Descriptors dropped on the way (an MMIO handler replaced on a BAR move).
    r.allow("close");
    // An MSI-X route, irqfd or ioeventfd that KVM refuses fails that device (Transport).
    allow_fail_device(r);
    // The "first KVM_RUN" start-up milestone (milestone::log).
    r.allow("getrusage");
    // No vhost-user request is sent from a vCPU: they are jobs for the device's worker.
}

/// The main thread, from just before the first boot to the end: VM creation and boot (again
/// on every guest reset), starting the vCPU threads, shutdown. Includes the vCPU rules, as
/// vCPU threads inherit this filter. It starts no process (a spawner does) and creates no
/// namespace.
fn main_rules(r: &mut Rules, kick_signal: u64) {
    vcpu_rules(r);
    r.allow_ioctls(&[
        // Vm::boot: Kvm::create_vm (KVM_CAP_ARM_VM_IPA_SIZE check, vCPU mmap size).
        KVM_CHECK_EXTENSION,
        KVM_CREATE_VM,
        KVM_GET_VCPU_MMAP_SIZE,
        // Vm::boot: guest RAM and vCPUs.
        KVM_SET_USER_MEMORY_REGION,
        KVM_CREATE_VCPU,
        // Vm::boot: the console's output queued by KVM (coalesce_serial_output; the ring
        // page is mapped from a vCPU's file without PROT_EXEC).
        KVM_REGISTER_COALESCED_MMIO,
        // arch::create_machine and arch::set_boot_regs.
        KVM_ARM_PREFERRED_TARGET,
        KVM_ARM_VCPU_INIT,
        KVM_GET_ONE_REG,
        KVM_SET_ONE_REG,
        // gic::create: the vGICv3 + ITS or vGICv2.
        KVM_CREATE_DEVICE,
        KVM_SET_DEVICE_ATTR,
        KVM_HAS_DEVICE_ATTR,
        // terminal::restore on the way out.
        TCGETS,
        TCSETS,
    ]);
    // Vm::boot: the kvm_run area of each vCPU (mmap, munmap when dropped); closing the old
    // VM's, vCPUs' and GIC's descriptors on a reboot; device connections on shutdown.
    r.allow("close");
    // Vm::boot: the kernel and initramfs are read again on every reboot, with positioned
    // reads (pread64), as the first boot's `load` thread (preload.rs), which runs under this
    // filter, reads them; the rng-seed from /dev/urandom (read). (No size query: the seccomp
    // rule usage trace saw none, so fstat, newfstatat, statx and readv are not allowed.)
    r.allow("read").allow("pread64");
    // Vm::boot starts the vCPU threads, VhostUserDevice::handshake a device's worker and
    // backend-request threads: clone with the thread flags only (never a process, never a
    // namespace); clone3 answers ENOSYS so that glibc falls back to clone.
    seccomp::allow_threads_only(r);
    // What a new thread does before its own filter: glibc registers its robust futex list
    // and rseq, reads its affinity (pthread_getattr_np); Rust names it (PR_SET_NAME) and
    // gives it a sigaltstack; then seccomp::apply adds its filter (NO_NEW_PRIVS is set).
    r.allow("set_robust_list").allow("sched_getaffinity");
    // A vCPU thread pins itself to its host CPUs (--cpus affinity, VcpuThread::run) before
    // its own filter: on itself only (pid 0).
    r.allow_arg("sched_setaffinity", 0, &[0]);
    r.allow_arg(
        "prctl",
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    );
    r.allow_arg("seccomp", 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)]);
    // Running::stop kicks vCPU threads out of KVM_RUN: pthread_kill is tgkill on glibc,
    // tkill on musl.
    r.allow_arg("tgkill", 2, &[kick_signal]);
    r.allow_arg("tkill", 1, &[kick_signal]);
    // Running::stop and Vm::shutdown_devices poll in short sleeps (thread::sleep is
    // clock_nanosleep in musl and glibc).
    r.allow("clock_nanosleep");
    // The start-up milestones of the first boot (milestone::log).
    r.allow("getrusage");
    // A device connected after the filter (restart, hot-plug): VhostUserDevice::handshake
    // sends and receives vhost-user messages and keeps a duplicate of the socket
    // (dup_socket: F_DUPFD_CLOEXEC);
    // FrontendReqHandler::new makes the backend channel (socketpair AF_UNIX); the
    // configuration and queue eventfds (eventfd2).
    r.allow("sendmsg").allow("recvmsg");
    // musl's fcntl(F_DUPFD_CLOEXEC) follows with F_SETFD FD_CLOEXEC (VhostUserDevice::handshake
    // also keeps a duplicate of the backend channel's device end, for a restart).
    r.allow_arg(
        "fcntl",
        1,
        &[libc::F_DUPFD_CLOEXEC as u64, libc::F_SETFD as u64],
    );
    r.allow_arg("socketpair", 0, &[libc::AF_UNIX as u64]);
    r.allow("eventfd2");
    // A device's control channel from the main thread (ControlChannel::request): the API's
    // balloon requests (Vm::resize_balloon, Vm::balloon_statistics -> Devices::balloon_resize,
    // Devices::balloon_statistics) and vm.resize-console and SIGWINCH with --console tty
    // (Devices::resize_console). std's UnixDatagram::send is a write (common rules); the
    // stale-reply drain is a recv with MSG_DONTWAIT and the reply a recv with flags 0, both
    // recvfrom on aarch64.
    r.allow_arg("recvfrom", 3, &[0, libc::MSG_DONTWAIT as u64]);
    hotplug_rules(r);
}

/// What the main thread needs to hot-plug a device (`Vm::plug`, hotplug.rs) and end a
/// removed one's process: the rest of the device start path (`Devices::add`) that `Vm::new`
/// runs before the filter is installed.
// The TUN and SIOC request numbers are c_ulong on glibc and c_int on musl.
#[allow(clippy::unnecessary_cast)]
fn hotplug_rules(r: &mut Rules) {
    // device::open_files: the disk image (lock::open_locked) or /dev/net/tun (tap::open_queues)
    // is opened by path; the image's open file description lock (F_OFD_SETLK, F_OFD_GETLK to
    // say who holds it).
    r.allow("openat");
    // device::program finds the device program beside the running bulkhead
    // (std::env::current_exe reads the /proc/self/exe link) and checks it is there
    // (Path::exists: a stat, which is newfstatat on aarch64 and with musl; std on glibc asks
    // statx first). Seen in L1: without these the first plug died of SIGSYS (syscall 79).
    r.allow("readlinkat");
    r.allow("newfstatat").allow("statx");
    r.allow_arg(
        "fcntl",
        1,
        &[
            libc::F_OFD_SETLK as u64,
            libc::F_OFD_GETLK as u64,
            // Monitor::watch makes the new device's log pipe non-blocking; tap::dup_queues
            // does the same to the tap queues handed in and checks and marks them
            // close-on-exec.
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
        ],
    );
    // tap::open_queues, tap::dup_queues (fd=): the tap queues, their vnet header size and
    // the check of queues handed in.
    r.allow_ioctls(&[
        libc::TUNSETIFF as u64,
        libc::TUNSETVNETHDRSZ as u64,
        libc::TUNGETIFF as u64,
    ]);
    // tap::configure_host: the host side's address, netmask, MTU and up flag, through an
    // AF_INET datagram socket.
    r.allow_arg("socket", 0, &[libc::AF_INET as u64]);
    r.allow_ioctls(&[
        libc::SIOCSIFADDR as u64,
        libc::SIOCSIFNETMASK as u64,
        libc::SIOCSIFMTU as u64,
        libc::SIOCGIFFLAGS as u64,
        libc::SIOCSIFFLAGS as u64,
    ]);
    // spawn_process: the device's log pipe (pipe2); ControlChannel::new sets its control
    // socket's deadlines (setsockopt SO_RCVTIMEO, SO_SNDTIMEO).
    r.allow("pipe2");
    r.allow_arg("setsockopt", 1, &[libc::SOL_SOCKET as u64]);
    // Monitor::watch adds the new process's log pipe and pidfd to the monitor's epoll.
    r.allow("epoll_ctl");
    // device::end_process (the unplug-end thread) and a failed start kill a device process
    // that did not exit: pidfd_send_signal, SIGKILL only.
    r.allow_arg("pidfd_send_signal", 1, &[libc::SIGKILL as u64]);
    // A hot-plugged restartable disk's inflight region (restart::add_inflight_region): a
    // memfd (MFD_CLOEXEC only: never sealed or executable) sized with ftruncate. ftruncate
    // cannot be held to the memfd: the main thread already holds the images it could write.
    r.allow_arg("memfd_create", 1, &[libc::MFD_CLOEXEC as u64]);
    r.allow("ftruncate");
}

/// The rules of one thread type.
pub fn rules(thread: ThreadKind) -> Rules {
    let signals = Signals::native();
    let mut r = common_rules(signals.abort);
    match thread {
        ThreadKind::Main => main_rules(&mut r, signals.kick),
        ThreadKind::Vcpu => vcpu_rules(&mut r),
        ThreadKind::Signals => {
            // forward_signals: sigwait for SIGTERM/SIGINT/SIGHUP.
            r.allow("rt_sigtimedwait");
        }
        ThreadKind::SerialIn => {
            // forward_stdin: reading stdin.
            r.allow("read");
            // SharedPl011::feed raises the receive interrupt (KvmIrqLine::set_level), after
            // removing the UART's register page from the guest so that its reads exit again
            // (Pl011::sync_mirror).
            r.allow_ioctls(&[KVM_IRQ_LINE, KVM_SET_USER_MEMORY_REGION]);
        }
        ThreadKind::DeviceWatcher => {
            // device::monitor::Monitor::run closes the log pipe and pidfd of a device that
            // ended (close). It reaps nothing: the spawner is the devices' parent.
            r.allow("close");
            // The device manager fails the device whose process ended (FailureHandle::fail).
            allow_fail_device(&mut r);
            // device::monitor::Monitor::run: epoll over the device log pipes, pidfds and the
            // spawner's report socket (epoll_pwait, called directly: aarch64 has no
            // epoll_wait; epoll_ctl DEL of an ended pipe or pidfd), reading log pipes (read)
            // and exit reports (recv is recvfrom); the device's log lines go to stderr (write).
            r.allow("epoll_pwait")
                .allow("epoll_ctl")
                .allow("read")
                .allow("recvfrom");
            // device::restart: starting a dead device's process again (Monitor::restart_now ->
            // spawn_program): its vhost-user and control socket pairs (socketpair AF_UNIX),
            // its log pipe (pipe2), the spawn request with its descriptors and the reply with
            // the pidfd (sendmsg, recvmsg), the control channel's deadline (setsockopt
            // SOL_SOCKET: SO_RCVTIMEO, SO_SNDTIMEO), duplicates of the kept files and the pidfd
            // (fcntl F_DUPFD_CLOEXEC), the new log pipe made non-blocking (fcntl F_GETFL,
            // F_SETFL), and SIGKILL of a new process that cannot be handed over.
            r.allow_arg("socketpair", 0, &[libc::AF_UNIX as u64]);
            r.allow("pipe2").allow("sendmsg").allow("recvmsg");
            r.allow_arg("setsockopt", 1, &[libc::SOL_SOCKET as u64]);
            r.allow_arg(
                "fcntl",
                1,
                &[
                    libc::F_DUPFD_CLOEXEC as u64,
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                    // musl's fcntl(F_DUPFD_CLOEXEC) sets FD_CLOEXEC again (F_SETFD); std's
                    // OwnedFd drop checks the descriptor is open (F_GETFD) where debug
                    // assertions are on.
                    libc::F_SETFD as u64,
                    libc::F_GETFD as u64,
                ],
            );
            allow_kill_device(&mut r);
            // Monitor::run_due: the liveness probe pings each restartable device's control
            // channel (ControlChannel::request: std's UnixDatagram::send is a write, in the
            // common rules; the reply is recvfrom, above).
        }
        ThreadKind::BackendReq => {
            // FrontendReqHandler::handle_request: requests (recvmsg, with any fds) and
            // REPLY_ACK replies (sendmsg); received fds are closed.
            r.allow("recvmsg").allow("sendmsg").allow("close");
            // ConfigChange::handle_config_change queues a job for the worker (futex, in the
            // common rules).
        }
        ThreadKind::VhostWorker => {
            // Connection::run_job: vhost-user requests with SCM_RIGHTS (memory regions, kick
            // and call eventfds) and their replies; fds a reply carries are closed.
            r.allow("sendmsg").allow("recvmsg").allow("close");
            // A request past its deadline fails the device (FailureHandle::fail).
            allow_fail_device(&mut r);
            // ... or, for a restartable device, kills its process for a restart
            // (DeviceShared::process_failed -> restart::CurrentProcess::kill).
            allow_kill_device(&mut r);
            // Configuration interrupts (eventfd write, in the common rules).
        }
        ThreadKind::Api => api_rules(&mut r),
    }
    r
}

/// An API worker (api::worker, api::serve): accepts a connection, reads requests and writes
/// answers; the VM's main loop does the work. It opens, creates and maps nothing.
fn api_rules(r: &mut Rules) {
    // UnixListener::accept is accept4(SOCK_CLOEXEC).
    r.allow("accept4");
    // std's UnixStream reads and writes are recv(fd, buf, len, 0) and
    // send(fd, buf, len, MSG_NOSIGNAL), that is recvfrom and sendto: http::read_request,
    // the answers, api::linger's drain. The connection is closed when served (close).
    r.allow_arg("recvfrom", 3, &[0]);
    r.allow_arg("sendto", 3, &[libc::MSG_NOSIGNAL as u64]);
    r.allow("close");
    // Debug builds of std check that a descriptor is open before closing it (OwnedFd's drop:
    // fcntl(F_GETFD)); harmless, so allowed in every build.
    r.allow_arg("fcntl", 1, &[libc::F_GETFD as u64]);
    // The per-request read deadline and the write timeout (UnixStream::set_read_timeout,
    // set_write_timeout): setsockopt(SOL_SOCKET, SO_RCVTIMEO / SO_SNDTIMEO) only.
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        r.allow_when(
            "setsockopt",
            vec![
                Cond::eq(1, libc::SOL_SOCKET as u64),
                Cond::eq(2, opt as u64),
            ],
        );
    }
    // api::linger ends the writing side after an error answer (shutdown(SHUT_WR)).
    r.allow_arg("shutdown", 1, &[libc::SHUT_WR as u64]);
    // The bounded wait for the VM's answer (mpsc recv_timeout: futex with a timeout, in the
    // common rules, and clock_gettime); a pause after a failed accept (nanosleep).
    r.allow("nanosleep").allow("clock_nanosleep");
    // vmm.ping reports the VMM's pid (getpid, in the common rules).
}

/// Signal numbers the filters allow sending (they differ between C libraries).
struct Signals {
    /// The vCPU kick (SIGRTMIN: 34 on glibc, 35 on musl).
    kick: u64,
    /// SIGABRT, for abort().
    abort: u64,
}

impl Signals {
    fn native() -> Self {
        Self {
            kick: crate::vcpu::kick_signal() as u64,
            abort: libc::SIGABRT as u64,
        }
    }
}

/// Compiles the filter of `thread` for `arch`.
pub fn compile(thread: ThreadKind, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules(thread)
        .compile(thread.name(), arch)
        .map_err(|e| SeccompError::Build(thread.name(), e))
}

/// The trace family of `thread`'s filter (the seccomp rule usage trace, test only): the main
/// thread's is traced apart from the others, since vCPU threads run under both.
pub fn trace_family(thread: ThreadKind) -> seccomp::TraceFamily {
    match thread {
        ThreadKind::Main => seccomp::TraceFamily::VmmMain,
        _ => seccomp::TraceFamily::VmmThreads,
    }
}

/// Compiles the filter of `thread` for this host as it is installed (traced in the test-only
/// seccomp rule usage trace, `bulkhead_sandbox::seccomp::TRACE_ENV`).
fn compile_installed(thread: ThreadKind) -> Result<BpfProgram, SeccompError> {
    rules(thread)
        .compile_installed(thread.name(), trace_family(thread))
        .map_err(|e| SeccompError::Build(thread.name(), e))
}

/// The compiled filters, or `None` when the sandbox is off.
static FILTERS: OnceLock<Option<BTreeMap<ThreadKind, BpfProgram>>> = OnceLock::new();

/// Compiles every thread type's filter for this host (`enabled`), or records that threads
/// run unfiltered (`--sandbox off`). Call once, before any thread calls [`apply`].
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    let filters = if enabled {
        // A panic under a filter must abort with its message, not die of SIGSYS while
        // resolving a backtrace.
        seccomp::install_panic_hook();
        Some(
            ThreadKind::ALL
                .iter()
                .map(|&t| compile_installed(t).map(|p| (t, p)))
                .collect::<Result<BTreeMap<_, _>, _>>()?,
        )
    } else {
        None
    };
    FILTERS
        .set(filters)
        .map_err(|_| SeccompError::AlreadyInitialised)
}

/// Installs the filter of `thread` on the calling thread. Does nothing when the sandbox is off
/// or [`init`] was not called (unit tests, library use).
pub fn apply(thread: ThreadKind) -> Result<(), SeccompError> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = filters.get(&thread) else {
        return Ok(());
    };
    seccomp::apply_thread(program).map_err(|e| SeccompError::Install(thread.name(), e))?;
    log::debug!("seccomp filter of the {} thread installed", thread.name());
    Ok(())
}

/// Installs the filter of a helper thread at its start; a thread that cannot be confined
/// logs why and ends rather than run unconfined.
pub fn apply_or_end_thread(thread: ThreadKind) -> bool {
    match apply(thread) {
        Ok(()) => true,
        Err(e) => {
            log::error!("{e}: {}; the thread ends", error_chain(&e));
            false
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    causes.join(": ")
}

/// Test-only: a guest write here makes the vCPU thread leave its filter (`seccomp-trigger`
/// feature). An address no device claims.
#[cfg(feature = "seccomp-trigger")]
pub const SECCOMP_TRIGGER_ADDR: u64 = 0x0a00_1000;

/// Test-only (`seccomp-trigger` feature): issues `socket(AF_INET, SOCK_STREAM, 0)`, which no
/// VMM thread's filter allows, so a sandboxed VMM dies of SIGSYS here.
#[cfg(feature = "seccomp-trigger")]
pub fn trigger_violation() {
    log::warn!("seccomp-trigger: the guest asked this vCPU thread to call socket()");
    // SAFETY: socket() takes no pointers; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_sandbox::seccomp::{
        check_matrix_bpf, check_matrix_real, enforcement, matrix, panic_under_filter_ends,
        syscall_nr, ChildEnd, Enforcement,
    };

    #[test]
    fn test_seccomp_every_filter_compiles_for_x86_64_and_aarch64() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            for thread in ThreadKind::ALL {
                let prog =
                    compile(thread, arch).unwrap_or_else(|e| panic!("{thread:?} on {arch:?}: {e}"));
                assert!(!prog.is_empty(), "{thread:?} on {arch:?}");
            }
        }
    }

    #[test]
    fn test_seccomp_syscall_numbers_come_from_the_shared_table() {
        assert_eq!(
            syscall_nr("ioctl", native_arch()),
            Some(libc::SYS_ioctl),
            "the sandbox crate's table is the VMM's"
        );
    }

    #[test]
    fn test_seccomp_kvm_ioctl_numbers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_IRQ_LINE, 0x4008_ae61);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_SET_ONE_REG, 0x4010_aeac);
        assert_eq!(KVM_ARM_VCPU_INIT, 0x4020_aeae);
        assert_eq!(KVM_ARM_PREFERRED_TARGET, 0x8020_aeaf);
        assert_eq!(KVM_CREATE_DEVICE, 0xc00c_aee0);
        assert_eq!(KVM_SET_DEVICE_ATTR, 0x4018_aee1);
        // Struct sizes the encodings assume, where this host's kvm-bindings has the struct.
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_irqfd>(), 32);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_ioeventfd>(), 64);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_irq_routing>(), 8);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_one_reg>(), 16);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_device_attr>(), 24);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_create_device>(), 12);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_msi>(), 32);
        assert_eq!(
            std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>(),
            32
        );
    }

    #[test]
    fn test_seccomp_vcpu_filter_omits_what_vcpus_never_need() {
        // Checked on the rule level: the vCPU may not create sockets, fork, exec, or talk
        // vhost-user (that is the device worker's job).
        let r = rules(ThreadKind::Vcpu);
        for s in [
            "socket", "clone", "clone3", "wait4", "prctl", "seccomp", "sendmsg", "recvmsg",
            "execve", "unshare",
        ] {
            assert!(!r.allowed.contains_key(s), "vCPU filter allows {s}");
        }
        let main = rules(ThreadKind::Main);
        for s in ["execve", "execveat", "unshare", "setns", "kill", "wait4"] {
            assert!(!main.allowed.contains_key(s), "main filter allows {s}");
        }
        // Sockets: AF_INET datagram only, for a hot-plugged NIC's tap host side
        // (tap::configure_host); no AF_UNIX, AF_NETLINK or AF_PACKET socket.
        for (family, allowed) in [
            (libc::AF_INET, true),
            (libc::AF_UNIX, false),
            (libc::AF_NETLINK, false),
            (libc::AF_PACKET, false),
        ] {
            let ok = main.verdict(
                "socket",
                &[family as u64, libc::SOCK_DGRAM as u64, 0, 0, 0, 0],
            );
            let ok = ok == Some(true);
            assert_eq!(ok, allowed, "socket family {family}");
        }
        // The main filter covers every vCPU syscall, since vCPU threads inherit it.
        for s in r.allowed.keys() {
            assert!(
                main.allowed.contains_key(s),
                "main filter lacks vCPU syscall {s}"
            );
        }
    }

    #[test]
    fn test_seccomp_api_filter_serves_sockets_only() {
        let r = rules(ThreadKind::Api);
        for s in [
            "socket", "connect", "bind", "openat", "clone", "clone3", "execve", "sendmsg",
            "recvmsg", "unlinkat", "mount",
        ] {
            assert!(!r.allowed.contains_key(s), "api filter allows {s}");
        }
        let sol = libc::SOL_SOCKET as u64;
        let rcv = libc::SO_RCVTIMEO as u64;
        assert_eq!(
            r.verdict("setsockopt", &[3, sol, rcv, 0, 16, 0]),
            Some(true)
        );
        assert_eq!(
            r.verdict("setsockopt", &[3, sol, libc::SO_RCVBUF as u64, 0, 4, 0]),
            Some(false)
        );
        assert_eq!(r.verdict("setsockopt", &[3, 6, rcv, 0, 16, 0]), Some(false));
    }

    #[test]
    fn test_seccomp_hardening_no_exec_clone_thread_only_clone3_enosys() {
        let glibc_thread = 0x3d0f00u64;
        let musl_thread = 0x7d0f00u64;
        for thread in ThreadKind::ALL {
            let r = rules(thread);
            for prot in [libc::PROT_EXEC, libc::PROT_READ | libc::PROT_EXEC] {
                let args = [0, 4096, prot as u64, 0x22, u64::MAX, 0];
                assert_eq!(
                    r.verdict("mmap", &args),
                    Some(false),
                    "{thread:?} mmap exec"
                );
                assert_eq!(
                    r.verdict("mprotect", &args),
                    Some(false),
                    "{thread:?} mprotect"
                );
            }
            assert_eq!(
                r.verdict("mmap", &[0, 4096, 3, 0x22, u64::MAX, 0]),
                Some(true),
                "{thread:?} mmap rw"
            );
        }
        let main = rules(ThreadKind::Main);
        assert_eq!(
            main.verdict("clone3", &[0; 6]),
            None,
            "clone3 answers ENOSYS"
        );
        assert_eq!(
            main.verdict("clone", &[glibc_thread, 0, 0, 0, 0, 0]),
            Some(true)
        );
        assert_eq!(
            main.verdict("clone", &[musl_thread, 0, 0, 0, 0, 0]),
            Some(true)
        );
        // fork (SIGCHLD only), vfork-like and every CLONE_NEW* are refused.
        assert_eq!(
            main.verdict("clone", &[libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            Some(false)
        );
        for new in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
        ] {
            let flags = glibc_thread | new as u64;
            assert_eq!(
                main.verdict("clone", &[flags, 0, 0, 0, 0, 0]),
                Some(false),
                "{new:#x}"
            );
        }
    }

    /// Every rule of every thread's filter, with allowed arguments and mutated ones, on the
    /// compiled BPF of both architectures.
    #[test]
    fn test_seccomp_matrix_every_rule_bpf_both_arches() {
        for thread in ThreadKind::ALL {
            let cases = matrix(&rules(thread));
            assert!(cases.iter().any(|c| c.expect == Some(false)), "{thread:?}");
            for arch in [TargetArch::x86_64, TargetArch::aarch64] {
                let prog = compile(thread, arch).expect("compile");
                let failures = check_matrix_bpf(&prog, arch, &cases);
                assert!(failures.is_empty(), "{thread:?}: {failures:#?}");
            }
            println!(
                "{thread:?}: {} calls checked on the BPF of x86_64 and aarch64",
                cases.len()
            );
        }
    }

    /// Every rule of every thread's filter, called for real in a forked child under the
    /// filter: allowed arguments run, mutated ones die of SIGSYS, clone3 gets ENOSYS, and a
    /// panic aborts (SIGABRT). Where filters are not enforced (qemu-user), says so and
    /// checks nothing more.
    #[test]
    fn test_seccomp_matrix_every_rule_real_kernel() {
        for thread in ThreadKind::ALL {
            let prog = compile(thread, native_arch()).expect("compile");
            match enforcement(&prog) {
                Enforcement::Enforced => {}
                other => {
                    println!(
                        "seccomp filters are not enforced here ({other:?}; qemu-user?): the \
                         real-kernel matrix is skipped, the BPF matrix covers the rules"
                    );
                    return;
                }
            }
            let cases = matrix(&rules(thread));
            let failures = check_matrix_real(&prog, &cases);
            assert!(failures.is_empty(), "{thread:?}: {failures:#?}");
            assert_eq!(
                panic_under_filter_ends(&prog),
                ChildEnd::Signalled(libc::SIGABRT),
                "{thread:?}: a panic must abort, not die of SIGSYS"
            );
            println!(
                "{thread:?}: {} real calls checked, panic aborts",
                cases.len()
            );
        }
    }
}
