//! What a depth-1 request with the polling driver costs, besides its work, when it finds the
//! backend asleep: a thread that waits in `epoll_wait` on an eventfd and does nothing else,
//! kicked by a thread that spins until it answers, on the polling rows' CPUs. Each round trip
//! is the kick's wake-up of a thread asleep on another CPU (which, on a VM, has halted and
//! left the host) and the answer. A backend still awake when the next request comes (one
//! that polls, like `--poll-us` or Cloud Hypervisor's `poll_queue=true`, one still busy with
//! the last request, or one whose CPU other work keeps from halting) does not pay it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pin::{self, Placement};

/// Round trips measured: their median, and how many there were.
pub struct RoundTrips {
    pub median: Duration,
    pub count: usize,
}

/// Kicks and waits for the answer for `secs` seconds (after 0.1 s of warm-up).
pub fn measure(place: Placement, secs: f64) -> Result<RoundTrips> {
    let kick = EventFd::new(EFD_NONBLOCK).context("eventfd")?;
    let epoll = Epoll::new().context("epoll_create")?;
    epoll
        .ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .context("epoll_ctl")?;
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sleeper = {
        let (kick, answered, stop) = (kick.try_clone()?, answered.clone(), stop.clone());
        std::thread::Builder::new()
            .name("wake-sleeper".into())
            .spawn(move || -> Result<()> {
                pin::repin_current_thread(place.backend).context("bind the sleeper")?;
                let mut events = [EpollEvent::default(); 1];
                while !stop.load(Ordering::Relaxed) {
                    // A timeout only so that it notices `stop`.
                    let n = epoll.wait(100, &mut events).context("epoll_wait")?;
                    if n > 0 && kick.read().is_ok() {
                        answered.fetch_add(1, Ordering::Release);
                    }
                }
                Ok(())
            })
            .context("start the sleeper")?
    };
    let result = (|| -> Result<RoundTrips> {
        pin::repin_current_thread(place.bench).context("bind the kicker")?;
        let start = Instant::now();
        let warm = start + Duration::from_millis(100);
        let until = warm + Duration::from_secs_f64(secs);
        let mut times = Vec::new();
        let mut sent = 0u64;
        loop {
            let t0 = Instant::now();
            if t0 >= until {
                break;
            }
            kick.write(1).context("kick")?;
            sent += 1;
            while answered.load(Ordering::Acquire) < sent {
                if t0.elapsed() > Duration::from_secs(1) {
                    anyhow::bail!("the sleeper did not answer a kick within 1 s");
                }
                std::hint::spin_loop();
            }
            if t0 >= warm {
                times.push(t0.elapsed());
            }
        }
        anyhow::ensure!(!times.is_empty(), "no round trip measured");
        times.sort();
        Ok(RoundTrips {
            median: times[times.len() / 2],
            count: times.len(),
        })
    })();
    stop.store(true, Ordering::Relaxed);
    let joined = sleeper
        .join()
        .map_err(|_| anyhow::anyhow!("the sleeper panicked"))?;
    let trips = result?;
    joined?;
    Ok(trips)
}
