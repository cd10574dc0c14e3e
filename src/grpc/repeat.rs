//! Answers a repeated `Authorize` or `BatchAuthorize` call before it is
//! decoded.
//!
//! A sidecar's callers ask the same questions over and over, and a client
//! library encodes the same request into the same bytes every time. This
//! layer sits in front of the generated `Authorizer` service: for either
//! call it reads the request's one message (when it is small, uncompressed
//! and alone in its stream) and looks its bytes up in the decision cache.
//! An entry made against the current snapshot is sent back as it was
//! encoded when the request was first answered: no decoding, no
//! conversion, no key to build, no response to copy or encode. Anything
//! else (a miss, a longer or compressed message, a malformed stream) goes
//! to the service with the bytes already read put back in front of the
//! rest, so the service sees the stream exactly as it came; on a miss the
//! message's bytes go with it ([`EncodedRequest`]) and the handler keeps
//! the encoded answer under them once it has answered (a batch only when
//! every item's answer may be kept: none read the time).
//!
//! The same bytes always decode to the same request (the decoder is a
//! function of them), and an entry answers only the revision it was decided
//! at (`grpc::decisions`): a hit is the answer the handler would give. The
//! layer steps aside whenever the handler would do more than answer: when
//! the decision log is on (it records each request), when debug logging is
//! on (a span per call), and when the cache is off. A hit is counted as the
//! handler counts a call: the RPC's latency and code, each decision, and
//! the cache hit.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;

use super::decisions::{self, Call, Reply};
use super::service::{code_label, Shared};

/// The calls answered here, by path, and their names in the metrics.
const CALLS: [(&str, Call, &str); 2] = [
    ("/tagward.v1.Authorizer/Authorize", Call::Authorize, "Authorize"),
    ("/tagward.v1.Authorizer/BatchAuthorize", Call::BatchAuthorize, "BatchAuthorize"),
];

/// The bytes of a gRPC message's frame header: a compression flag and a
/// 32-bit big-endian length.
const FRAME_HEADER: usize = 5;

/// The most of a stream read before it is passed on undecided: one frame
/// whose message could be a key.
const MOST_READ: usize = FRAME_HEADER + decisions::MAX_KEY_BYTES;

/// The encoded request message of a call this layer could not answer, in
/// the request's extensions: the handler keeps its answer under it (see
/// `service::decide` and `service::remember_batch`).
#[derive(Debug, Clone)]
pub struct EncodedRequest(pub Bytes);

/// A message encoded in a gRPC frame of its own: the header, then the
/// message, written once into one buffer.
pub fn framed(message: &impl prost::Message) -> Option<Bytes> {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(FRAME_HEADER + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).ok()?);
    message.encode(&mut out).ok()?;
    Some(out.freeze())
}

/// The `Authorizer` service with repeated calls answered in front of it.
#[derive(Clone)]
pub struct Repeat<S> {
    inner: S,
    shared: Shared,
}

impl<S> Repeat<S> {
    pub fn new(inner: S, shared: Shared) -> Repeat<S> {
        Repeat { inner, shared }
    }

    /// The call, and its name, when it is one the layer may answer.
    fn applies(&self, req: &http::Request<Body>) -> Option<(Call, &'static str)> {
        let (_, call, name) = CALLS.iter().find(|(path, ..)| req.uri().path() == *path)?;
        (self.shared.decisions.is_some()
            && self.shared.decision_log.is_none()
            && !tracing::level_enabled!(tracing::Level::DEBUG)
            && req.headers().get("grpc-encoding").is_none_or(|e| e.as_bytes() == b"identity"))
        .then_some((*call, *name))
    }
}

impl<S: NamedService> NamedService for Repeat<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Repeat<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; a clone
        // stays for the next one.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let Some((call, name)) = self.applies(&req) else {
            return Box::pin(inner.call(req));
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            let started = Instant::now();
            let (mut parts, body) = req.into_parts();
            let (read, rest) = read_message(body).await;
            if let Read::Message { message, .. } = &read {
                if let Some(answer) = answer(&shared, call, name, message, started) {
                    return Ok(answer);
                }
                parts.extensions.insert(EncodedRequest(message.clone()));
            }
            let body = Replayed { buffered: read.into_frames(), rest };
            inner.call(http::Request::from_parts(parts, Body::new(body))).await
        })
    }
}

/// What was read of a request stream.
enum Read {
    /// One whole uncompressed message, no more (`frame` is what was read,
    /// `message` the part after the header).
    Message { frame: Bytes, message: Bytes },
    /// Anything else, as read: the data so far, then (when it is why the
    /// reading stopped) a frame that is not data, or the stream's error.
    Other { data: Bytes, then: Option<Result<Frame<Bytes>, Status>> },
}

impl Read {
    /// What was read, to be read again.
    fn into_frames(self) -> VecDeque<Result<Frame<Bytes>, Status>> {
        let (data, then) = match self {
            Read::Message { frame, .. } => (frame, None),
            Read::Other { data, then } => (data, then),
        };
        let mut out = VecDeque::with_capacity(2);
        if !data.is_empty() {
            out.push_back(Ok(Frame::data(data)));
        }
        out.extend(then);
        out
    }
}

/// Reads `body` until it holds one whole message, ends, or passes
/// [`MOST_READ`] bytes, whichever comes first.
async fn read_message(mut body: Body) -> (Read, Body) {
    let mut data = BytesMut::new();
    loop {
        match seen(&data) {
            Seen::Whole(len) if len == data.len() => {
                let frame = data.freeze();
                let message = frame.slice(FRAME_HEADER..);
                return (Read::Message { frame, message }, body);
            }
            // More than one message in a unary call (the service says
            // so), or a message this layer does not look up.
            Seen::Whole(_) | Seen::Unanswerable => break,
            Seen::Partial if data.len() > MOST_READ => break,
            Seen::Partial => {}
        }
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => return (Read::Other { data: data.freeze(), then: Some(Ok(frame)) }, body),
            },
            Some(Err(status)) => return (Read::Other { data: data.freeze(), then: Some(Err(status)) }, body),
        }
    }
    (Read::Other { data: data.freeze(), then: None }, body)
}

/// What the start of a request stream shows.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Not yet a whole first frame.
    Partial,
    /// A whole first frame, uncompressed and short enough to be a key, of
    /// this many bytes (header included).
    Whole(usize),
    /// A first frame that is compressed or too long to be a key.
    Unanswerable,
}

fn seen(data: &[u8]) -> Seen {
    let Some(&[flag, a, b, c, d]) = data.get(..FRAME_HEADER) else {
        return Seen::Partial;
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if flag != 0 || len >= decisions::MAX_KEY_BYTES {
        Seen::Unanswerable
    } else if data.len() >= FRAME_HEADER + len {
        Seen::Whole(FRAME_HEADER + len)
    } else {
        Seen::Partial
    }
}

/// The remembered answer to `message` (sent to `call`, named `name` in the
/// metrics) against the current snapshot, as a whole gRPC response,
/// counted as the handler counts one.
fn answer(shared: &Shared, call: Call, name: &'static str, message: &[u8], started: Instant) -> Option<http::Response<Body>> {
    let cache = shared.decisions.as_deref()?;
    let key = decisions::message_key(call, message)?;
    let hit = cache.get(&key, shared.store.revision());
    shared.meters.decision_cache(hit.is_some());
    let hit = hit?;
    let Reply::Encoded { reasons, frame } = &hit.reply else {
        return None;
    };
    for reason in reasons.iter() {
        shared.meters.reason(*reason);
    }
    let (index, code) = code_label(Code::Ok);
    shared.meters.rpc(name, started.elapsed(), index, code);
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [Ok::<_, Status>(Frame::data(frame.clone())), Ok(Frame::trailers(trailers))];
    let mut response = http::Response::new(Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames))));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Some(response)
}

/// A request body with what was already read of it in front.
struct Replayed {
    buffered: VecDeque<Result<Frame<Bytes>, Status>>,
    rest: Body,
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.buffered.pop_front() {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn a_response_is_framed_as_grpc_frames_it() {
        let response = super::super::proto::AuthorizeResponse { revision: 7, ..Default::default() };
        let frame = framed(&response).expect("a frame");
        assert_eq!(&frame[..], &frame_of(&prost::Message::encode_to_vec(&response))[..]);
    }

    #[test]
    fn a_whole_frame_is_found() {
        let f = frame_of(b"abc");
        assert_eq!(seen(&f), Seen::Whole(8));
        assert_eq!(seen(&f[..7]), Seen::Partial, "not yet whole");
        assert_eq!(seen(&f[..3]), Seen::Partial, "no header yet");
        let mut two = f.clone();
        two.extend_from_slice(&f);
        assert_eq!(seen(&two), Seen::Whole(8), "the first of two");
        let mut compressed = f.clone();
        compressed[0] = 1;
        assert_eq!(seen(&compressed), Seen::Unanswerable, "compressed");
        let long = frame_of(&vec![0u8; decisions::MAX_KEY_BYTES]);
        assert_eq!(seen(&long[..10]), Seen::Unanswerable, "too long to be a key, known from its header");
    }

    fn body_of(chunks: Vec<Result<Frame<Bytes>, Status>>) -> Body {
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(chunks)))
    }

    async fn replayed(read: Read, rest: Body) -> Vec<u8> {
        let body = Replayed { buffered: read.into_frames(), rest };
        match body.collect().await {
            Ok(all) => all.to_bytes().to_vec(),
            Err(s) => panic!("{s}"),
        }
    }

    #[tokio::test]
    async fn a_message_in_pieces_is_read_whole_and_given_back_unchanged() {
        let f = frame_of(b"hello, world");
        let chunks = f.chunks(3).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let (read, rest) = read_message(body_of(chunks)).await;
        let Read::Message { message, .. } = &read else { panic!("one whole message") };
        assert_eq!(&message[..], b"hello, world");
        assert_eq!(replayed(read, rest).await, f);
    }

    #[tokio::test]
    async fn anything_else_is_given_back_unchanged() {
        let f = frame_of(b"one");
        let mut two = f.clone();
        two.extend_from_slice(&f);
        let long = frame_of(&vec![7u8; 3 * decisions::MAX_KEY_BYTES]);
        for stream in [two, long, f[..6].to_vec(), Vec::new()] {
            let chunks = stream.chunks(1000).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
            let (read, rest) = read_message(body_of(chunks)).await;
            assert!(matches!(read, Read::Other { .. }), "{} bytes", stream.len());
            assert_eq!(replayed(read, rest).await, stream);
        }
    }

    #[tokio::test]
    async fn an_error_in_the_stream_is_passed_on() {
        let chunks = vec![Ok(Frame::data(Bytes::from_static(&[0, 0]))), Err(Status::cancelled("gone"))];
        let (read, rest) = read_message(body_of(chunks)).await;
        let body = Replayed { buffered: read.into_frames(), rest };
        let err = body.collect().await.err().map(|s| s.code());
        assert_eq!(err, Some(Code::Cancelled));
    }
}
