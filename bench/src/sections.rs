//! Generated sections of a document (BENCHMARKS.md), between two markers.

use std::path::Path;

use anyhow::Context;

/// Replaces the text between `start` and `end` in `path` with `section`
/// (appends the markers and the section the first time).
pub fn replace(path: &Path, start: &str, end: &str, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{start}\n{section}{end}");
    let new = match (old.find(start), old.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{old}\n{block}\n"),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}
