//! `ssh -J relay job-name`: the relay's jump listener reaches a job's sshd by name with nothing
//! but OpenSSH, through a real agent, with real `ssh`, `scp` and `ssh-keygen` certificates.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// The OpenSSH client tools these tests drive.
const TOOLS: &[(&str, &str)] = &[
    ("ssh", "openssh-client"),
    ("scp", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("sshd", "openssh-server"),
];

/// Signs `key.pub` with `ca` into `key-cert.pub` (which ssh picks up next to `key`).
fn sign(ca: &Path, key: &Path, id: &str, principals: &str, validity: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", id, "-n", principals, "-V", validity])
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One job (an sshd behind a real agent named `name`) and a relay with a jump listener.
struct JumpLab {
    dir: tempfile::TempDir,
    sshd: Sshd,
    relay: Relay,
    _agent: Agent,
    name: String,
    /// `127.0.0.1:PORT` of the jump listener.
    jump: String,
    /// The relay's host key as `relay-server fingerprint --jump` prints it.
    known_hosts: PathBuf,
}

impl JumpLab {
    fn start(name: &str, extra: &[&str]) -> JumpLab {
        let dir = scratch();
        let sshd = Sshd::start(dir.path(), name);
        let jump = format!("127.0.0.1:{}", free_port());
        let audit = dir.path().join("audit.jsonl");
        let mut args = vec![
            "--jump-listen",
            &jump,
            "--audit-log",
            audit.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let relay = Relay::start(dir.path(), port_range(3), &args);
        relay.proc.wait_log("jump listener for ssh -J on", UP);
        let agent = Agent::start(dir.path(), &relay, name, sshd.port, &[]);
        agent.wait_serving(&sshd, UP);
        let known_hosts = relay.pin_jump_host(&jump, dir.path());
        JumpLab {
            dir,
            sshd,
            relay,
            _agent: agent,
            name: name.to_string(),
            jump,
            known_hosts,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn jump_port(&self) -> &str {
        self.jump.rsplit_once(':').unwrap().1
    }

    /// An ssh_config whose `jumphost` (and `127.0.0.1`, for generated ProxyJump lines) log in to
    /// the relay with `key`, pinning the relay's printed host key. OpenSSH passes `-F` on to the
    /// jump hop's own ssh, and no `-o` option.
    fn ssh_config(&self, key: &Path) -> PathBuf {
        let text = format!(
            "Host jumphost 127.0.0.1\n    HostName 127.0.0.1\n    Port {port}\n    User jumper\n    \
             IdentityFile {key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {kh}\n    \
             StrictHostKeyChecking yes\n    BatchMode yes\n    ConnectTimeout 10\n",
            port = self.jump_port(),
            key = key.display(),
            kh = self.known_hosts.display(),
        );
        let path = self.dir.path().join(format!(
            "ssh_config.{}",
            key.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `tool` (ssh or scp) with `cfg`, through `-J jumphost`, logging in to the job's sshd.
    fn through(&self, tool: &str, cfg: &Path) -> Command {
        let mut cmd = Command::new(tool);
        cmd.arg("-F")
            .arg(cfg)
            .args(["-J", "jumphost"])
            .args(self.sshd.client_opts())
            .stdin(Stdio::null());
        cmd
    }

    /// `ssh -J jumphost -p PORT root@HOST cmd` with the user key `key` for the jump hop.
    fn ssh(&self, key: &Path, host: &str, cmd: &str) -> Output {
        self.through("ssh", &self.ssh_config(key))
            .args([
                "-p",
                &self.sshd.port.to_string(),
                &format!("root@{host}"),
                cmd,
            ])
            .output()
            .unwrap()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.path("audit.jsonl")).unwrap_or_default()
    }
}

/// Runs `cmd`, killing it if it has not ended within `limit` (a refusal must never hang).
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ended = wait_for(limit, || child.try_wait().unwrap().map(|_| ()));
    if ended.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        ended.is_some(),
        "still running after {limit:?}: {}",
        stderr(&out)
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ssh_scp_and_port_forwarding_reach_a_job_by_name() {
    if !require_tools(TOOLS) {
        return;
    }
    let lab = JumpLab::start("jp-a", &[]);
    let key = lab.path("jumper");
    keygen(&key);

    // A command, by agent name (the service whose target port is the one asked for) and by
    // SERVICE.AGENT.
    let out = lab.ssh(&key, &lab.name, "echo $JG_WHO");
    assert_eq!(ok_stdout(&out).trim(), "jp-a", "{}", stderr(&out));
    let out = lab.ssh(&key, "ssh.jp-a", "echo $JG_WHO");
    assert_eq!(ok_stdout(&out).trim(), "jp-a", "{}", stderr(&out));

    // The audit log names the jump user's key.
    let fingerprint = ok_stdout(
        &Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.with_extension("pub"))
            .output()
            .unwrap(),
    );
    let fingerprint = fingerprint.split_whitespace().nth(1).unwrap().to_string();
    let audit = wait_until("the audit record", UP, || {
        let text = lab.audit();
        text.contains("jp-a").then_some(text)
    });
    assert!(
        audit.contains(&format!("\"user\":\"key {fingerprint}\"")),
        "{audit}"
    );

    // scp both ways with matching hashes.
    let cfg = lab.ssh_config(&key);
    let up = lab.path("up.bin");
    let sent = random_file(&up, 4 << 20);
    let out = lab
        .through("scp", &cfg)
        .args(["-P", &lab.sshd.port.to_string()])
        .arg(&up)
        .arg(format!("root@jp-a:{}", lab.path("on-job.bin").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&lab.path("on-job.bin")), sent);
    let down = lab.path("down.bin");
    let out = lab
        .through("scp", &cfg)
        .args(["-P", &lab.sshd.port.to_string()])
        .arg(format!("root@jp-a:{}", lab.path("on-job.bin").display()))
        .arg(&down)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&down), sent);

    // ssh -J ... -L to a server inside the job (the TensorBoard case).
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in web.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from the job");
        }
    });
    let local = free_port();
    let mut forward = lab
        .through("ssh", &cfg)
        .args(["-N", "-o", "ExitOnForwardFailure=yes"])
        .args(["-L", &format!("127.0.0.1:{local}:127.0.0.1:{web_port}")])
        .args(["-p", &lab.sshd.port.to_string(), "root@jp-a"])
        .spawn()
        .unwrap();
    let page = wait_until("the forwarded page", UP, || {
        let mut s = TcpStream::connect(("127.0.0.1", local)).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut page = String::new();
        s.read_to_string(&mut page).ok()?;
        page.contains("hello from the job").then_some(page)
    });
    assert!(page.starts_with("HTTP/1.0 200 OK"), "{page}");
    let _ = forward.kill();
    let _ = forward.wait();

    // The generated config block works as is: `ssh jp-a` with no -J on the command line.
    let generated = Command::new(bin("relay-server"))
        .args(["ssh-config", "--jump", "--pattern", "jp-*"])
        .args(["--jump-listen", &lab.jump, "--public-host", "127.0.0.1"])
        .output()
        .unwrap();
    let block = ok_stdout(&generated);
    assert!(
        block.contains(&format!(
            "Host jp-*\n    ProxyJump 127.0.0.1:{}\n",
            lab.jump_port()
        )),
        "{block}"
    );
    let both = lab.path("generated_config");
    std::fs::write(
        &both,
        format!("{}{block}", std::fs::read_to_string(&cfg).unwrap()),
    )
    .unwrap();
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&both)
        .args(lab.sshd.client_opts())
        .args([
            "-p",
            &lab.sshd.port.to_string(),
            "root@jp-a",
            "echo $JG_WHO",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(ok_stdout(&out).trim(), "jp-a", "{}", stderr(&out));
}

#[test]
fn refusals_are_quick_say_why_and_harm_nothing_else() {
    if !require_tools(TOOLS) {
        return;
    }
    let lab = JumpLab::start("jp-r", &[]);
    let key = lab.path("jumper");
    keygen(&key);
    let cfg = lab.ssh_config(&key);

    // An unknown name: refused at once, with the reason in ssh's own output.
    let started = Instant::now();
    let out = Command::new("ssh")
        .arg("-v")
        .arg("-F")
        .arg(&cfg)
        .args(["-J", "jumphost"])
        .args(lab.sshd.client_opts())
        .args(["-p", "22", "root@nobody", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains("no agent named \\\"nobody\\\" is connected")
            || said.contains("no agent named \"nobody\" is connected"),
        "{said}"
    );
    eprintln!("unknown name refused after {took:?} (whole ssh -J run, key exchange included)");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");

    // The relay itself has no shell, and says so.
    let out = output_within(
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(["jumphost", "true"]),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has no shell"), "{}", stderr(&out));

    // Garbage, a silent connection and a half-open handshake on the jump port harm nothing.
    let mut silent = TcpStream::connect(&lab.jump).unwrap();
    let mut garbage = TcpStream::connect(&lab.jump).unwrap();
    let noise: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = garbage.write_all(&noise);
    let mut half = TcpStream::connect(&lab.jump).unwrap();
    let _ = half.write_all(b"SSH-2.0-OpenSSH_9.9\r\n\x00\x00\x10\x00\x05\x14garbage-kexinit");
    let out = lab.ssh(&key, "jp-r", "echo $JG_WHO");
    assert_eq!(ok_stdout(&out).trim(), "jp-r", "{}", stderr(&out));
    let _ = silent.write_all(b"x");
    assert!(
        lab.relay.proc.log().contains("relay listening for agents")
            && !lab.relay.proc.log().contains("panicked"),
        "{}",
        lab.relay.proc.log()
    );
}

#[test]
fn authorized_keys_and_user_certificates_decide_who_may_jump() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = scratch();
    let (listed, stranger, ca, carol, dave, erin) = (
        dir.path().join("listed"),
        dir.path().join("stranger"),
        dir.path().join("ca"),
        dir.path().join("carol"),
        dir.path().join("dave"),
        dir.path().join("erin"),
    );
    for key in [&listed, &stranger, &ca, &carol, &dave, &erin] {
        keygen(key);
    }
    sign(&ca, &carol, "carol@example", "jp-*", "-5m:+1h");
    sign(&ca, &dave, "dave@example", "jp-c", "20200101:20200102");
    sign(&ca, &erin, "erin@example", "other-job", "-5m:+1h");
    let authorized = dir.path().join("jump_authorized_keys");
    std::fs::copy(listed.with_extension("pub"), &authorized).unwrap();
    let lab = JumpLab::start(
        "jp-c",
        &[
            "--jump-authorized-keys-file",
            authorized.to_str().unwrap(),
            "--jump-trusted-user-ca-keys",
            ca.with_extension("pub").to_str().unwrap(),
        ],
    );

    let out = lab.ssh(&listed, "jp-c", "echo $JG_WHO");
    assert_eq!(
        ok_stdout(&out).trim(),
        "jp-c",
        "listed key: {}",
        stderr(&out)
    );

    let out = lab.ssh(&stranger, "jp-c", "echo $JG_WHO");
    assert!(!out.status.success(), "a key outside the file got in");
    assert!(
        stderr(&out).contains("Permission denied (publickey)"),
        "{}",
        stderr(&out)
    );

    let out = lab.ssh(&carol, "jp-c", "echo $JG_WHO");
    assert_eq!(
        ok_stdout(&out).trim(),
        "jp-c",
        "carol's cert: {}",
        stderr(&out)
    );
    let audit = wait_until("carol's audit record", UP, || {
        let text = lab.audit();
        text.contains("cert carol@example").then_some(text)
    });
    assert!(audit.contains("\"user\":\"key SHA256:"), "{audit}");

    let out = lab.ssh(&dave, "jp-c", "echo $JG_WHO");
    assert!(!out.status.success(), "an expired certificate got in");
    assert!(
        stderr(&out).contains("Permission denied (publickey)"),
        "{}",
        stderr(&out)
    );
    // russh checks the window before the relay's own check does; either says why in the log.
    wait_until(
        "the expiry in the relay's log",
        Duration::from_secs(5),
        || {
            let log = lab.relay.proc.log();
            (log.contains("Certificate is expired") || log.contains("outside its validity window"))
                .then_some(())
        },
    );

    let out = lab.ssh(&erin, "jp-c", "echo $JG_WHO");
    assert!(
        !out.status.success(),
        "a certificate for another job got in"
    );
    assert!(
        stderr(&out).contains("principals do not include"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn repeated_refused_keys_ban_the_source_from_the_jump_port_only() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = scratch();
    let (listed, stranger) = (dir.path().join("listed"), dir.path().join("stranger"));
    keygen(&listed);
    keygen(&stranger);
    let authorized = dir.path().join("jump_authorized_keys");
    std::fs::copy(listed.with_extension("pub"), &authorized).unwrap();
    let lab = JumpLab::start(
        "jp-b",
        &[
            "--jump-authorized-keys-file",
            authorized.to_str().unwrap(),
            "--auth-failure-limit",
            "2",
        ],
    );
    let out = lab.ssh(&listed, "jp-b", "echo $JG_WHO");
    assert_eq!(ok_stdout(&out).trim(), "jp-b", "{}", stderr(&out));
    for _ in 0..2 {
        let out = lab.ssh(&stranger, "jp-b", "true");
        assert!(!out.status.success());
    }
    lab.relay.proc.wait_log("jump: banning 127.0.0.1", UP);
    // Banned: even the listed key is closed at once on the jump port...
    let out = lab.ssh(&listed, "jp-b", "echo $JG_WHO");
    assert!(!out.status.success(), "a banned source got in");
    // ...while the agent port, and the job's own port, are untouched.
    let port: u16 = lab._agent.wait_port(UP);
    assert_eq!(
        ok_stdout(&lab.sshd.ssh("127.0.0.1", port, "echo $JG_WHO")).trim(),
        "jp-b"
    );
}

#[test]
fn unauthenticated_connections_hold_a_capped_share_per_source() {
    if !require_tools(TOOLS) {
        return;
    }
    // 8 handshakes in all: one source may hold one of them (an eighth).
    let lab = JumpLab::start("jp-s", &["--max-handshakes", "8"]);
    let key = lab.path("jumper");
    keygen(&key);
    let silent = TcpStream::connect(&lab.jump).unwrap();
    let mut banner = [0u8; 7];
    (&silent).read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0", "the first connection is served");
    let mut second = TcpStream::connect(&lab.jump).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    match second.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "a second unauthenticated connection from the same source must be closed at once: {other:?}"
        ),
    }
    drop(silent);
    let out = wait_until("a jump once the silent connection left", UP, || {
        let out = lab.ssh(&key, "jp-s", "echo $JG_WHO");
        out.status.success().then_some(out)
    });
    assert_eq!(ok_stdout(&out).trim(), "jp-s");
}
