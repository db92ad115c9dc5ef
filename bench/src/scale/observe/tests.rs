//! The metrics histogram's quantiles and the relay log's warnings, on fixed text.

use super::*;

#[test]
fn quantiles_interpolate_within_buckets() {
    let text = "x_bucket{le=\"0.001\"} 50\nx_bucket{le=\"0.01\"} 90\n\
                x_bucket{le=\"0.1\"} 100\nx_bucket{le=\"+Inf\"} 100\nx_count 100\n";
    let b = histogram(text, "x");
    assert_eq!(b.len(), 4);
    assert!((quantile(&b, 0.5).unwrap() - 0.001).abs() < 1e-12);
    // 99th: 9 of the 10 observations between 0.01 and 0.1.
    assert!((quantile(&b, 0.99).unwrap() - 0.091).abs() < 1e-9);
    assert_eq!(quantile(&[], 0.5), None);
    assert_eq!(quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
}

#[test]
fn warnings_are_counted_once_each() {
    let log = "t1  WARN a: x\nt2  INFO b\nt3  WARN a: x\nt4 ERROR c\n";
    assert_eq!(warnings(log), vec!["1x ERROR c", "2x WARN a: x"]);
}
