//! The options every device process takes, and their validated form.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{ArgGroup, ValueEnum};

/// The common options of every device process; device crates `#[command(flatten)]` them.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
#[command(group(ArgGroup::new("socket").required(true).args(["socket_path", "socket_fd"])))]
pub struct RuntimeArgs {
    /// Listen on this unix socket path and serve the first frontend that connects.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve an already connected unix stream socket inherited as descriptor N (3 from the VMM).
    #[arg(long, value_name = "N")]
    pub socket_fd: Option<i32>,
    /// Answer control requests on this connected SOCK_SEQPACKET socket (4 from the VMM).
    #[arg(long, value_name = "N")]
    pub control_fd: Option<i32>,
    /// Install the device's seccomp filter before serving. `off` is for debugging only and is
    /// logged loudly.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub seccomp: Switch,
    /// A memfd (from the VMM) for in-flight I/O tracking: VHOST_USER_GET_INFLIGHT_FD lays its
    /// region out here (a device's jail cannot create one). Without it, the device does not
    /// offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.
    #[arg(long, value_name = "N")]
    pub inflight_fd: Option<i32>,
    /// A fault armed from the start (fault injection, docs/restart.md): `crash_after=N`, the
    /// process aborts when it takes its Nth request (devices that count requests: block).
    #[arg(long, value_name = "FAULT")]
    pub fault: Option<String>,
    /// Apply landlock (no path reachable) before serving. `on` fails on a kernel without
    /// landlock; `off` is for debugging only and is logged loudly.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub landlock: Switch,
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Where the vhost-user connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Listen on this path and serve the first frontend that connects.
    Path(PathBuf),
    /// An already connected unix stream socket inherited as this descriptor.
    Fd(RawFd),
}

/// The validated common options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub socket: SocketSource,
    pub control_fd: Option<RawFd>,
    pub inflight_fd: Option<RawFd>,
    pub fault: Option<String>,
    pub seccomp: bool,
    pub landlock: bool,
}

/// A common option that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("exactly one of --socket-path and --socket-fd is required")]
    Socket,
    #[error("--{option} must be a descriptor above 2 (0-2 are standard input, output and error), not {fd}")]
    ReservedFd { option: &'static str, fd: RawFd },
    #[error("descriptor {0} is named by two options")]
    FdTwice(RawFd),
}

/// Checks that an inherited descriptor number is not standard I/O.
pub fn check_fd(option: &'static str, fd: RawFd) -> Result<RawFd, ArgsError> {
    if fd <= 2 {
        return Err(ArgsError::ReservedFd { option, fd });
    }
    Ok(fd)
}

impl RuntimeConfig {
    /// The descriptors this configuration names (socket and control channel).
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        if let SocketSource::Fd(fd) = self.socket {
            fds.push(fd);
        }
        fds.extend(self.control_fd);
        fds.extend(self.inflight_fd);
        fds
    }

    /// Fails when `fds` (the device's own descriptors) reuse a number this configuration or
    /// another of them names.
    pub fn check_distinct(&self, fds: &[RawFd]) -> Result<(), ArgsError> {
        let mut all = self.fds();
        all.extend_from_slice(fds);
        for (i, fd) in all.iter().enumerate() {
            if all.iter().skip(i + 1).any(|other| other == fd) {
                return Err(ArgsError::FdTwice(*fd));
            }
        }
        Ok(())
    }
}

impl TryFrom<RuntimeArgs> for RuntimeConfig {
    type Error = ArgsError;

    fn try_from(args: RuntimeArgs) -> Result<RuntimeConfig, ArgsError> {
        let socket = match (args.socket_path, args.socket_fd) {
            (Some(path), None) => SocketSource::Path(path),
            (None, Some(fd)) => SocketSource::Fd(check_fd("socket-fd", fd)?),
            _ => return Err(ArgsError::Socket),
        };
        let control_fd = args
            .control_fd
            .map(|fd| check_fd("control-fd", fd))
            .transpose()?;
        let inflight_fd = args
            .inflight_fd
            .map(|fd| check_fd("inflight-fd", fd))
            .transpose()?;
        let config = RuntimeConfig {
            socket,
            control_fd,
            inflight_fd,
            fault: args.fault,
            seccomp: args.seccomp == Switch::On,
            landlock: args.landlock == Switch::On,
        };
        config.check_distinct(&[])?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    fn parse(args: &[&str]) -> Result<RuntimeConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("dev").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        RuntimeConfig::try_from(cli.runtime).map_err(|e| e.to_string())
    }

    #[test]
    fn test_runtime_args_defaults_on() {
        let config = parse(&["--socket-fd", "3"]).expect("config");
        assert_eq!(config.socket, SocketSource::Fd(3));
        assert_eq!(config.control_fd, None);
        assert!(config.seccomp && config.landlock);
    }

    #[test]
    fn test_runtime_args_all_options_converted() {
        let config = parse(&[
            "--socket-path",
            "/s",
            "--control-fd",
            "4",
            "--seccomp",
            "off",
            "--landlock",
            "off",
        ])
        .expect("config");
        assert_eq!(config.socket, SocketSource::Path("/s".into()));
        assert_eq!(config.control_fd, Some(4));
        assert!(!config.seccomp && !config.landlock);
    }

    #[test]
    fn test_runtime_args_bad_fds_rejected() {
        assert!(parse(&["--socket-fd", "2"]).is_err());
        assert!(parse(&["--socket-fd=-1"]).is_err());
        assert!(parse(&["--socket-fd", "3", "--control-fd", "0"]).is_err());
        assert!(parse(&["--socket-fd", "3", "--control-fd", "3"]).is_err());
        assert!(parse(&["--control-fd", "4"]).is_err(), "no socket");
        assert!(parse(&["--socket-fd", "3", "--socket-path", "/s"]).is_err());
        assert!(parse(&["--socket-fd", "3", "--landlock", "maybe"]).is_err());
    }

    #[test]
    fn test_check_distinct_device_fd_reuse_rejected() {
        let config = parse(&["--socket-fd", "3", "--control-fd", "4"]).expect("config");
        assert_eq!(config.check_distinct(&[5]), Ok(()));
        assert_eq!(config.check_distinct(&[4]), Err(ArgsError::FdTwice(4)));
    }
}
