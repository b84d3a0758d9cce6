//! The `bulkhead-balloon` binary: [`Args`] (clap) -> [`Config`] (`TryFrom`) -> the device
//! runtime.

use std::process::ExitCode;

use bulkhead_balloon::args::Args;
use bulkhead_balloon::Config;

fn main() -> ExitCode {
    bulkhead_device_runtime::main::<Args, Config>()
}
