//! The systems under test, each exposing the same two targets (echo and iperf3) on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::measure::wait_echo;
use crate::proc::{free_port, Proc};

/// A running system: where its echo and iperf ports are, and which processes to watch.
pub struct System {
    /// Name in the report.
    pub name: &'static str,
    /// Echo target through the system.
    pub echo: SocketAddr,
    /// iperf3 target through the system.
    pub iperf: u16,
    /// Public-side process (relay, frps, rathole server).
    pub relay: Option<Proc>,
    /// Private-side process (agent, frpc, rathole client).
    pub agent: Option<Proc>,
}

/// Targets every system forwards to.
#[derive(Clone, Copy)]
pub struct Targets {
    /// Echo server.
    pub echo: SocketAddr,
    /// iperf3 server port.
    pub iperf: u16,
}

/// No tunnel: the physical limit.
pub fn direct(t: Targets) -> System {
    System {
        name: "direct",
        echo: t.echo,
        iperf: t.iperf,
        relay: None,
        agent: None,
    }
}

/// Extra flags for a jumpgate binary from the environment (whitespace-separated), so a tuning
/// such as `--worker-threads 1` can be measured without editing the benchmark.
fn extra_args(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Waits until something accepts TCP connections on `addr`.
fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// jumpgate: the real relay-server and worker-agent binaries.
pub fn jumpgate(bin: &Path, t: Targets, dir: &Path) -> Result<System> {
    let relay = JumpgateRelay::start(bin, dir, 10)?;
    let status = dir.join("status.json");
    let agent = relay.agent(
        "bench-agent",
        &[
            format!("echo=127.0.0.1:{}", t.echo.port()),
            format!("iperf=127.0.0.1:{}", t.iperf),
        ],
        &status,
        dir,
    )?;
    let ports = wait_status(&status, Duration::from_secs(20))?;
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .context("service missing from status file")
    };
    let echo = loopback(port_of("echo")?);
    wait_echo(echo, Duration::from_secs(10))?;
    Ok(System {
        name: "jumpgate",
        echo,
        iperf: port_of("iperf")?,
        relay: Some(relay.proc),
        agent: Some(agent),
    })
}

/// A running relay-server for the benchmark.
pub struct JumpgateRelay {
    /// The process.
    pub proc: Proc,
    bin: PathBuf,
    listen: String,
    state: PathBuf,
    range: (u16, u16),
    pin: String,
}

impl JumpgateRelay {
    /// Starts a relay with a range of `width` ports and limits high enough for the benchmark.
    pub fn start(bin: &Path, dir: &Path, width: u16) -> Result<Self> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let lo = 20_000 + (std::process::id() % 5_000) as u16;
        Self::start_at(bin, dir, listen, (lo, lo + width - 1))
    }

    fn start_at(bin: &Path, dir: &Path, listen: String, range: (u16, u16)) -> Result<Self> {
        let state = dir.join("relay-state");
        let proc = Proc::spawn(
            "relay",
            Command::new(bin.join("relay-server"))
                .args([
                    "--listen",
                    &listen,
                    "--public-host",
                    "127.0.0.1",
                    "--admin",
                    "off",
                ])
                .args(["--port-range", &format!("{}-{}", range.0, range.1)])
                .args([
                    "--max-streams-per-agent",
                    "4000",
                    "--max-conns-per-port",
                    "100000",
                ])
                .args([
                    "--max-new-conns-per-sec",
                    "1000000",
                    "--max-handshakes",
                    "5000",
                ])
                .arg("--state-dir")
                .arg(&state)
                .args(extra_args("JUMPGATE_RELAY_ARGS"))
                .env("RUST_LOG", "warn,relay_server=info"),
            dir,
        )?;
        proc.wait_log("relay listening for agents", Duration::from_secs(20))?;
        let out = Command::new(bin.join("relay-server"))
            .arg("fingerprint")
            .arg("--state-dir")
            .arg(&state)
            .output()?;
        let pin = String::from_utf8(out.stdout)?.trim().to_string();
        Ok(Self {
            proc,
            bin: bin.to_path_buf(),
            listen,
            state,
            range,
            pin,
        })
    }

    /// Kills the relay with SIGKILL and starts it again on the same address and state.
    pub fn restart(&mut self, dir: &Path) -> Result<()> {
        self.proc.kill();
        let again = Self::start_at(&self.bin, dir, self.listen.clone(), self.range)?;
        *self = again;
        Ok(())
    }

    /// Starts an agent exposing `services` (NAME=HOST:PORT).
    pub fn agent(
        &self,
        name: &str,
        services: &[String],
        status: &Path,
        dir: &Path,
    ) -> Result<Proc> {
        let mut cmd = Command::new(self.bin.join("worker-agent"));
        cmd.args([
            "--server",
            &self.listen,
            "--name",
            name,
            "--fingerprint",
            &self.pin,
        ])
        .arg("--token-file")
        .arg(self.state.join("token"))
        .arg("--status-file")
        .arg(status)
        .args(extra_args("JUMPGATE_AGENT_ARGS"))
        .env("RUST_LOG", "warn");
        for s in services {
            cmd.args(["--service", s]);
        }
        Proc::spawn(&format!("agent-{name}"), &mut cmd, dir)
    }
}

/// (service, port) pairs from an agent's status file once it is connected.
pub fn wait_status(path: &Path, timeout: Duration) -> Result<Vec<(String, u16)>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if v["relays"][0]["state"] == "connected" {
                    let ports = v["services"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| {
                            Some((s["name"].as_str()?.to_string(), s["port"].as_u64()? as u16))
                        })
                        .collect();
                    return Ok(ports);
                }
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("agent never reported connected in {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// frp as its users run it: frps + frpc with its defaults (TLS on, tcpMux on).
pub fn frp(frps: &Path, frpc: &Path, t: Targets, dir: &Path) -> Result<System> {
    let (bind, echo, iperf) = (free_port()?, free_port()?, free_port()?);
    let server = dir.join("frps.toml");
    std::fs::write(
        &server,
        format!("bindAddr = \"127.0.0.1\"\nbindPort = {bind}\nauth.token = \"bench-token\"\nlog.level = \"warn\"\n"),
    )?;
    let client = dir.join("frpc.toml");
    std::fs::write(
        &client,
        format!(
            "serverAddr = \"127.0.0.1\"\nserverPort = {bind}\nauth.token = \"bench-token\"\nlog.level = \"warn\"\n\n\
             [[proxies]]\nname = \"echo\"\ntype = \"tcp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {}\nremotePort = {echo}\n\n\
             [[proxies]]\nname = \"iperf\"\ntype = \"tcp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {}\nremotePort = {iperf}\n",
            t.echo.port(),
            t.iperf
        ),
    )?;
    let relay = Proc::spawn("frps", Command::new(frps).arg("-c").arg(&server), dir)?;
    // frpc gives up for good if its first login fails, so the server must be listening first.
    wait_listening(loopback(bind), Duration::from_secs(20))?;
    let agent = Proc::spawn("frpc", Command::new(frpc).arg("-c").arg(&client), dir)?;
    wait_echo(loopback(echo), Duration::from_secs(20))?;
    Ok(System {
        name: "frp",
        echo: loopback(echo),
        iperf,
        relay: Some(relay),
        agent: Some(agent),
    })
}

/// rathole over TCP with its defaults (no TLS, one TCP data channel per connection).
pub fn rathole(bin: &Path, t: Targets, dir: &Path) -> Result<System> {
    let (bind, echo, iperf) = (free_port()?, free_port()?, free_port()?);
    let server = dir.join("rathole-server.toml");
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{bind}\"\ndefault_token = \"bench-token\"\n\n\
             [server.services.echo]\nbind_addr = \"127.0.0.1:{echo}\"\n\n\
             [server.services.iperf]\nbind_addr = \"127.0.0.1:{iperf}\"\n"
        ),
    )?;
    let client = dir.join("rathole-client.toml");
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{bind}\"\ndefault_token = \"bench-token\"\n\n\
             [client.services.echo]\nlocal_addr = \"127.0.0.1:{}\"\n\n\
             [client.services.iperf]\nlocal_addr = \"127.0.0.1:{}\"\n",
            t.echo.port(),
            t.iperf
        ),
    )?;
    let relay = Proc::spawn(
        "rathole-server",
        Command::new(bin)
            .arg("--server")
            .arg(&server)
            .env("RUST_LOG", "warn"),
        dir,
    )?;
    wait_listening(loopback(bind), Duration::from_secs(20))?;
    let agent = Proc::spawn(
        "rathole-client",
        Command::new(bin)
            .arg("--client")
            .arg(&client)
            .env("RUST_LOG", "warn"),
        dir,
    )?;
    wait_echo(loopback(echo), Duration::from_secs(20))?;
    Ok(System {
        name: "rathole",
        echo: loopback(echo),
        iperf,
        relay: Some(relay),
        agent: Some(agent),
    })
}
