//! A lean gRPC client for the unary KV calls the throughput workloads make,
//! straight on an HTTP/2 connection.
//!
//! tonic's `Channel` puts a buffer task, hyper's client dispatcher and a
//! body-pumping task between a caller and the HTTP/2 connection: several
//! task hops and allocations per request, which made the load generator
//! cost as much CPU per request as the server it measures. On a machine
//! shared by both, that CPU is taken from the server. Here a call opens a
//! stream on the shared connection, sends the request and reads the reply
//! with no task of its own; the connection's writes are coalesced
//! ([`crate::connect`]), as grpc-go's writer batches its frames. The wire
//! format is plain gRPC, so the same client measures tessera and etcd.

use anyhow::Context;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Uri};
use tessera_proto::etcdserverpb::{
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::{Code, Status};

use crate::connect::{coalesced_tcp, within_timeout};

/// gRPC's length-prefixed message header: a compression flag and a length.
const PREFIX: usize = 5;

/// One HTTP/2 connection to a member, shared by the clients assigned to it.
#[derive(Clone)]
pub struct UnaryConn {
    send: SendRequest<Bytes>,
    authority: Authority,
}

impl UnaryConn {
    /// Connects to `endpoint` (`host:port`, optionally with `http://`).
    pub async fn connect(endpoint: &str) -> anyhow::Result<UnaryConn> {
        // (TLS endpoints are refused by `Target::check`.)
        let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
        let authority: Authority = addr
            .parse()
            .with_context(|| format!("bad endpoint {endpoint}"))?;
        let port = authority.port_u16().unwrap_or(2379);
        let tcp = within_timeout(endpoint, coalesced_tcp(authority.host(), port)).await?;
        let (send, connection) = h2::client::Builder::new()
            // As grpc-go's defaults: a large window, so a burst of replies
            // is never held back by flow control.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake(tcp)
            .await
            .with_context(|| format!("HTTP/2 handshake with {endpoint} failed"))?;
        tokio::spawn(async move {
            // Ends when every handle is dropped or the server goes away;
            // the calls in flight see the error themselves.
            let _ = connection.await;
        });
        Ok(UnaryConn { send, authority })
    }

    pub async fn put(&self, req: &PutRequest) -> Result<PutResponse, Status> {
        self.call("/etcdserverpb.KV/Put", req).await
    }

    pub async fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Status> {
        self.call("/etcdserverpb.KV/Range", req).await
    }

    pub async fn txn(&self, req: &TxnRequest) -> Result<TxnResponse, Status> {
        self.call("/etcdserverpb.KV/Txn", req).await
    }

    /// One unary call: `req` to `path`, its reply decoded.
    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        path: &'static str,
        req: &Req,
    ) -> Result<Resp, Status> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::from_static(path))
            .build()
            .map_err(|e| Status::internal(format!("bad request URI: {e}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|e| Status::internal(format!("bad request: {e}")))?;
        let mut body = BytesMut::with_capacity(PREFIX + req.encoded_len());
        body.put_u8(0);
        body.put_u32(req.encoded_len() as u32);
        req.encode(&mut body)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))?;

        let mut send = self.send.clone().ready().await.map_err(transport)?;
        let (response, mut stream) = send.send_request(request, false).map_err(transport)?;
        stream.send_data(body.freeze(), true).map_err(transport)?;
        let (head, mut reply) = response.await.map_err(transport)?.into_parts();
        if !head.status.is_success() {
            return Err(Status::unknown(format!("HTTP status {}", head.status)));
        }
        // A reply without a message carries its status in the headers.
        if let Some(status) = grpc_status(&head.headers) {
            return Err(status);
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = reply.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = reply.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
        }
        let trailers = reply.trailers().await.map_err(transport)?;
        if let Some(status) = trailers.as_ref().and_then(grpc_status) {
            return Err(status);
        }
        if message.len() < PREFIX {
            return Err(Status::internal("reply without a message"));
        }
        let mut message = message.freeze();
        let compressed = message.get_u8();
        let len = message.get_u32() as usize;
        if compressed != 0 || len != message.len() {
            return Err(Status::internal("malformed reply message"));
        }
        Resp::decode(message).map_err(|e| Status::internal(format!("decoding the reply: {e}")))
    }
}

/// The status in `headers`, unless it is OK or absent.
fn grpc_status(headers: &HeaderMap) -> Option<Status> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Status::new(Code::from(code), message))
}

/// gRPC percent-encodes `grpc-message`.
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn transport(e: h2::Error) -> Status {
    Status::unavailable(format!("transport: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decode(b"etcdserver: %22mvcc%22 %E2%9C%93"),
            "etcdserver: \"mvcc\" \u{2713}"
        );
        assert_eq!(percent_decode(b"100%"), "100%");
    }

    #[test]
    fn an_ok_or_missing_status_is_no_error() {
        let mut h = HeaderMap::new();
        assert!(grpc_status(&h).is_none());
        h.insert("grpc-status", "0".parse().unwrap());
        assert!(grpc_status(&h).is_none());
        h.insert("grpc-status", "9".parse().unwrap());
        h.insert("grpc-message", "etcdserver:%20mvcc".parse().unwrap());
        let s = grpc_status(&h).unwrap();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "etcdserver: mvcc");
    }
}
