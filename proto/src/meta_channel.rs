//! A gRPC channel to a meta group: every meta client's transport.
//!
//! It takes the group's addresses (`host:port,host:port,...`). A call goes
//! to the member that answered last. A member that does not lead answers
//! UNAVAILABLE with the leader's address in the `ironblock-meta-leader`
//! header: the call follows it at once (to an address not in the list too).
//! A member that is unreachable, or knows no leader (an election), sends
//! the call to the next one, with a backoff of 25 ms doubling to 200 ms once
//! every member was tried. The call is retried for at most
//! [`MetaChannel::retry_for`] (and never past the caller's own timeout,
//! which drops it). A retried call may have taken effect already: meta's
//! mutations are idempotent for that (see meta.proto).
//!
//! Requests are buffered to be replayed: meta's calls all send one message.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

/// The response header naming the leader (see meta.proto).
pub const LEADER_HEADER: &str = "ironblock-meta-leader";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a channel is built for one address.
type Configure = Arc<dyn Fn(Endpoint) -> Endpoint + Send + Sync>;

struct Member {
    addr: String,
    channel: Channel,
}

struct Inner {
    members: Mutex<Vec<Member>>,
    current: AtomicUsize,
    configure: Configure,
    retry_for: Duration,
}

/// See the module doc.
#[derive(Clone)]
pub struct MetaChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MetaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaChannel")
            .field("members", &self.addrs())
            .field("current", &self.current_addr())
            .finish()
    }
}

/// A bad meta address list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAddress {
    /// The address as given.
    pub addr: String,
    /// Why it is not usable.
    pub reason: String,
}

impl std::fmt::Display for BadAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "meta address {:?}: {}", self.addr, self.reason)
    }
}

impl std::error::Error for BadAddress {}

/// `http://` + `addr` unless it has a scheme.
pub fn meta_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The addresses of a comma-separated list (blanks dropped).
pub fn split_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

fn lazy(addr: &str, configure: &Configure) -> Result<Channel, BadAddress> {
    let ep = Endpoint::from_shared(meta_uri(addr)).map_err(|e| BadAddress {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(configure(ep).connect_lazy())
}

impl MetaChannel {
    /// A channel to the meta group at `addrs` (comma-separated
    /// `host:port` or URLs), each member's endpoint set up by `configure`
    /// (timeouts, TCP options), connecting lazily; a call is retried for at
    /// most `retry_for`. Must be called within a tokio runtime.
    pub fn new(
        addrs: &str,
        retry_for: Duration,
        configure: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static,
    ) -> Result<MetaChannel, BadAddress> {
        let configure: Configure = Arc::new(configure);
        let list = split_addrs(addrs);
        if list.is_empty() {
            return Err(BadAddress {
                addr: addrs.to_string(),
                reason: "no meta address given".into(),
            });
        }
        let mut members = Vec::new();
        for a in list {
            let channel = lazy(&a, &configure)?;
            members.push(Member { addr: a, channel });
        }
        Ok(MetaChannel {
            inner: Arc::new(Inner {
                members: Mutex::new(members),
                current: AtomicUsize::new(0),
                configure,
                retry_for,
            }),
        })
    }

    /// The two channels of a daemon (a chunk, a redirector) whose calls
    /// are all quick: one for calls, each attempt bounded by
    /// `timeout.min(1 s)` (so an attempt that hangs on a frozen leader gives
    /// way to the next member) and the call by `timeout`; one for
    /// `WatchRevisions`, with no per-attempt bound (the stream lives as long
    /// as the leader). A dead member costs at most a 500 ms connect.
    pub fn for_daemon(
        addrs: &str,
        timeout: Duration,
    ) -> Result<(MetaChannel, MetaChannel), BadAddress> {
        let connect = timeout.min(Duration::from_millis(500));
        let attempt = timeout.min(Duration::from_secs(1));
        let calls = MetaChannel::new(addrs, timeout, move |e| {
            e.connect_timeout(connect)
                .tcp_nodelay(true)
                .timeout(attempt)
        })?;
        let watch = MetaChannel::new(addrs, timeout, move |e| {
            e.connect_timeout(connect).tcp_nodelay(true)
        })?;
        Ok((calls, watch))
    }

    /// The longest a call is retried.
    pub fn retry_for(&self) -> Duration {
        self.inner.retry_for
    }

    /// The member calls go to now.
    pub fn current_addr(&self) -> String {
        let i = self.inner.current.load(Ordering::Relaxed);
        self.inner
            .members
            .lock()
            .ok()
            .and_then(|m| m.get(i).map(|m| m.addr.clone()))
            .unwrap_or_default()
    }

    /// Every member address known (the list, then leader hints).
    pub fn addrs(&self) -> Vec<String> {
        self.inner
            .members
            .lock()
            .map(|m| m.iter().map(|m| m.addr.clone()).collect())
            .unwrap_or_default()
    }

    fn pick(&self, i: usize) -> Option<(usize, Channel)> {
        let m = self.inner.members.lock().ok()?;
        if m.is_empty() {
            return None;
        }
        let i = i % m.len();
        Some((i, m[i].channel.clone()))
    }

    fn len(&self) -> usize {
        self.inner
            .members
            .lock()
            .map(|m| m.len())
            .unwrap_or(1)
            .max(1)
    }

    /// The index of `addr`, added if it is new.
    fn index_of(&self, addr: &str) -> Option<usize> {
        let mut m = self.inner.members.lock().ok()?;
        let norm = |a: &str| a.trim_start_matches("http://").to_string();
        if let Some(i) = m.iter().position(|x| norm(&x.addr) == norm(addr)) {
            return Some(i);
        }
        let channel = lazy(addr, &self.inner.configure).ok()?;
        m.push(Member {
            addr: addr.to_string(),
            channel,
        });
        Some(m.len() - 1)
    }
}

/// What the response of one attempt says to do.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Give it to the caller.
    Done,
    /// Not the leader: go to this address.
    Leader(String),
    /// UNAVAILABLE without a hint: try another member after a pause.
    Elsewhere,
}

/// Decide from a response's headers (a trailers-only gRPC error carries its
/// status there).
fn next_step(headers: &http::HeaderMap) -> Next {
    let unavailable = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "14");
    if !unavailable {
        return Next::Done;
    }
    match headers.get(LEADER_HEADER).and_then(|v| v.to_str().ok()) {
        Some(l) if !l.trim().is_empty() => Next::Leader(l.trim().to_string()),
        _ => Next::Elsewhere,
    }
}

fn rebuild(parts: &http::request::Parts, body: &Bytes) -> http::Request<Body> {
    let mut b = http::Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    b.body(Body::new(http_body_util::Full::new(body.clone())))
        .unwrap_or_else(|_| http::Request::new(Body::empty()))
}

impl tower::Service<http::Request<Body>> for MetaChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let deadline = tokio::time::Instant::now() + me.inner.retry_for;
            let mut backoff = Duration::from_millis(25);
            let mut i = me.inner.current.load(Ordering::Relaxed);
            // Members tried since the last pause.
            let mut tried = 0usize;
            loop {
                let Some((at, channel)) = me.pick(i) else {
                    return Err("no meta address".into());
                };
                let res = channel.oneshot(rebuild(&parts, &body)).await;
                let last_chance = tokio::time::Instant::now() >= deadline;
                let step = match &res {
                    Ok(r) => next_step(r.headers()),
                    Err(_) => Next::Elsewhere,
                };
                match step {
                    Next::Done => {
                        me.inner.current.store(at, Ordering::Relaxed);
                        return res.map_err(Into::into);
                    }
                    _ if last_chance => return res.map_err(Into::into),
                    Next::Leader(addr) => {
                        match me.index_of(&addr) {
                            Some(j) if j != at => i = j,
                            // A hint naming the member that sent it: wait.
                            _ => {
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_millis(200));
                                i = at + 1;
                            }
                        }
                        tracing::debug!(leader = %addr, "meta: following the leader hint");
                    }
                    Next::Elsewhere => {
                        tried += 1;
                        if tried >= me.len() {
                            tried = 0;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(200));
                        }
                        i = at + 1;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_follows_status_and_hint() {
        let mut h = http::HeaderMap::new();
        assert_eq!(next_step(&h), Next::Done);
        h.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(next_step(&h), Next::Done);
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(next_step(&h), Next::Done);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(next_step(&h), Next::Elsewhere);
        h.insert(LEADER_HEADER, "10.0.0.2:7000".parse().unwrap());
        assert_eq!(next_step(&h), Next::Leader("10.0.0.2:7000".into()));
    }

    #[test]
    fn address_lists() {
        assert_eq!(split_addrs(" a:1, ,b:2,"), vec!["a:1", "b:2"]);
        assert_eq!(meta_uri("a:1"), "http://a:1");
        assert_eq!(meta_uri("https://a:1"), "https://a:1");
    }

    #[tokio::test]
    async fn hints_add_members_and_bad_lists_are_refused() {
        let t = Duration::from_millis(5);
        assert!(MetaChannel::new(" , ", t, |e| e).is_err());
        let c = MetaChannel::new("127.0.0.1:1,127.0.0.1:2", t, |e| e).unwrap();
        assert_eq!(c.index_of("127.0.0.1:2"), Some(1));
        assert_eq!(c.index_of("http://127.0.0.1:1"), Some(0));
        assert_eq!(c.index_of("127.0.0.1:3"), Some(2));
        assert_eq!(c.addrs().len(), 3);
        assert_eq!(c.retry_for(), t);
        assert_eq!(c.current_addr(), "127.0.0.1:1");
    }
}
