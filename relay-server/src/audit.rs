//! The audit log: one JSON line per user connection, and one per signed jump certificate
//! (`"event": "jump_certificate"`), written off the data path.
//!
//! Records go through a bounded channel to a writer task; if the disk cannot keep up, records are
//! dropped and counted rather than slowing anyone's session.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How a user connection ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both sides closed normally.
    Closed,
    /// Ended by an I/O error or reset.
    Error,
    /// Source address not in an allowlist.
    RefusedAllowlist,
    /// A connection limit (per port, per agent, rate) was hit.
    RefusedLimit,
    /// The agent could not be reached or did not answer.
    AgentUnavailable,
    /// The agent could not reach its local target.
    TargetUnreachable,
    /// The port's agent is disconnected; its lease keeps the port.
    AgentAway,
    /// An `ssh -J` user whose key or certificate may not reach this agent (its
    /// `jump_authorized_keys`, a certificate's principals).
    RefusedUser,
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// When the connection was accepted (RFC 3339, UTC).
    pub start: String,
    /// The user's address.
    pub src: String,
    /// The relay port it came in on.
    pub relay_port: u16,
    /// Agent name.
    pub agent: String,
    /// Service name.
    pub service: String,
    /// Bytes from the user to the service.
    pub bytes_up: u64,
    /// Bytes from the service to the user.
    pub bytes_down: u64,
    /// Milliseconds from accept to close.
    pub duration_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Details, for errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The authenticated user, for `ssh -J` (`key SHA256:...`, plus `cert KEY-ID`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// One signed `ssh -J` user certificate: who was given which jobs for how long. Never holds
/// the CA key; the certificate itself is not needed to audit it (its key and serial are here).
#[derive(Debug, Clone, Serialize)]
pub struct CertificateRecord {
    /// Always `jump_certificate`, telling these lines from user connections.
    pub event: &'static str,
    /// When it was signed (RFC 3339, UTC).
    pub time: String,
    /// Who asked: `admin API caller ADDR` or `sign-jump-cert (uid N)`.
    pub caller: String,
    /// The certificate's key id.
    pub key_id: String,
    /// Its serial number.
    pub serial: u64,
    /// Its principals: the job names it reaches.
    pub names: Vec<String>,
    /// The lifetime given, in seconds.
    pub lifetime_secs: u64,
    /// Valid from (Unix seconds, backdated).
    pub valid_after: u64,
    /// Valid until (Unix seconds).
    pub valid_before: u64,
    /// SHA256 fingerprint of the signed (user's) key.
    pub fingerprint: String,
}

/// What the audit file holds, one JSON object a line.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum Entry {
    Connection(Record),
    Certificate(CertificateRecord),
}

/// Appends one certificate record to the audit file `path` at once, for `relay-server
/// sign-jump-cert`, which runs without the relay's writer. One `write` of one line on an
/// `O_APPEND` file, so it does not interleave with a running relay's lines.
pub fn append_certificate(path: &Path, rec: CertificateRecord) -> std::io::Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_vec(&Entry::Certificate(rec)).map_err(std::io::Error::other)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}

/// RFC 3339 timestamp for a record.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The audit log handle; a no-op when no log is configured.
#[derive(Debug, Default)]
pub struct AuditLog {
    tx: Mutex<Option<mpsc::Sender<Entry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: AtomicU64,
}

impl AuditLog {
    /// Opens `path` for appending ("-" is stdout) and starts the writer.
    pub async fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if path == Path::new("-") {
            Box::new(tokio::io::stdout())
        } else {
            Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<Entry>(4096);
        let shown: PathBuf = path.to_path_buf();
        let writer = tokio::spawn(async move {
            while let Some(rec) = rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&rec) else {
                    continue;
                };
                line.push(b'\n');
                if let Err(e) = out.write_all(&line).await {
                    tracing::error!(path = %shown.display(), "cannot write audit log: {e}");
                }
                if rx.is_empty() {
                    let _ = out.flush().await;
                }
            }
            let _ = out.flush().await;
        });
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues a record without waiting.
    pub fn record(&self, rec: Record) {
        self.queue(Entry::Connection(rec));
    }

    /// Queues a signed certificate's record without waiting.
    pub fn record_certificate(&self, rec: CertificateRecord) {
        self.queue(Entry::Certificate(rec));
    }

    fn queue(&self, entry: Entry) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            if tx.try_send(entry).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Flushes what is queued and stops the writer.
    pub async fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.await;
        }
    }
}
