//! Record framing.
//!
//! Version 2 (every segment created since header checksums were added):
//! `crc32c (4) | length (4) | kind (1) | header crc32c (4) | payload`. The
//! first checksum covers length, kind and payload; the header checksum
//! covers length and kind alone, so a damaged length is told apart from a
//! torn payload, and a record whose header checks out has a length recovery
//! can trust. Version 1 (older segments) lacks the header checksum:
//! `crc32c (4) | length (4) | kind (1) | payload`. A segment's header record
//! (always version-1 framed, so it can be read before the version is known)
//! names the version by its kind.
//!
//! Segments are preallocated with zeros; an all-zero header marks the end of
//! the written data. Kind 0 is reserved for that reason.

/// Bytes before the payload in version-1 records.
pub const HEADER_LEN: usize = 9;
/// Bytes before the payload in version-2 records.
pub const HEADER_LEN_V2: usize = 13;

/// Kind of the header record of a version-1 segment (reserved for the WAL).
pub const SEGMENT_HEADER: u8 = 255;
/// Kind of the header record of a version-2 segment (reserved for the WAL).
pub const SEGMENT_HEADER_V2: u8 = 254;

/// Record framing of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn header_len(self) -> usize {
        match self {
            Version::V1 => HEADER_LEN,
            Version::V2 => HEADER_LEN_V2,
        }
    }
}

/// Payload of a segment header: the segment's own sequence number and where
/// the previous segment's records ended, which lets recovery tell a segment
/// that lost its tail from one that was simply full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub prev_end: u64,
}

impl SegmentHeader {
    /// Appends the header record of a version-2 segment.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&self.seq.to_le_bytes());
        payload[8..].copy_from_slice(&self.prev_end.to_le_bytes());
        encode_v1(SEGMENT_HEADER_V2, &payload, out);
    }

    pub fn parse(payload: &[u8]) -> Option<SegmentHeader> {
        let seq = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
        let prev_end = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
        (payload.len() == 16).then_some(SegmentHeader { seq, prev_end })
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// What the bytes at an offset hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record whose checksum matches; `len` is its framed length.
    Record {
        kind: u8,
        payload: &'a [u8],
        len: usize,
    },
    /// Zeros: nothing was ever written here.
    End,
    /// A partial or damaged record: a torn write or corruption. `end`, when
    /// the record's header is known good (version 2), is where the record
    /// claims to end.
    Torn { end: Option<usize> },
}

fn checksum(len: u32, kind: u8, payload: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&len.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &[kind]);
    crc32c::crc32c_append(crc, payload)
}

fn header_checksum(len: u32, kind: u8) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), &[kind])
}

/// Framed length of a version-2 record with `payload_len` bytes of payload.
pub fn framed_len(payload_len: usize) -> usize {
    HEADER_LEN_V2 + payload_len
}

/// Appends the framed (version-2) record to `out`.
///
/// # Panics
/// If `kind` is 0 (reserved for the end marker) or the payload exceeds 4 GiB;
/// both are programming errors of the caller, not input errors.
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    assert_ne!(kind, 0, "record kind 0 is reserved");
    let len = u32::try_from(payload.len()).expect("record payload over 4 GiB");
    out.extend_from_slice(&checksum(len, kind, payload).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&header_checksum(len, kind).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends a version-1 framed record (segment headers; older segments).
pub fn encode_v1(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    assert_ne!(kind, 0, "record kind 0 is reserved");
    let len = u32::try_from(payload.len()).expect("record payload over 4 GiB");
    out.extend_from_slice(&checksum(len, kind, payload).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Decodes the record at the start of `buf` (the rest of a segment).
pub fn decode(buf: &[u8], version: Version) -> Decoded<'_> {
    let header_len = version.header_len();
    if buf.len() < header_len {
        // A header cut by the end of the file is torn unless it is all zeros.
        return if buf.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Torn { end: None }
        };
    }
    let header = &buf[..header_len];
    if header.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let crc = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let kind = header[8];
    let trusted = match version {
        Version::V1 => false,
        Version::V2 => {
            let stored = u32::from_le_bytes([header[9], header[10], header[11], header[12]]);
            if stored != header_checksum(len, kind) || kind == 0 {
                return Decoded::Torn { end: None };
            }
            true
        }
    };
    let end = header_len.saturating_add(len as usize);
    let claimed = trusted.then_some(end);
    if kind == 0 || end > buf.len() {
        return Decoded::Torn { end: claimed };
    }
    let payload = &buf[header_len..end];
    if checksum(len, kind, payload) != crc {
        return Decoded::Torn { end: claimed };
    }
    Decoded::Record {
        kind,
        payload,
        len: end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_end_marker() {
        let mut buf = Vec::new();
        encode(7, b"hello", &mut buf);
        encode(1, b"", &mut buf);
        buf.extend_from_slice(&[0; 32]);
        let v = Version::V2;
        let Decoded::Record { kind, payload, len } = decode(&buf, v) else {
            panic!("first record not decoded")
        };
        assert_eq!((kind, payload, len), (7, &b"hello"[..], 18));
        let Decoded::Record { kind, payload, len } = decode(&buf[18..], v) else {
            panic!("empty record not decoded")
        };
        assert_eq!((kind, payload.len(), len), (1, 0, HEADER_LEN_V2));
        assert_eq!(decode(&buf[18 + HEADER_LEN_V2..], v), Decoded::End);
        assert_eq!(decode(&[], v), Decoded::End);
        // Version 1, as older segments hold it.
        let mut old = Vec::new();
        encode_v1(7, b"hello", &mut old);
        assert!(matches!(
            decode(&old, Version::V1),
            Decoded::Record { len: 14, .. }
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(3, b"payload bytes", &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let decoded = decode(&damaged, Version::V2);
            assert!(matches!(decoded, Decoded::Torn { .. }), "bit {bit}");
            // A flip in the length or kind is caught by the header checksum:
            // the record's claimed extent is not trusted.
            if (4..9).contains(&(bit / 8)) {
                assert_eq!(decoded, Decoded::Torn { end: None }, "bit {bit}");
            }
        }
    }

    #[test]
    fn every_cut_is_detected() {
        let mut buf = Vec::new();
        encode(3, b"payload bytes", &mut buf);
        for cut in 1..buf.len() {
            assert!(
                matches!(decode(&buf[..cut], Version::V2), Decoded::Torn { .. }),
                "cut at {cut}"
            );
        }
    }
}
