//! The `bulkhead-block` binary: parses the command line and runs the device.

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_block::backend::{MAX_QUEUES, MAX_QUEUE_SIZE};
use bulkhead_block::request::ID_BYTES;
use bulkhead_block::{start_backend, Config, ImageSource, Serial, SocketSource};
use clap::{ArgGroup, Parser, ValueEnum};
use log::error;

/// virtio-blk device process: serves a raw disk image to one vhost-user frontend.
#[derive(Parser, Debug, PartialEq, Eq)]
#[command(name = "bulkhead-block", version)]
#[command(group(ArgGroup::new("socket").required(true).args(["socket_path", "socket_fd"])))]
struct Args {
    /// Listen on this unix socket path and serve the first frontend that connects.
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,
    /// Serve an already connected unix stream socket inherited as descriptor N.
    #[arg(long, value_name = "N")]
    socket_fd: Option<i32>,
    /// The raw disk image (regular file or block device). With --image-fd, only its name in logs.
    #[arg(long, value_name = "IMG")]
    path: Option<PathBuf>,
    /// Serve the image inherited as descriptor N (opened by the VMM; the jailed process opens
    /// no path).
    #[arg(long, value_name = "N")]
    image_fd: Option<i32>,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    num_queues: u16,
    /// Largest size of each queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
    /// Serial number returned by VIRTIO_BLK_T_GET_ID (ASCII, up to 20 bytes).
    #[arg(long, value_name = "S")]
    serial: Option<String>,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,
    /// Install the seccomp filter before serving. `off` is for debugging only and is logged
    /// loudly.
    #[arg(long, value_enum, default_value_t = Seccomp::On)]
    seccomp: Seccomp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Seccomp {
    On,
    Off,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ConfigError {
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, not {0}")]
    NumQueues(u16),
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("--serial must be printable ASCII of at most {ID_BYTES} bytes")]
    Serial,
    #[error("--socket-fd must not be negative, not {0}")]
    SocketFd(i32),
    #[error("exactly one of --socket-path and --socket-fd is required")]
    Socket,
    #[error("--image-fd must not be negative, not {0}")]
    ImageFd(i32),
    #[error("one of --path and --image-fd is required")]
    Image,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        if args.num_queues == 0 || args.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(args.num_queues));
        }
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        let mut serial = Serial::default();
        if let Some(s) = &args.serial {
            let bytes = s.as_bytes();
            if bytes.len() > ID_BYTES || !bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                return Err(ConfigError::Serial);
            }
            serial
                .0
                .get_mut(..bytes.len())
                .ok_or(ConfigError::Serial)?
                .copy_from_slice(bytes);
        }
        let socket = match (args.socket_path, args.socket_fd) {
            (Some(path), None) => SocketSource::Path(path),
            (None, Some(fd)) if fd >= 0 => SocketSource::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::SocketFd(fd)),
            _ => return Err(ConfigError::Socket),
        };
        let image = match (args.image_fd, args.path) {
            (Some(fd), _) if fd < 0 => return Err(ConfigError::ImageFd(fd)),
            (Some(fd), name) => ImageSource::Fd {
                fd,
                name: name.unwrap_or_else(|| PathBuf::from(format!("fd {fd}"))),
            },
            (None, Some(path)) => ImageSource::Path(path),
            (None, None) => return Err(ConfigError::Image),
        };
        Ok(Config {
            socket,
            image,
            read_only: args.readonly,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial,
            direct: args.direct,
            seccomp: args.seccomp == Seccomp::On,
        })
    }
}

fn main() -> ExitCode {
    // In its jail the process is executed from a descriptor; get its name back for ps and the
    // VMM's logs.
    bulkhead_sandbox::set_name_from_argv0();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Usage errors exit with status 2 here.
    let args = Args::parse();
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    match start_backend(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let bad_input = e.is_bad_input();
            error!("{:#}", anyhow::Error::from(e));
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("bulkhead-block").chain(args.iter().copied()))
    }

    #[test]
    fn test_args_socket_path_defaults_accepted() {
        let args = parse(&["--socket-path", "/tmp/s", "--path", "/img"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(config.socket, SocketSource::Path("/tmp/s".into()));
        assert_eq!(config.num_queues, 1);
        assert_eq!(config.queue_size, 256);
        assert_eq!(config.serial, Serial::default());
        assert!(!config.read_only && !config.direct);
        assert_eq!(config.image, ImageSource::Path("/img".into()));
        assert!(config.seccomp, "seccomp is on by default");
    }

    #[test]
    fn test_args_image_fd_names_image_by_path() {
        let args =
            parse(&["--socket-fd", "3", "--image-fd", "4", "--path", "/a.img"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(
            config.image,
            ImageSource::Fd {
                fd: 4,
                name: "/a.img".into()
            }
        );
        let args =
            parse(&["--socket-fd", "3", "--image-fd", "4", "--seccomp", "off"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(
            config.image,
            ImageSource::Fd {
                fd: 4,
                name: "fd 4".into()
            }
        );
        assert!(!config.seccomp);
    }

    #[test]
    fn test_args_no_image_rejected() {
        let args = parse(&["--socket-fd", "3"]).expect("parse");
        assert_eq!(Config::try_from(args), Err(ConfigError::Image));
        let args = parse(&["--socket-fd", "3", "--image-fd=-2"]).expect("parse");
        assert_eq!(Config::try_from(args), Err(ConfigError::ImageFd(-2)));
        assert!(parse(&["--socket-fd", "3", "--path", "/i", "--seccomp", "maybe"]).is_err());
    }

    #[test]
    fn test_args_both_sockets_rejected() {
        let err = parse(&["--socket-path", "/s", "--socket-fd", "3", "--path", "/i"])
            .expect_err("conflict");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn test_args_no_socket_rejected() {
        let err = parse(&["--path", "/i"]).expect_err("missing socket");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn test_args_unparsable_queue_count_rejected() {
        let err = parse(&["--socket-fd", "3", "--path", "/i", "--num-queues", "x"])
            .expect_err("bad number");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn test_config_all_options_converted() {
        let args = parse(&[
            "--socket-fd",
            "3",
            "--path",
            "/i",
            "--readonly",
            "--num-queues",
            "4",
            "--queue-size",
            "128",
            "--serial",
            "disk-0",
            "--direct",
        ])
        .expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(config.socket, SocketSource::Fd(3));
        assert_eq!(&config.serial.0[..7], b"disk-0\0");
        assert!(config.read_only && config.direct);
        assert_eq!((config.num_queues, config.queue_size), (4, 128));
    }

    #[test]
    fn test_config_bad_values_rejected() {
        let base = ["--socket-fd", "3", "--path", "/i"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            Config::try_from(parse(&v).expect("parse"))
        };
        assert_eq!(with(&["--num-queues", "0"]), Err(ConfigError::NumQueues(0)));
        assert_eq!(
            with(&["--num-queues", "65"]),
            Err(ConfigError::NumQueues(65))
        );
        assert_eq!(
            with(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            with(&["--queue-size", "2048"]),
            Err(ConfigError::QueueSize(2048))
        );
        assert_eq!(
            with(&["--serial", "012345678901234567890"]),
            Err(ConfigError::Serial)
        );
        assert_eq!(with(&["--serial", "tab\there"]), Err(ConfigError::Serial));
        let args = parse(&["--socket-fd=-1", "--path", "/i"]).expect("parse");
        assert_eq!(Config::try_from(args), Err(ConfigError::SocketFd(-1)));
    }
}
