//! Who may jump, beyond the relay's own policy: per-job keys an agent brings
//! (`jump_authorized_keys`), short-lived certificates the relay signs for a set of job names,
//! the relay's host certificate, and reloading the access files on SIGHUP. Real relay, agents,
//! sshd and OpenSSH clients.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

const TOOLS: &[(&str, &str)] = &[
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("sshd", "openssh-server"),
];

fn pub_line(key: &Path) -> String {
    std::fs::read_to_string(key.with_extension("pub")).unwrap()
}

/// `SHA256:...` of `key.pub`, as ssh-keygen prints it.
fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    ok_stdout(&out)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A relay with a jump listener and jobs (an sshd behind an agent each).
struct Lab {
    dir: tempfile::TempDir,
    relay: Relay,
    jump: String,
    known_hosts: PathBuf,
    jobs: Vec<(Sshd, Agent)>,
}

impl Lab {
    fn start(relay_args: &[&str]) -> Lab {
        let dir = scratch();
        let jump = format!("127.0.0.1:{}", free_port());
        let audit = dir.path().join("audit.jsonl");
        let mut args = vec![
            "--jump-listen",
            &jump,
            "--audit-log",
            audit.to_str().unwrap(),
        ];
        args.extend_from_slice(relay_args);
        let relay = Relay::start(dir.path(), port_range(4), &args);
        relay.proc.wait_log("jump listener for ssh -J on", UP);
        let known_hosts = relay.pin_jump_host(&jump, dir.path());
        Lab {
            dir,
            relay,
            jump,
            known_hosts,
            jobs: Vec::new(),
        }
    }

    /// Starts a job named `name` whose agent gets `agent_args`.
    fn job(&mut self, name: &str, agent_args: &[&str]) {
        let sshd = Sshd::start(self.dir.path(), name);
        let agent = Agent::start(self.dir.path(), &self.relay, name, sshd.port, agent_args);
        agent.wait_serving(&sshd, UP);
        self.jobs.push((sshd, agent));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An ssh_config whose `jumphost` logs in to the relay with `key` and trusts `known_hosts`.
    fn ssh_config(&self, key: &Path, known_hosts: &Path) -> PathBuf {
        let port = self.jump.rsplit_once(':').unwrap().1;
        let text = format!(
            "Host jumphost\n    HostName 127.0.0.1\n    Port {port}\n    User jumper\n    \
             IdentityFile {key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {kh}\n    \
             StrictHostKeyChecking yes\n    BatchMode yes\n    ConnectTimeout 10\n",
            key = key.display(),
            kh = known_hosts.display(),
        );
        let path = self.dir.path().join(format!(
            "ssh_config.{}.{}",
            key.file_name().unwrap().to_string_lossy(),
            known_hosts.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `ssh -v -J jumphost root@name 'echo $JG_WHO'` with `key` on the jump hop (a certificate
    /// `key-cert.pub` next to it is offered too), the relay pinned by its printed host key.
    fn ssh(&self, key: &Path, name: &str) -> Output {
        self.ssh_trusting(key, name, &self.known_hosts)
    }

    fn ssh_trusting(&self, key: &Path, name: &str, known_hosts: &Path) -> Output {
        let (sshd, _) = self
            .jobs
            .iter()
            .find(|(s, _)| s.dir.ends_with(format!("sshd-{name}")))
            .unwrap_or(&self.jobs[0]);
        Command::new("ssh")
            .arg("-v")
            .arg("-F")
            .arg(self.ssh_config(key, known_hosts))
            .args(["-J", "jumphost"])
            .args(sshd.client_opts())
            .args(["-p", &sshd.port.to_string(), &format!("root@{name}")])
            .arg("echo $JG_WHO")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.path("audit.jsonl")).unwrap_or_default()
    }
}

/// Asserts `ssh` reached job `name`.
fn reached(out: &Output, name: &str) {
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        name,
        "{}",
        stderr(out)
    );
}

/// Asserts `ssh` was refused at the jump hop with `reason` in its output.
fn refused(out: &Output, reason: &str) {
    assert!(!out.status.success(), "reached: {}", stderr(out));
    assert!(stderr(out).contains(reason), "{}", stderr(out));
}

#[test]
fn an_agents_jump_keys_admit_only_those_keys() {
    if !require_tools(TOOLS) {
        return;
    }
    let mut lab = Lab::start(&[]);
    let alice = lab.path("alice");
    let bob = lab.path("bob");
    keygen(&alice);
    keygen(&bob);
    let keys = lab.path("job-keys");
    std::fs::write(
        &keys,
        format!("# who may reach ja-keys\n{}", pub_line(&alice)),
    )
    .unwrap();
    lab.job(
        "ja-keys",
        &["--jump-authorized-keys", keys.to_str().unwrap()],
    );
    lab.job("ja-open", &[]);

    // Alice's key is in the agent's file: she reaches the job.
    reached(&lab.ssh(&alice, "ja-keys"), "ja-keys");
    // Bob's key passes the relay's policy (any key) but not this agent's list; the reason
    // names his key and ssh shows it.
    let out = lab.ssh(&bob, "ja-keys");
    refused(&out, "admits only the keys in its jump_authorized_keys");
    let bob_fp = fingerprint(&bob);
    assert!(stderr(&out).contains(&bob_fp), "{}", stderr(&out));
    // ... and still reaches a job whose agent brought no keys.
    reached(&lab.ssh(&bob, "ja-open"), "ja-open");
    // The audit log records the refusal with Bob's key.
    let audit = wait_until("the refusal's audit record", UP, || {
        let text = lab.audit();
        text.contains("refused_user").then_some(text)
    });
    let line = audit.lines().find(|l| l.contains("refused_user")).unwrap();
    assert!(
        line.contains("\"agent\":\"ja-keys\"") && line.contains(&format!("key {bob_fp}")),
        "{line}"
    );

    // The agent re-reads its file when it reconnects: Bob replaces Alice.
    std::fs::write(&keys, pub_line(&bob)).unwrap();
    let (status, body) = lab.relay.admin("DELETE", "/api/agents/ja-keys");
    assert_eq!(status, 200, "{body}");
    wait_until("Bob through the reconnected agent", UP, || {
        let out = lab.ssh(&bob, "ja-keys");
        out.status.success().then_some(())
    });
    refused(
        &lab.ssh(&alice, "ja-keys"),
        "admits only the keys in its jump_authorized_keys",
    );
}

/// POSTs `body` (JSON) to the relay's admin API with `bearer`; returns (status, body).
fn post_json(relay: &Relay, path: &str, body: &str, bearer: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = relay.admin_addr();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// Asks the relay to sign `key.pub` for `names`; returns the answer's JSON.
fn sign_through_api(lab: &Lab, key: &Path, names: &[&str], lifetime: &str) -> serde_json::Value {
    let body = serde_json::json!({
        "public_key": pub_line(key),
        "names": names,
        "lifetime": lifetime,
        "key_id": format!("{}@example", key.file_name().unwrap().to_string_lossy()),
    })
    .to_string();
    let token = lab.relay.admin_token();
    let (status, answer) = post_json(&lab.relay, "/api/jump/certificates", &body, Some(&token));
    assert_eq!(status, 200, "{answer}");
    serde_json::from_str(&answer).unwrap()
}

/// The audit file's `jump_certificate` record for the certificate with `key_id`.
fn certificate_record(audit: &str, key_id: &str) -> serde_json::Value {
    audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["event"] == "jump_certificate" && r["key_id"] == key_id)
        .unwrap_or_else(|| panic!("no jump_certificate record for {key_id}: {audit}"))
}

/// An SSH CA key pair (made by ssh-keygen, mode 0600) in a directory of its own.
fn ssh_ca() -> (tempfile::TempDir, PathBuf) {
    let dir = scratch();
    let ca = dir.path().join("jump_ca");
    keygen(&ca);
    (dir, ca)
}

#[test]
fn certificates_signed_for_names_reach_exactly_those_jobs() {
    if !require_tools(TOOLS) {
        return;
    }
    let (_ca_dir, ca) = ssh_ca();
    let ca_pub = ca.with_extension("pub");
    let mut lab = Lab::start(&[
        "--jump-trusted-user-ca-keys",
        ca_pub.to_str().unwrap(),
        "--jump-ca-key",
        ca.to_str().unwrap(),
        "--jump-cert-max-lifetime",
        "12h",
    ]);
    for name in ["jc-one", "jc-two", "jc-three"] {
        lab.job(name, &[]);
    }

    // Signed through the admin API for two names: it reaches exactly those two.
    let carol = lab.path("carol");
    keygen(&carol);
    let signed = sign_through_api(&lab, &carol, &["jc-one", "jc-two"], "1h");
    std::fs::write(
        lab.path("carol-cert.pub"),
        signed["certificate"].as_str().unwrap(),
    )
    .unwrap();
    reached(&lab.ssh(&carol, "jc-one"), "jc-one");
    reached(&lab.ssh(&carol, "jc-two"), "jc-two");
    refused(&lab.ssh(&carol, "jc-three"), "principals do not include");
    // The signing is logged with key id, names, lifetime and caller; the jump with the key id.
    lab.relay
        .proc
        .wait_log("jump certificate signed: key id \"carol@example\"", UP);
    let log = lab.relay.proc.log();
    let line = log
        .lines()
        .find(|l| l.contains("jump certificate signed"))
        .unwrap();
    assert!(
        line.contains("names [\"jc-one\", \"jc-two\"]")
            && line.contains("lifetime 3600s")
            && line.contains("admin API caller 127.0.0.1:"),
        "{line}"
    );
    let audit = wait_until("the jump's audit record", UP, || {
        let text = lab.audit();
        text.contains("cert carol@example").then_some(text)
    });
    assert!(audit.contains(&fingerprint(&carol)), "{audit}");
    // The audit file holds the signing too: key id, names, lifetime, caller, the key signed.
    let record = certificate_record(&audit, "carol@example");
    assert_eq!(record["names"], serde_json::json!(["jc-one", "jc-two"]));
    assert_eq!(record["lifetime_secs"], 3600);
    assert_eq!(record["serial"], signed["serial"]);
    assert_eq!(record["fingerprint"].as_str(), Some(&*fingerprint(&carol)));
    assert!(
        record["caller"]
            .as_str()
            .unwrap()
            .starts_with("admin API caller 127.0.0.1:"),
        "{record}"
    );
    let ca_secret = std::fs::read_to_string(&ca).unwrap();
    assert!(
        ca_secret
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .all(|l| !audit.contains(l)),
        "the CA key is in the audit file: {audit}"
    );

    // The endpoint wants the admin token, and refuses a lifetime past the cap.
    let (status, _) = post_json(&lab.relay, "/api/jump/certificates", "{}", None);
    assert_eq!(status, 401);
    let body =
        serde_json::json!({"public_key": pub_line(&carol), "names": ["jc-one"], "lifetime": "13h"});
    let (status, answer) = post_json(
        &lab.relay,
        "/api/jump/certificates",
        &body.to_string(),
        Some(&lab.relay.admin_token()),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("at most jump_cert_max_lifetime (12h)"),
        "{answer}"
    );

    // A certificate whose lifetime is over is refused.
    let dave = lab.path("dave");
    keygen(&dave);
    let signed = sign_through_api(&lab, &dave, &["jc-one"], "1s");
    std::fs::write(
        lab.path("dave-cert.pub"),
        signed["certificate"].as_str().unwrap(),
    )
    .unwrap();
    let expiry = signed["valid_before"].as_u64().unwrap();
    wait_until("the certificate's expiry", Duration::from_secs(5), || {
        (unix_now() > expiry).then_some(())
    });
    refused(&lab.ssh(&dave, "jc-one"), "Permission denied");
    assert!(!lab
        .relay
        .proc
        .log()
        .contains("cert dave@example authenticated"));

    // The offline subcommand: ssh-keygen reads what it prints, and the relay accepts it.
    let erin = lab.path("erin");
    keygen(&erin);
    let out = Command::new(bin("relay-server"))
        .arg("sign-jump-cert")
        .arg("--public-key")
        .arg(erin.with_extension("pub"))
        .args([
            "--name",
            "jc-three",
            "--lifetime",
            "8h",
            "--key-id",
            "erin-laptop",
        ])
        .arg("--jump-ca-key")
        .arg(&ca)
        .arg("--audit-log")
        .arg(lab.path("audit.jsonl"))
        .output()
        .unwrap();
    let cert = ok_stdout(&out);
    let record = certificate_record(&lab.audit(), "erin-laptop");
    assert_eq!(record["names"], serde_json::json!(["jc-three"]));
    assert_eq!(record["lifetime_secs"], 8 * 3600);
    assert_eq!(record["fingerprint"].as_str(), Some(&*fingerprint(&erin)));
    assert!(
        record["caller"]
            .as_str()
            .unwrap()
            .starts_with("sign-jump-cert (uid "),
        "{record}"
    );
    assert!(
        stderr(&out).contains("jump certificate signed: key id \"erin-laptop\""),
        "{}",
        stderr(&out)
    );
    let cert_file = lab.path("erin-cert.pub");
    std::fs::write(&cert_file, &cert).unwrap();
    let listed = ok_stdout(
        &Command::new("ssh-keygen")
            .arg("-L")
            .arg("-f")
            .arg(&cert_file)
            .output()
            .unwrap(),
    );
    assert!(
        listed.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate")
            && listed.contains("Key ID: \"erin-laptop\"")
            && listed.contains("Principals: \n                jc-three\n"),
        "{listed}"
    );
    reached(&lab.ssh(&erin, "jc-three"), "jc-three");
    refused(&lab.ssh(&erin, "jc-one"), "principals do not include");
    // Past the cap, or with a CA file others may read: a usage error (exit 64).
    let out = Command::new(bin("relay-server"))
        .arg("sign-jump-cert")
        .arg("--public-key")
        .arg(erin.with_extension("pub"))
        .args(["--name", "jc-three", "--lifetime", "48h", "--jump-ca-key"])
        .arg(&ca)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("at most jump_cert_max_lifetime (1day)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_host_certificate_is_trusted_through_its_ca_alone() {
    if !require_tools(TOOLS) {
        return;
    }
    // The operator's host CA signs the relay's jump host key for the name users dial.
    let (keys_dir, host_ca) = ssh_ca();
    let host_key = keys_dir.path().join("jump_host_key");
    keygen(&host_key);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&host_ca)
        .args(["-h", "-I", "relay-1", "-n", "127.0.0.1", "-V", "-5m:+1h"])
        .arg(host_key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let host_cert = keys_dir.path().join("jump_host_key-cert.pub");
    let mut lab = Lab::start(&[
        "--jump-host-key-file",
        host_key.to_str().unwrap(),
        "--jump-host-certificate",
        host_cert.to_str().unwrap(),
    ]);
    lab.job("jh-one", &[]);
    let user = lab.path("user");
    keygen(&user);

    // known_hosts holds only the CA: the relay's certificate is what ssh checks.
    let ca_only = lab.path("ca_known_hosts");
    std::fs::write(
        &ca_only,
        format!("@cert-authority * {}", pub_line(&host_ca)),
    )
    .unwrap();
    let out = lab.ssh_trusting(&user, "jh-one", &ca_only);
    reached(&out, "jh-one");
    assert!(
        stderr(&out).contains("Server host certificate: ssh-ed25519-cert-v01@openssh.com"),
        "{}",
        stderr(&out)
    );
    // `fingerprint --jump` prints that @cert-authority line too: alone, it is enough for ssh.
    let state = scratch();
    let printed = Command::new(bin("relay-server"))
        .args(["fingerprint", "--jump", "--jump-listen", &lab.jump])
        .args(["--public-host", "127.0.0.1", "--state-dir"])
        .arg(state.path())
        .arg("--jump-host-key-file")
        .arg(&host_key)
        .arg("--jump-host-certificate")
        .arg(&host_cert)
        .output()
        .unwrap();
    let printed = ok_stdout(&printed);
    let port = lab.jump.rsplit_once(':').unwrap().1;
    let ca_line = printed
        .lines()
        .find(|l| l.starts_with("@cert-authority "))
        .unwrap_or_else(|| panic!("no @cert-authority line: {printed}"));
    let ca_key = pub_line(&host_ca);
    let ca_key: Vec<&str> = ca_key.split_whitespace().take(2).collect();
    assert_eq!(
        ca_line,
        format!("@cert-authority [127.0.0.1]:{port} {}", ca_key.join(" ")),
        "{printed}"
    );
    assert!(printed.contains("edit the host pattern"), "{printed}");
    let printed_only = lab.path("printed_known_hosts");
    std::fs::write(&printed_only, format!("{ca_line}\n")).unwrap();
    reached(&lab.ssh_trusting(&user, "jh-one", &printed_only), "jh-one");

    // Another CA: host key verification fails (nothing else in known_hosts vouches for it).
    let (_other_dir, other_ca) = ssh_ca();
    let other = lab.path("other_known_hosts");
    std::fs::write(&other, format!("@cert-authority * {}", pub_line(&other_ca))).unwrap();
    refused(
        &lab.ssh_trusting(&user, "jh-one", &other),
        "Host key verification failed",
    );
}

/// Signs `key.pub` with `ca` into `key-cert.pub` for `principals`.
fn sign_with(ca: &Path, key: &Path, principals: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", "reload-test", "-n", principals, "-V", "-5m:+1h"])
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// SIGHUP to the relay, then waits for its `n`th reload to be logged as done or failed.
fn reload(lab: &Lab, n: usize) {
    lab.relay.proc.signal("HUP");
    wait_until("the reload", UP, || {
        let log = lab.relay.proc.log();
        (count(&log, "configuration reloaded") + count(&log, "reload failed") >= n).then_some(())
    });
}

#[test]
fn sighup_reloads_the_access_files_and_keeps_live_sessions() {
    if !require_tools(TOOLS) {
        return;
    }
    let (_ca_dir, old_ca) = ssh_ca();
    let (_ca_dir2, new_ca) = ssh_ca();
    let scratch_dir = scratch();
    let keys = scratch_dir.path().join("jump_keys");
    let cas = scratch_dir.path().join("jump_cas");
    std::fs::write(&cas, pub_line(&old_ca)).unwrap();
    let alice = scratch_dir.path().join("alice");
    let bob = scratch_dir.path().join("bob");
    let carol = scratch_dir.path().join("carol");
    for k in [&alice, &bob, &carol] {
        keygen(k);
    }
    sign_with(&new_ca, &carol, "jr-one");
    std::fs::write(&keys, pub_line(&alice)).unwrap();
    let mut lab = Lab::start(&[
        "--jump-authorized-keys-file",
        keys.to_str().unwrap(),
        "--jump-trusted-user-ca-keys",
        cas.to_str().unwrap(),
    ]);
    lab.job("jr-one", &[]);
    reached(&lab.ssh(&alice, "jr-one"), "jr-one");
    refused(&lab.ssh(&bob, "jr-one"), "Permission denied");
    refused(&lab.ssh(&carol, "jr-one"), "Permission denied");

    // Alice's session is live across the reload that removes her key.
    let (sshd, _) = &lab.jobs[0];
    let live = Command::new("ssh")
        .arg("-F")
        .arg(lab.ssh_config(&alice, &lab.known_hosts))
        .args(["-J", "jumphost"])
        .args(sshd.client_opts())
        .args(["-p", &sshd.port.to_string(), "root@jr-one"])
        .arg("sleep 3; echo still-$JG_WHO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let alice_fp = fingerprint(&alice);
    wait_until("Alice's second session", UP, || {
        (count(&lab.relay.proc.log(), &format!("key {alice_fp} to jr-one")) >= 2).then_some(())
    });

    // Bob replaces Alice in the keys file; the new CA replaces the old one.
    std::fs::write(&keys, format!("# rotated\n{}", pub_line(&bob))).unwrap();
    std::fs::write(&cas, pub_line(&new_ca)).unwrap();
    reload(&lab, 1);
    reached(&lab.ssh(&bob, "jr-one"), "jr-one");
    reached(&lab.ssh(&carol, "jr-one"), "jr-one");
    refused(&lab.ssh(&alice, "jr-one"), "Permission denied");
    let out = live.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "still-jr-one",
        "{}",
        stderr(&out)
    );

    // A broken file keeps what is in force, and says why.
    std::fs::write(&keys, "ssh-ed25519 not-base64!\n").unwrap();
    reload(&lab, 2);
    assert!(
        lab.relay
            .proc
            .log()
            .contains("reload failed, keeping the running configuration"),
        "{}",
        lab.relay.proc.log()
    );
    reached(&lab.ssh(&bob, "jr-one"), "jr-one");
}

/// Signs the host key `key.pub` with `ca` into `key-cert.pub` for 127.0.0.1.
fn host_sign(ca: &Path, key: &Path, id: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-h", "-I", id, "-n", "127.0.0.1", "-V", "-5m:+1h"])
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The `Signing CA` fingerprint `ssh-keygen -L` reads from a certificate.
fn signing_ca(lab: &Lab, certificate: &str) -> String {
    let file = lab.path("signed-cert.pub");
    std::fs::write(&file, certificate).unwrap();
    let listed = ok_stdout(
        &Command::new("ssh-keygen")
            .arg("-Lf")
            .arg(&file)
            .output()
            .unwrap(),
    );
    let line = listed
        .lines()
        .find(|l| l.trim_start().starts_with("Signing CA:"))
        .unwrap_or_else(|| panic!("{listed}"));
    line.split_whitespace().nth(3).unwrap().to_string()
}

#[test]
fn sighup_reloads_the_host_certificate_and_the_signing_ca() {
    if !require_tools(TOOLS) {
        return;
    }
    let (keys_dir, host_ca) = ssh_ca();
    let (_new_host_dir, new_host_ca) = ssh_ca();
    let (_user_ca_dir, user_ca) = ssh_ca();
    let (_new_user_dir, new_user_ca) = ssh_ca();
    let host_key = keys_dir.path().join("jump_host_key");
    keygen(&host_key);
    host_sign(&host_ca, &host_key, "relay-old");
    let host_cert = keys_dir.path().join("jump_host_key-cert.pub");
    let signing_key = keys_dir.path().join("signing_ca");
    std::fs::copy(&user_ca, &signing_key).unwrap();
    let mut lab = Lab::start(&[
        "--jump-host-key-file",
        host_key.to_str().unwrap(),
        "--jump-host-certificate",
        host_cert.to_str().unwrap(),
        "--jump-ca-key",
        signing_key.to_str().unwrap(),
    ]);
    lab.job("jh-reload", &[]);
    let user = lab.path("user");
    keygen(&user);
    let trusting = |name: &str, ca: &Path| {
        let path = lab.path(name);
        std::fs::write(&path, format!("@cert-authority * {}", pub_line(ca))).unwrap();
        path
    };
    let old_kh = trusting("old_known_hosts", &host_ca);
    let new_kh = trusting("new_known_hosts", &new_host_ca);
    reached(&lab.ssh_trusting(&user, "jh-reload", &old_kh), "jh-reload");
    refused(
        &lab.ssh_trusting(&user, "jh-reload", &new_kh),
        "Host key verification failed",
    );
    let signed = sign_through_api(&lab, &user, &["jh-reload"], "1h");
    assert_eq!(
        signing_ca(&lab, signed["certificate"].as_str().unwrap()),
        fingerprint(&user_ca)
    );

    // Both rotated on disk, then SIGHUP: ssh sees the new host certificate, and what the relay
    // signs from now on verifies with the new CA.
    host_sign(&new_host_ca, &host_key, "relay-new");
    std::fs::copy(&new_user_ca, &signing_key).unwrap();
    reload(&lab, 1);
    let out = lab.ssh_trusting(&user, "jh-reload", &new_kh);
    reached(&out, "jh-reload");
    assert!(
        stderr(&out).contains("ID \"relay-new\""),
        "the new certificate: {}",
        stderr(&out)
    );
    refused(
        &lab.ssh_trusting(&user, "jh-reload", &old_kh),
        "Host key verification failed",
    );
    let signed = sign_through_api(&lab, &user, &["jh-reload"], "1h");
    assert_eq!(
        signing_ca(&lab, signed["certificate"].as_str().unwrap()),
        fingerprint(&new_user_ca)
    );

    // A bad new certificate or CA key keeps the running ones, and the log says why.
    std::fs::write(&host_cert, "not a certificate\n").unwrap();
    reload(&lab, 2);
    let log = lab.relay.proc.log();
    assert!(
        log.contains("reload failed, keeping the running configuration")
            && log.contains("jump_host_certificate"),
        "{log}"
    );
    reached(&lab.ssh_trusting(&user, "jh-reload", &new_kh), "jh-reload");
    host_sign(&new_host_ca, &host_key, "relay-new");
    std::fs::write(&signing_key, "not a key\n").unwrap();
    reload(&lab, 3);
    assert!(
        count(
            &lab.relay.proc.log(),
            "reload failed, keeping the running configuration"
        ) >= 2,
        "{}",
        lab.relay.proc.log()
    );
    let signed = sign_through_api(&lab, &user, &["jh-reload"], "1h");
    assert_eq!(
        signing_ca(&lab, signed["certificate"].as_str().unwrap()),
        fingerprint(&new_user_ca)
    );
}

#[test]
fn a_key_removed_by_sighup_opens_no_channel_on_a_connection_already_in() {
    if !require_tools(TOOLS) {
        return;
    }
    let keys_dir = scratch();
    let keys = keys_dir.path().join("jump_keys");
    let alice = keys_dir.path().join("alice");
    let bob = keys_dir.path().join("bob");
    keygen(&alice);
    keygen(&bob);
    std::fs::write(&keys, pub_line(&alice)).unwrap();
    let mut lab = Lab::start(&["--jump-authorized-keys-file", keys.to_str().unwrap()]);
    lab.job("jm-one", &[]);

    // One connection to the jump host (a ControlMaster, no session of its own); every ssh below
    // opens its channel through it with `-S SOCKET -W`.
    let config = lab.ssh_config(&alice, &lab.known_hosts);
    let socket = lab.path("mux");
    let mut master = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-M", "-N", "-S"])
        .arg(&socket)
        .arg("jumphost")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the ControlMaster's socket", UP, || {
        socket.exists().then_some(())
    });
    let (sshd, _) = &lab.jobs[0];
    let through_master = || {
        Command::new("ssh")
            .args(sshd.client_opts())
            .arg("-o")
            .arg(format!(
                "ProxyCommand=ssh -F {} -o ControlMaster=no -S {} -W %h:%p jumphost",
                config.display(),
                socket.display()
            ))
            .args(["-p", &sshd.port.to_string(), "root@jm-one"])
            .arg("echo $JG_WHO")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    reached(&through_master(), "jm-one");
    let alice_fp = fingerprint(&alice);
    let authenticated = |log: &str| count(log, &format!("key {alice_fp} authenticated"));
    assert_eq!(authenticated(&lab.relay.proc.log()), 1, "one connection");

    // Alice's key leaves the file: the master's connection stays, but opens nothing more.
    std::fs::write(&keys, pub_line(&bob)).unwrap();
    reload(&lab, 1);
    let out = through_master();
    assert!(!out.status.success(), "reached: {}", stderr(&out));
    let log = wait_until("the refused channel", UP, || {
        let log = lab.relay.proc.log();
        log.contains("is no longer admitted by the jump host")
            .then_some(log)
    });
    assert!(
        log.contains(&format!("refused a channel to jm-one:{}", sshd.port))
            && log.contains("key not in jump_authorized_keys_file"),
        "{log}"
    );
    assert_eq!(authenticated(&log), 1, "still the one connection: {log}");
    let audit = wait_until("the refusal's audit record", UP, || {
        let text = lab.audit();
        text.contains("no longer admitted").then_some(text)
    });
    let line = audit
        .lines()
        .find(|l| l.contains("no longer admitted"))
        .unwrap();
    assert!(
        line.contains("\"outcome\":\"refused_user\"")
            && line.contains("\"agent\":\"jm-one\"")
            && line.contains(&alice_fp),
        "{line}"
    );
    assert!(
        master.try_wait().unwrap().is_none(),
        "the master's connection itself is left alone"
    );
    let _ = master.kill();
    let _ = master.wait();
}
