//! Prometheus text exposition (format 0.0.4): the one renderer behind the relay's and the agent's
//! `/metrics`, so both write HELP/TYPE lines, label quoting and histogram series the same way.
//!
//! A counter whose label is a closed set of reasons is a [`LabeledCounter`] over an enum declared
//! with [`metric_labels!`]: each variant names its label value once, next to its doc, so a new
//! reason cannot be counted without being rendered (or the other way round). A latency histogram
//! is a [`Histogram`] whose buckets are sized from its bounds.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `Content-Type` of the text format, for the HTTP answer that carries it.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// What a metric family is, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One scrape's text, written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty scrape.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes a family's HELP and TYPE lines; its samples follow through the returned handle.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let _ = write!(self.out, "# HELP {name} ");
        escape_into(&mut self.out, help, false);
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.as_str());
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A family of one unlabelled sample, the common case for totals and gauges.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help).sample(&[], value);
    }

    /// The finished text.
    pub fn into_string(self) -> String {
        self.out
    }
}

/// The samples of one family, written right after its HELP and TYPE lines.
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Family<'_> {
    /// Writes `name{labels} value`; no braces without labels.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.series("", labels, value);
        self
    }

    /// One sample per label value of `counter`, in declaration order, labelled `label`.
    pub fn labeled<L: LabelSet>(&mut self, label: &str, counter: &LabeledCounter<L>) -> &mut Self {
        for key in L::ALL {
            self.sample(&[(label, key.label())], counter.get(*key));
        }
        self
    }

    /// The `_bucket` (cumulative, then `+Inf`), `_sum` and `_count` series of `histogram`.
    pub fn histogram(&mut self, histogram: &Histogram) -> &mut Self {
        for (bound, n) in histogram.bounds.iter().zip(histogram.buckets.iter()) {
            self.series("_bucket", &[("le", &bound.to_string())], load(n));
        }
        let count = load(&histogram.count);
        self.series("_bucket", &[("le", "+Inf")], count);
        self.series("_sum", &[], load(&histogram.sum_micros) as f64 / 1e6);
        self.series("_count", &[], count);
        self
    }

    fn series(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl Display) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        for (i, (name, value)) in labels.iter().enumerate() {
            let _ = write!(self.out, "{}{name}=\"", if i == 0 { "{" } else { "," });
            escape_into(self.out, value, true);
            self.out.push('"');
        }
        if !labels.is_empty() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Escapes as the text format requires: backslash and newline always, the double quote inside
/// label values.
fn escape_into(out: &mut String, text: &str, quote: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

fn load(n: &AtomicU64) -> u64 {
    n.load(Ordering::Relaxed)
}

/// A closed set of label values, one per variant; implemented by [`metric_labels!`].
pub trait LabelSet: Copy + 'static {
    /// Every value, in the order they are rendered.
    const ALL: &'static [Self];
    /// The value as it appears in the label.
    fn label(self) -> &'static str;
    /// Position in [`LabelSet::ALL`].
    fn index(self) -> usize;
}

/// Declares a fieldless enum whose variants are metric label values, each written once beside
/// its variant (`Variant => "label"`), and implements [`LabelSet`] for it.
#[macro_export]
macro_rules! metric_labels {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $crate::prometheus::LabelSet for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];

            fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

/// A counter per value of a [`LabelSet`].
#[derive(Debug)]
pub struct LabeledCounter<L> {
    counts: Box<[AtomicU64]>,
    labels: std::marker::PhantomData<L>,
}

impl<L: LabelSet> Default for LabeledCounter<L> {
    fn default() -> Self {
        Self {
            counts: L::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            labels: std::marker::PhantomData,
        }
    }
}

impl<L: LabelSet> LabeledCounter<L> {
    /// Counts one event labelled `key`.
    pub fn inc(&self, key: L) {
        if let Some(n) = self.counts.get(key.index()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events labelled `key` so far.
    pub fn get(&self, key: L) -> u64 {
        self.counts.get(key.index()).map_or(0, load)
    }
}

/// A histogram of durations, in seconds, with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Cumulative: observations at or under each bound.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// Microseconds, so the sum stays an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// A histogram with the given ascending upper bounds (seconds); `+Inf` is implied.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, n) in self.bounds.iter().zip(self.buckets.iter()) {
            if secs <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::metric_labels! {
        /// Test reasons.
        enum Why {
            /// First.
            Alpha => "alpha",
            /// Second.
            BetaGamma => "beta_gamma",
        }
    }

    #[test]
    fn families_samples_and_labels() {
        let mut e = Exposition::new();
        e.single("x_total", Kind::Counter, "Things.", 3);
        e.family("y", Kind::Gauge, "Per thing.")
            .sample(&[("agent", "a"), ("service", "ssh")], 1)
            .sample(&[("agent", "b\"\\\n")], 2);
        let c = LabeledCounter::<Why>::default();
        c.inc(Why::BetaGamma);
        c.inc(Why::BetaGamma);
        e.family("z_total", Kind::Counter, "By why.")
            .labeled("reason", &c);
        assert_eq!(
            e.into_string(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
             # HELP y Per thing.\n# TYPE y gauge\ny{agent=\"a\",service=\"ssh\"} 1\n\
             y{agent=\"b\\\"\\\\\\n\"} 2\n\
             # HELP z_total By why.\n# TYPE z_total counter\n\
             z_total{reason=\"alpha\"} 0\nz_total{reason=\"beta_gamma\"} 2\n"
        );
    }

    #[test]
    fn histogram_is_cumulative_with_inf_sum_and_count() {
        static BOUNDS: [f64; 3] = [0.001, 0.5, 1.0];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(750));
        h.observe(Duration::from_secs(9));
        let mut e = Exposition::new();
        e.family("t_seconds", Kind::Histogram, "Took.")
            .histogram(&h);
        assert_eq!(
            e.into_string(),
            "# HELP t_seconds Took.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.001\"} 0\nt_seconds_bucket{le=\"0.5\"} 1\n\
             t_seconds_bucket{le=\"1\"} 2\nt_seconds_bucket{le=\"+Inf\"} 3\n\
             t_seconds_sum 9.753\nt_seconds_count 3\n"
        );
    }
}
