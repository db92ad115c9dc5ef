//! The relay's handshake path on one hello payload: version probe, negotiation, full decode and
//! name validation must never panic; nor the agent's: the relay's answer decoded and its member
//! list checked, keeping at most MAX_MEMBERS dialable addresses.
#![no_main]

use jumpgate_proto::{
    check_members, decode, negotiate_version, validate_name, AgentHello, Control, RelayHello,
    VersionProbe, MAX_MEMBERS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let members = match decode::<RelayHello>(payload) {
        Ok(RelayHello::Accepted(a)) => Some(a.members),
        _ => match decode::<Control>(payload) {
            Ok(Control::Members { relays }) => Some(relays),
            _ => None,
        },
    };
    if let Some(list) = members {
        let checked = check_members(&list);
        assert!(checked.valid.len() <= MAX_MEMBERS);
    }
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
