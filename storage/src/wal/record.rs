//! Record framing: `crc32c (4) | length (4) | kind (1) | payload`.
//!
//! The checksum covers length, kind and payload, so a flipped bit anywhere in
//! a record, its header included, is detected. Segments are preallocated with
//! zeros; an all-zero header marks the end of the written data. Kind 0 is
//! reserved for that reason.

/// Bytes before the payload.
pub const HEADER_LEN: usize = 9;

/// Kind of the record every segment starts with (reserved for the WAL).
pub const SEGMENT_HEADER: u8 = 255;

/// Payload of a segment header: the segment's own sequence number and where
/// the previous segment's records ended, which lets recovery tell a segment
/// that lost its tail from one that was simply full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub prev_end: u64,
}

impl SegmentHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&self.seq.to_le_bytes());
        payload[8..].copy_from_slice(&self.prev_end.to_le_bytes());
        encode(SEGMENT_HEADER, &payload, out);
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
    /// A partial or damaged record: a torn write or corruption.
    Torn,
}

fn checksum(len: u32, kind: u8, payload: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&len.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &[kind]);
    crc32c::crc32c_append(crc, payload)
}

/// Framed length of a record with `payload_len` bytes of payload.
pub fn framed_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len
}

/// Appends the framed record to `out`.
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
    out.extend_from_slice(payload);
}

/// Decodes the record at the start of `buf` (the rest of a segment).
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_LEN {
        // A header cut by the end of the file is torn unless it is all zeros.
        return if buf.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Torn
        };
    }
    let header = &buf[..HEADER_LEN];
    if header.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let crc = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let kind = header[8];
    let end = HEADER_LEN.saturating_add(len as usize);
    if kind == 0 || end > buf.len() {
        return Decoded::Torn;
    }
    let payload = &buf[HEADER_LEN..end];
    if checksum(len, kind, payload) != crc {
        return Decoded::Torn;
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
        let Decoded::Record { kind, payload, len } = decode(&buf) else {
            panic!("first record not decoded")
        };
        assert_eq!((kind, payload, len), (7, &b"hello"[..], 14));
        let Decoded::Record { kind, payload, len } = decode(&buf[14..]) else {
            panic!("empty record not decoded")
        };
        assert_eq!((kind, payload.len(), len), (1, 0, HEADER_LEN));
        assert_eq!(decode(&buf[14 + HEADER_LEN..]), Decoded::End);
        assert_eq!(decode(&[]), Decoded::End);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(3, b"payload bytes", &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode(&damaged), Decoded::Torn, "bit {bit}");
        }
    }

    #[test]
    fn every_cut_is_detected() {
        let mut buf = Vec::new();
        encode(3, b"payload bytes", &mut buf);
        for cut in 1..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Torn, "cut at {cut}");
        }
    }
}
