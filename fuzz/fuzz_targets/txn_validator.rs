//! libFuzzer entry for `raftkv::fuzzing::txn_validator`: hostile bytes must be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| raftkv::fuzzing::txn_validator(data));
