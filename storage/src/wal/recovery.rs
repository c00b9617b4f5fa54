//! Reading the log back after a restart or crash.
//!
//! Segments are read in order and records decoded until the first one that
//! is torn or corrupt. The log is cut there: the rest of that segment is
//! zero-filled and every later segment is deleted, so what remains is always
//! a prefix of what was written, and a later append is never followed by
//! stale bytes that happen to decode.
//!
//! Each segment starts with a header naming itself and where the previous
//! segment's records ended. A segment whose header does not match (missing,
//! renamed, or following a segment that lost its tail) ends the log.

use std::io;
use std::path::Path;

use super::record::{decode, Decoded, Record, SegmentHeader, SEGMENT_HEADER};
use super::segment;

/// A segment that survived recovery.
#[derive(Debug, Clone)]
pub struct SegmentState {
    pub seq: u64,
    /// Largest tag of its records (see [`super::Wal::open`]).
    pub max_tag: u64,
    /// Offset just past its last record.
    pub end: u64,
    pub capacity: u64,
}

/// Where recovery cut the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub seq: u64,
    pub offset: u64,
    pub dropped_segments: usize,
}

pub struct Recovered {
    pub records: Vec<Record>,
    pub segments: Vec<SegmentState>,
    pub truncation: Option<Truncation>,
}

/// One segment as read.
struct Scan {
    state: SegmentState,
    records: Vec<Record>,
    /// Whether the header links it to the segment before.
    linked: bool,
    stop: Stop,
}

/// Why reading a segment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// An end marker followed by zeros only.
    Clean,
    /// An end marker followed by stray bytes.
    JunkAfterEnd,
    /// A torn or corrupt record (or a bad header).
    Torn,
}

fn scan(
    dir: &Path,
    seq: u64,
    prev_end: Option<u64>,
    segment_size: u64,
    tag_of: &dyn Fn(u8, &[u8]) -> u64,
) -> io::Result<Scan> {
    let data = std::fs::read(segment::path(dir, seq))?;
    let mut state = SegmentState {
        seq,
        max_tag: 0,
        end: 0,
        capacity: (data.len() as u64).max(segment_size),
    };
    let mut records = Vec::new();
    let linked = match decode(&data) {
        Decoded::Record {
            kind: SEGMENT_HEADER,
            payload,
            len,
        } => {
            state.end = len as u64;
            SegmentHeader::parse(payload)
                .is_some_and(|h| h.seq == seq && prev_end.is_none_or(|end| end == h.prev_end))
        }
        _ => false,
    };
    if !linked {
        return Ok(Scan {
            state,
            records,
            linked,
            stop: Stop::Torn,
        });
    }
    let mut offset = state.end as usize;
    let stop = loop {
        match decode(&data[offset..]) {
            Decoded::Record { kind, payload, len } => {
                state.max_tag = state.max_tag.max(tag_of(kind, payload));
                records.push(Record {
                    kind,
                    payload: payload.to_vec(),
                });
                offset += len;
            }
            Decoded::End if data[offset..].iter().all(|&b| b == 0) => break Stop::Clean,
            Decoded::End => break Stop::JunkAfterEnd,
            Decoded::Torn => break Stop::Torn,
        }
    };
    state.end = offset as u64;
    Ok(Scan {
        state,
        records,
        linked,
        stop,
    })
}

pub fn recover(
    dir: &Path,
    segment_size: u64,
    tag_of: &dyn Fn(u8, &[u8]) -> u64,
) -> io::Result<Recovered> {
    let seqs = segment::list(dir)?;
    let mut scans: Vec<Scan> = Vec::new();
    let mut truncation = None;
    for (i, &seq) in seqs.iter().enumerate() {
        let prev_end = scans.last().map(|s| s.state.end);
        let s = scan(dir, seq, prev_end, segment_size, tag_of)?;
        // Junk after the end of a full, closed segment is harmless (nothing
        // is written there again), but a torn record is where the log ends.
        let torn = s.linked && s.stop == Stop::Torn;
        if !s.linked || torn {
            let (cut_seq, cut_at, first_dropped) = if s.linked {
                (seq, s.state.end, i + 1)
            } else {
                let prev = scans.last().map(|p| (p.state.seq, p.state.end));
                let (pseq, pend) = prev.unwrap_or((seq, 0));
                (pseq, pend, i)
            };
            let dropped = &seqs[first_dropped..];
            if s.linked {
                scans.push(s);
            }
            for &gone in dropped {
                segment::remove(dir, gone)?;
            }
            segment::sync_dir(dir)?;
            tracing::warn!(
                segment = cut_seq,
                offset = cut_at,
                dropped_segments = dropped.len(),
                "WAL: torn or corrupt record; the log ends there"
            );
            truncation = Some(Truncation {
                seq: cut_seq,
                offset: cut_at,
                dropped_segments: dropped.len(),
            });
            break;
        }
        scans.push(s);
    }
    // A crash while rolling can leave a last segment with nothing after its
    // header (not even the checkpoint): drop it and go on in the one before.
    while scans.len() > 1 && scans.last().is_some_and(|s| s.records.is_empty()) {
        if let Some(empty) = scans.pop() {
            segment::remove(dir, empty.state.seq)?;
            segment::sync_dir(dir)?;
        }
    }
    // Writing resumes at the end of the last segment: nothing may follow it.
    if let Some(last) = scans.last_mut() {
        if last.stop != Stop::Clean {
            let file = segment::open(dir, last.state.seq)?;
            segment::cut(&file, last.state.end, last.state.capacity)?;
            last.stop = Stop::Clean;
        }
    }
    let mut records = Vec::new();
    let mut segments = Vec::new();
    for s in scans {
        records.extend(s.records);
        segments.push(s.state);
    }
    Ok(Recovered {
        records,
        segments,
        truncation,
    })
}
