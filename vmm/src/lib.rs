//! Bulkhead's VMM core: vCPUs, the interrupt controller, the PL011 console and the VM
//! lifecycle. Devices beyond the console run in their own processes.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod api;
pub mod arch;
pub mod coalesced;
pub mod config;
pub mod console;
pub mod control;
pub mod create;
pub mod device;
pub mod hotplug;
pub mod image_cmd;
pub mod irq;
pub mod legacy;
pub mod memory;
pub mod milestone;
pub mod mmio;
pub mod pci;
pub mod preload;
pub mod ratelimit;
pub mod regpage;
pub mod seccomp;
pub mod tap;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
