//! The results table: one row per metric, one column per system, plus jumpgate/peer ratios.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

/// A metric.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured.
    pub metric: String,
    /// Its unit.
    pub unit: String,
    /// Whether more is better (for reading the ratio).
    pub higher_is_better: bool,
}

impl Row {
    /// A metric row.
    pub fn new(metric: &str, unit: &str, higher_is_better: bool) -> Self {
        Self {
            metric: metric.into(),
            unit: unit.into(),
            higher_is_better,
        }
    }
}

#[derive(Serialize)]
struct Entry {
    #[serde(flatten)]
    row: Row,
    values: BTreeMap<String, f64>,
}

/// All results of a run.
pub struct Report {
    systems: Vec<&'static str>,
    rows: Vec<Entry>,
    notes: Vec<String>,
}

impl Report {
    /// An empty report for these systems (in column order).
    pub fn new(systems: Vec<&'static str>) -> Self {
        Self {
            systems,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a line printed under the table (e.g. what the WAN delay line forwarded and dropped,
    /// so the emulator is never a silent limit).
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// Records `value` for `system` in `row`.
    pub fn set(&mut self, row: Row, system: &str, value: f64) {
        match self.rows.iter_mut().find(|e| e.row.metric == row.metric) {
            Some(e) => {
                e.values.insert(system.into(), value);
            }
            None => self.rows.push(Entry {
                row,
                values: BTreeMap::from([(system.to_string(), value)]),
            }),
        }
    }

    fn peers(&self) -> Vec<&'static str> {
        self.systems
            .iter()
            .copied()
            .filter(|s| *s != "jumpgate" && *s != "direct")
            .collect()
    }

    /// The table as Markdown.
    pub fn markdown(&self) -> String {
        let peers = self.peers();
        let mut out = String::from("| metric | unit |");
        for s in &self.systems {
            let _ = write!(out, " {s} |");
        }
        for p in &peers {
            let _ = write!(out, " jumpgate/{p} |");
        }
        out.push_str("\n|---|---|");
        for _ in 0..self.systems.len() + peers.len() {
            out.push_str("---:|");
        }
        out.push('\n');
        for e in &self.rows {
            let _ = write!(out, "| {} | {} |", e.row.metric, e.row.unit);
            for s in &self.systems {
                match e.values.get(*s) {
                    Some(v) => {
                        let _ = write!(out, " {} |", fmt(*v));
                    }
                    None => out.push_str(" – |"),
                }
            }
            for p in &peers {
                match (e.values.get("jumpgate"), e.values.get(*p)) {
                    (Some(j), Some(v)) if *v != 0.0 => {
                        let _ = write!(out, " {:.2}x |", j / v);
                    }
                    _ => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Prints the table.
    pub fn print(&self) {
        println!("{}", self.markdown());
    }

    /// Writes results.json and results.md into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        let json = serde_json::json!({
            "systems": self.systems,
            "results": self.rows,
            "notes": self.notes,
        });
        std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&json)?)?;
        Ok(())
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
