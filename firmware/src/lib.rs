//! Bulkhead's guest platform: the memory map, the device tree, loading the kernel and
//! initramfs into guest RAM, and checking disk images against the ARM VM System
//! Specification.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod fdt;
pub mod image;
pub mod image_check;
pub mod layout;
