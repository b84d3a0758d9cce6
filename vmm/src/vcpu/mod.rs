//! vCPU threads: run the guest, dispatch exits, report how a vCPU stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::info;

use crate::coalesced::CoalescedRing;
use crate::mmio::MmioBus;

/// Why a vCPU thread ended on its own.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for power-off (PSCI SYSTEM_OFF).
    PowerOff,
    /// The guest asked for a reset (PSCI SYSTEM_RESET).
    Reset,
    /// The vCPU cannot go on; the message names the exit or error.
    Failed(String),
}

/// A message to the VMM's main thread.
#[derive(Debug)]
pub enum Event {
    /// vCPU `index` stopped.
    Vcpu {
        /// Which vCPU.
        index: usize,
        /// Why.
        stop: VcpuStop,
    },
    /// A termination signal arrived.
    Signal(i32),
    /// A request from outside the VM (the API), with where to answer it.
    Control(crate::control::Request, crate::control::ReplySender),
    /// A hot-unplug under way moved on (the guest powered the slot off, or its bound ran out).
    Hotplug(crate::hotplug::HotplugEvent),
}

/// `vm.pause` / `vm.resume`: where paused vCPU threads wait (out of KVM_RUN, on a condition
/// variable: a futex wait, which the vCPU filter allows).
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Mirrors `state.paused`, so that a vCPU thread's check on every exit takes no lock
    /// while the gate is open (set under the lock; a vCPU that misses a close sees it after
    /// the kick that follows every close).
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    /// vCPU threads waiting at the gate.
    parked: usize,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the gate: each vCPU thread parks at its next loop (kick it out of KVM_RUN).
    pub fn close(&self) {
        let mut g = self.lock();
        g.paused = true;
        self.closed.store(true, Ordering::Release);
    }

    /// Opens the gate: parked vCPU threads run again.
    pub fn open(&self) {
        let mut g = self.lock();
        g.paused = false;
        self.closed.store(false, Ordering::Release);
        drop(g);
        self.changed.notify_all();
    }

    /// Wakes parked threads to look at their stop flag (the VM is stopping).
    pub fn wake(&self) {
        let _held = self.lock();
        self.changed.notify_all();
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().paused
    }

    /// Waits up to `timeout` for `n` threads to be parked; whether they are.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |g| g.paused && g.parked < n)
            .unwrap_or_else(|e| e.into_inner());
        g.paused && g.parked >= n
    }

    /// A vCPU thread's check: parks while the gate is closed and `stop` is not set.
    fn pass(&self, stop: &AtomicBool) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut g = self.lock();
        if !g.paused {
            return;
        }
        g.parked += 1;
        self.changed.notify_all();
        while g.paused && !stop.load(Ordering::Acquire) {
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked -= 1;
    }
}

/// What a vCPU thread needs.
pub struct VcpuThread {
    /// Index of the vCPU.
    pub index: usize,
    /// Its KVM file.
    pub fd: VcpuFd,
    /// Devices it dispatches MMIO exits to.
    pub bus: Arc<MmioBus>,
    /// Writes KVM queued instead of exiting (the console's output), played to `bus` before
    /// every exit is served.
    pub ring: Option<Arc<CoalescedRing>>,
    /// Set when the VMM wants the thread to return.
    pub stop: Arc<AtomicBool>,
    /// Where to report a stop of its own.
    pub events: Sender<Event>,
    /// Log the time of the first KVM_RUN (the boot vCPU of the first boot).
    pub log_first_run: bool,
    /// Where it waits while the VM is paused.
    pub pause: Arc<PauseGate>,
    /// The host CPUs it is pinned to (`--cpus affinity=`), if any.
    pub affinity: Option<Vec<usize>>,
}

/// Pins the calling thread to `cpus` (sched_setaffinity on itself, pid 0).
fn pin_self(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Signal sent to a vCPU thread to get it out of KVM_RUN; its handler does nothing.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler; once per process, before any vCPU thread starts.
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

impl VcpuThread {
    /// Runs the vCPU until the guest stops it, it fails, or `stop` is set.
    pub fn run(mut self) {
        // First thing: its pinning (the main thread's filter allows sched_setaffinity on the
        // calling thread; its own does not), then its own filter, on top of the main thread's
        // it inherited.
        let pinned = match &self.affinity {
            Some(cpus) => pin_self(cpus).map_err(|e| {
                VcpuStop::Failed(format!(
                    "vcpu{}: cannot pin it to host CPUs {cpus:?} (--cpus affinity): {e}",
                    self.index
                ))
            }),
            None => Ok(()),
        };
        let stop = match pinned {
            Err(stop) => Some(stop),
            Ok(()) => match crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
                Ok(()) => self.run_loop(),
                Err(e) => Some(VcpuStop::Failed(format!("vcpu{}: {e}", self.index))),
            },
        };
        if let Some(stop) = stop {
            // The main thread may already be gone on its way out; nothing to do then.
            let _ = self.events.send(Event::Vcpu {
                index: self.index,
                stop,
            });
        }
    }

    fn run_loop(&mut self) -> Option<VcpuStop> {
        let index = self.index;
        loop {
            self.pause.pass(&self.stop);
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if std::mem::take(&mut self.log_first_run) {
                crate::milestone::log("first KVM_RUN");
            }
            let exit = self.fd.run();
            if let Some(ring) = &self.ring {
                // Before anything the exit does: the guest's queued writes came first.
                ring.drain(&self.bus);
            }
            match exit {
                Ok(VcpuExit::MmioRead(addr, data)) => self.bus.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    #[cfg(feature = "seccomp-trigger")]
                    if addr == crate::seccomp::SECCOMP_TRIGGER_ADDR {
                        crate::seccomp::trigger_violation();
                    }
                    self.bus.write(addr, data)
                }
                Ok(VcpuExit::SystemEvent(kind, data)) => {
                    return Some(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => {
                            info!("vcpu{index}: guest powered off");
                            VcpuStop::PowerOff
                        }
                        KVM_SYSTEM_EVENT_RESET => {
                            info!("vcpu{index}: guest asked for a reset");
                            VcpuStop::Reset
                        }
                        KVM_SYSTEM_EVENT_CRASH => {
                            VcpuStop::Failed(format!("vcpu{index}: guest reported a crash"))
                        }
                        other => VcpuStop::Failed(format!(
                            "vcpu{index}: unhandled system event {other} (data {data:x?})"
                        )),
                    });
                }
                Ok(VcpuExit::Intr) => {}
                Ok(exit) => {
                    return Some(VcpuStop::Failed(format!(
                        "vcpu{index}: unhandled KVM exit {exit:?}"
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    let what = crate::arch::describe_run_error(e.errno())
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    return Some(VcpuStop::Failed(format!(
                        "vcpu{index}: KVM_RUN failed ({e}){what}"
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pin_self_sets_the_thread_affinity() {
        std::thread::spawn(|| {
            // SAFETY: plain data; the kernel fills it.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: `set` is a valid cpu_set_t of `size` bytes.
            assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
            let first = (0..libc::CPU_SETSIZE as usize)
                // SAFETY: `c` is below CPU_SETSIZE.
                .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .expect("some CPU is allowed");
            pin_self(&[first]).expect("pin to an allowed CPU");
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
            // SAFETY: CPU_COUNT reads the set.
            assert_eq!(unsafe { libc::CPU_COUNT(&set) }, 1);
            // SAFETY: `first` is below CPU_SETSIZE.
            assert!(unsafe { libc::CPU_ISSET(first, &set) });
            // No such CPU on this machine: the kernel refuses, the affinity is unchanged.
            assert!(pin_self(&[1023]).is_err());
            assert!(pin_self(&[libc::CPU_SETSIZE as usize]).is_err());
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn test_pause_gate_parks_until_open_or_stop() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Open: passes at once.
        gate.pass(&stop);
        gate.close();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (g, s) = (gate.clone(), stop.clone());
                std::thread::spawn(move || g.pass(&s))
            })
            .collect();
        assert!(gate.wait_parked(2, Duration::from_secs(5)), "both parked");
        assert!(threads.iter().all(|t| !t.is_finished()));
        gate.open();
        for t in threads {
            t.join().expect("thread");
        }
        // Closed again, a stop releases it.
        gate.close();
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.pass(&s));
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        gate.wake();
        t.join().expect("thread");
        assert!(gate.is_closed(), "a stop does not open the gate");
        assert!(
            !gate.wait_parked(1, Duration::from_millis(10)),
            "nobody parked now"
        );
    }
}
