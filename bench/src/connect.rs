//! The TCP connections under both kinds of client (tonic channels and
//! [`crate::unary::UnaryConn`]): Nagle off, writes coalesced, so the
//! requests of the clients sharing a connection go out together instead of
//! one segment (and one server wakeup) each, as grpc-go batches its writes.

use std::future::Future;
use std::time::Duration;

use tessera_proto::coalesce::CoalescedIo;
use tokio::net::TcpStream;

/// How long connecting (and, for tonic, the HTTP/2 setup) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A coalescing TCP connection to `host:port`; an IPv6 host may come
/// bracketed, as in a URI.
pub async fn coalesced_tcp(host: &str, port: u16) -> std::io::Result<CoalescedIo<TcpStream>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(CoalescedIo::new(tcp))
}

/// `connecting` bounded by [`CONNECT_TIMEOUT`], its error naming `target`.
pub async fn within_timeout<T, E>(
    target: &str,
    connecting: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T>
where
    E: Into<anyhow::Error>,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.into().context(format!("cannot connect to {target}"))),
        Err(_) => Err(anyhow::anyhow!("timed out").context(format!("cannot connect to {target}"))),
    }
}
