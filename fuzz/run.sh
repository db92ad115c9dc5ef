#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20) and fails on the first crash; with
# --build-only, only builds them (CI builds them while the end-to-end tests run).
# cargo fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
TARGETS="frame_decoder hello lease_ops proxy_reply websocket agent_session"
if [ "${1:-}" = --build-only ]; then
    for target in $TARGETS; do cargo fuzz build --sanitizer none "$target"; done
    exit 0
fi
# One target after another would leave a core idle: libFuzzer runs one process per target. Two
# (FUZZ_JOBS) run at once; a crash in any fails the run.
fuzz_one() {
    local target=$1 secs=$SECONDS_EACH
    # The agent session core's target (added last) gets half the time: with its own build (a
    # small crate, ~5-20 s) the fuzz step grows by about SECONDS_EACH. Its seeds reach a broken
    # lane limit within seconds.
    if [ "$target" = agent_session ]; then secs=$(( (SECONDS_EACH + 1) / 2 )); fi
    mkdir -p "corpus/$target" target
    local log="target/fuzz-$target.log"
    if ! cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
        -max_total_time="$secs" -max_len=70000 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz target $target failed; the crashing input is under fuzz/artifacts/$target/" >&2
        return 1
    fi
    echo "fuzzed $target for ${secs}s: $(grep -E "^stat::number_of_executed_units" "$log" || echo "no stats")"
}
export -f fuzz_one
export SECONDS_EACH
# Built first, one at a time, so the parallel runs do not queue on cargo's build lock.
for target in $TARGETS; do cargo fuzz build --sanitizer none "$target"; done
printf '%s\n' $TARGETS | xargs -P "${FUZZ_JOBS:-2}" -I{} bash -c 'fuzz_one "$@"' _ {}
