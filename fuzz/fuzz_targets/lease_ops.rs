//! Random sequences of lease operations keep the table's invariants: no port leased twice,
//! every port either leased or free, a name whose session ended without leases is held by
//! nobody, and a snapshot restores to the same state. Placements ask for 0-2 services under
//! changing names, so services a name stops asking for are retired too.
#![no_main]

use jumpgate_lease::{LeaseTable, PortRange, ServiceAsk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(range) = PortRange::new(100, 115) else { return };
    let mut table = LeaseTable::new(range, 50);
    let mut now = 1u64;
    for op in data.chunks(3) {
        let (kind, a, b) = (op[0] % 6, op.get(1).copied().unwrap_or(0), op.get(2).copied().unwrap_or(0));
        let agent = format!("agent{}", a % 10);
        now += u64::from(b % 40);
        match kind {
            0 | 1 => {
                let asks = [
                    ServiceAsk {
                        service: "ssh".into(),
                        preferred: (b % 3 == 0).then_some(95 + u16::from(b % 25)),
                        strict: b % 7 == 0,
                    },
                    ServiceAsk { service: format!("s{}", a % 3), preferred: None, strict: false },
                ];
                let asks = &asks[..usize::from(b % 3)];
                let blocked = u16::from(b % 16) + 100;
                let mut bindable = |p| p != blocked || a % 2 == 0;
                if kind == 0 {
                    let _ = table.acquire(&agent, asks, now, &mut bindable);
                } else {
                    // An attempt the caller refuses must leave the table exactly as it was.
                    let before = table.snapshot(now);
                    if let Ok(jumpgate_lease::Attempt::RolledBack(_)) =
                        table.try_acquire(&agent, asks, now, &mut bindable, &mut |_| false)
                    {
                        assert_eq!(table.snapshot(now), before, "a refused attempt changed the table");
                    }
                }
            }
            2 => {
                table.deactivate_agent(&agent, now);
                if table.leases_of(&agent).next().is_none() {
                    assert!(table.holder(&agent).is_none(), "{agent} held after its session ended without leases");
                }
            }
            5 => table.hold(&agent, &format!("identity{}", b % 3)),
            3 => {
                table.release_agent(&agent, now);
            }
            _ => {
                table.expire(now);
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (_, port, _, _) in table.iter() {
            assert!(seen.insert(port), "port {port} leased twice");
            assert!(range.contains(port));
        }
        assert_eq!(table.in_use() + table.free_count(), range.len());
        let snap = table.snapshot(now);
        let (restored, dropped) = LeaseTable::restore(range, 50, snap.clone()).expect("own snapshot restores");
        assert!(dropped.is_empty());
        assert_eq!(restored.snapshot(now), snap);
    }
});
