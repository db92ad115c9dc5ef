//! Network namespaces: a worker behind a real NAT.

use std::process::{Command, Stdio};

use crate::{find_tool, require_tools, sh, sh_words};

/// A small routed network of namespaces: a NAT router joining a relay host, a user host and a
/// worker that may only dial out (MASQUERADE, inbound forwarding dropped), as behind a real NAT.
/// Everything is deleted on drop.
pub struct NatLab {
    pub relay_ns: String,
    pub user_ns: String,
    pub worker_ns: String,
    pub router_ns: String,
    pub relay_ip: &'static str,
    pub user_ip: &'static str,
    pub worker_ip: &'static str,
}

impl NatLab {
    /// Builds the lab, or returns why it cannot (not root, no `ip`/`iptables`). Tests call
    /// [`NatLab::require_tools`] first, so a missing tool fails in CI with the package to install.
    pub fn create() -> Result<NatLab, String> {
        let tag = format!("{}", std::process::id() % 100_000);
        let lab = NatLab {
            relay_ns: format!("jg{tag}-relay"),
            user_ns: format!("jg{tag}-user"),
            worker_ns: format!("jg{tag}-worker"),
            router_ns: format!("jg{tag}-router"),
            relay_ip: "10.77.1.2",
            user_ip: "10.77.2.2",
            worker_ip: "10.77.3.2",
        };
        let probe = Command::new("ip")
            .args(["netns", "add", &lab.router_ns])
            .output();
        match probe {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "cannot create network namespaces: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Err(format!("`ip` not available (Debian package iproute2): {e}")),
        }
        if find_tool("iptables").is_none() {
            return Err("iptables not available (Debian package iptables)".into());
        }
        let r = lab.router_ns.clone();
        for ns in [&lab.relay_ns, &lab.user_ns, &lab.worker_ns] {
            sh(&["ip", "netns", "add", ns]);
        }
        for ns in [&lab.relay_ns, &lab.user_ns, &lab.worker_ns, &lab.router_ns] {
            sh_words(&format!("ip -n {ns} link set lo up"));
        }
        for (i, ns) in [(1, &lab.relay_ns), (2, &lab.user_ns), (3, &lab.worker_ns)] {
            let (inner, outer) = (format!("jg{tag}i{i}"), format!("jg{tag}o{i}"));
            sh_words(&format!("ip link add {inner} type veth peer name {outer}"));
            sh_words(&format!("ip link set {inner} netns {ns}"));
            sh_words(&format!("ip link set {outer} netns {r}"));
            sh_words(&format!("ip -n {ns} addr add 10.77.{i}.2/24 dev {inner}"));
            sh_words(&format!("ip -n {ns} link set {inner} up"));
            sh_words(&format!("ip -n {ns} route add default via 10.77.{i}.1"));
            sh_words(&format!("ip -n {r} addr add 10.77.{i}.1/24 dev {outer}"));
            sh_words(&format!("ip -n {r} link set {outer} up"));
        }
        sh_words(&format!(
            "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"
        ));
        // The worker's NAT: it can dial out, nothing can dial in.
        sh_words(&format!(
            "ip netns exec {r} iptables -t nat -A POSTROUTING -s 10.77.3.0/24 -j MASQUERADE"
        ));
        sh_words(&format!(
            "ip netns exec {r} iptables -A FORWARD -d 10.77.3.0/24 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        ));
        sh_words(&format!(
            "ip netns exec {r} iptables -A FORWARD -d 10.77.3.0/24 -j DROP"
        ));
        Ok(lab)
    }

    /// The programs a lab and its checks run, with their Debian packages; see [`require_tools`].
    pub const TOOLS: &'static [(&'static str, &'static str)] = &[
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("nc", "netcat-openbsd"),
    ];

    /// [`require_tools`] for [`NatLab::TOOLS`]: false (outside CI) when the lab cannot be built.
    pub fn require_tools() -> bool {
        require_tools(NatLab::TOOLS)
    }

    /// Silently drops every packet to and from the worker (no RST, like a dead link).
    pub fn cut_worker(&self) {
        for dir in ["-s", "-d"] {
            sh_words(&format!(
                "ip netns exec {} iptables -I FORWARD 1 {dir} 10.77.3.0/24 -j DROP",
                self.router_ns
            ));
        }
    }

    /// Undoes [`NatLab::cut_worker`].
    pub fn restore_worker(&self) {
        for dir in ["-s", "-d"] {
            sh_words(&format!(
                "ip netns exec {} iptables -D FORWARD {dir} 10.77.3.0/24 -j DROP",
                self.router_ns
            ));
        }
    }

    /// A command that runs inside namespace `ns`.
    pub fn cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Whether a TCP connection from namespace `ns` to `ip:port` succeeds within 3 s.
    pub fn can_connect(ns: &str, ip: &str, port: u16) -> bool {
        // Without nc every probe would fail, and "cannot connect" would pass for the wrong reason.
        assert!(
            find_tool("nc").is_some(),
            "nc not installed (Debian package netcat-openbsd)"
        );
        NatLab::cmd(ns, "nc")
            .args(["-z", "-w", "3", ip, &port.to_string()])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in [
            &self.relay_ns,
            &self.user_ns,
            &self.worker_ns,
            &self.router_ns,
        ] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
