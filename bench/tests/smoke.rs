//! The benchmark runs end to end in smoke mode (tiny sizes, no thresholds): CI exercises it
//! without timing anything.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn smoke_run_writes_results() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_jumpgate-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(&bench)
        .args(["--smoke", "--agents", "3", "--out"])
        .arg(out.path())
        .env("JUMPGATE_BIN_DIR", &bin_dir)
        .env_remove("FRPS")
        .env_remove("FRPC")
        .env_remove("RATHOLE")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let rows = json["results"].as_array().unwrap();
    let value = |metric: &str| {
        rows.iter()
            .find(|r| r["metric"] == metric)
            .and_then(|r| r["values"]["jumpgate"].as_f64())
            .unwrap_or_else(|| panic!("no jumpgate value for {metric}: {json}"))
    };
    assert!(value("connections/s (connect+echo+close)") > 0.0);
    assert!(value("echo RTT p50 (64 B)") > 0.0);
    assert_eq!(value("agents back after restart"), 3.0);
    if Command::new("iperf3").arg("--version").output().is_ok() {
        assert!(value("throughput, 1 stream(s)") > 0.0);
    }
    assert!(std::fs::read_to_string(out.path().join("results.md"))
        .unwrap()
        .contains("| jumpgate |"));
}
