//! Bulkhead's guest platform: the memory map, the device tree, and loading the kernel and
//! initramfs into guest RAM.

pub mod fdt;
pub mod image;
pub mod layout;
