//! libFuzzer entry for `raftkv::fuzzing::envelope`: hostile bytes must be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| raftkv::fuzzing::envelope(data));
