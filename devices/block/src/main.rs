//! The `bulkhead-block` binary: [`Args`] (clap) -> [`Config`] (`TryFrom`) -> the device runtime.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use std::process::ExitCode;

use bulkhead_block::args::Args;
use bulkhead_block::Config;

fn main() -> ExitCode {
    bulkhead_device_runtime::main::<Args, Config>()
}
