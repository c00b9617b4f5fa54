//! Repair of the malformed `:authority` some etcd clients send.
//!
//! etcd's Go clients have sent `:authority` values that are not URI
//! authorities: etcdctl 3.4 sends the endpoint URL itself
//! (`http://127.0.0.1:2379`) when it dials one endpoint on its own, as
//! `endpoint status` and `endpoint health --cluster` do, and client v3.5.0
//! sent `#initially=[...]`. grpc-go's server ignores the value, so etcd
//! serves them. The `h2` crate refuses such a request with a stream reset
//! (PROTOCOL_ERROR), and offers no way to relax that check.
//!
//! [`AuthorityRepair`] sits under hyper on each client connection and looks
//! at the HTTP/2 request headers before `h2` does. A connection's first
//! header block is decoded (HPACK); if its `:authority` is valid, as it is
//! for every well-behaved client, the connection's bytes pass through
//! untouched from then on (a client uses one authority per connection). If
//! it is not, every header block of that connection is decoded with the
//! client's compression state and re-encoded as plain literals that `h2`
//! can decode without any (so its own table stays empty), with the
//! authority reduced to its `host:port` part, or left out when nothing
//! valid remains, as grpc-go's server does not use it.
//! HTTP/1 connections (the JSON gateway, `/metrics`) pass through.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest frame a server accepts until its SETTINGS say otherwise,
/// which hyper's do not: re-encoded blocks are split to fit, and a client
/// frame announcing more ends the connection before any of it is buffered
/// (h2 would refuse it with FRAME_SIZE_ERROR anyway). Without this bound a
/// client could make each connection hold a 16 MiB frame here, before any
/// request is checked.
const MAX_FRAME_LEN: usize = 16_384;
/// The dynamic table size `h2` advertises to clients (the HTTP/2 default).
const HEADER_TABLE_SIZE: usize = 4096;
/// A header block (HEADERS with its CONTINUATIONs) larger than this ends
/// the connection while it is examined; etcd requests carry a few hundred
/// bytes of headers, and hyper accepts 16 KiB of them once decoded.
const MAX_HEADER_BLOCK: usize = 64 << 10;
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Nothing examined yet: HTTP/2 with prior knowledge, or HTTP/1?
    Preface,
    /// HTTP/2, before the first header block.
    FirstHeaders,
    /// Every header block is rewritten.
    Rewrite,
    /// Bytes pass through unexamined.
    PassThrough,
}

/// A client connection's I/O with malformed `:authority` values repaired on
/// the way in (see the module docs). Writes pass through.
pub struct AuthorityRepair<T> {
    inner: T,
    mode: Mode,
    /// Received and not yet examined.
    input: Vec<u8>,
    /// Examined (and perhaps rewritten), for hyper to read.
    output: Vec<u8>,
    output_read: usize,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

impl<T> AuthorityRepair<T> {
    pub fn new(inner: T) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        AuthorityRepair {
            inner,
            mode: Mode::Preface,
            input: Vec::new(),
            output: Vec::new(),
            output_read: 0,
            decoder,
            eof: false,
        }
    }

    /// Moves what `input` holds that can be examined into `output`.
    fn examine(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::PassThrough => {
                    self.output.append(&mut self.input);
                    return Ok(());
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::PassThrough;
                    } else if n == PREFACE.len() {
                        self.output.extend(self.input.drain(..n));
                        self.mode = Mode::FirstHeaders;
                    } else {
                        return Ok(());
                    }
                }
                Mode::FirstHeaders | Mode::Rewrite => {
                    if !self.examine_frame()? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Examines the frame (or header block) at the start of `input`; false
    /// when more bytes are needed first.
    fn examine_frame(&mut self) -> io::Result<bool> {
        check_frame_len(&self.input, 0)?;
        let Some(first) = frame_at(&self.input, 0) else {
            return Ok(false);
        };
        if first.kind != FRAME_HEADERS {
            let end = first.end;
            self.output.extend(self.input.drain(..end));
            return Ok(true);
        }
        let Some(block) = header_block(&self.input)? else {
            return Ok(false);
        };
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                fields.push((name.into_owned(), value.into_owned()))
            })
            .map_err(|e| invalid(format!("undecodable request headers: {e:?}")))?;
        let repair = fields
            .iter()
            .find(|(name, _)| name == b":authority")
            .map(|(_, value)| repair_authority(value));
        if self.mode == Mode::FirstHeaders {
            if matches!(repair, None | Some(Repair::Valid)) {
                self.mode = Mode::PassThrough;
                return Ok(true);
            }
            tracing::debug!("client sends a malformed :authority; rewriting its headers");
            self.mode = Mode::Rewrite;
        }
        let fields = fields.into_iter().filter_map(|(name, value)| {
            if name != b":authority" {
                return Some((name, value));
            }
            match repair_authority(&value) {
                Repair::Valid => Some((name, value)),
                Repair::Replace(v) => Some((name, v)),
                Repair::Drop => None,
            }
        });
        let encoded = encode_literals(fields);
        write_header_frames(&mut self.output, block.stream_id, block.flags, &encoded);
        self.input.drain(..block.end);
        Ok(true)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

struct FrameHeader {
    kind: u8,
    flags: u8,
    stream_id: u32,
    /// Offset of the payload and of the frame's end in the buffer.
    payload: usize,
    end: usize,
}

/// Refuses a frame at `at` in `buf` whose header announces a length above
/// [`MAX_FRAME_LEN`], as soon as its header is there.
fn check_frame_len(buf: &[u8], at: usize) -> io::Result<()> {
    if let Some(h) = buf.get(at..at + 3) {
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        if len > MAX_FRAME_LEN {
            return Err(invalid(format!(
                "frame of {len} bytes, above the maximum frame size {MAX_FRAME_LEN}"
            )));
        }
    }
    Ok(())
}

/// The frame starting at `at` in `buf`, if all of it is there.
fn frame_at(buf: &[u8], at: usize) -> Option<FrameHeader> {
    let h = buf.get(at..at + FRAME_HEADER_LEN)?;
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let end = at + FRAME_HEADER_LEN + len;
    (buf.len() >= end).then(|| FrameHeader {
        kind: h[3],
        flags: h[4],
        stream_id: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        payload: at + FRAME_HEADER_LEN,
        end,
    })
}

struct HeaderBlock {
    stream_id: u32,
    flags: u8,
    /// The HPACK block: the fragments without padding or priority.
    fragment: Vec<u8>,
    /// Where the block's last frame ends in the buffer.
    end: usize,
}

/// The header block starting with the HEADERS frame at the start of `buf`,
/// once it and all its CONTINUATION frames are there.
fn header_block(buf: &[u8]) -> io::Result<Option<HeaderBlock>> {
    let Some(first) = frame_at(buf, 0) else {
        return Ok(None);
    };
    let mut payload = &buf[first.payload..first.end];
    let mut pad = 0;
    if first.flags & FLAG_PADDED != 0 {
        let (&len, rest) = payload
            .split_first()
            .ok_or_else(|| invalid("HEADERS frame without its pad length".into()))?;
        pad = usize::from(len);
        payload = rest;
    }
    if first.flags & FLAG_PRIORITY != 0 {
        payload = payload
            .get(5..)
            .ok_or_else(|| invalid("HEADERS frame without its priority".into()))?;
    }
    let fragment_len = payload
        .len()
        .checked_sub(pad)
        .ok_or_else(|| invalid("HEADERS frame padding longer than its payload".into()))?;
    let mut fragment = payload[..fragment_len].to_vec();
    let mut flags = first.flags;
    let mut end = first.end;
    while flags & FLAG_END_HEADERS == 0 {
        if end > MAX_HEADER_BLOCK {
            return Err(invalid("request header block too large".into()));
        }
        check_frame_len(buf, end)?;
        let Some(next) = frame_at(buf, end) else {
            if buf.len() > MAX_HEADER_BLOCK {
                return Err(invalid("request header block too large".into()));
            }
            return Ok(None);
        };
        if next.kind != FRAME_CONTINUATION || next.stream_id != first.stream_id {
            return Err(invalid(
                "header block not followed by its CONTINUATION".into(),
            ));
        }
        fragment.extend_from_slice(&buf[next.payload..next.end]);
        flags |= next.flags & FLAG_END_HEADERS;
        end = next.end;
    }
    Ok(Some(HeaderBlock {
        stream_id: first.stream_id,
        flags: first.flags & FLAG_END_STREAM,
        fragment,
        end,
    }))
}

#[derive(Debug, PartialEq)]
enum Repair {
    Valid,
    Replace(Vec<u8>),
    Drop,
}

/// What to send `h2` for the `:authority` `value`: its `host[:port]` when
/// it is a URL, nothing when no valid authority can be found in it.
fn repair_authority(value: &[u8]) -> Repair {
    let is_valid = |v: &[u8]| axum::http::uri::Authority::try_from(v).is_ok();
    if is_valid(value) {
        return Repair::Valid;
    }
    let after_scheme = value
        .windows(3)
        .position(|w| w == b"://")
        .map_or(value, |i| &value[i + 3..]);
    let host_port = after_scheme
        .split(|b| matches!(b, b'/' | b'?' | b'#'))
        .next()
        .unwrap_or_default();
    if !host_port.is_empty() && is_valid(host_port) {
        Repair::Replace(host_port.to_vec())
    } else {
        Repair::Drop
    }
}

/// `fields` as an HPACK block of literals without indexing, neither
/// indexed nor Huffman-coded: decodable with no compression state at all.
fn encode_literals(fields: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00); // literal without indexing, new name
        encode_string(&mut out, &name);
        encode_string(&mut out, &value);
    }
    out
}

/// An HPACK string literal (RFC 7541 §5.2) without Huffman coding.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// An HPACK integer (RFC 7541 §5.1) with an `prefix_bits`-bit prefix, whose
/// first octet's other bits are `first`.
fn encode_integer(out: &mut Vec<u8>, mut n: usize, prefix_bits: u32, first: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if n < max_prefix {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    n -= max_prefix;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A HEADERS frame, and CONTINUATION frames as needed, carrying `block`.
fn write_header_frames(out: &mut Vec<u8>, stream_id: u32, end_stream: u8, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME_LEN).peekable();
    let mut kind = FRAME_HEADERS;
    let mut flags = end_stream;
    // An empty block still needs its HEADERS frame.
    let empty: &[u8] = &[];
    let mut next = chunks.next().or(Some(empty));
    while let Some(chunk) = next {
        next = chunks.next();
        if next.is_none() {
            flags |= FLAG_END_HEADERS;
        }
        let len = chunk.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(chunk);
        kind = FRAME_CONTINUATION;
        flags = 0;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityRepair<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_read < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.output_read);
                buf.put_slice(&this.output[this.output_read..this.output_read + n]);
                this.output_read += n;
                if this.output_read == this.output.len() {
                    this.output.clear();
                    this.output_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::PassThrough && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.eof {
                // A connection that ends inside a frame: let hyper see what
                // there was, and the end.
                this.mode = Mode::PassThrough;
                this.output.append(&mut this.input);
                if this.output.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.mode == Mode::PassThrough {
                this.output.append(&mut this.input);
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            } else {
                this.input.extend_from_slice(read.filled());
                this.examine()?;
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityRepair<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A client's bytes: the preface, an empty SETTINGS frame, then header
    /// blocks encoded by an HPACK encoder that indexes (as Go's does).
    fn client_bytes(blocks: &[Vec<(&[u8], &[u8])>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let mut encoder = loona_hpack::Encoder::new();
        for (i, fields) in blocks.iter().enumerate() {
            let block = encoder.encode(fields.iter().copied());
            write_header_frames(&mut out, 2 * i as u32 + 1, 0, &block);
        }
        out
    }

    async fn through_repair(bytes: Vec<u8>) -> Vec<u8> {
        let mut repaired = AuthorityRepair::new(&bytes[..]);
        let mut out = Vec::new();
        repaired.read_to_end(&mut out).await.unwrap();
        out
    }

    /// The header blocks in `bytes` (after the preface and SETTINGS),
    /// decoded with a fresh decoder.
    fn decoded_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut rest = &bytes[PREFACE.len() + FRAME_HEADER_LEN..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        while let Some(block) = header_block(rest).unwrap() {
            blocks.push(decoder.decode(&block.fragment).unwrap());
            rest = &rest[block.end..];
        }
        assert!(rest.is_empty());
        blocks
    }

    fn request(authority: &'static [u8]) -> Vec<(&'static [u8], &'static [u8])> {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.Maintenance/Status"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ]
    }

    #[test]
    fn authorities_are_cut_to_host_and_port_or_dropped() {
        assert_eq!(repair_authority(b"127.0.0.1:2379"), Repair::Valid);
        assert_eq!(repair_authority(b"etcd.local"), Repair::Valid);
        assert_eq!(
            repair_authority(b"http://127.0.0.1:2379"),
            Repair::Replace(b"127.0.0.1:2379".to_vec())
        );
        assert_eq!(
            repair_authority(b"https://[::1]:2379/"),
            Repair::Replace(b"[::1]:2379".to_vec())
        );
        assert_eq!(
            repair_authority(b"#initially=[http://a:2379;http://b:2379]"),
            Repair::Drop
        );
    }

    #[test]
    fn integers_use_their_prefix_then_continuation_octets() {
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        encode_integer(&mut out, 1337, 5, 0);
        // RFC 7541 C.1.1 and C.1.2.
        assert_eq!(out, [10, 31, 154, 10]);
    }

    #[tokio::test]
    async fn valid_authorities_pass_through_byte_for_byte() {
        let bytes = client_bytes(&[request(b"127.0.0.1:2379"), request(b"127.0.0.1:2379")]);
        assert_eq!(through_repair(bytes.clone()).await, bytes);
    }

    #[tokio::test]
    async fn http1_passes_through() {
        let bytes = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through_repair(bytes.clone()).await, bytes);
    }

    #[tokio::test]
    async fn url_authorities_are_rewritten_in_every_block() {
        let bytes = client_bytes(&[
            request(b"http://127.0.0.1:2379"),
            request(b"http://127.0.0.1:2379"),
            request(b"#initially=[http://127.0.0.1:2379]"),
        ]);
        let blocks = decoded_blocks(&through_repair(bytes).await);
        assert_eq!(blocks.len(), 3);
        for (i, block) in blocks.iter().enumerate() {
            let authority = block
                .iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| v.as_slice());
            let expected: Option<&[u8]> = (i < 2).then_some(b"127.0.0.1:2379");
            assert_eq!(authority, expected);
            let path = block.iter().find(|(n, _)| n == b":path").unwrap();
            assert_eq!(path.1, b"/etcdserverpb.Maintenance/Status");
        }
    }

    #[tokio::test]
    async fn large_blocks_are_split_into_continuations() {
        let big = vec![b'v'; 3 * MAX_FRAME_LEN];
        let mut fields = request(b"http://127.0.0.1:2379");
        fields.push((b"x-big", &big));
        let bytes = client_bytes(&[fields]);
        let repaired = through_repair(bytes).await;
        let blocks = decoded_blocks(&repaired);
        assert_eq!(blocks[0].last().unwrap().1, big);
        let first = frame_at(&repaired, PREFACE.len() + FRAME_HEADER_LEN).unwrap();
        assert_eq!(
            (first.kind, first.end - first.payload),
            (FRAME_HEADERS, MAX_FRAME_LEN)
        );
    }

    /// A client that announces a frame larger than the maximum frame size
    /// is refused at its header, whatever it sends after: nothing of the
    /// frame is held (hyper itself never sees it).
    #[tokio::test]
    async fn frames_above_the_maximum_frame_size_end_the_connection() {
        for first_headers in [true, false] {
            let mut bytes = PREFACE.to_vec();
            if !first_headers {
                // A malformed authority first, so frames go on being examined.
                let mut encoder = loona_hpack::Encoder::new();
                let block = encoder.encode(request(b"http://127.0.0.1:2379").into_iter());
                write_header_frames(&mut bytes, 1, 0, &block);
            }
            // A SETTINGS frame announcing 16 MiB - 1, of which 64 KiB arrive.
            bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0x4, 0, 0, 0, 0, 0]);
            bytes.extend(std::iter::repeat_n(0u8, 64 << 10));
            let mut repaired = AuthorityRepair::new(&bytes[..]);
            let mut out = Vec::new();
            let err = repaired.read_to_end(&mut out).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("maximum frame size"), "{err}");
            assert!(
                repaired.input.len() < 2 * READ_CHUNK,
                "buffered {}",
                repaired.input.len()
            );
        }
    }

    #[tokio::test]
    async fn garbage_headers_end_the_connection() {
        let mut bytes = PREFACE.to_vec();
        write_header_frames(&mut bytes, 1, 0, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut repaired = AuthorityRepair::new(&bytes[..]);
        let mut out = Vec::new();
        let err = repaired.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
