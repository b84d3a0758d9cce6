//! `bulkhead-kill-at FILE BYTES PID [TIMEOUT_S]`: sends SIGKILL to PID as soon as FILE holds at
//! least BYTES, then prints FILE's size at that moment. Exits 1 (and kills nothing) if that
//! does not happen within TIMEOUT_S seconds (default 300), 2 on bad arguments.
//!
//! The nested net-io scenario kills a device process a quarter of the way into a transfer. A
//! shell loop that runs `wc -c` to watch the received file costs a program start per look, and
//! in the emulated L1, with the transfer keeping both CPUs busy, it saw the count late, at times
//! only after the transfer was over. This looks every millisecond with one `stat` and no fork.

use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!("usage: bulkhead-kill-at FILE BYTES PID [TIMEOUT_S]");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(file), Some(bytes), Some(pid)) = (args.first(), args.get(1), args.get(2)) else {
        usage()
    };
    let (Ok(bytes), Ok(pid)) = (bytes.parse::<u64>(), pid.parse::<libc::pid_t>()) else {
        usage()
    };
    let timeout = match args.get(3).map(|t| t.parse::<u64>()) {
        None => 300,
        Some(Ok(t)) => t,
        Some(Err(_)) => usage(),
    };
    if pid <= 0 {
        usage()
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if size >= bytes {
            // SAFETY: kill with a positive pid and a valid signal.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                eprintln!(
                    "bulkhead-kill-at: kill {pid}: {}",
                    std::io::Error::last_os_error()
                );
                std::process::exit(1);
            }
            println!("{size}");
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("bulkhead-kill-at: {file} held {size} of {bytes} bytes after {timeout} s; nothing killed");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
