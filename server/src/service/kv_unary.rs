//! The KV service's unary calls served straight from the HTTP/2 request.
//!
//! Range, Put, DeleteRange, Txn and Compact are nearly all of a busy
//! member's traffic. tonic's generic server path costs each of them a second
//! router, a streaming decoder and an encoder with buffers of their own, and
//! several boxed body layers: about a tenth of a member's CPU under a put
//! load (see BENCHMARKS.md). Here a request whose body is one plain gRPC
//! message is decoded from the bytes received, handed to the same
//! [`KvService`] methods as tonic's service calls, and answered with one
//! data frame and the `grpc-status` trailer, as tonic answers. Anything else (a compressed or malformed message, one
//! above the size limit, several) goes to tonic's service unchanged, so its
//! errors stay exactly tonic's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tessera_proto::etcdserverpb::kv_server::KvServer;
use tonic::Status;
use tower::ServiceExt;

use super::kv::KvService;
use crate::auth::{AuthInfo, Credentials};
use crate::tls::ClientConn;

/// gRPC's message prefix: a compressed flag and a big-endian length.
const PREFIX_LEN: usize = 5;

struct Shared {
    kv: KvService,
    /// tonic's own service, for every request this path does not take.
    tonic: KvServer<KvService>,
    /// The largest message accepted (`--max-request-bytes` plus etcd's
    /// allowance for framing), as tonic's `max_decoding_message_size`.
    max_message: usize,
}

/// The KV unary calls' handler. `server::serve_on` hands it every request
/// whose path names one of them ([`Method::of_path`]) before axum's router
/// sees it: that router's route matching and boxed service layers cost
/// about 5% of a member's CPU under a put load.
#[derive(Clone)]
pub struct KvUnary {
    shared: Arc<Shared>,
}

/// The answer to a request this handler took.
pub type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

impl KvUnary {
    pub fn new(kv: KvService, max_message: usize) -> Self {
        KvUnary {
            shared: Arc::new(Shared {
                tonic: KvServer::new(kv.clone()).max_decoding_message_size(max_message),
                kv,
                max_message,
            }),
        }
    }

    /// Answers `req`, a call of `method` on connection `conn`.
    pub fn call<B>(&self, method: Method, req: Request<B>, conn: ClientConn) -> Answer
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let shared = self.shared.clone();
        match method {
            Method::Range => Box::pin(async move {
                serve(&shared, req, conn, |kv, who, r| async move {
                    kv.do_range(who.as_ref(), r).await
                })
                .await
            }),
            Method::Put => Box::pin(async move {
                serve(&shared, req, conn, |kv, who, r| async move {
                    kv.do_put(who.as_ref(), r).await
                })
                .await
            }),
            Method::DeleteRange => Box::pin(async move {
                serve(&shared, req, conn, |kv, who, r| async move {
                    kv.do_delete_range(who.as_ref(), r).await
                })
                .await
            }),
            Method::Txn => Box::pin(async move {
                serve(&shared, req, conn, |kv, who, r| async move {
                    kv.do_txn(who.as_ref(), r).await
                })
                .await
            }),
            Method::Compact => Box::pin(async move {
                serve(&shared, req, conn, |kv, who, r| async move {
                    kv.do_compact(who.as_ref(), r).await
                })
                .await
            }),
        }
    }
}

/// The KV unary methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Range,
    Put,
    DeleteRange,
    Txn,
    Compact,
}

impl Method {
    /// The method a request to `path` calls, if it is one of these.
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/etcdserverpb.KV/Range" => Some(Method::Range),
            "/etcdserverpb.KV/Put" => Some(Method::Put),
            "/etcdserverpb.KV/DeleteRange" => Some(Method::DeleteRange),
            "/etcdserverpb.KV/Txn" => Some(Method::Txn),
            "/etcdserverpb.KV/Compact" => Some(Method::Compact),
            _ => None,
        }
    }
}

async fn serve<B, Req, Resp, F, Fut>(
    shared: &Shared,
    req: Request<B>,
    conn: ClientConn,
    call: F,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(KvService, Option<AuthInfo>, Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let (parts, body) = req.into_parts();
    let body = match read_one_message(Body::new(body), shared.max_message).await {
        Ok(Received::Message(message)) => match Req::decode(message.slice(PREFIX_LEN..)) {
            // The same calls as tonic's service makes (`Kv for KvService`),
            // without a tonic::Request around them.
            Ok(decoded) => {
                let creds = Credentials::of_http(&parts.headers, Some(&conn));
                let answer = match shared.kv.caller(&creds) {
                    Ok(who) => call(shared.kv.clone(), who, decoded).await,
                    Err(status) => Err(status),
                };
                return respond(answer);
            }
            Err(_) => Body::from(message),
        },
        Ok(Received::Other(body)) => body,
        // The client reset the stream: nobody reads the answer.
        Err(e) => return Status::cancelled(e.to_string()).into_http(),
    };
    let mut req = Request::from_parts(parts, body);
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(conn));
    let answer = shared.tonic.clone().oneshot(req);
    match answer.await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    }
}

/// What a request's body held.
enum Received {
    /// Exactly one uncompressed message within the size limit, prefix included.
    Message(Bytes),
    /// Anything else, as a body that yields every byte sent.
    Other(Body),
}

/// Reads `body` to its end, unless it grows past one message of
/// `max_message` bytes; then what was read goes back in front of the rest.
async fn read_one_message(mut body: Body, max_message: usize) -> Result<Received, axum::Error> {
    let mut received: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers end a request as its end of stream does.
        let Ok(data) = frame?.into_data() else {
            break;
        };
        match received.take() {
            // The usual case: the whole message in one DATA frame, not copied.
            None if joined.is_empty() => received = Some(data),
            first => {
                joined.extend_from_slice(&first.unwrap_or_default());
                joined.extend_from_slice(&data);
            }
        }
        let length = received.as_ref().map_or(joined.len(), Bytes::len);
        if length > PREFIX_LEN + max_message {
            let read = received.unwrap_or_else(|| joined.freeze());
            let rest =
                futures::stream::once(async move { Ok(read) }).chain(body.into_data_stream());
            return Ok(Received::Other(Body::from_stream(rest)));
        }
    }
    let bytes = received.unwrap_or_else(|| joined.freeze());
    if is_one_plain_message(&bytes, max_message) {
        Ok(Received::Message(bytes))
    } else {
        Ok(Received::Other(Body::from(bytes)))
    }
}

/// Whether `bytes` is one uncompressed gRPC message of at most
/// `max_message` bytes, prefix included.
fn is_one_plain_message(bytes: &[u8], max_message: usize) -> bool {
    let mut prefix = bytes;
    if prefix.len() < PREFIX_LEN || prefix.get_u8() != 0 {
        return false;
    }
    let length = prefix.get_u32() as usize;
    length <= max_message && length == bytes.len() - PREFIX_LEN
}

/// The gRPC answer to a call: one message and the OK trailer, or tonic's
/// trailers-only error response.
fn respond<Resp: Message>(result: Result<Resp, Status>) -> Response<Body> {
    let message = match result {
        Ok(message) => message,
        Err(status) => return status.into_http(),
    };
    let length = message.encoded_len();
    let mut framed = BytesMut::with_capacity(PREFIX_LEN + length);
    framed.put_u8(0);
    framed.put_u32(length as u32);
    if message.encode(&mut framed).is_err() {
        return Status::internal("response did not fit its own encoded length").into_http();
    }
    let mut answer = Response::new(Body::new(OneMessage {
        message: Some(framed.freeze()),
        trailers_sent: false,
    }));
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    answer
}

/// A response body of one framed message, then `grpc-status: 0`.
struct OneMessage {
    message: Option<Bytes>,
    trailers_sent: bool,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        self.trailers_sent = true;
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn only_the_kv_unary_paths_are_taken() {
        assert_eq!(Method::of_path("/etcdserverpb.KV/Put"), Some(Method::Put));
        assert_eq!(Method::of_path("/etcdserverpb.KV/Txn"), Some(Method::Txn));
        for other in [
            "/etcdserverpb.KV/Nope",
            "/etcdserverpb.Watch/Watch",
            "/health",
            "/",
        ] {
            assert_eq!(Method::of_path(other), None, "{other}");
        }
    }

    #[test]
    fn only_one_plain_message_within_the_limit_takes_this_path() {
        assert!(is_one_plain_message(&framed(0, b"abc"), 3));
        assert!(is_one_plain_message(&framed(0, b""), 3));
        // Too large, compressed, two messages, truncated, no prefix.
        assert!(!is_one_plain_message(&framed(0, b"abcd"), 3));
        assert!(!is_one_plain_message(&framed(1, b"abc"), 3));
        let two = [framed(0, b"a"), framed(0, b"b")].concat();
        assert!(!is_one_plain_message(&two, 3));
        assert!(!is_one_plain_message(&framed(0, b"abc")[..6], 3));
        assert!(!is_one_plain_message(&[0, 0], 3));
    }

    #[tokio::test]
    async fn a_message_split_over_frames_is_joined_and_an_oversized_one_passes_on_whole() {
        let message = framed(0, &[7; 100]);
        let chunks: Vec<Result<Bytes, Infallible>> = message
            .chunks(30)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body = Body::from_stream(futures::stream::iter(chunks.clone()));
        match read_one_message(body, 100).await.unwrap() {
            Received::Message(bytes) => assert_eq!(bytes, message),
            Received::Other(_) => panic!("one message within the limit"),
        }
        // Above the limit: every byte still reaches tonic, in order.
        let body = Body::from_stream(futures::stream::iter(chunks));
        match read_one_message(body, 40).await.unwrap() {
            Received::Message(_) => panic!("a message above the limit"),
            Received::Other(rest) => {
                let all = rest.collect().await.unwrap().to_bytes();
                assert_eq!(all, message);
            }
        }
    }
}
