#!/usr/bin/env python3
"""Interleaved A/B of jumpgate builds on a busy host (BENCHMARKS.md, "Allocator").

For each round and each build in turn (order reversed every other round), starts relay-server
and worker-agent from BINDIR with the benchmark's flags, an iperf3 server behind the agent, and
runs `iperf3 -n SIZE` with 1 then 4 streams through the tunnel. Per transfer it records the CPU
seconds (utime+stime of both daemons, /proc/PID/stat) and minor page faults per GiB received,
Gbit/s and the load average; RSS (VmRSS) once the tunnel is up and after the transfers.
CPU per GiB is what other load on the machine disturbs least: compare that, paired by round.

usage: python3 bench/ab.py ROUNDS SIZE NAME=BINDIR[,VAR=VALUE...] ...   (one JSON line per run)
e.g.   python3 bench/ab.py 6 4G old=/tmp/old new=/tmp/new,MIMALLOC_VERBOSE=0 > ab.jsonl
       python3 bench/ab.py summary ab.jsonl   (medians [min-max]; ratios to the first build)"""
import json, os, random, socket, statistics, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu(pid):
    st = open(f"/proc/{pid}/stat").read()
    f = st[st.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def minflt(pid):
    st = open(f"/proc/{pid}/stat").read()
    return int(st[st.rfind(")") + 2:].split()[7])

def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) / 1024
    return 0

def load():
    return float(open("/proc/loadavg").read().split()[0])

def start(bindir, env, iperf_port, d):
    e = dict(os.environ); e.update(env); e["RUST_LOG"] = "warn,relay_server=info"
    listen = f"127.0.0.1:{free_port()}"
    lo = 30000 + random.randrange(0, 20000)
    state = os.path.join(d, "state")
    relay = subprocess.Popen([f"{bindir}/relay-server", "--listen", listen, "--public-host", "127.0.0.1",
        "--admin", "off", "--port-range", f"{lo}-{lo+9}", "--max-streams-per-agent", "4000",
        "--max-conns-per-port", "100000", "--max-new-conns-per-sec", "1000000", "--max-handshakes", "5000",
        "--state-dir", state], env=e, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(d, "relay.log"), "w"))
    t0 = time.time()
    while "relay listening for agents" not in open(os.path.join(d, "relay.log")).read():
        if time.time() - t0 > 20: raise SystemExit("relay did not start")
        time.sleep(0.05)
    pin = subprocess.run([f"{bindir}/relay-server", "fingerprint", "--state-dir", state], env=e,
        capture_output=True, text=True).stdout.strip()
    status = os.path.join(d, "status.json")
    e["RUST_LOG"] = "warn"
    agent = subprocess.Popen([f"{bindir}/worker-agent", "--server", listen, "--name", "ab", "--fingerprint", pin,
        "--token-file", os.path.join(state, "token"), "--status-file", status,
        "--service", f"iperf=127.0.0.1:{iperf_port}"], env=e, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "agent.log"), "w"))
    t0 = time.time()
    while True:
        try:
            v = json.load(open(status))
            if v["relays"][0]["state"] == "connected":
                port = [s["port"] for s in v["services"] if s["name"] == "iperf"][0]
                break
        except Exception:
            pass
        if time.time() - t0 > 20: raise SystemExit("agent did not connect")
        time.sleep(0.05)
    return relay, agent, port

def iperf(port, size, streams):
    for _ in range(6):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", size, "-P", str(streams), "-J"],
            capture_output=True, text=True).stdout
        v = json.loads(out)
        if "error" in v and "busy" in v["error"]:
            time.sleep(1); continue
        if "error" in v: raise SystemExit(v["error"])
        s = v["end"]["sum_received"]
        return s["bytes"], s["bits_per_second"]
    raise SystemExit("iperf3 busy")

def summary(files):
    rows = [dict(json.loads(l), file=i) for i, f in enumerate(files) for l in open(f)]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    keys = ["p1_spg", "p4_spg", "p1_gbps", "p4_gbps", "relay_rss_idle", "agent_rss_idle",
            "relay_rss_after", "agent_rss_after", "p1_relay_flt_per_gib", "p1_agent_flt_per_gib", "p1_load"]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        print(f"{name} ({len(mine)} runs)")
        for k in keys:
            xs = sorted(r[k] for r in mine if k in r)
            if xs:
                print(f"  {k}: {statistics.median(xs):.2f} [{xs[0]:.2f}-{xs[-1]:.2f}]")
        for k in ["p1_spg", "p4_spg", "p1_gbps", "p4_gbps"]:
            ratios = [r[k] / b[k] for r in mine for b in rows
                      if b["variant"] == names[0] and (b["file"], b["round"]) == (r["file"], r["round"])]
            if name != names[0] and ratios:
                print(f"  {k} / {names[0]}, paired: {statistics.median(ratios):.3f} "
                      f"[{min(ratios):.3f}-{max(ratios):.3f}]")

def main():
    if sys.argv[1] == "summary":
        return summary(sys.argv[2:])
    rounds, size = int(sys.argv[1]), sys.argv[2]
    variants = []
    for a in sys.argv[3:]:
        name, rest = a.split("=", 1)
        parts = rest.split(",")
        env = dict(p.split("=", 1) for p in parts[1:])
        variants.append((name, parts[0], env))
    iport = free_port()
    srv = subprocess.Popen(["iperf3", "-s", "-p", str(iport)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, bindir, env in order:
                with tempfile.TemporaryDirectory() as d:
                    relay, agent, port = start(bindir, env, iport, d)
                    try:
                        time.sleep(0.5)
                        rec = {"round": r, "variant": name, "relay_rss_idle": rss(relay.pid),
                               "agent_rss_idle": rss(agent.pid)}
                        envs = open(f"/proc/{agent.pid}/environ", "rb").read()
                        rec["tunable"] = b"x86_rep_movsb_threshold=0xffffffffffffffff" in envs
                        for streams in (1, 4):
                            l0 = load(); c0 = cpu(relay.pid) + cpu(agent.pid); t0 = time.time()
                            f0 = (minflt(relay.pid), minflt(agent.pid))
                            nbytes, bps = iperf(port, size, streams)
                            c1 = cpu(relay.pid) + cpu(agent.pid)
                            rec[f"p{streams}_gbps"] = bps / 1e9
                            rec[f"p{streams}_relay_flt_per_gib"] = (minflt(relay.pid) - f0[0]) / (nbytes / 2**30)
                            rec[f"p{streams}_agent_flt_per_gib"] = (minflt(agent.pid) - f0[1]) / (nbytes / 2**30)
                            rec[f"p{streams}_spg"] = (c1 - c0) / (nbytes / 2**30)
                            rec[f"p{streams}_load"] = (l0 + load()) / 2
                        rec["relay_rss_after"] = rss(relay.pid); rec["agent_rss_after"] = rss(agent.pid)
                        print(json.dumps(rec), flush=True)
                    finally:
                        for p in (agent, relay):
                            p.kill(); p.wait()
    finally:
        srv.kill(); srv.wait()

main()
