//! Reading the log back after a restart or crash.
//!
//! Only the tail of the last segment can be torn: a group commit is one
//! write and one `fdatasync`, it is acknowledged only after the sync, and a
//! sync makes everything written before it durable. So recovery accepts
//! damage in exactly one place. In the last segment, a record that does not
//! check out is a torn write when some of its sectors were never written
//! (they still hold the preallocated zeros; etcd's WAL uses the same test):
//! the log is cut there, the rest of the segment zero-filled, and nothing
//! acknowledged is lost. Anywhere else (an older segment, a damaged record
//! whose sectors were all written, a segment missing from the sequence, a
//! header that does not link) it is corruption, and recovery stops with
//! [`WalError::Corrupt`] instead of silently dropping the newest records,
//! votes among them: a member that forgot its vote could vote twice.
//!
//! Each segment starts with a header naming itself and where the previous
//! segment's records ended, so an older segment's exact extent is known and
//! checked record by record.

use std::path::Path;

use super::record::{
    decode, Decoded, Record, SegmentHeader, Version, SEGMENT_HEADER, SEGMENT_HEADER_V2,
};
use super::segment;
use super::WalError;

/// Sectors are written whole or not at all; a torn write leaves unwritten
/// sectors of a record all zero.
const SECTOR: usize = 512;

/// A segment that survived recovery.
#[derive(Debug, Clone)]
pub struct SegmentState {
    pub seq: u64,
    /// Its records' framing.
    pub version: Version,
    /// Largest tag of its records (see [`super::Wal::open`]).
    pub max_tag: u64,
    /// Offset just past its last record.
    pub end: u64,
    pub capacity: u64,
}

/// Where recovery cut a torn tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub seq: u64,
    pub offset: u64,
    /// Segments removed whole (a last segment whose header was torn).
    pub dropped_segments: usize,
}

pub struct Recovered {
    pub records: Vec<Record>,
    pub segments: Vec<SegmentState>,
    pub truncation: Option<Truncation>,
}

fn corrupt(dir: &Path, seq: u64, offset: u64, reason: impl Into<String>) -> WalError {
    WalError::Corrupt {
        segment: segment::path(dir, seq),
        offset,
        reason: reason.into(),
    }
}

/// Whether the damaged record at `at` in `data` has a sector that was never
/// written: some piece of it between sector boundaries, within `[at, end)`,
/// is all zeros.
fn has_unwritten_sector(data: &[u8], at: usize, end: usize) -> bool {
    let end = end.min(data.len());
    let mut start = at;
    while start < end {
        let piece_end = ((start / SECTOR + 1) * SECTOR).min(end);
        if data[start..piece_end].iter().all(|&b| b == 0) {
            return true;
        }
        start = piece_end;
    }
    false
}

/// Whether the record at `at` that did not decode was torn by a crash
/// rather than corrupted: its header or its body has an unwritten sector.
/// `claimed` is where the record ends when its header checked out (version
/// 2): then only its own extent counts. Without a trusted header (version
/// 1, or a header that failed its checksum), a header that was fully
/// written is trusted for its length only if that length stays within the
/// file (segments are always sized for their records); otherwise it is
/// corruption unless the header itself is torn.
fn is_torn(data: &[u8], at: usize, version: Version, claimed: Option<usize>) -> bool {
    let header_end = at + version.header_len();
    if has_unwritten_sector(data, at, header_end) || data.len() < header_end {
        return true;
    }
    match (version, claimed) {
        (_, Some(end)) => {
            let end = at + end;
            end <= data.len() && has_unwritten_sector(data, at, end)
        }
        // A version-2 header that fails its own checksum while all of it
        // was written: damaged, not torn.
        (Version::V2, None) => false,
        (Version::V1, None) => {
            let len = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
            let end = header_end.saturating_add(len as usize);
            end <= data.len() && has_unwritten_sector(data, at, end)
        }
    }
}

/// The header at the start of a segment's bytes, if it is one, with the
/// segment's record version and where its records start.
fn header_of(data: &[u8]) -> Option<(SegmentHeader, Version, usize)> {
    match decode(data, Version::V1) {
        Decoded::Record { kind, payload, len } => {
            let version = match kind {
                SEGMENT_HEADER => Version::V1,
                SEGMENT_HEADER_V2 => Version::V2,
                _ => return None,
            };
            SegmentHeader::parse(payload).map(|h| (h, version, len))
        }
        _ => None,
    }
}

/// The first bytes of segment `seq`: enough for its header record.
fn read_head(dir: &Path, seq: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(segment::path(dir, seq))?
        .take(64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// Reads the records of segment `seq` from `from` up to `until` (an older
/// segment, whose end the next header names), or up to its end (the last
/// one). Returns the segment's state, its records, and where a torn tail
/// was found.
#[allow(clippy::too_many_arguments)]
fn scan(
    dir: &Path,
    seq: u64,
    version: Version,
    data: &[u8],
    from: usize,
    until: Option<u64>,
    segment_size: u64,
    tag_of: &dyn Fn(u8, &[u8]) -> u64,
) -> Result<(SegmentState, Vec<Record>, Option<u64>), WalError> {
    let mut state = SegmentState {
        seq,
        version,
        max_tag: 0,
        end: from as u64,
        capacity: (data.len() as u64).max(segment_size),
    };
    let mut records = Vec::new();
    let mut offset = from;
    let torn_at = loop {
        if until.is_some_and(|end| offset as u64 >= end) {
            break None;
        }
        match decode(&data[offset..], version) {
            Decoded::Record { kind, payload, len } => {
                state.max_tag = state.max_tag.max(tag_of(kind, payload));
                records.push(Record {
                    kind,
                    payload: payload.to_vec(),
                });
                offset += len;
            }
            damaged => {
                if let Some(end) = until {
                    return Err(corrupt(
                        dir,
                        seq,
                        offset as u64,
                        format!(
                            "a damaged record before the segment's end at {end}, which the next \
                             segment records"
                        ),
                    ));
                }
                let clean_end = damaged == Decoded::End && data[offset..].iter().all(|&b| b == 0);
                if clean_end {
                    break None;
                }
                // An end marker (zeros) followed by data means the start of
                // a write was not persisted but later sectors were: torn.
                let torn = match damaged {
                    Decoded::Torn { end } => is_torn(data, offset, version, end),
                    _ => true,
                };
                if torn {
                    break Some(offset as u64);
                }
                return Err(corrupt(
                    dir,
                    seq,
                    offset as u64,
                    "a record fails its checksum, and every sector of it was written",
                ));
            }
        }
    };
    if let Some(end) = until {
        if offset as u64 != end {
            return Err(corrupt(
                dir,
                seq,
                offset as u64,
                format!("the records run past the segment's end at {end}"),
            ));
        }
    }
    state.end = offset as u64;
    Ok((state, records, torn_at))
}

pub fn recover(
    dir: &Path,
    segment_size: u64,
    tag_of: &dyn Fn(u8, &[u8]) -> u64,
) -> Result<Recovered, WalError> {
    let mut seqs = segment::list(dir)?;
    for pair in seqs.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(corrupt(dir, pair[0] + 1, 0, "the segment is missing"));
        }
    }
    // Headers first (a few bytes of each file), so each segment's end is
    // known; then one segment in memory at a time.
    let mut headers = Vec::with_capacity(seqs.len());
    for (i, &seq) in seqs.iter().enumerate() {
        let head = read_head(dir, seq)?;
        match header_of(&head) {
            Some((h, version, len)) if h.seq == seq => headers.push((h, version, len)),
            Some((h, _, _)) => {
                return Err(corrupt(
                    dir,
                    seq,
                    0,
                    format!("its header names segment {}", h.seq),
                ))
            }
            None if i + 1 == seqs.len() && is_torn(&head, 0, Version::V1, None) => {
                // A crash while rolling: the new segment's header was never
                // written, so nothing in it was acknowledged.
                break;
            }
            None => return Err(corrupt(dir, seq, 0, "its header is damaged")),
        }
    }
    let mut dropped_segments = 0;
    if headers.len() < seqs.len() {
        if let Some(torn) = seqs.pop() {
            segment::remove(dir, torn)?;
            segment::sync_dir(dir)?;
            dropped_segments = 1;
        }
    }

    let mut records = Vec::new();
    let mut segments: Vec<SegmentState> = Vec::new();
    let mut torn = None;
    for (i, &seq) in seqs.iter().enumerate() {
        let (_, version, header_len) = headers[i];
        let until = headers.get(i + 1).map(|(next, _, _)| next.prev_end);
        let data = std::fs::read(segment::path(dir, seq))?;
        let (state, found, torn_at) = scan(
            dir,
            seq,
            version,
            &data,
            header_len,
            until,
            segment_size,
            tag_of,
        )?;
        if let Some(offset) = torn_at {
            tracing::warn!(
                segment = seq,
                offset,
                "WAL: the last write was torn by a crash (never acknowledged); the log ends there"
            );
            torn = Some((seq, offset));
        }
        // A crash while rolling can leave a last segment with nothing after
        // its header (not even the checkpoint): go on in the one before.
        if i > 0 && i + 1 == seqs.len() && found.is_empty() {
            segment::remove(dir, seq)?;
            segment::sync_dir(dir)?;
            dropped_segments += 1;
            torn = None;
            break;
        }
        records.extend(found);
        segments.push(state);
    }
    let truncation = match (torn, segments.last()) {
        (Some((seq, offset)), _) => Some(Truncation {
            seq,
            offset,
            dropped_segments,
        }),
        (None, Some(last)) if dropped_segments > 0 => Some(Truncation {
            seq: last.seq,
            offset: last.end,
            dropped_segments,
        }),
        _ => None,
    };
    // Writing resumes at the end of the last segment: nothing may follow it.
    if let (Some(last), Some(_)) = (segments.last(), &truncation) {
        let file = segment::open(dir, last.seq)?;
        segment::cut(&file, last.end, last.capacity)?;
    }
    Ok(Recovered {
        records,
        segments,
        truncation,
    })
}
