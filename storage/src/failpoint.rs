//! Failpoints: named places in Tessera's binaries where tests inject faults
//! into a real process (a lost write, a delay, a step skipped), so crash and
//! race scenarios can be produced on purpose instead of waited for.
//!
//! They are set for a whole process with the `TESSERA_FAILPOINTS`
//! environment variable, read once: `name=value` pairs separated by `;`
//! (`name` alone means `on`). An unset failpoint costs one lookup in an
//! empty map. Every failpoint in use is logged at start, so a log shows
//! when a process ran with faults injected.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that sets failpoints.
pub const ENV: &str = "TESSERA_FAILPOINTS";

fn table() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let table = parse(&std::env::var(ENV).unwrap_or_default());
        for (name, value) in &table {
            tracing::warn!(failpoint = %name, value = %value, "failpoint set: faults will be injected");
        }
        table
    })
}

/// `name=value;name2` as a table (`name2` is `on`).
fn parse(spec: &str) -> HashMap<String, String> {
    spec.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('=') {
            Some((name, value)) => (name.trim().to_string(), value.trim().to_string()),
            None => (item.to_string(), "on".to_string()),
        })
        .collect()
}

/// The value failpoint `name` is set to, if it is set.
pub fn value(name: &str) -> Option<&'static str> {
    table().get(name).map(String::as_str)
}

/// Whether failpoint `name` is set (to anything but `off`).
pub fn is_on(name: &str) -> bool {
    value(name).is_some_and(|v| v != "off")
}

/// The delay failpoint `name` asks for, as milliseconds (`name=250`).
pub fn delay(name: &str) -> Option<Duration> {
    value(name)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// Logs the failpoints set for this process (call once at start).
pub fn announce() {
    let _ = table();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_names_and_values() {
        let t = parse(" a=1; b ;; c = x=y ");
        assert_eq!(t.get("a").map(String::as_str), Some("1"));
        assert_eq!(t.get("b").map(String::as_str), Some("on"));
        assert_eq!(t.get("c").map(String::as_str), Some("x=y"));
        assert_eq!(t.len(), 3);
        assert!(parse("").is_empty());
    }
}
