//! Guest accesses to a virtio-pci function: PCI configuration space, BAR 0's common and
//! device configuration, notifications, the MSI-X table and PBA. None may panic the VMM or
//! wait on the device process.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bulkhead::virtio::fuzzing::transport(data);
});
