//! Fuzzes the snapshot state loader: arbitrary bytes as a `state` file go
//! through the header, checksum, JSON and consistency checks. The
//! properties: no panic, and whatever is accepted survives a second round
//! through the writer's format (so a loaded state is one the VMM could
//! have written). Inputs get a valid header for their body half of the
//! time, so that the JSON and consistency checks are reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{parse_state, FORMAT, VERSION};

/// A state file with a valid header for `body`.
fn with_header(body: &[u8]) -> Vec<u8> {
    let header = format!(
        "{{\"format\":\"{FORMAT}\",\"version\":{VERSION},\"state_bytes\":{},\"state_crc32\":{}}}\n",
        body.len(),
        crc32fast::hash(body)
    );
    [header.as_bytes(), body].concat()
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_state(data);
    if data.first().is_some_and(|b| b & 1 == 1) {
        if let Ok(snap) = parse_state(&with_header(&data[1..])) {
            let again = serde_json::to_vec(&snap).expect("an accepted state serializes");
            assert!(
                parse_state(&with_header(&again)).is_ok(),
                "a loaded state reloads"
            );
        }
    }
});
