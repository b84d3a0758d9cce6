//! Replies a (malicious) vhost-user backend sends the VMM's frontend, during the handshake
//! and the jobs after it. None may panic the VMM or hang it past the request deadline.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bulkhead::virtio::fuzzing::replies(data);
});
