//! OpenSSH: a throwaway `sshd` and an interactive session through a tunnel.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for, NatLab, Proc};

/// A throwaway OpenSSH server with its own host key and one authorised user key.
/// Sessions see `JG_WHO=<tag>` in their environment, so a test can tell which sshd it reached.
pub struct Sshd {
    pub port: u16,
    pub tag: String,
    pub dir: PathBuf,
    proc: Option<Proc>,
}

/// A fresh Ed25519 key pair without a passphrase at `path` (and `path.pub`): host keys for
/// [`Sshd`], user keys for the jump tests.
pub fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen not found: install openssh-client")
        .success();
    assert!(ok, "ssh-keygen failed");
}

impl Sshd {
    /// Path of the sshd binary.
    pub fn binary() -> &'static str {
        ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd not found: install openssh-server")
    }

    /// Keys and directory, no process yet.
    pub fn prepare(dir: &Path, tag: &str) -> Sshd {
        let dir = dir.join(format!("sshd-{tag}"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all("/run/sshd").ok();
        keygen(&dir.join("host_key"));
        keygen(&dir.join("user_key"));
        fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        Sshd {
            port: 0,
            tag: tag.to_string(),
            dir,
            proc: None,
        }
    }

    /// Writes an sshd_config for `listen:port` and returns its path.
    pub fn config(&self, port: u16, listen: &str) -> PathBuf {
        let config = format!(
            "Port {port}\nListenAddress {listen}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nPidFile none\nSubsystem sftp internal-sftp\n\
             AllowTcpForwarding yes\nSetEnv JG_WHO={tag}\nMaxStartups 100:30:200\n",
            d = self.dir.display(),
            tag = self.tag
        );
        let path = self.dir.join(format!("sshd_config.{port}"));
        fs::write(&path, config).unwrap();
        path
    }

    /// Adopts a running sshd process listening on `port`.
    pub fn attach(&mut self, proc: Proc, port: u16) {
        self.proc = Some(proc);
        self.port = port;
    }

    /// Starts an sshd on 127.0.0.1 at a free port.
    pub fn start(dir: &Path, tag: &str) -> Sshd {
        let mut sshd = Sshd::prepare(dir, tag);
        for _ in 0..20 {
            let port = free_port();
            let config = sshd.config(port, "127.0.0.1");
            let mut proc = Proc::spawn(
                &format!("sshd-{tag}"),
                Command::new(Sshd::binary())
                    .args(["-D", "-e", "-f"])
                    .arg(config),
                &sshd.dir,
            );
            let up = wait_for(Duration::from_secs(5), || {
                if proc.child.try_wait().ok().flatten().is_some() {
                    return Some(false);
                }
                TcpStream::connect(("127.0.0.1", port)).ok().map(|_| true)
            });
            if up == Some(true) {
                sshd.attach(proc, port);
                return sshd;
            }
            proc.kill();
        }
        panic!("sshd did not start");
    }

    /// An sshd inside network namespace `ns`, listening on every address there (port 2222),
    /// for tests where the worker is a namespace behind NAT or a proxy.
    pub fn start_in(ns: &str, dir: &Path, tag: &str) -> Sshd {
        let mut sshd = Sshd::prepare(dir, tag);
        let port = 2222;
        let config = sshd.config(port, "0.0.0.0");
        let proc = Proc::spawn(
            "sshd-ns",
            NatLab::cmd(ns, Sshd::binary())
                .args(["-D", "-e", "-f"])
                .arg(config),
            dir,
        );
        let up = wait_for(Duration::from_secs(30), || {
            NatLab::can_connect(ns, "127.0.0.1", port).then_some(())
        });
        assert!(
            up.is_some(),
            "sshd in namespace did not start: {}",
            proc.log()
        );
        sshd.attach(proc, port);
        sshd
    }

    /// The private key of the one user this sshd lets in.
    pub fn user_key(&self) -> PathBuf {
        self.dir.join("user_key")
    }

    /// A known_hosts file that trusts only this sshd, under the alias `tag`.
    pub fn known_hosts(&self) -> PathBuf {
        let path = self.dir.join("known_hosts");
        let key = fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        let line = format!("{} {}", self.tag, key);
        // Written once and atomically: ssh processes started in parallel read it meanwhile.
        if fs::read_to_string(&path).ok().as_deref() != Some(line.as_str()) {
            let tmp = self
                .dir
                .join(format!("known_hosts.{}.tmp", std::process::id()));
            fs::write(&tmp, line).unwrap();
            fs::rename(&tmp, &path).unwrap();
        }
        path
    }

    /// `ssh`/`scp`/`sftp` options that log in to this sshd (and fail on any other) at `port`.
    pub fn client_opts(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.user_key().display().to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-o".into(),
            format!("HostKeyAlias={}", self.tag),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// Runs `cmd` over ssh through `host:port`.
    pub fn ssh(&self, host: &str, port: u16, cmd: &str) -> Output {
        Command::new("ssh")
            .args(self.client_opts())
            .args(["-p", &port.to_string(), &format!("root@{host}"), cmd])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// An interactive ssh session running `cat`, checked line by line: proves a session survives
/// whatever else happens and loses no byte.
pub struct EchoSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    reader: Option<std::thread::JoinHandle<Vec<String>>>,
    sent: Vec<String>,
}

impl EchoSession {
    /// Starts the session through `127.0.0.1:port` and sends its first 64 lines.
    pub fn start(sshd: &Sshd, port: u16) -> EchoSession {
        Self::start_via(sshd, "127.0.0.1", port)
    }

    /// The same through `host` (one relay of a fleet on its own loopback address).
    pub fn start_via(sshd: &Sshd, host: &str, port: u16) -> EchoSession {
        let mut child = Command::new("ssh")
            .args(sshd.client_opts())
            .args(["-p", &port.to_string(), &format!("root@{host}"), "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect()
        });
        let mut s = EchoSession {
            child,
            stdin,
            reader: Some(reader),
            sent: Vec::new(),
        };
        s.send(64);
        s
    }

    /// Sends `n` numbered lines of varied content.
    pub fn send(&mut self, n: usize) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        for _ in 0..n {
            let i = self.sent.len();
            let line = format!(
                "{i:06} {}",
                "abcdefghijklmnopqrstuvwxyz0123456789".repeat(1 + i % 7)
            );
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.write_all(b"\n").unwrap();
            self.sent.push(line);
        }
        stdin.flush().unwrap();
    }

    /// Closes stdin and checks every line came back, in order, and ssh exited cleanly.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let got = self.reader.take().unwrap().join().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "ssh session failed: {status:?}");
        assert_eq!(got.len(), self.sent.len(), "lost lines");
        assert!(got == self.sent, "echoed bytes differ");
    }
}
