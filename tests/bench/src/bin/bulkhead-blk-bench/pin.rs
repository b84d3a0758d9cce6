//! Where the benchmark and the backend under test run. On a small VM a request's latency at
//! queue depth 1 is mostly the wake-ups between the two processes, and a wake-up across CPUs
//! costs several times one on the same CPU: left to the scheduler, the figures jump between
//! the two cases from run to run.

use anyhow::{ensure, Result};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pin {
    /// Both on the first CPU this process may use: the figures show the CPU cost of the
    /// whole path, and repeat.
    Same,
    /// The benchmark on the first CPU, the backend (or io_uring's workers) on the second, as
    /// a vCPU thread and a device process would usually be.
    Split,
    /// Wherever the scheduler puts them.
    None,
}

/// The CPU of the benchmark's thread and the CPU of the backend's threads.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub bench: Option<usize>,
    pub backend: Option<usize>,
}

fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: all-zero is a valid, empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    ensure!(
        rc == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads `set`, at an index below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

pub fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: all-zero is a valid, empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes into `set`; an index of CPU_SETSIZE or more is ignored.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Every CPU this process may use (taken at start-up, before any pinning).
pub fn all_cpus() -> libc::cpu_set_t {
    // SAFETY: all-zero is a valid, empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in ALLOWED.get().cloned().unwrap_or_default() {
        // SAFETY: CPU_SET writes into `set`; an index of CPU_SETSIZE or more is ignored.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

/// Let the calling thread run on every CPU it could at start-up (`None`), or bind it.
pub fn repin_current_thread(cpu: Option<usize>) -> std::io::Result<()> {
    let set = match cpu {
        Some(c) => cpu_set(c),
        None => all_cpus(),
    };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bind the calling thread to `cpu`; threads and processes it creates later inherit that.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Pin {
    pub fn placement(self) -> Result<Placement> {
        let cpus = match ALLOWED.get() {
            Some(c) => c.clone(),
            None => {
                let c = allowed_cpus()?;
                let _ = ALLOWED.set(c.clone());
                c
            }
        };
        ensure!(!cpus.is_empty(), "no CPU to run on");
        Ok(match self {
            Pin::None => Placement {
                bench: None,
                backend: None,
            },
            Pin::Same => Placement {
                bench: Some(cpus[0]),
                backend: Some(cpus[0]),
            },
            Pin::Split => {
                ensure!(
                    cpus.len() >= 2,
                    "--pin split needs two CPUs, this process may use {cpus:?}"
                );
                Placement {
                    bench: Some(cpus[0]),
                    backend: Some(cpus[1]),
                }
            }
        })
    }
}
