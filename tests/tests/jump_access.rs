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

/// A fresh Ed25519 key pair at `path` (and `path.pub`).
fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "jump-access", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen failed");
}

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
        let printed = Command::new(bin("relay-server"))
            .args(["fingerprint", "--jump", "--jump-listen", &jump])
            .args(["--public-host", "127.0.0.1", "--state-dir"])
            .arg(&relay.state_dir)
            .output()
            .unwrap();
        let known_hosts = dir.path().join("relay_known_hosts");
        std::fs::write(&known_hosts, ok_stdout(&printed)).unwrap();
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
}
