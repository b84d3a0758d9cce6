//! What a client of the REST API sends: bytes on the connection (HTTP framing, limits) and
//! JSON bodies of the endpoints that take one. None may panic the VMM (docs/api.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bulkhead::api::fuzz_requests(data);
});
