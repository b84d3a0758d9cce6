//! The `bulkhead-console` binary: `Args` (clap) -> [`Config`] (`TryFrom`) -> the device runtime.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use std::process::ExitCode;

use bulkhead_console::backend::MAX_QUEUE_SIZE;
use bulkhead_console::{Config, ConsoleParams, HostFds};
use bulkhead_device_runtime::args::check_fd;
use bulkhead_device_runtime::{ArgsError, RuntimeArgs, RuntimeConfig};
use clap::Parser;

/// virtio-console device process: serves one console port to one vhost-user frontend, on a
/// host end the VMM opened and handed in.
#[derive(Parser, Debug, PartialEq, Eq)]
#[command(name = "bulkhead-console", version)]
struct Args {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Where the guest's output goes: a file opened for append, or (with --input-fd) the
    /// VMM's standard output.
    #[arg(long, value_name = "N")]
    output_fd: Option<i32>,
    /// Where input for the guest comes from (the VMM's standard input); needs --output-fd.
    #[arg(long, value_name = "N", requires = "output_fd")]
    input_fd: Option<i32>,
    /// A pty master: input and output.
    #[arg(long, value_name = "N", conflicts_with_all = ["output_fd", "listen_fd"])]
    pty_fd: Option<i32>,
    /// The pty's slave, kept open (never read or written) so the master sees no hang-up.
    #[arg(long, value_name = "N", requires = "pty_fd")]
    pty_slave_fd: Option<i32>,
    /// A listening unix stream socket: one client at a time gets the console.
    #[arg(long, value_name = "N", conflicts_with = "output_fd")]
    listen_fd: Option<i32>,
    /// The console's initial width (VIRTIO_CONSOLE_F_SIZE).
    #[arg(long, value_name = "N", default_value_t = 80)]
    cols: u16,
    /// The console's initial height.
    #[arg(long, value_name = "N", default_value_t = 24)]
    rows: u16,
    /// Largest size of each queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ConfigError {
    #[error("one of --output-fd, --pty-fd and --listen-fd is required")]
    HostEnd,
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error(transparent)]
    Runtime(#[from] ArgsError),
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        let runtime = RuntimeConfig::try_from(args.runtime)?;
        if args.pty_slave_fd.is_some() && args.pty_fd.is_none() {
            return Err(ConfigError::HostEnd);
        }
        let host = match (args.output_fd, args.input_fd, args.pty_fd, args.listen_fd) {
            (Some(o), None, None, None) => HostFds::Output(check_fd("output-fd", o)?),
            (Some(o), Some(i), None, None) => HostFds::Streams {
                input: check_fd("input-fd", i)?,
                output: check_fd("output-fd", o)?,
            },
            (None, None, Some(m), None) => HostFds::Pty {
                master: check_fd("pty-fd", m)?,
                slave: args
                    .pty_slave_fd
                    .map(|s| check_fd("pty-slave-fd", s))
                    .transpose()?,
            },
            (None, None, None, Some(l)) => HostFds::Listener(check_fd("listen-fd", l)?),
            _ => return Err(ConfigError::HostEnd),
        };
        runtime.check_distinct(&host.fds())?;
        Ok(Config {
            runtime,
            host,
            params: ConsoleParams {
                cols: args.cols,
                rows: args.rows,
                queue_size: args.queue_size,
            },
        })
    }
}

fn main() -> ExitCode {
    bulkhead_device_runtime::main::<Args, Config>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::SocketSource;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("bulkhead-console").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        Config::try_from(parse(args).expect("parse"))
    }

    #[test]
    fn test_args_each_host_end() {
        let c =
            config(&["--socket-fd", "3", "--control-fd", "4", "--output-fd", "5"]).expect("config");
        assert_eq!(c.runtime.socket, SocketSource::Fd(3));
        assert_eq!(c.host, HostFds::Output(5));
        assert_eq!(
            (c.params.cols, c.params.rows, c.params.queue_size),
            (80, 24, 256)
        );
        let c =
            config(&["--socket-fd", "3", "--input-fd", "5", "--output-fd", "6"]).expect("config");
        assert_eq!(
            c.host,
            HostFds::Streams {
                input: 5,
                output: 6
            }
        );
        let c = config(&[
            "--socket-fd",
            "3",
            "--pty-fd",
            "5",
            "--pty-slave-fd",
            "6",
            "--cols",
            "132",
            "--rows",
            "50",
        ])
        .expect("config");
        assert_eq!(
            c.host,
            HostFds::Pty {
                master: 5,
                slave: Some(6)
            }
        );
        assert_eq!((c.params.cols, c.params.rows), (132, 50));
        let c = config(&["--socket-fd", "3", "--listen-fd", "5", "--queue-size", "64"])
            .expect("config");
        assert_eq!(c.host, HostFds::Listener(5));
        assert_eq!(c.params.queue_size, 64);
    }

    #[test]
    fn test_args_bad_input_rejected() {
        assert_eq!(config(&["--socket-fd", "3"]), Err(ConfigError::HostEnd));
        assert_eq!(
            config(&[
                "--socket-fd",
                "3",
                "--output-fd",
                "5",
                "--queue-size",
                "100"
            ]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            config(&[
                "--socket-fd",
                "3",
                "--output-fd",
                "5",
                "--queue-size",
                "512"
            ]),
            Err(ConfigError::QueueSize(512))
        );
        assert_eq!(
            config(&["--socket-fd", "3", "--output-fd", "3"]),
            Err(ConfigError::Runtime(ArgsError::FdTwice(3)))
        );
        assert_eq!(
            config(&["--socket-fd", "3", "--input-fd", "5", "--output-fd", "5"]),
            Err(ConfigError::Runtime(ArgsError::FdTwice(5)))
        );
        assert!(matches!(
            config(&["--socket-fd", "3", "--output-fd", "1"]),
            Err(ConfigError::Runtime(ArgsError::ReservedFd { fd: 1, .. }))
        ));
        // Combinations clap refuses.
        for bad in [
            &["--socket-fd", "3", "--input-fd", "5"][..],
            &["--socket-fd", "3", "--pty-fd", "5", "--output-fd", "6"],
            &["--socket-fd", "3", "--listen-fd", "5", "--output-fd", "6"],
            &["--socket-fd", "3", "--output-fd", "5", "--cols", "70000"],
            &["--socket-fd", "3", "--output-fd", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&["--socket-fd", "3", "--pty-fd", "5", "--listen-fd", "6"]).is_err());
        assert_eq!(
            config(&[
                "--socket-fd",
                "3",
                "--pty-slave-fd",
                "6",
                "--output-fd",
                "5"
            ]),
            Err(ConfigError::HostEnd)
        );
    }
}
