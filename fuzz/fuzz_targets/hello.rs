//! The relay's handshake path on one hello payload: version probe, negotiation, full decode and
//! name validation must never panic.
#![no_main]

use jumpgate_proto::{decode, negotiate_version, validate_name, AgentHello, VersionProbe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let Ok(probe) = decode::<VersionProbe>(payload) else { return };
    let _ = negotiate_version(probe);
    let Ok(hello) = decode::<AgentHello>(payload) else { return };
    let _ = validate_name("agent", &hello.name);
    for s in &hello.services {
        let _ = validate_name("service", &s.name);
        for c in &s.allow {
            let _ = c.contains(std::net::IpAddr::from([127, 0, 0, 1]));
        }
    }
    let _ = format!("{hello:?}");
});
