//! Parsing and size of a port range.

use super::PortRange;

#[test]
fn range_parsing() {
    assert_eq!("10000-50000".parse(), PortRange::new(10000, 50000));
    assert!("10000".parse::<PortRange>().is_err());
    assert!("5-4".parse::<PortRange>().is_err());
    assert!("0-4".parse::<PortRange>().is_err());
    assert!("1-70000".parse::<PortRange>().is_err());
    assert_eq!(PortRange::new(7, 7).unwrap().len(), 1);
}
