//! Write coalescing for connections that carry many concurrent streams.
//!
//! hyper's HTTP/2 connection task writes and flushes whatever responses are
//! ready each time it runs. When a Raft batch is applied, hundreds of
//! handler tasks finish at once, and tokio runs a task woken by the running
//! one next (its LIFO slot): the connection task runs after every single
//! handler, so each response went out in its own `writev` (one syscall and
//! one TCP segment per request, about a tenth of the server's CPU, plus a
//! wakeup of the client per segment).
//!
//! [`CoalescedIo`] buffers writes and defers the first flush of each burst
//! by one trip through the scheduler: the flushing task wakes itself and
//! returns `Pending`, which tokio treats as a yield (to the back of the run
//! queue). The handlers queued meanwhile add their responses, and the next
//! flush sends them all in one write. Under light load the deferral costs
//! one extra poll, microseconds.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this many buffered bytes a write drains the buffer first, so a
/// burst stays bounded in memory and large responses stream.
const MAX_BUFFERED: usize = 256 * 1024;
/// A buffer grown above this by one large burst is shrunk after draining.
const KEEP_CAPACITY: usize = 64 * 1024;

/// An I/O stream whose writes are buffered and sent in as few syscalls as
/// the scheduler allows (see the module docs). Reads pass through.
pub struct CoalescedIo<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the socket has taken (a partial write).
    sent: usize,
    /// The current burst's flush has already yielded once.
    deferred: bool,
}

impl<T> CoalescedIo<T> {
    pub fn new(inner: T) -> Self {
        CoalescedIo {
            inner,
            buf: Vec::new(),
            sent: 0,
            deferred: false,
        }
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for CoalescedIo<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncWrite + Unpin> CoalescedIo<T> {
    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for more writes when the buffer is full.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let n = data.len().min(MAX_BUFFERED - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let start = this.buf.len();
        for b in bufs {
            let room = MAX_BUFFERED - this.buf.len();
            this.buf.extend_from_slice(&b[..b.len().min(room)]);
        }
        Poll::Ready(Ok(this.buf.len() - start))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.deferred {
            // Yield once: tokio reschedules a task that woke itself while
            // running behind the tasks already queued.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.deferred = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_reach_the_peer_only_when_flushed_in_one_piece() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut io = CoalescedIo::new(near);
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two").await.unwrap();
        // Nothing is sent before the flush.
        let mut probe = [0u8; 16];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut probe));
        assert!(early.await.is_err(), "data went out before the flush");
        io.flush().await.unwrap();
        let n = far.read(&mut probe).await.unwrap();
        assert_eq!(&probe[..n], b"one two");
    }

    #[tokio::test]
    async fn a_burst_larger_than_the_buffer_streams_through_a_small_pipe() {
        // The pipe holds 4 KiB: the writer must drain as the reader reads.
        let (near, mut far) = tokio::io::duplex(4096);
        let data: Vec<u8> = (0..3 * MAX_BUFFERED).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let mut io = CoalescedIo::new(near);
            io.write_all(&data).await.unwrap();
            io.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }
}
