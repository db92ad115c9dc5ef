//! Real work through `ssh -J relay job-name`: every OpenSSH tool a user has (`ssh`, `scp`,
//! `sftp`, `rsync` over ssh, `-L` forwarding) reaches a job by name through the relay's jump
//! listener and a real agent, with the relay's host key pinned from `fingerprint --jump`.
//! tests/tests/jump.rs covers who may jump and hostile input; this file proves the jump carries
//! what users move.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// The tools these tests drive, by Debian package.
const TOOLS: &[(&str, &str)] = &[
    ("ssh", "openssh-client"),
    ("scp", "openssh-client"),
    ("sftp", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("sshd", "openssh-server"),
    ("rsync", "rsync"),
];

/// One job (an sshd behind a real agent named `name`), a relay with a jump listener, a user key
/// for the jump hop and an ssh_config that pins the relay's printed host key.
struct Lab {
    dir: tempfile::TempDir,
    sshd: Sshd,
    relay: Relay,
    agent: Agent,
    name: String,
    /// `127.0.0.1:PORT` of the jump listener.
    jump: String,
    /// `Host jumphost 127.0.0.1`: the jump hop's key, port and pinned host key. OpenSSH hands
    /// `-F` (and no `-o` option) on to the jump hop's own ssh.
    cfg: PathBuf,
}

impl Lab {
    fn start(name: &str) -> Lab {
        let dir = scratch();
        let sshd = Sshd::start(dir.path(), name);
        let jump = format!("127.0.0.1:{}", free_port());
        let relay = Relay::builder(dir.path())
            .range(port_range(3))
            .args(["--jump-listen", &jump])
            .start();
        relay.proc.wait_log("jump listener for ssh -J on", UP);
        let agent = Agent::builder(dir.path(), name)
            .relay(&relay)
            .target(sshd.port)
            .start();
        agent.wait_serving(&sshd, UP);

        // What a user does once: pin the key `relay-server fingerprint --jump` prints.
        let known_hosts = relay.pin_jump_host(&jump, dir.path());
        let key = dir.path().join("jumper");
        keygen(&key);
        let cfg = dir.path().join("ssh_config");
        std::fs::write(
            &cfg,
            format!(
                "Host jumphost 127.0.0.1\n    HostName 127.0.0.1\n    Port {port}\n    User jumper\n    \
                 IdentityFile {key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {kh}\n    \
                 StrictHostKeyChecking yes\n    BatchMode yes\n    ConnectTimeout 10\n",
                port = jump.rsplit_once(':').unwrap().1,
                key = key.display(),
                kh = known_hosts.display(),
            ),
        )
        .unwrap();
        Lab {
            dir,
            sshd,
            relay,
            agent,
            name: name.to_string(),
            jump,
            cfg,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn port(&self) -> String {
        self.sshd.port.to_string()
    }

    /// `tool` (ssh, scp or sftp) through `-J jumphost`, logging in to the job's sshd.
    fn through(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.arg("-F")
            .arg(&self.cfg)
            .args(["-J", "jumphost"])
            .args(self.sshd.client_opts())
            .stdin(Stdio::null());
        cmd
    }

    /// `ssh -J jumphost -p PORT root@JOB cmd`.
    fn ssh(&self, cmd: &str) -> Command {
        let mut ssh = self.through("ssh");
        ssh.args(["-p", &self.port(), &format!("root@{}", self.name), cmd]);
        ssh
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// MiB/s of `bytes` moved in `took`, for the log.
fn rate(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

#[test]
fn scp_both_ways_sftp_batch_and_rsync_through_the_jump() {
    if !require_tools(TOOLS) {
        return;
    }
    let lab = Lab::start("jt-bulk");
    let job = |p: &str| format!("root@{}:{}", lab.name, lab.path(p).display());

    // scp -J, 64 MiB each way, hashes equal.
    const BIG: usize = 64 << 20;
    let sent = random_file(&lab.path("up.bin"), BIG);
    let started = Instant::now();
    run(lab
        .through("scp")
        .args(["-P", &lab.port()])
        .arg(lab.path("up.bin"))
        .arg(job("on-job.bin")));
    eprintln!("scp -J up: {:.0} MiB/s", rate(BIG, started.elapsed()));
    assert_eq!(sha256_file(&lab.path("on-job.bin")), sent, "upload differs");
    let started = Instant::now();
    run(lab
        .through("scp")
        .args(["-P", &lab.port()])
        .arg(job("on-job.bin"))
        .arg(lab.path("down.bin")));
    eprintln!("scp -J down: {:.0} MiB/s", rate(BIG, started.elapsed()));
    assert_eq!(sha256_file(&lab.path("down.bin")), sent, "download differs");

    // sftp -J in batch mode: put, get, ls.
    let small = random_file(&lab.path("notes.bin"), 300_000);
    std::fs::create_dir(lab.path("sftp-remote")).unwrap();
    let batch = lab.path("batch");
    std::fs::write(
        &batch,
        format!(
            "put {local} {remote}/notes.bin\nget {remote}/notes.bin {back}\nls -l {remote}\n",
            local = lab.path("notes.bin").display(),
            remote = lab.path("sftp-remote").display(),
            back = lab.path("notes.back").display(),
        ),
    )
    .unwrap();
    let out = run(lab
        .through("sftp")
        .args(["-P", &lab.port(), "-b"])
        .arg(&batch)
        .arg(format!("root@{}", lab.name)));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("300000") && listed.contains("notes.bin"),
        "sftp ls: {listed}"
    );
    assert_eq!(sha256_file(&lab.path("sftp-remote/notes.bin")), small);
    assert_eq!(sha256_file(&lab.path("notes.back")), small);

    // rsync -e 'ssh -J ...' of a small tree, then again with one file changed.
    let tree = lab.path("tree");
    let mut hashes = Vec::new();
    for (i, rel) in ["a.txt", "sub/b.bin", "sub/deeper/c.bin", "empty/.keep"]
        .iter()
        .enumerate()
    {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        hashes.push((rel.to_string(), random_file(&p, 1000 * i * i)));
    }
    let ssh_cmd = {
        let mut words = vec![
            "ssh".to_string(),
            "-F".into(),
            lab.cfg.display().to_string(),
            "-J".into(),
            "jumphost".into(),
            "-p".into(),
            lab.port(),
        ];
        words.extend(lab.sshd.client_opts());
        words.join(" ")
    };
    let rsync = |src: &Path| {
        let out = Command::new("rsync")
            .args(["-a", "--delete", "--stats", "-e", &ssh_cmd])
            .arg(format!("{}/", src.display()))
            .arg(job("tree-copy/"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "rsync failed: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    rsync(&tree);
    for (rel, hash) in &hashes {
        assert_eq!(
            &sha256_file(&lab.path("tree-copy").join(rel)),
            hash,
            "{rel}"
        );
    }
    let changed = random_file(&tree.join("sub/b.bin"), 5000);
    let stats = rsync(&tree);
    assert!(
        stats.contains("Number of regular files transferred: 1"),
        "the second rsync should send only the changed file: {stats}"
    );
    assert_eq!(sha256_file(&lab.path("tree-copy/sub/b.bin")), changed);
}

/// A tiny HTTP server in the job (TensorBoard's place): every GET gets `body`.
fn web_server(body: Vec<u8>) -> u16 {
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in web.incoming() {
            let Ok(mut conn) = conn else { return };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            });
        }
    });
    port
}

#[test]
fn a_command_and_local_forwarding_to_a_web_server_in_the_job() {
    if !require_tools(TOOLS) {
        return;
    }
    let lab = Lab::start("jt-web");

    // A command, its stdin and its exit status come through.
    let mut child = lab
        .ssh("cat; echo \"$JG_WHO\"; exit 7")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"typed line\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "typed line\njt-web\n");

    // ssh -J ... -L to a web server inside the job: several page loads, bodies intact.
    let body: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let web = web_server(body.clone());
    let local = free_port();
    let mut forward = lab
        .through("ssh")
        .args(["-N", "-o", "ExitOnForwardFailure=yes"])
        .args(["-L", &format!("127.0.0.1:{local}:127.0.0.1:{web}")])
        .args(["-p", &lab.port(), &format!("root@{}", lab.name)])
        .spawn()
        .unwrap();
    let get = || -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", local)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"GET /#scalars HTTP/1.0\r\n\r\n").ok()?;
        let mut page = Vec::new();
        s.read_to_end(&mut page).ok()?;
        let at = page.windows(4).position(|w| w == b"\r\n\r\n")?;
        Some(page.split_off(at + 4))
    };
    let first = wait_until("the forwarded page", UP, || get().filter(|b| !b.is_empty()));
    assert!(first == body, "first page differs ({} bytes)", first.len());
    for _ in 0..5 {
        assert!(get().as_ref() == Some(&body), "a later page differs");
    }
    let _ = forward.kill();
    let _ = forward.wait();
}

#[test]
fn twenty_parallel_sessions_all_succeed() {
    if !require_tools(TOOLS) {
        return;
    }
    let lab = Lab::start("jt-many");
    let children: Vec<_> = (0..20)
        .map(|i| {
            lab.ssh(&format!("echo \"$JG_WHO {i}\"; head -c 100000 /dev/zero"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "session {i}: {}", stderr(&out));
        let first = format!("jt-many {i}\n");
        assert!(
            out.stdout.starts_with(first.as_bytes()) && out.stdout.len() == first.len() + 100_000,
            "session {i} got {} bytes",
            out.stdout.len()
        );
    }
    // Each went through the jump listener, not some other path.
    assert_eq!(
        count(&lab.relay.proc.log(), " to jt-many/ssh"),
        20,
        "{}",
        lab.relay.proc.log()
    );
}

/// Runs `ssh -v -J` to `host` and returns its stderr and how long the whole run took.
fn refused(lab: &Lab, host: &str) -> (String, Duration) {
    let started = Instant::now();
    let out = Command::new("ssh")
        .arg("-v")
        .arg("-F")
        .arg(&lab.cfg)
        .args(["-J", "jumphost"])
        .args(lab.sshd.client_opts())
        .args(["-p", &lab.port(), &format!("root@{host}"), "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success(), "{host} was reached");
    (stderr(&out), took)
}

#[test]
fn unknown_and_disconnected_names_are_refused_within_a_second_saying_why() {
    if !require_tools(TOOLS) {
        return;
    }
    let mut lab = Lab::start("jt-gone");
    let (said, took) = refused(&lab, "jt-nobody");
    eprintln!("unknown name refused after {took:?} (the whole ssh -J run)");
    assert!(
        said.contains("open failed: connect failed: no agent named \"jt-nobody\" is connected"),
        "{said}"
    );
    assert!(took < Duration::from_secs(1), "refused after {took:?}");

    // The job's agent goes away: its name is refused the same way, at once.
    lab.agent.proc.kill();
    wait_until("the relay to see the agent leave", UP, || {
        let (said, _) = refused(&lab, "jt-gone");
        said.contains("no agent named \"jt-gone\" is connected")
            .then_some(())
    });
    let (said, took) = refused(&lab, "jt-gone");
    eprintln!("disconnected name refused after {took:?}");
    assert!(said.contains("connect failed: no agent named"), "{said}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
}

#[test]
fn proxyjump_from_the_generated_config() {
    if !require_tools(TOOLS) {
        return;
    }
    let lab = Lab::start("jt-cfg");
    let generated = run(Command::new(bin("relay-server"))
        .args([
            "ssh-config",
            "--jump",
            "--pattern",
            "jt-*",
            "--user",
            "root",
        ])
        .args(["--jump-listen", &lab.jump, "--public-host", "127.0.0.1"]));
    let block = String::from_utf8(generated.stdout).unwrap();
    let proxy_jump = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("ProxyJump "))
        .unwrap_or_else(|| panic!("no ProxyJump line in:\n{block}"))
        .to_string();
    assert_eq!(proxy_jump, lab.jump);

    // `ssh -F` with the generated block in the user's config, and no -J: `ssh jt-cfg` works.
    let config = lab.path("user_ssh_config");
    std::fs::write(
        &config,
        format!("{}{block}", std::fs::read_to_string(&lab.cfg).unwrap()),
    )
    .unwrap();
    let out = run(Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(lab.sshd.client_opts())
        .args(["-p", &lab.port(), &lab.name, "echo \"$JG_WHO\" \"$USER\""])
        .stdin(Stdio::null()));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "jt-cfg root\n");

    // `ssh -o ProxyJump=` with the value taken from it; scp honours the same option.
    let out = run(Command::new("ssh")
        .arg("-F")
        .arg(&lab.cfg)
        .args(["-o", &format!("ProxyJump={proxy_jump}")])
        .args(lab.sshd.client_opts())
        .args(["-p", &lab.port(), "root@jt-cfg", "echo \"$JG_WHO\""])
        .stdin(Stdio::null()));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "jt-cfg\n");
    let sent = random_file(&lab.path("cfg.bin"), 100_000);
    run(Command::new("scp")
        .arg("-F")
        .arg(&config)
        .args(lab.sshd.client_opts())
        .args(["-P", &lab.port()])
        .arg(lab.path("cfg.bin"))
        .arg(format!("jt-cfg:{}", lab.path("cfg.copy").display()))
        .stdin(Stdio::null()));
    assert_eq!(sha256_file(&lab.path("cfg.copy")), sent);
}
