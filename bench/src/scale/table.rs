//! The agents report as Markdown: one column per run, so runs of different sizes read side by
//! side; the table type is shared with the fleet's report.

use std::fmt::Write as _;

use super::results::{Percentiles, Restart, Run};
use super::AgentsArgs;

/// A Markdown table with one column per run, as both agent reports print them.
pub(crate) struct Columns<'a, T> {
    runs: &'a [T],
    out: String,
}

impl<'a, T> Columns<'a, T> {
    /// The header: `title`, then `heading` of each run.
    pub(crate) fn new(title: &str, runs: &'a [T], heading: impl Fn(&T) -> String) -> Self {
        let mut out = format!("| {title} |");
        for r in runs {
            let _ = write!(out, " {} |", heading(r));
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(runs.len()));
        out.push('\n');
        Self { runs, out }
    }

    /// One row: `name`, then `cell` of each run.
    pub(crate) fn row(&mut self, name: &str, cell: &dyn Fn(&T) -> String) {
        let _ = write!(self.out, "| {name} |");
        for r in self.runs {
            let _ = write!(self.out, " {} |", cell(r));
        }
        self.out.push('\n');
    }

    /// The table's text.
    pub(crate) fn finish(self) -> String {
        self.out
    }
}

/// p50 / p99 for a table cell.
pub(crate) fn pair(p: Option<Percentiles>) -> String {
    p.map_or("–".into(), |p| {
        format!("{:.2} / {:.2}", p.p50_ms, p.p99_ms)
    })
}

/// The results as a Markdown table, one column per agent count.
pub(super) fn markdown(runs: &[Run], args: &AgentsArgs) -> String {
    let title = format!("metric ({:?} store)", args.store);
    let mut table = Columns::new(&title, runs, |r| match r.host_tunnels {
        0 => format!("{} agents", r.agents),
        per => format!("{} tunnels, {per} per host", r.agents),
    });
    let mut row = |name: &str, cell: &dyn Fn(&Run) -> String| table.row(name, cell);
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let restart =
        |r: &Run, f: &dyn Fn(&Restart) -> String| r.restart.as_ref().map_or("–".into(), f);
    row("relay RSS idle, MiB", &|r| mib(r.relay_rss_idle_kib));
    row("relay RSS above idle, all connected, MiB", &|r| {
        mib(r.relay_rss_loaded_kib.saturating_sub(r.relay_rss_idle_kib))
    });
    row("relay RSS per agent, KiB", &|r| {
        format!("{:.1}", r.relay_kib_per_agent)
    });
    row("relay open files, all connected", &|r| {
        r.relay_fds.to_string()
    });
    row("cold start: agents with a port", &|r| {
        r.cold.allocated.to_string()
    });
    row("cold start: until all have a port, s", &|r| {
        format!("{:.2}", r.cold.all_allocated_secs)
    });
    row("cold start: hello -> allocation p50 / p99, ms", &|r| {
        pair(r.cold.hello)
    });
    row("cold start: connect -> allocation p50 / p99, ms", &|r| {
        pair(r.cold.setup)
    });
    row(
        "cold start: relay lease operation p50 / p99, ms (jumpgate_placement_seconds)",
        &|r| pair(r.cold.placement),
    );
    row("cold start: relay CPU, s", &|r| {
        format!("{:.2}", r.cold.relay_cpu_secs)
    });
    row("kill -9: relay listening again after, s", &|r| {
        restart(r, &|x| format!("{:.2}", x.relay_up_secs))
    });
    row("kill -9: until all are back, s", &|r| {
        restart(r, &|x| format!("{:.2}", x.storm.all_allocated_secs))
    });
    row("kill -9: back / on the same port", &|r| {
        restart(r, &|x| format!("{} / {}", x.storm.allocated, x.same_port))
    });
    row("kill -9: hello -> allocation p50 / p99, ms", &|r| {
        restart(r, &|x| pair(x.storm.hello))
    });
    row("kill -9: relay lease operation p50 / p99, ms", &|r| {
        restart(r, &|x| pair(x.storm.placement))
    });
    row("kill -9: relay CPU, s", &|r| {
        restart(r, &|x| format!("{:.2}", x.storm.relay_cpu_secs))
    });
    row("relay RSS above idle after the restart, MiB", &|r| {
        restart(r, &|x| {
            mib(x.relay_rss_kib.saturating_sub(r.relay_rss_idle_kib))
        })
    });
    row("simulator RSS, MiB", &|r| mib(r.simulator_rss_kib));
    row("load average (1 min) before / after", &|r| {
        format!("{:.2} / {:.2}", r.load.0, r.load.1)
    });
    let mut out = table.finish();
    let mut notes = String::new();
    for r in runs {
        let failures = r
            .cold
            .failures
            .iter()
            .chain(r.restart.iter().flat_map(|x| x.storm.failures.iter()));
        for (reason, count) in failures {
            let _ = writeln!(
                notes,
                "- {} agents: {count} failed attempts (retried): {reason}",
                r.agents
            );
        }
        for w in &r.relay_warnings {
            let _ = writeln!(notes, "- {} agents, relay log: {w}", r.agents);
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out
}
