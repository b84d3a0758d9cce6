//! Raw mode for a terminal on stdin, restored on every way out of the process.

use std::sync::Mutex;

/// The settings stdin had before raw mode, if raw mode is on.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin, if it is a terminal, in raw mode, so every key reaches the guest as typed
/// (Ctrl-C included). A panic hook and [`restore`] put it back.
pub fn enter_raw_mode() -> std::io::Result<bool> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return Ok(false);
    }
    // SAFETY: termios is plain data; all-zero is a valid value to be overwritten by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let saved = t;
    // SAFETY: `t` is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // Keep output post-processing so host-side log lines still start at column 0.
    t.c_oflag |= libc::OPOST | libc::ONLCR;
    // SAFETY: `t` is a valid termios.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
    Ok(true)
}

/// Restores the terminal settings saved by [`enter_raw_mode`]; harmless if there are none.
pub fn restore() {
    let saved = match SAVED.try_lock() {
        Ok(mut s) => s.take(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(t) = saved {
        // SAFETY: `t` is the termios tcgetattr returned for this descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}
