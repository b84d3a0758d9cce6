//! A VM: guest memory, the KVM VM and its vCPU threads, the devices, and its lifecycle
//! (boot, reset in place, power-off, termination signals).

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bulkhead_firmware::fdt::{create_fdt, FdtConfig, FdtError};
use bulkhead_firmware::image::LoadError;
use bulkhead_firmware::layout::{
    FLASH_CODE_START, GIC_V2M_SIZE, GIC_V2M_START, GPIO_SIZE, GPIO_SPI, GPIO_START, PCIE_ECAM_SIZE,
    PCIE_ECAM_START, RAM_START, RTC_SIZE, RTC_START, UART_SIZE, UART_SPI, UART_START,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::{debug, error, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::Killable;

use crate::arch::{self, ArchError};
use crate::coalesced::CoalescedRing;
use crate::config::{BootConfig, SerialConfig, VmConfig};
use crate::control::{Reply, ReplySender, Request, RequestError};
use crate::device::spawner::Spawner;
use crate::device::{DeviceEnv, DeviceError, Devices};
use crate::irq::VmInterrupts;
use crate::legacy::cfi_flash::{Flash, FlashError};
use crate::legacy::pl011::{IrqLine, Pl011, SharedPl011};
use crate::legacy::pl031::Pl031;
use crate::legacy::pl061::{Pl061, SharedPl061, POWER_BUTTON_LINE, POWER_BUTTON_PULSE};
use crate::mmio::{MmioBus, MmioDevice};
use crate::pci::host::{PciError, PcieHost};
use crate::regpage::{KvmPageSlot, RegisterPage};
use crate::vcpu::{self, Event, VcpuStop, VcpuThread};
use crate::virtio::pci::VirtioPciError;

/// How long `vm.counters` waits for the device processes' answers (each has its control
/// channel's 2 s deadline): within the API's 5 s.
const COUNTERS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible here?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host's KVM allows fewer vCPUs than asked for.
    #[error("this host's KVM allows at most {max} vCPUs in a VM, {asked} were asked for")]
    TooManyVcpus {
        /// vCPUs asked for.
        asked: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// KVM_CREATE_VM failed.
    #[error("creating the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Guest RAM could not be created.
    #[error("creating {0} MiB of guest RAM")]
    CreateMemory(u64, #[source] crate::memory::MemoryError),
    /// Guest RAM could not be registered with KVM.
    #[error("registering guest RAM with KVM")]
    SetMemoryRegion(#[source] kvm_ioctls::Error),
    /// A vCPU could not be created.
    #[error("creating vCPU {0}")]
    CreateVcpu(u64, #[source] kvm_ioctls::Error),
    /// The architecture-specific setup failed.
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// The device tree could not be built.
    #[error(transparent)]
    Fdt(#[from] FdtError),
    /// The boot images could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A thread could not be started.
    #[error("starting thread {0}")]
    SpawnThread(String, #[source] std::io::Error),
    /// The thread copying the first boot's kernel and initramfs (preload.rs) panicked.
    #[error("the thread loading the kernel and initramfs panicked")]
    LoadThreadPanicked,
    /// Signal handling could not be set up.
    #[error("setting up signal handling")]
    Signals(#[source] vmm_sys_util::errno::Error),
    /// The MMIO map is inconsistent.
    #[error(transparent)]
    Mmio(#[from] crate::mmio::OverlapError),
    /// The PCIe topology could not be built.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A device's transport could not be created.
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    /// A vCPU stopped with an error.
    #[error("{0}")]
    Vcpu(String),
    /// The API server could not be started.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A seccomp filter could not be set up or installed.
    #[error("confining the VMM's threads")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The UEFI flash needs read-only memory slots.
    #[error("this host's KVM has no read-only memory slots (KVM_CAP_READONLY_MEM), which the UEFI flash needs")]
    NoReadonlyMem,
    /// The UEFI flash banks could not be set up.
    #[error(transparent)]
    Flash(#[from] FlashError),
}

impl VmError {
    /// Whether the error is the user's to fix (exit status 2): a device refused as
    /// configured, or a guest this host cannot run.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Device(e) => e.is_bad_input(),
            Self::Arch(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// How a VM ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The VMM was asked to terminate by this signal.
    Signal(i32),
}

/// Drives the PL011's interrupt line through KVM_IRQ_LINE.
struct KvmIrqLine {
    vm: Arc<VmFd>,
    line: u32,
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.line, high) {
            error!("setting interrupt line {:#x} to {high}: {e}", self.line);
        }
    }
}

/// The line of a device (PL011, PL061) before any VM exists; nothing can be listening.
struct Unwired;

impl IrqLine for Unwired {
    fn set_level(&self, _high: bool) {}
}

impl MmioDevice for SharedPl011 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data)
    }
    fn write_queued(&self, base: u64, writes: &[crate::mmio::QueuedWrite]) {
        self.lock()
            .write_queued(writes.iter().map(|w| (w.addr - base, w.data())));
    }
}

/// A fresh rng-seed for the guest's device tree, from `urandom` (opened once in [`Vm::new`],
/// so that a reboot under the main thread's seccomp filter needs no open()).
fn random_seed(urandom: Option<&File>) -> [u8; 64] {
    let mut seed = [0u8; 64];
    let read = match urandom {
        Some(mut f) => f.read_exact(&mut seed),
        None => Err(std::io::ErrorKind::NotFound.into()),
    };
    if let Err(e) = read {
        warn!("no host entropy for the guest's rng-seed: {e}");
    }
    seed
}

/// A booted VM: its KVM handle and running vCPU threads.
struct Running {
    _vm: Arc<VmFd>,
    _irq: Arc<VmInterrupts>,
    _machine: arch::Machine,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pause: Arc<vcpu::PauseGate>,
    /// The console's queued output (coalesced MMIO), if KVM queues it.
    ring: Option<Arc<CoalescedRing>>,
    bus: Arc<MmioBus>,
}

/// Has KVM queue the guest's writes to the PL011 data register (its console output) instead
/// of exiting for each character, and maps the ring they go to. `None`, with a log line, where
/// KVM cannot: the writes then exit as any other.
/// The KVM memory slot of the PL011's register page (guest RAM is slot 0, the flash banks 1
/// and 2, bus 0's configuration space 8 on).
const UART_MIRROR_SLOT: u32 = 3;

/// The PL011's register page for `vm` (see [`crate::legacy::pl011`]), or why not (said on the
/// first boot): KVM without read-only memory, or host pages larger than the UART's window.
fn serial_register_slot(kvm: &Kvm, vm: &Arc<VmFd>, first: bool) -> Option<KvmPageSlot> {
    let why_not = |reason: &dyn std::fmt::Display| {
        if first {
            info!("console: every PL011 register read is an exit ({reason})");
        }
    };
    if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
        why_not(&"KVM has no read-only memory slots");
        return None;
    }
    let page = match RegisterPage::new() {
        Ok(page) => page,
        Err(e) => {
            why_not(&format_args!("no page for its registers: {e}"));
            return None;
        }
    };
    // The page covers the UART's window and what follows up to the next device (the RTC);
    // reads of that gap come from the page (zero) instead of exits.
    let len = page.len() as u64;
    if !UART_START.is_multiple_of(len) || UART_START + len > RTC_START {
        why_not(&format_args!(
            "host pages of {len} bytes span other devices"
        ));
        return None;
    }
    if first {
        info!(
            "console: PL011 register reads come from memory while no input waits (a read-only \
             memory slot); writes, and reads while input waits, exit"
        );
    }
    Some(KvmPageSlot::new(
        page,
        vm.clone(),
        UART_MIRROR_SLOT,
        UART_START,
    ))
}

fn coalesce_serial_output(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Option<CoalescedRing> {
    if !kvm.check_extension(kvm_ioctls::Cap::CoalescedMmio) {
        info!("KVM has no coalesced MMIO: every console character is an exit");
        return None;
    }
    let ring = match CoalescedRing::map(vcpu) {
        Ok(ring) => ring,
        Err(e) => {
            warn!("cannot map KVM's coalesced MMIO ring ({e}): every console character is an exit");
            return None;
        }
    };
    // The data register alone: every other register's access still exits, after the
    // queued writes are played.
    if let Err(e) = vm.register_coalesced_mmio(kvm_ioctls::IoEventAddress::Mmio(UART_START), 4) {
        warn!("cannot queue console output in KVM ({e}): every console character is an exit");
        return None;
    }
    info!("console: KVM queues the guest's writes to the PL011 data register (coalesced MMIO)");
    Some(ring)
}

impl Running {
    /// Stops every vCPU thread and waits for them.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Paused threads wait on the gate, not in KVM_RUN: wake them to see the flag.
        self.pause.wake();
        // A kick can land just before a thread enters KVM_RUN and be lost, so kick until
        // every thread has seen the flag.
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                if let Err(e) = t.kill(vcpu::kick_signal()) {
                    debug!("kicking a vCPU thread: {e}");
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in std::mem::take(&mut self.threads) {
            if t.join().is_err() {
                error!("a vCPU thread panicked");
            }
        }
        // What the guest wrote to its console last.
        self.drain();
        debug!("vCPU threads stopped");
    }

    /// Plays the console output KVM queued (see [`crate::coalesced`]).
    fn drain(&self) {
        if let Some(ring) = &self.ring {
            ring.drain(&self.bus);
        }
    }

    /// `vm.pause`: every vCPU thread out of KVM_RUN and parked at the gate (kicked until it
    /// is, as a kick can land just before KVM_RUN), within [`PAUSE_WAIT`].
    fn pause(&self) -> Result<Reply, RequestError> {
        if self.pause.is_closed() {
            return Err(RequestError::new(409, "the VM is already paused"));
        }
        self.pause.close();
        let deadline = std::time::Instant::now() + PAUSE_WAIT;
        while !self
            .pause
            .wait_parked(self.threads.len(), Duration::from_millis(1))
        {
            if std::time::Instant::now() >= deadline {
                self.pause.open();
                return Err(RequestError::new(
                    500,
                    format!(
                        "the vCPUs did not stop within {} ms",
                        PAUSE_WAIT.as_millis()
                    ),
                ));
            }
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                if let Err(e) = t.kill(vcpu::kick_signal()) {
                    debug!("kicking a vCPU thread: {e}");
                }
            }
        }
        info!("VM paused ({} vCPUs parked)", self.threads.len());
        Ok(Reply::Done)
    }

    /// `vm.resume`.
    fn resume(&self) -> Result<Reply, RequestError> {
        if !self.pause.is_closed() {
            return Err(RequestError::new(409, "the VM is not paused"));
        }
        self.pause.open();
        info!("VM resumed");
        Ok(Reply::Done)
    }
}

/// How long `vm.pause` waits for every vCPU to leave KVM_RUN.
const PAUSE_WAIT: Duration = Duration::from_secs(2);

/// A VM and everything it owns across reboots.
pub struct Vm {
    kvm: Kvm,
    pub(crate) config: VmConfig,
    pub(crate) memory: GuestMemoryMmap,
    serial: Arc<SharedPl011>,
    /// The PL061 GPIO controller; its line 3 is the power button (`vm.power-button`).
    gpio: Arc<SharedPl061>,
    pub(crate) bus: Arc<MmioBus>,
    pub(crate) pcie: Arc<PcieHost>,
    /// The device processes and the thread watching them.
    pub(crate) devices: Devices,
    events: (Sender<Event>, Receiver<Event>),
    /// /dev/urandom, for each boot's rng-seed.
    urandom: Option<File>,
    /// The UEFI firmware's flash banks (`--firmware`).
    flash: Option<Flash>,
    /// Which device is in which slot, and what hot-plug needs (hotplug.rs).
    pub(crate) hotplug: crate::hotplug::Hotplug,
    /// The vCPUs are paused (`vm.pause`), for `vm.info`.
    paused: bool,
    /// The first boot's kernel and initramfs being copied into guest RAM (preload.rs).
    preload: Option<crate::preload::Preload>,
    /// Whether the vCPUs get pointer authentication (`arch::resolve_ptrauth`).
    ptrauth: bool,
}

impl Vm {
    /// Opens KVM and creates guest RAM and devices (their processes started through
    /// `spawner`, in cgroup leaves under `cgroup` if given); no vCPU runs yet.
    pub fn new(
        config: VmConfig,
        spawner: &Arc<Spawner>,
        cgroup: Option<&std::path::Path>,
    ) -> Result<Self, VmError> {
        Self::with_events(config, spawner, cgroup, channel())
    }

    /// As [`Vm::new`], with the channel of its main loop made before (the API and signal
    /// threads of a VMM that waited for `vm.create` already send on it).
    pub fn with_events(
        mut config: VmConfig,
        spawner: &Arc<Spawner>,
        cgroup: Option<&std::path::Path>,
        events: (Sender<Event>, Receiver<Event>),
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        arch::check_kvm(&kvm, config.boot.guest_arch())?;
        let ptrauth = arch::resolve_ptrauth(&kvm, config.boot.guest_arch(), config.ptrauth)?;
        let max_vcpus = kvm.get_max_vcpus();
        if config.vcpus as usize > max_vcpus {
            return Err(VmError::TooManyVcpus {
                asked: config.vcpus,
                max: max_vcpus,
            });
        }
        let memory = crate::memory::create(config.ram_size, config.ram_backing)
            .map_err(|e| VmError::CreateMemory(config.ram_size >> 20, e))?
            .memory;
        crate::milestone::log("guest RAM created");
        let preload = match &config.boot {
            BootConfig::Kernel {
                kernel: (kernel, image),
                initramfs,
                layout,
            } => Some(crate::preload::Preload::start(
                &memory,
                layout,
                kernel,
                image,
                initramfs.as_ref(),
            )?),
            BootConfig::Firmware { .. } => None,
        };
        let out: Option<Box<dyn std::io::Write + Send>> =
            match std::mem::replace(&mut config.serial, SerialConfig::Off) {
                SerialConfig::Tty => Some(Box::new(std::io::stdout())),
                SerialConfig::File(f) => Some(Box::new(f)),
                SerialConfig::Off => None,
            };
        let serial = Arc::new(SharedPl011::new(Pl011::new(out, Box::new(Unwired))));
        let bus = Arc::new(MmioBus::default());
        bus.insert(UART_START..UART_START + UART_SIZE, serial.clone())?;
        bus.insert(RTC_START..RTC_START + RTC_SIZE, Arc::new(Pl031::default()))?;
        let gpio = Arc::new(SharedPl061::new(Pl061::new(Box::new(Unwired))));
        bus.insert(GPIO_START..GPIO_START + GPIO_SIZE, gpio.clone())?;
        let flash = match &config.boot {
            BootConfig::Firmware { code, vars, .. } => {
                if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
                    return Err(VmError::NoReadonlyMem);
                }
                let flash = Flash::new(code, vars)?;
                bus.insert(flash.code.range(), flash.code.clone())?;
                bus.insert(flash.vars.range(), flash.vars.clone())?;
                Some(flash)
            }
            BootConfig::Kernel { .. } => None,
        };
        // The GICv2m frame's registers (read by a GICv2 guest; unused on a GICv3).
        bus.insert(
            GIC_V2M_START..GIC_V2M_START + GIC_V2M_SIZE,
            Arc::new(crate::pci::gicv2m::Gicv2mFrame),
        )?;
        let pcie = Arc::new(PcieHost::new(config.pci_slots)?);
        bus.insert(
            PCIE_ECAM_START..PCIE_ECAM_START + PCIE_ECAM_SIZE,
            pcie.clone(),
        )?;
        let specs = crate::device::specs(&config);
        let env = DeviceEnv {
            memory: &memory,
            bus: &bus,
            spawner,
            cgroup,
            device_ids: config.device_ids,
            ram_size: config.ram_size,
        };
        let (devices, transports) = Devices::start(&specs, &env)?;
        for (slot, transport) in transports {
            pcie.plug(slot, Box::new(transport))?;
        }
        let urandom = File::open("/dev/urandom")
            .map_err(|e| warn!("cannot open /dev/urandom: {e}"))
            .ok();
        let power_off = events.0.clone();
        pcie.set_power_off_notify(Box::new(move |slot| {
            drop(
                power_off.send(Event::Hotplug(crate::hotplug::HotplugEvent::PoweredOff(
                    slot,
                ))),
            );
        }));
        let hotplug = crate::hotplug::Hotplug::new(
            config.pci_slots,
            &specs,
            spawner.clone(),
            cgroup.map(std::path::Path::to_path_buf),
            config.sandbox,
            events.0.clone(),
        );
        Ok(Self {
            hotplug,
            paused: false,
            urandom,
            flash,
            kvm,
            config,
            memory,
            serial,
            gpio,
            bus,
            pcie,
            devices,
            events,
            preload,
            ptrauth,
        })
    }

    /// The guest console, for feeding it input.
    pub fn serial(&self) -> Arc<SharedPl011> {
        self.serial.clone()
    }

    /// A sender of events to this VM's main loop (for the signal thread).
    pub fn event_sender(&self) -> Sender<Event> {
        self.events.0.clone()
    }

    /// Creates the KVM VM, loads the guest and starts the vCPUs.
    fn boot(&mut self, first: bool) -> Result<Running, VmError> {
        let vm = Arc::new(self.kvm.create_vm().map_err(VmError::CreateVm)?);
        let host_addr = self
            .memory
            .get_host_address(GuestAddress(RAM_START))
            .map_err(|_| VmError::Vcpu("guest RAM is not mapped".into()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: RAM_START,
            memory_size: self.config.ram_size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is this VM's guest memory mapping, which lives in `self.memory`
        // for as long as any KVM VM created from it.
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::SetMemoryRegion)?;
        if let Some(flash) = &self.flash {
            flash.reset(&vm)?;
        }

        let vcpus = (0..u64::from(self.config.vcpus))
            .map(|i| vm.create_vcpu(i).map_err(|e| VmError::CreateVcpu(i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let ring = coalesce_serial_output(&self.kvm, &vm, &vcpus[0]).map(Arc::new);
        let guest_arch = self.config.boot.guest_arch();
        let machine = arch::create_machine(&vm, &vcpus, guest_arch, self.ptrauth)?;
        // A GICv2 has no ITS: PCI MSIs go through the GICv2m frame, routed to its SPIs.
        let irq = match machine.gic {
            bulkhead_firmware::fdt::GicKind::V2 => VmInterrupts::new(vm.clone()).with_gicv2m(),
            _ => VmInterrupts::new(vm.clone()),
        };
        let irq = Arc::new(irq);
        self.pcie.reset(&irq);
        self.pcie.map_mirror(&self.kvm, &vm, PCIE_ECAM_START);
        if first {
            crate::milestone::log("VM created");
        }

        let fdt_config = |initramfs, flash| FdtConfig {
            mpidrs: &machine.mpidrs,
            ram_size: self.config.ram_size,
            cmdline: &self.config.cmdline,
            initramfs,
            gic: machine.gic,
            pcie: true,
            rng_seed: random_seed(self.urandom.as_ref()),
            flash,
        };
        match &mut self.config.boot {
            BootConfig::Kernel {
                kernel: (kernel, image),
                initramfs,
                layout,
            } => {
                let fdt = create_fdt(&fdt_config(layout.initramfs, false))?;
                match self.preload.take() {
                    Some(preload) => {
                        preload.finish()?;
                        layout.write_fdt(&self.memory, &fdt)?;
                    }
                    None => layout.load(&self.memory, kernel, image, initramfs.as_ref(), &fdt)?,
                }
                arch::set_boot_regs(&vcpus[0], guest_arch, layout.kernel_addr, layout.fdt_addr)?;
                debug!("boot layout: {layout:x?}, FDT {} bytes", fdt.len());
            }
            BootConfig::Firmware { .. } => {
                // ArmVirtQemu looks for the device tree at the start of RAM (QEMU puts it
                // there) and starts executing at the start of flash bank 0.
                let fdt = create_fdt(&fdt_config(None, true))?;
                self.memory
                    .write_slice(&fdt, GuestAddress(RAM_START))
                    .map_err(|e| LoadError::Fdt(RAM_START, e))?;
                arch::set_boot_regs(&vcpus[0], guest_arch, FLASH_CODE_START, RAM_START)?;
                debug!("firmware boot, FDT {} bytes at {RAM_START:#x}", fdt.len());
            }
        }
        if first {
            crate::milestone::log("guest loaded");
        }

        {
            let mut serial = self.serial.lock();
            serial.reset(Box::new(KvmIrqLine {
                vm: vm.clone(),
                line: arch::spi_irq_line(UART_SPI),
            }));
            if let Some(slot) = serial_register_slot(&self.kvm, &vm, first) {
                serial.attach_mirror(Box::new(slot));
            }
        }
        self.gpio.lock().reset(Box::new(KvmIrqLine {
            vm: vm.clone(),
            line: arch::spi_irq_line(GPIO_SPI),
        }));

        let stop = Arc::new(AtomicBool::new(false));
        // Every boot starts running (a reboot asked while paused resumes).
        let pause = Arc::new(vcpu::PauseGate::default());
        let mut threads = Vec::with_capacity(vcpus.len());
        for (index, fd) in vcpus.into_iter().enumerate() {
            let thread = VcpuThread {
                index,
                fd,
                bus: self.bus.clone(),
                ring: ring.clone(),
                stop: stop.clone(),
                events: self.events.0.clone(),
                log_first_run: first && index == 0,
                pause: pause.clone(),
                affinity: self.config.vcpu_affinity.get(index).cloned().flatten(),
            };
            let name = format!("vcpu{index}");
            let spawned = bulkhead_sandbox::thread_builder()
                .name(name.clone())
                .spawn(move || thread.run())
                .map_err(|e| VmError::SpawnThread(name, e));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    Running {
                        _vm: vm,
                        _irq: irq,
                        _machine: machine,
                        threads,
                        stop,
                        pause,
                        ring,
                        bus: self.bus.clone(),
                    }
                    .stop();
                    return Err(e);
                }
            }
        }
        Ok(Running {
            _vm: vm,
            _irq: irq,
            _machine: machine,
            threads,
            stop,
            pause,
            ring,
            bus: self.bus.clone(),
        })
    }

    /// Boots the guest and runs it until it powers off, fails, or a signal ends it. A guest
    /// reset boots it again in place: fresh VM, vCPU and GIC state, the same RAM with the
    /// kernel, initramfs and a new device tree loaded again. On the way out the device
    /// processes are disconnected and given a moment to finish.
    pub fn run(mut self) -> Result<Outcome, VmError> {
        let outcome = self.run_guest();
        self.shutdown_devices();
        outcome
    }

    /// Closes every device connection and waits (a bounded time) for the device processes to
    /// exit; the spawner kills the rest when the VMM exits.
    fn shutdown_devices(&mut self) {
        drop(self.pcie.unplug_all());
        self.devices.shutdown(crate::device::SHUTDOWN_GRACE);
    }

    /// The device processes the VMM started.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    fn run_guest(&mut self) -> Result<Outcome, VmError> {
        let mut boots = 0u32;
        loop {
            let running = self.boot(boots == 0)?;
            boots += 1;
            info!(
                "VM booted ({} vCPUs, {} MiB), boot #{boots}",
                self.config.vcpus,
                self.config.ram_size >> 20
            );
            let event = loop {
                let received = match running.ring {
                    // The console output a guest queued and left there (see crate::coalesced).
                    Some(_) => match self.events.1.recv_timeout(crate::coalesced::DRAIN_PERIOD) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            running.drain();
                            continue;
                        }
                        other => other.ok(),
                    },
                    None => self.events.1.recv().ok(),
                };
                match received.ok_or_else(|| VmError::Vcpu("event channel closed".into()))? {
                    Event::Control(Request::Pause, reply) => {
                        drop(reply.send(running.pause()));
                        self.paused = running.pause.is_closed();
                    }
                    Event::Control(Request::Resume, reply) => {
                        drop(reply.send(running.resume()));
                        self.paused = running.pause.is_closed();
                    }
                    Event::Control(request, reply) => {
                        if let Some(event) = self.control(request, reply) {
                            break event;
                        }
                    }
                    Event::Hotplug(event) => self.hotplug_event(event),
                    event => break event,
                }
            };
            running.stop();
            self.paused = false;
            match event {
                Event::Vcpu {
                    stop: VcpuStop::PowerOff,
                    ..
                } => {
                    crate::milestone::log("vCPUs stopped after power-off");
                    return Ok(Outcome::PowerOff);
                }
                Event::Vcpu {
                    stop: VcpuStop::Reset,
                    ..
                } => info!("rebooting the VM in place"),
                Event::Vcpu {
                    stop: VcpuStop::Failed(reason),
                    ..
                } => return Err(VmError::Vcpu(reason)),
                Event::Signal(sig) => return Ok(Outcome::Signal(sig)),
                Event::Control(..) | Event::Hotplug(..) => {
                    unreachable!("control requests and hot-plug events are handled above")
                }
            }
            // Drop what other vCPUs reported while they were being stopped (a second
            // SYSTEM_RESET from another CPU, say); a signal still counts.
            while let Ok(late) = self.events.1.try_recv() {
                match late {
                    Event::Signal(sig) => return Ok(Outcome::Signal(sig)),
                    Event::Hotplug(event) => self.hotplug_event(event),
                    Event::Control(request, reply) => {
                        debug!("control request {request:?} arrived during a reset");
                        drop(reply.send(Err(RequestError::new(
                            409,
                            "the VM is rebooting: try again",
                        ))));
                    }
                    late => debug!("ignoring late event {late:?}"),
                }
            }
        }
    }
}

/// A balloon request's failure as the API answers it: what the caller asked for (400), or a
/// device that does not answer (500).
fn balloon_error(e: crate::device::BalloonError) -> RequestError {
    use crate::device::BalloonError;
    let status = match e {
        BalloonError::NoBalloon | BalloonError::Refused(_) => 400,
        BalloonError::Control(_) => 500,
    };
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    RequestError::new(status, message)
}

impl Vm {
    /// Answers one control request while the guest runs; returns the event that ends this
    /// boot when the request asks for one (shutdown, reboot).
    fn control(&mut self, request: Request, reply: ReplySender) -> Option<Event> {
        debug!("control request: {request:?}");
        match request {
            Request::Info => {
                drop(reply.send(Ok(Reply::Info(self.info().to_string()))));
                None
            }
            Request::Shutdown => {
                info!("shutdown asked through the API");
                drop(reply.send(Ok(Reply::Done)));
                // As SIGTERM: stop the vCPUs, disconnect the devices, exit 0.
                Some(Event::Signal(libc::SIGTERM))
            }
            Request::Reboot => {
                info!("reboot asked through the API");
                drop(reply.send(Ok(Reply::Done)));
                // As a guest PSCI SYSTEM_RESET.
                Some(Event::Vcpu {
                    index: 0,
                    stop: VcpuStop::Reset,
                })
            }
            Request::Plug(plug) => {
                self.plug(plug, reply);
                None
            }
            Request::Unplug { id } => {
                self.unplug(id, reply);
                None
            }
            Request::ResizeBalloon { desired_balloon } => {
                drop(reply.send(self.resize_balloon(desired_balloon)));
                None
            }
            Request::BalloonStatistics => {
                drop(reply.send(self.balloon_statistics()));
                None
            }
            Request::Counters => {
                self.counters(reply);
                None
            }
            // The run loop answers these (it holds the running vCPUs).
            Request::Pause | Request::Resume => {
                drop(reply.send(Err(RequestError::new(409, "the VM is not running"))));
                None
            }
            Request::InjectFault { id, fault } => {
                self.inject_fault(id, fault, reply);
                None
            }
            Request::Create(_) => {
                drop(reply.send(Err(RequestError::new(
                    409,
                    "the VM is already created and booted (one VM per VMM)",
                ))));
                None
            }
            Request::Boot => {
                drop(reply.send(Err(RequestError::new(409, "the VM is already booted"))));
                None
            }
            Request::PowerButton => {
                self.power_button();
                drop(reply.send(Ok(Reply::Done)));
                None
            }
            Request::ResizeConsole { size } => {
                let from_terminal = size.is_none();
                let size = size.or_else(|| {
                    (self.config.console == crate::config::ConsoleConfig::Tty)
                        .then(crate::console::terminal_size)
                        .flatten()
                });
                let result = match size {
                    // SIGWINCH without a console on the terminal: nothing to follow.
                    None if from_terminal => Ok(Reply::Done),
                    None => Err(RequestError::new(400, "no size")),
                    Some((cols, rows)) => match self.devices.resize_console(cols, rows) {
                        Ok(()) => {
                            info!("console resized to {cols}x{rows}");
                            Ok(Reply::Done)
                        }
                        Err(e) => Err(RequestError::new(409, e)),
                    },
                };
                if let Err(e) = &result {
                    debug!("console resize: {}", e.message);
                }
                drop(reply.send(result));
                None
            }
        }
    }

    /// `vm.counters`: each device process's counters (its `stats` on the control channel:
    /// `name=value` pairs) and its restarts, in Cloud Hypervisor's shape: `{"disk0": {"reads":
    /// 12, ...}, ...}`. Asked from a thread per device, all answered or not within
    /// [`COUNTERS_WAIT`]: a device that does not answer is left out (and logged), never waited
    /// on by the main loop.
    fn counters(&self, reply: ReplySender) {
        let channels = self.devices.control_channels();
        let restarts = self.devices.restarts();
        let spawned = bulkhead_sandbox::thread_builder()
            .name("counters".into())
            .spawn(move || {
                let (tx, rx) = channel();
                let n = channels.len();
                for (id, control) in channels {
                    let tx = tx.clone();
                    let asked = bulkhead_sandbox::thread_builder()
                        .name("counters".into())
                        .spawn(move || drop(tx.send((id, control.request("stats")))));
                    if let Err(e) = asked {
                        warn!("vm.counters: no thread to ask a device ({e})");
                    }
                }
                drop(tx);
                let deadline = std::time::Instant::now() + COUNTERS_WAIT;
                let mut all = serde_json::Map::new();
                for _ in 0..n {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let Ok((id, answer)) = rx.recv_timeout(left) else {
                        break;
                    };
                    let stats = match answer {
                        Ok(line) => line,
                        Err(e) => {
                            warn!("vm.counters: {id} did not report its counters: {e}");
                            continue;
                        }
                    };
                    let mut counters: serde_json::Map<String, serde_json::Value> = stats
                        .split_whitespace()
                        .filter_map(|kv| kv.split_once('='))
                        .filter_map(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()?.into())))
                        .collect();
                    if let Some(r) = restarts.iter().find(|r| r.id == id) {
                        counters.insert("restarts".into(), r.restarts.into());
                    }
                    all.insert(id, counters.into());
                }
                drop(reply.send(Ok(Reply::Info(serde_json::Value::Object(all).to_string()))));
            });
        if let Err(e) = spawned {
            warn!("vm.counters: no thread for it ({e})");
        }
    }

    /// `vm.inject-fault`: `fault FAULT` on device `id`'s control channel, sent from a thread:
    /// a device that does not answer is bounded by the channel's deadline, and the main loop
    /// never waits on it. 404 for an id with no device process (unknown, or served by an
    /// external backend), 400 for a fault the device refuses, 409 if it does not answer.
    fn inject_fault(&self, id: String, fault: String, reply: ReplySender) {
        let Some(control) = self.devices.control_channel(&id) else {
            drop(reply.send(Err(RequestError::new(
                404,
                format!("no device process {id} (an unknown id, or a device served by an external backend)"),
            ))));
            return;
        };
        let spawned = bulkhead_sandbox::thread_builder()
            .name("inject-fault".into())
            .spawn(move || {
                let answer = match control.request(&format!("fault {fault}")) {
                    Ok(r) => {
                        warn!("{id}: fault {fault} injected through the API: {r}");
                        Ok(Reply::Info(
                            serde_json::json!({ "id": id, "fault": fault, "reply": r }).to_string(),
                        ))
                    }
                    Err(crate::device::control::ControlError::Refused(m)) => Err(
                        RequestError::new(400, format!("{id} refused fault {fault}: {m}")),
                    ),
                    Err(e) => Err(RequestError::new(
                        409,
                        format!("{id} did not take fault {fault}: {e}"),
                    )),
                };
                drop(reply.send(answer));
            });
        if let Err(e) = spawned {
            warn!("vm.inject-fault: no thread for it ({e})");
        }
    }

    /// `vm.power-button`: the PL061's line 3 goes high, and low again [`POWER_BUTTON_PULSE`]
    /// later (from a thread: the main loop does not wait), as QEMU `virt`'s power button. A
    /// guest with a gpio-keys driver sees KEY_POWER pressed and released (docs/power.md).
    fn power_button(&self) {
        info!("power button pressed through the API");
        self.gpio.lock().set_input(POWER_BUTTON_LINE, true);
        let gpio = self.gpio.clone();
        let spawned = bulkhead_sandbox::thread_builder()
            .name("power-button".into())
            .spawn(move || {
                std::thread::sleep(POWER_BUTTON_PULSE);
                gpio.lock().set_input(POWER_BUTTON_LINE, false);
            });
        if let Err(e) = spawned {
            warn!("vm.power-button: no thread to release the button ({e}); released at once");
            self.gpio.lock().set_input(POWER_BUTTON_LINE, false);
        }
    }

    /// `vm.resize` `desired_balloon`: the device takes the target, the guest is told.
    fn resize_balloon(&self, bytes: u64) -> Result<Reply, RequestError> {
        if self.config.balloon.is_none() {
            return Err(RequestError::new(
                400,
                "the VM has no balloon (start it with --balloon size=0)",
            ));
        }
        if bytes > self.config.ram_size {
            return Err(RequestError::new(
                400,
                format!(
                    "desired_balloon {bytes} is larger than guest RAM ({} bytes)",
                    self.config.ram_size
                ),
            ));
        }
        self.devices
            .balloon_resize(bytes)
            .map(|()| {
                info!("balloon target set to {} MiB through the API", bytes >> 20);
                Reply::Done
            })
            .map_err(balloon_error)
    }

    /// `vm.balloon-statistics`, in Firecracker's field names (`target_pages`, `actual_pages`,
    /// `target_mib`, `actual_mib`, then each figure the guest reported: `free_memory`,
    /// `total_memory`, `available_memory`, `disk_caches`, `swap_in`...).
    fn balloon_statistics(&self) -> Result<Reply, RequestError> {
        let pairs = self.devices.balloon_statistics().map_err(balloon_error)?;
        let mut doc = serde_json::Map::new();
        for (k, v) in pairs {
            doc.insert(k, serde_json::Value::from(v));
        }
        Ok(Reply::Info(serde_json::Value::Object(doc).to_string()))
    }

    /// `vm.info`: the configuration (Cloud Hypervisor's field names where the concept is the
    /// same), the state, and every device with its slot, PCI address, process and state.
    fn info(&self) -> serde_json::Value {
        use serde_json::json;
        let c = &self.config;
        let restarts = self.devices.restarts();
        // The devices in the slots now: cold-plugged, hot-plugged, less the removed ones.
        let devices: Vec<_> = self
            .plugged_devices()
            .into_iter()
            .map(|spec| {
                let bdf = self
                    .pcie
                    .device_bus(spec.slot)
                    .map(|bus| format!("0000:{bus:02x}:00.0"));
                let (pid, state) = match self.devices.process_state(&spec.id) {
                    Some((pid, false)) => (Some(pid), "running"),
                    Some((pid, true)) => (Some(pid), "ended"),
                    None => (None, "external"),
                };
                let restarted = restarts.iter().find(|r| r.id == spec.id);
                json!({
                    "id": spec.id,
                    "kind": spec.kind.name(),
                    "slot": spec.slot,
                    "bdf": bdf,
                    "pid": pid,
                    "state": state,
                    "removing": spec.removing,
                    "restarts": restarted.map_or(0, |r| r.restarts),
                    "last_cause": restarted.and_then(|r| r.last_cause.clone()),
                    "standby_pid": restarted.and_then(|r| r.standby_pid),
                })
            })
            .collect();
        // The guest's RAM less what its balloon holds.
        let ballooned = c
            .balloon
            .as_ref()
            .and_then(|_| self.devices.balloon_statistics().ok())
            .and_then(|s| s.into_iter().find(|(k, _)| k == "actual_pages"))
            .map_or(0, |(_, pages)| pages.saturating_mul(4096));
        // Not Cloud Hypervisor's: what the devices hold of KVM's routing table.
        let (gsis, msi_routes) = self.pcie.interrupt_usage().unwrap_or_default();
        json!({
            "config": config_json(c),
            "state": if self.paused { "Paused" } else { "Running" },
            "memory_actual_size": c.ram_size.saturating_sub(ballooned),
            "devices": devices,
            "interrupts": { "gsis": gsis, "msi_routes": msi_routes },
        })
    }
}

/// `vm.info`'s `config`: the VM's configuration in Cloud Hypervisor's field names where the
/// concept is the same (also before `vm.boot`, for a VM `vm.create` described).
pub fn config_json(c: &VmConfig) -> serde_json::Value {
    use serde_json::json;
    let disks: Vec<_> = c
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut v = json!({
                "id": d.id.clone().unwrap_or_else(|| format!("disk{i}")),
                "num_queues": d.num_queues,
                "queue_size": d.queue_size,
            });
            match &d.backend {
                crate::config::DiskBackend::Process {
                    path,
                    readonly,
                    direct,
                    serial,
                    ..
                } => {
                    v["path"] = json!(path.display().to_string());
                    v["readonly"] = json!(readonly);
                    v["direct"] = json!(direct);
                    v["serial"] = json!(serial);
                    v["vhost_user"] = json!(false);
                }
                crate::config::DiskBackend::Socket(p) => {
                    v["vhost_user"] = json!(true);
                    v["vhost_socket"] = json!(p.display().to_string());
                }
            }
            v
        })
        .collect();
    let nets: Vec<_> = c
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut v = json!({
                "id": n.id.clone().unwrap_or_else(|| format!("net{i}")),
                "mac": crate::config::format_mac(&n.mac),
                "mtu": n.mtu,
                "num_queues": n.num_queues,
                "queue_size": n.queue_size,
                "vhost_user": matches!(n.backend, crate::config::NetBackend::Socket(_)),
            });
            match &n.backend {
                crate::config::NetBackend::Tap { name, addr } => {
                    v["tap"] = json!(name);
                    if let Some((ip, mask)) = addr {
                        v["ip"] = json!(ip.to_string());
                        v["mask"] = json!(mask.to_string());
                    }
                }
                crate::config::NetBackend::Fds { fds, name } => {
                    v["tap"] = json!(name);
                    v["fds"] = json!(fds);
                }
                crate::config::NetBackend::Socket(p) => {
                    v["vhost_socket"] = json!(p.display().to_string())
                }
            }
            v
        })
        .collect();
    // Cloud Hypervisor's fields.
    let balloon = c.balloon.as_ref().map(|b| {
        json!({
            "size": b.size,
            "deflate_on_oom": b.deflate_on_oom,
            "free_page_reporting": b.free_page_reporting,
            "stats_polling_interval_s": b.stats_polling_interval_s,
        })
    });
    json!({
        "cpus": { "boot_vcpus": c.vcpus, "max_vcpus": c.vcpus },
        "memory": { "size": c.ram_size },
        "payload": { "cmdline": c.cmdline },
        "disks": disks,
        "net": nets,
        "console": console_info(&c.console),
        "balloon": balloon,
        "pci_slots": c.pci_slots,
    })
}

/// `vm.info`'s `config.console` (Cloud Hypervisor's fields: `mode`, and `file` for a file or
/// the pty's path, `socket` for a socket).
fn console_info(console: &crate::config::ConsoleConfig) -> serde_json::Value {
    use crate::config::ConsoleConfig;
    use serde_json::json;
    match console {
        ConsoleConfig::Off => json!({ "mode": "Off" }),
        ConsoleConfig::Tty => json!({ "mode": "Tty" }),
        ConsoleConfig::Pty => json!({
            "mode": "Pty",
            "file": crate::console::pty_path().map(|p| p.display().to_string()),
        }),
        ConsoleConfig::File(p) => json!({ "mode": "File", "file": p.display().to_string() }),
        ConsoleConfig::Socket(p) => json!({ "mode": "Socket", "socket": p.display().to_string() }),
    }
}

/// Blocks termination signals (SIGTERM, SIGINT, SIGHUP) in the calling thread, and so in every
/// thread it starts afterwards; returns their set. Call before starting any thread (device
/// watchers included): a thread that does not block them would take the process down with
/// their default action. Child processes get an empty mask from `Command`.
///
/// SIGWINCH is in the set too: [`forward_signals`] turns it into a resize of the virtio console
/// when that is on the terminal (`--console tty`), and it ends nothing.
pub fn block_termination_signals() -> Result<libc::sigset_t, VmError> {
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGWINCH];
    let set = vmm_sys_util::signal::create_sigset(&signals).map_err(VmError::Signals)?;
    // SAFETY: `set` is a valid sigset; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmError::Signals(vmm_sys_util::errno::Error::new(rc)));
    }
    Ok(set)
}

/// Blocks termination signals (see [`block_termination_signals`]) and starts a thread that
/// turns them into events.
pub fn forward_signals(events: Sender<Event>) -> Result<(), VmError> {
    let set = block_termination_signals()?;
    bulkhead_sandbox::thread_builder()
        .name("signals".into())
        .spawn(move || {
            if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::Signals) {
                return;
            }
            loop {
                let mut sig = 0;
                // SAFETY: `set` and `sig` are valid; sigwait only writes `sig`.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    if sig == libc::SIGWINCH {
                        // The terminal changed size: the console follows it (its answer is
                        // not waited for).
                        let (reply, _) = std::sync::mpsc::channel();
                        let resize = Request::ResizeConsole { size: None };
                        if events.send(Event::Control(resize, reply)).is_err() {
                            return;
                        }
                        continue;
                    }
                    info!("received signal {sig}, shutting down");
                    if events.send(Event::Signal(sig)).is_err() {
                        return;
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| VmError::SpawnThread("signals".into(), e))
}

/// Starts a thread that copies this process's stdin to the guest console.
pub fn forward_stdin(serial: Arc<SharedPl011>) -> Result<(), VmError> {
    let stop = AtomicBool::new(false);
    bulkhead_sandbox::thread_builder()
        .name("serial-in".into())
        .spawn(move || {
            if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::SerialIn) {
                return;
            }
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => {
                        debug!("stdin closed; the guest console gets no more input");
                        return;
                    }
                    Ok(n) => serial.feed(&buf[..n], &stop),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!("reading stdin for the guest console: {e}");
                        return;
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| VmError::SpawnThread("serial-in".into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsoleConfig;

    #[test]
    fn test_console_info_in_ch_fields() {
        assert_eq!(
            console_info(&ConsoleConfig::Off).to_string(),
            r#"{"mode":"Off"}"#
        );
        assert_eq!(
            console_info(&ConsoleConfig::Socket("/run/c.sock".into())).to_string(),
            r#"{"mode":"Socket","socket":"/run/c.sock"}"#
        );
        assert_eq!(
            console_info(&ConsoleConfig::File("/var/log/c".into())).to_string(),
            r#"{"file":"/var/log/c","mode":"File"}"#
        );
        let pty = console_info(&ConsoleConfig::Pty);
        assert_eq!(pty["mode"], "Pty");
        assert!(pty.get("file").is_some(), "{pty}");
    }
}
