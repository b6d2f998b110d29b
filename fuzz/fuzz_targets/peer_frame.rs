//! libFuzzer entry for `raftkv::fuzzing::peer_frame`: hostile bytes must be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| raftkv::fuzzing::peer_frame(data));
