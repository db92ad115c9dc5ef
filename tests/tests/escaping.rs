//! Whatever a hostile hello carries, the relay neither echoes it back at length nor lets it
//! forge lines in its log.

use std::time::Duration;

use jumpgate_proto::{Refusal, RelayHello};
use jumpgate_tests::*;

#[test]
fn a_hostile_name_is_neither_echoed_at_length_nor_forges_log_lines() {
    let dir = scratch();
    let relay = Relay::start(dir.path(), port_range(4), &[]);
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    // A 60 KB name (refused for its length, unquoted) and a short one the refusal quotes.
    let long = format!("evil\nFORGED log line \u{1b}[31m{}", "x".repeat(60_000));
    let short = "evil\nFORGED log line \u{1b}[31m\r".to_string();
    for name in [long, short] {
        let reply = block_on(raw::exchange(
            &relay.listen,
            &relay.fingerprint(),
            &raw::hello(&name, token.trim(), (1, 1)),
        ));
        let RelayHello::Refused(refusal) = reply else {
            panic!("a name with control characters was accepted: {reply:?}");
        };
        // What the agent logs is the refusal's Display text, built from the detail the relay
        // sent (derived Debug would escape a newline anyway, so it proves nothing).
        let Refusal::BadRequest { detail } = &refusal else {
            panic!("expected a bad request, got {refusal:?}");
        };
        let shown = refusal.to_string();
        for text in [detail.as_str(), shown.as_str()] {
            assert!(text.len() < 1024, "the refusal echoes {} bytes", text.len());
            assert!(
                !text.contains('\n') && !text.contains('\r') && !text.contains('\u{1b}'),
                "the refusal carries raw control characters: {text:?}"
            );
        }
    }
    relay
        .proc
        .wait_log("agent refused", Duration::from_secs(10));
    let log = relay.proc.log();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a hello forged a log line:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "raw escape sequences reached the log"
    );
    assert!(log.len() < 20_000, "the log grew by {} bytes", log.len());
}
