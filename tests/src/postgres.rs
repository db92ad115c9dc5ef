//! A throwaway PostgreSQL server for the fleet tests: `initdb` into the test's directory, one
//! password-protected superuser (so the relay's password path is exercised), TCP on a free
//! loopback port. Run as the unprivileged `postgres` user when the tests run as root (PostgreSQL
//! refuses root). Stopped on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{find_tool, free_port, skip_unless_ci, wait_for, Proc};

/// The database role the relays log in as.
pub const PG_USER: &str = "jumpgate";

/// A running (or stopped, between [`Postgres::stop`] and [`Postgres::start`]) PostgreSQL.
pub struct Postgres {
    /// The postmaster, while running.
    pub proc: Option<Proc>,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Data directory.
    pub data: PathBuf,
    /// Where the server's logs go.
    dir: PathBuf,
    bin: PathBuf,
    /// File holding the role's password, 0600, for `--lease-store-password-file`.
    pub password_file: PathBuf,
    password: String,
}

/// Where PostgreSQL's server programs are: on PATH, or Debian's versioned directory.
fn server_bin_dir() -> Option<PathBuf> {
    if let Some(initdb) = find_tool("initdb") {
        let dir = initdb.canonicalize().ok()?.parent()?.to_path_buf();
        if dir.join("postgres").exists() {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").exists() && d.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Postgres {
    /// Whether a PostgreSQL server can be started here; otherwise the test is skipped (outside
    /// CI) or fails (in CI), naming the package.
    pub fn available() -> bool {
        if server_bin_dir().is_some() && find_tool("psql").is_some() {
            return true;
        }
        skip_unless_ci(
            "PostgreSQL's initdb/postgres/psql are not installed; apt-get install postgresql",
        );
        false
    }

    /// A test's scratch directory with a server started in it, or `None` where PostgreSQL
    /// cannot run ([`Postgres::available`]: skipped, or failed in CI). The server comes second,
    /// so `let Some((dir, pg)) = ...` stops it before the directory goes.
    pub fn in_scratch() -> Option<(tempfile::TempDir, Postgres)> {
        if !Postgres::available() {
            return None;
        }
        let dir = crate::scratch();
        let pg = Postgres::start(dir.path());
        Some((dir, pg))
    }

    /// Creates a cluster under `dir` and starts it.
    pub fn start(dir: &Path) -> Postgres {
        let bin = server_bin_dir().expect("PostgreSQL server programs (Debian package postgresql)");
        let home = dir.join("pg");
        fs::create_dir_all(&home).unwrap();
        let data = home.join("data");
        let password = format!("pw-{}", free_port());
        let pwfile = home.join("initdb-password");
        fs::write(&pwfile, &password).unwrap();
        let password_file = dir.join("lease-store-password");
        fs::write(&password_file, &password).unwrap();
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&home)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PostgreSQL directory failed");
        }
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                PG_USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            proc: None,
            port: free_port(),
            data,
            dir: dir.to_path_buf(),
            bin,
            password_file,
            password,
        };
        pg.start_server();
        pg
    }

    /// Starts the server again after [`Postgres::stop`], on the same port.
    pub fn start_server(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let sockets = self.data.parent().unwrap().to_path_buf();
        let mut cmd = as_postgres(&self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&sockets)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]);
        let proc = Proc::spawn("postgres", &mut cmd, &self.dir);
        proc.wait_log(
            "database system is ready to accept connections",
            Duration::from_secs(30),
        );
        self.proc = Some(proc);
    }

    /// Turns TLS on with a certificate for 127.0.0.1 issued by `ca`, and restarts the server.
    pub fn enable_tls(&mut self, ca: &crate::TestCa) {
        let (cert, key) = ca.issue_server(&self.data, "127.0.0.1");
        if is_root() {
            for f in [&cert, &key] {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(f)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown {} failed", f.display());
            }
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ));
        fs::write(&conf, text).unwrap();
        self.stop();
        self.start_server();
    }

    /// Stops the server (a fast shutdown, as an operator or a failover would), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.signal("INT");
            if proc.wait_exit(Duration::from_secs(20)).is_none() {
                proc.kill();
            }
        }
    }

    /// The connection URL for the relay (no password in it).
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The relay flags that use this server as the lease store.
    pub fn relay_flags(&self) -> Vec<String> {
        vec![
            "--lease-store".into(),
            "postgres".into(),
            "--lease-store-url".into(),
            self.url(),
            "--lease-store-password-file".into(),
            self.password_file.display().to_string(),
        ]
    }

    /// `psql` connected to this server's `postgres` database as the harness user, unaligned and
    /// tuples-only, ignoring any ~/.psqlrc.
    fn psql_command(&self, psql: PathBuf) -> Command {
        let mut cmd = Command::new(psql);
        cmd.args(["-X", "-At", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", PG_USER, "-d", "postgres"])
            .env("PGPASSWORD", &self.password);
        cmd
    }

    /// Runs `sql` with psql and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .psql_command(find_tool("psql").expect("psql"))
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Waits until psql can connect (after a restart).
    pub fn wait_ready(&self) {
        let ready = wait_for(Duration::from_secs(30), || {
            self.psql_command(find_tool("psql")?)
                .args(["-c", "SELECT 1"])
                .output()
                .ok()?
                .status
                .success()
                .then_some(())
        });
        assert!(ready.is_some(), "PostgreSQL did not come up");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program` run as the `postgres` user when the tests run as root (PostgreSQL refuses root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}
