#!/usr/bin/env bash
# jumpgate quick start: a relay, an agent and a throwaway sshd, all on this machine's loopback.
# It prints the `ssh -p` line that reaches the "worker" through the relay's allocated port and
# the `ssh -J` line that reaches it by name through the relay's jump listener, proves each works
# once, and keeps the tunnel up until Ctrl-C. `--once` stops right after the proof (used by the tests).
#
# Needs: cargo, and OpenSSH (Debian: apt-get install openssh-server openssh-client).
set -euo pipefail

ONCE=0
[ "${1:-}" = "--once" ] && ONCE=1
cd "$(dirname "$0")/.."

SSHD=$(command -v sshd || true)
[ -z "$SSHD" ] && [ -x /usr/sbin/sshd ] && SSHD=/usr/sbin/sshd
if [ -z "$SSHD" ] || ! command -v ssh >/dev/null; then
    echo "quickstart needs OpenSSH: apt-get install openssh-server openssh-client" >&2
    exit 1
fi

BIN=${JUMPGATE_BIN_DIR:-}
if [ -z "$BIN" ]; then
    echo "building relay-server and worker-agent (first time takes a few minutes)..." >&2
    cargo build --quiet --release -p relay-server -p worker-agent
    BIN=target/release
fi

WORK=$(mktemp -d -t jumpgate-quickstart.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 9000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
}

wait_for() { # wait_for FILE PATTERN
    for _ in $(seq 1 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1:" >&2
    cat "$1" >&2
    exit 1
}

# 1. The "container": an sshd on loopback that accepts one throwaway key.
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/user_key"
cp "$WORK/user_key.pub" "$WORK/authorized_keys"
SSHD_PORT=$(free_port)
mkdir -p /run/sshd 2>/dev/null || true
cat > "$WORK/sshd_config" <<CONF
Port $SSHD_PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
CONF
"$SSHD" -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
PIDS+=($!)

# 2. The jump host: relay-server with a self-signed certificate, a generated token and an
#    `ssh -J` listener (its SSH host key generated in the state dir).
RELAY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
JUMP_PORT=$(free_port)
RELAY_FLAGS=(--public-host 127.0.0.1 --jump-listen "127.0.0.1:$JUMP_PORT" --state-dir "$WORK/relay-state")
"$BIN/relay-server" --listen "127.0.0.1:$RELAY_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
    --port-range 30000-30099 "${RELAY_FLAGS[@]}" 2>"$WORK/relay.log" &
PIDS+=($!)
wait_for "$WORK/relay.log" "relay listening for agents"
wait_for "$WORK/relay.log" "jump listener for ssh -J on"
PIN=$("$BIN/relay-server" fingerprint --state-dir "$WORK/relay-state")
# What a user does once: pin the jump listener's host key.
"$BIN/relay-server" fingerprint --jump "${RELAY_FLAGS[@]}" >"$WORK/relay_known_hosts"
cat > "$WORK/ssh_config" <<CONF
# The relay's jump listener, its host key pinned (relay-server fingerprint --jump).
Host 127.0.0.1
    UserKnownHostsFile $WORK/relay_known_hosts
    StrictHostKeyChecking yes
# Every hop logs in with the throwaway key; the job's sshd is throwaway too.
Host *
    IdentityFile $WORK/user_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
CONF

# 3. The worker: worker-agent dials out and exposes the sshd.
"$BIN/worker-agent" --server "127.0.0.1:$RELAY_PORT" --name quickstart \
    --token-file "$WORK/relay-state/token" --fingerprint "$PIN" \
    --service "ssh=127.0.0.1:$SSHD_PORT" --status-file "$WORK/status.json" \
    >"$WORK/agent.out" 2>"$WORK/agent.log" &
PIDS+=($!)
wait_for "$WORK/agent.out" "ssh enabled on"
LINE=$(grep "ssh enabled on" "$WORK/agent.out" | head -n1)
PORT=${LINE##*:}

SSH_CMD="ssh -p $PORT -i $WORK/user_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null $(id -un)@127.0.0.1"
# By name through the jump listener: ssh.quickstart is agent quickstart's service `ssh` (a job
# whose sshd is on port 22 is simply `ssh -J relay:2222 job-name`).
JUMP_CMD="ssh -F $WORK/ssh_config -J 127.0.0.1:$JUMP_PORT $(id -un)@ssh.quickstart"
echo "agent says: $LINE"
echo
echo "  $SSH_CMD"
echo "  $JUMP_CMD"
echo
echo "proving they work:"
$SSH_CMD -o BatchMode=yes -o LogLevel=ERROR 'echo "  hello from $(hostname) via jumpgate, sshd sees you as $USER"'
$JUMP_CMD -o BatchMode=yes -o LogLevel=ERROR 'echo "  hello from $(hostname) via ssh -J, sshd sees you as $USER"'

if [ "$ONCE" = 1 ]; then
    exit 0
fi
echo
echo "tunnel is up; run either ssh line above in another terminal. Ctrl-C stops everything."
wait
