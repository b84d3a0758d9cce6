//! `bulkhead`: boots one VM from the command line.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use std::process::ExitCode;

use bulkhead::config::{Args, SerialConfig, VmConfig};
use bulkhead::control::{Reply, RequestError};
use bulkhead::create::Waited;
use bulkhead::device::spawner::Spawner;
use bulkhead::seccomp::{self, ThreadKind};
use bulkhead::vm::{block_termination_signals, forward_signals, forward_stdin, Outcome, Vm};
use bulkhead::{terminal, vcpu};
use clap::Parser;
use log::{error, info, warn};

/// Exit status for a VM that failed while running.
const EXIT_VM_FAILED: u8 = 1;
/// Exit status for bad input: nothing was started.
const EXIT_BAD_INPUT: u8 = 2;

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .format_timestamp_millis()
        .init();
}

/// Prints an error and its chain of causes on one line.
fn report(prefix: &str, e: &dyn std::error::Error) {
    let mut msg = format!("{prefix}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    error!("{msg}");
    // Also to stderr unformatted when logging is filtered off.
    if !log::log_enabled!(log::Level::Error) {
        eprintln!("bulkhead: {msg}");
    }
}

/// What the VMM boots: the VM of its command line, or the one `vm.create` will describe
/// (the command line then holds the VMM's options and the defaults).
enum Start {
    Config(Box<VmConfig>),
    WaitForCreate(Box<Args>),
}

/// An error of `vm.boot` as the API answers it: bad input 400, anything else 500.
fn boot_error(e: &bulkhead::vm::VmError) -> RequestError {
    let status = match e {
        bulkhead::vm::VmError::Device(d) if d.is_bad_input() => 400,
        _ => 500,
    };
    let mut message = format!("vm.boot: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    RequestError::new(status, message)
}

fn run(
    start: Start,
    spawner: &std::sync::Arc<Spawner>,
    cgroup: Option<&std::path::Path>,
    api: Option<bulkhead::api::Listener>,
) -> Result<Outcome, bulkhead::vm::VmError> {
    // Before Vm::new starts device watcher and backend-req threads: they must block these too.
    block_termination_signals()?;
    // The VM's main loop's channel: signals and API requests queue there from now on (and,
    // without --kernel, the VMM answers them until vm.boot).
    let events = std::sync::mpsc::channel();
    forward_signals(events.0.clone())?;
    if let Some(listener) = api {
        bulkhead::api::start(listener, events.0.clone())?;
    }
    let (config, boot_reply) = match start {
        Start::Config(config) => (*config, None),
        Start::WaitForCreate(base) => match bulkhead::create::wait(&base, &events.1) {
            Waited::Exit(outcome) => return Ok(outcome),
            Waited::Boot(config, reply) => (*config, Some(reply)),
        },
    };
    let interactive = matches!(config.serial, SerialConfig::Tty);
    // `--console tty`: the terminal is the virtio console's (never both: config.rs).
    let console_tty = config.console == bulkhead::config::ConsoleConfig::Tty;
    let vm = match Vm::with_events(config, spawner, cgroup, events) {
        Ok(vm) => vm,
        Err(e) => {
            // vm.boot's caller learns why; the VMM then ends as a failed start does.
            if let Some(reply) = boot_reply {
                drop(reply.send(Err(boot_error(&e))));
            }
            return Err(e);
        }
    };
    if let Some(reply) = boot_reply {
        info!("VM booting through the API");
        drop(reply.send(Ok(Reply::Done)));
    }
    vcpu::register_kick_handler().map_err(bulkhead::vm::VmError::Signals)?;
    if interactive || console_tty {
        match terminal::enter_raw_mode() {
            Ok(true) => info!("stdin is a terminal: raw mode until the VM ends"),
            Ok(false) => {}
            Err(e) => warn!("cannot put the terminal in raw mode: {e}"),
        }
    }
    if interactive {
        forward_stdin(vm.serial())?;
    }
    // The device processes are started and every helper thread runs under its own filter:
    // from here on the main thread needs only what boot, reboot and shutdown need. vCPU
    // threads, started by Vm::run, inherit this filter and add their own.
    seccomp::apply(ThreadKind::Main)?;
    vm.run()
}

fn main() -> ExitCode {
    // `bulkhead image check IMG`: the image checker (docs/image-check.md), no VM.
    if std::env::args_os().nth(1).is_some_and(|a| a == "image") {
        return bulkhead::image_cmd::main(std::env::args_os().skip(1));
    }
    let args = Args::parse();
    init_logging(args.verbose);
    let cgroup_parent = args.cgroup_parent.clone();
    // Without --kernel or --firmware the VM comes from vm.create: the command line holds the
    // VMM's own options (checked now) and the defaults of vm.create's body.
    let checked = if bulkhead::config::waits_for_create(&args) {
        bulkhead::config::vmm_options(&args).map(|(sandbox, api_socket)| {
            (
                sandbox,
                Some(api_socket),
                Start::WaitForCreate(Box::new(args)),
            )
        })
    } else {
        VmConfig::try_from(args)
            .map(|c| (c.sandbox, c.api_socket.clone(), Start::Config(Box::new(c))))
    };
    let (sandbox, api_socket, start) = match checked {
        Ok(c) => c,
        Err(e) => {
            report("invalid configuration", &e);
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    bulkhead::milestone::log("configuration checked");
    // Once the configuration is checked, first thing, while this process has one thread and
    // no seccomp filter: the VM's cgroup (the VMM moves into a leaf of its own, and the
    // spawner starts there too), then the spawner, the only part of Bulkhead that creates
    // namespaces and executes programs.
    let cgroup = bulkhead::device::cgroup::prepare(cgroup_parent.as_deref());
    let policy = bulkhead::device::spawner_policy(sandbox);
    let spawner = match Spawner::fork(policy) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            report("starting the device spawner", &e);
            return ExitCode::from(EXIT_VM_FAILED);
        }
    };
    if !sandbox {
        let msg = "--sandbox off: the VMM's threads run WITHOUT seccomp filters; \
                   a compromised VMM thread can make any system call. Use only to debug.";
        warn!("{msg}");
        eprintln!("bulkhead: WARNING: {msg}");
    }
    if let Err(e) = seccomp::init(sandbox) {
        report("setting up the seccomp filters", &e);
        return ExitCode::from(EXIT_VM_FAILED);
    }
    // The API socket, while this process still has one thread (its mode is set through the
    // umask); a path in use or a bad descriptor is bad input.
    let api = match api_socket.as_ref().map(bulkhead::api::Listener::open) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            report("invalid configuration", &e);
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let result = run(start, &spawner, cgroup.as_deref(), api);
    // The answer to an API shutdown reaches its client before the VMM exits.
    bulkhead::api::wait_answered(std::time::Duration::from_secs(1));
    terminal::restore();
    // Hangs up the spawner, which kills any device process still running.
    drop(spawner);
    bulkhead::milestone::log("exiting");
    match result {
        Ok(Outcome::PowerOff) => {
            info!("VM powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Signal(sig)) => {
            info!("VM stopped on signal {sig}");
            ExitCode::SUCCESS
        }
        Err(e) if e.is_bad_input() => {
            report("invalid configuration", &e);
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(e) => {
            report("VM failed", &e);
            ExitCode::from(EXIT_VM_FAILED)
        }
    }
}
