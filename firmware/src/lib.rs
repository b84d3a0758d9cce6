//! Bulkhead's guest platform: the memory map, the device tree, loading the kernel and
//! initramfs into guest RAM, and checking disk images against the ARM VM System
//! Specification.

pub mod fdt;
pub mod image;
pub mod image_check;
pub mod layout;
