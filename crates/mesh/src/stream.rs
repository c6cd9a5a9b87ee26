use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use muster_tls::{MeshTls, ServiceName, SpiffeId, cert_not_after, peer_spiffe_id};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// A slow or silent peer gets this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes under way at once, from one address and in all. Each
/// holds a task and a descriptor for up to [`HANDSHAKE_TIMEOUT`] before
/// the peer has shown any certificate; past these bounds a connection is
/// closed as soon as it is accepted. A mesh client opens a handful of
/// connections (HTTP/2 carries its calls), so only a peer that opens
/// sockets and says nothing meets them.
pub const HANDSHAKES_PER_ADDRESS: usize = 32;
const HANDSHAKES: usize = 1024;

/// The address a peer's handshakes count under: an IPv6 peer by its /64,
/// since one host may hold a whole network of addresses.
fn counted_as(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(network.into())
        }
        v4 => v4,
    }
}

/// Counts the handshakes under way, by the peer's address.
#[derive(Default)]
struct Handshakes {
    under_way: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
}

/// One handshake's place among those under way; given back when dropped.
struct Handshaking {
    handshakes: Arc<Handshakes>,
    ip: std::net::IpAddr,
}

impl Handshakes {
    fn begin(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Handshaking> {
        let mut guard = self.under_way.lock().expect("handshakes lock");
        let (total, by_address) = &mut *guard;
        let of_address = by_address.get(&ip).copied().unwrap_or(0);
        if *total >= HANDSHAKES || of_address >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        by_address.insert(ip, of_address + 1);
        *total += 1;
        Some(Handshaking {
            handshakes: self.clone(),
            ip,
        })
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut guard = self.handshakes.under_way.lock().expect("handshakes lock");
        let (total, by_address) = &mut *guard;
        *total -= 1;
        if let Some(of_address) = by_address.get_mut(&self.ip) {
            *of_address -= 1;
            if *of_address == 0 {
                by_address.remove(&self.ip);
            }
        }
    }
}

/// What the mesh knows of the peer of a connection; every request on it
/// carries a copy in its extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// From the verified client certificate.
    pub spiffe_id: Option<SpiffeId>,
    /// When that certificate expires (seconds since the epoch): a
    /// connection outlives the handshake that checked it, and its calls
    /// stop being served then.
    pub not_after: Option<i64>,
}

impl PeerInfo {
    pub fn service(&self) -> Option<ServiceName> {
        self.spiffe_id.as_ref()?.service()
    }

    /// Whether the certificate the connection was opened with has expired
    /// since, by the wall clock.
    pub fn certificate_expired(&self) -> bool {
        self.not_after
            .is_some_and(|not_after| unix_now() > not_after)
    }
}

/// An accepted, handshaken connection. It ends when the certificate it
/// was opened with expires: the handshake that checked it is long past,
/// and there is no revocation list, so expiry is the cut-off. A peer that
/// renewed its certificate connects again with the new one.
pub(crate) struct MeshStream {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Connections whose certificate lasts longer than this are not timed
/// (the timer's range); the call check in `authorize` still holds.
const LONGEST_TIMED: Duration = Duration::from_secs(2 * 365 * 86_400);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn expiry_timer(not_after: Option<i64>) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let now = unix_now();
    let left = Duration::from_secs(u64::try_from(not_after?.saturating_sub(now)).unwrap_or(0));
    (left < LONGEST_TIMED).then(|| Box::pin(tokio::time::sleep(left)))
}

impl Connected for MeshStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Polled while the connection waits for data too, so an idle one
        // ends at the expiry, not at its next request. The timer's clock
        // stops while the machine sleeps, so the wall clock is asked too
        // (the client's keep-alive pings bring a read at least every 30 s).
        if let Some(expires) = self.expires.as_mut()
            && expires.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
        if self.peer.certificate_expired() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts until `shutdown`, handshaking each connection in its own task so
/// one stalled peer cannot hold up the others. A failed handshake never
/// reaches the server.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<MeshTls>,
    service: ServiceName,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<MeshStream>> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(Handshakes::default());
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of descriptors and the like: back off, don't spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(handshaking) = handshakes.begin(counted_as(remote.ip())) else {
                metrics::counter!("muster_mesh_handshakes_refused_total", "service" => service.as_str()).increment(1);
                tracing::debug!(%remote, "too many tls handshakes under way: closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshaking);
                match handshake {
                    Ok(Ok(stream)) => {
                        let leaf = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first());
                        let peer = PeerInfo {
                            remote_addr: Some(remote),
                            spiffe_id: leaf.and_then(peer_spiffe_id),
                            not_after: leaf.and_then(cert_not_after),
                        };
                        let expires = expiry_timer(peer.not_after);
                        let _ = tx
                            .send(Ok(MeshStream {
                                inner: stream,
                                peer,
                                expires,
                            }))
                            .await;
                    }
                    Ok(Err(error)) => {
                        metrics::counter!("muster_mesh_handshake_failures_total", "service" => service.as_str()).increment(1);
                        tracing::debug!(%remote, %error, "tls handshake refused");
                    }
                    Err(_) => {
                        metrics::counter!("muster_mesh_handshake_failures_total", "service" => service.as_str()).increment(1);
                        tracing::debug!(%remote, "tls handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_ipv6_peer_counts_by_its_network() {
        let a = super::counted_as("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = super::counted_as("2001:db8:1:2:bbbb::9".parse().unwrap());
        let other = super::counted_as("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, other);
        let v4 = super::counted_as("::ffff:10.0.0.7".parse().unwrap());
        assert_eq!(v4, "10.0.0.7".parse::<std::net::IpAddr>().unwrap());
    }
}
