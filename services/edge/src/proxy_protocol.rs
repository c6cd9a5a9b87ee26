//! The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer that
//! passes TCP through (AWS NLB, GCP's TCP proxy, HAProxy in `mode tcp`)
//! can start each connection with a header naming the client's address,
//! which the edge would otherwise never see. Read only from trusted
//! proxies, and from them it is required: a connection from one that does
//! not start with a header is dropped, since anyone who can reach the
//! edge through that proxy could otherwise write one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a trusted proxy has to send its header.
pub(crate) const HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// Version 2's signature: its first 12 bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 1's longest header, `\r\n` included (the specification's).
const V1_MAX: usize = 107;

/// The most address and TLV bytes a version 2 header may carry here.
/// Load balancers add a few TLVs (a VPC endpoint id, a TLS summary); a
/// header longer than this is refused rather than buffered.
const V2_MAX_PAYLOAD: usize = 4096;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    /// Relayed for a client at this address.
    Proxied(SocketAddr),
    /// The proxy's own connection (version 2 `LOCAL`, as health checks
    /// send), or a source the header does not give as an IP address
    /// (`UNKNOWN`, `AF_UNSPEC`, `AF_UNIX`): the socket's address stands.
    Local,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    /// The proxy closed without sending anything (a TCP health check).
    #[error("closed before a PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Reads one header from the start of `io`, and not a byte past it: what
/// follows (a TLS handshake, an HTTP request) is left for the next reader.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<Header, HeaderError> {
    // Both versions are told apart by their first 8 bytes, and neither's
    // shortest header (`PROXY UNKNOWN\r\n`, 15 bytes) is shorter.
    let mut start = [0u8; 8];
    let first = io.read(&mut start).await?;
    if first == 0 {
        return Err(HeaderError::Closed);
    }
    io.read_exact(&mut start[first..]).await?;
    if start == V2_SIGNATURE[..8] {
        let mut rest = [0u8; 8];
        io.read_exact(&mut rest).await?;
        if rest[..4] != V2_SIGNATURE[8..] {
            return Err(HeaderError::Malformed("bad version 2 signature"));
        }
        let length = usize::from(u16::from_be_bytes([rest[6], rest[7]]));
        if length > V2_MAX_PAYLOAD {
            return Err(HeaderError::Malformed("version 2 header too long"));
        }
        let mut payload = vec![0u8; length];
        io.read_exact(&mut payload).await?;
        return v2(rest[4], rest[5], &payload);
    }
    if !start.starts_with(b"PROXY ") {
        return Err(HeaderError::Malformed("no PROXY header"));
    }
    // Byte by byte up to the line's end, so that nothing after it is read.
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() == V1_MAX {
            return Err(HeaderError::Malformed("version 1 header too long"));
        }
        line.push(io.read_u8().await?);
    }
    v1(&line[..line.len() - 2])
}

/// `PROXY TCP4|TCP6 <source> <destination> <source port> <destination
/// port>`, or `PROXY UNKNOWN` followed by anything (which the
/// specification says to ignore, whatever its bytes).
fn v1(line: &[u8]) -> Result<Header, HeaderError> {
    if line == b"PROXY UNKNOWN" || line.starts_with(b"PROXY UNKNOWN ") {
        return Ok(Header::Local);
    }
    let line = std::str::from_utf8(line).map_err(|_| HeaderError::Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    fields.next(); // "PROXY"
    let family = fields.next();
    let fields: Vec<&str> = fields.collect();
    let [source, destination, source_port, destination_port] = fields[..] else {
        return Err(HeaderError::Malformed("version 1 needs four fields"));
    };
    let (source, destination): (IpAddr, IpAddr) = match family {
        Some("TCP4") => (
            IpAddr::V4(v1_address(source)?),
            IpAddr::V4(v1_address(destination)?),
        ),
        Some("TCP6") => (
            IpAddr::V6(v1_address(source)?),
            IpAddr::V6(v1_address(destination)?),
        ),
        _ => return Err(HeaderError::Malformed("unknown version 1 protocol")),
    };
    let _ = destination;
    let source_port = v1_port(source_port)?;
    v1_port(destination_port)?;
    Ok(Header::Proxied(SocketAddr::new(source, source_port)))
}

fn v1_address<A: std::str::FromStr>(text: &str) -> Result<A, HeaderError> {
    text.parse()
        .map_err(|_| HeaderError::Malformed("bad version 1 address"))
}

fn v1_port(text: &str) -> Result<u16, HeaderError> {
    // Digits only: `u16`'s parser would also take a leading `+`.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeaderError::Malformed("bad version 1 port"));
    }
    text.parse()
        .map_err(|_| HeaderError::Malformed("bad version 1 port"))
}

fn v2(version_command: u8, family_protocol: u8, payload: &[u8]) -> Result<Header, HeaderError> {
    if version_command >> 4 != 2 {
        return Err(HeaderError::Malformed("unknown version"));
    }
    match version_command & 0x0f {
        0 => return Ok(Header::Local),
        1 => {}
        _ => return Err(HeaderError::Malformed("unknown version 2 command")),
    }
    // The specification's pairs of family and transport; any other is
    // invalid. Datagrams are not what the edge serves.
    match family_protocol {
        0x00 | 0x11 | 0x21 | 0x31 => {}
        0x12 | 0x22 | 0x32 => return Err(HeaderError::Malformed("not a stream")),
        _ => return Err(HeaderError::Malformed("unknown version 2 family")),
    }
    match family_protocol >> 4 {
        // AF_UNSPEC: no addresses to take.
        0 => Ok(Header::Local),
        // AF_UNIX: two paths of 108 bytes, and no IP address to take.
        3 if payload.len() >= 216 => Ok(Header::Local),
        3 => Err(HeaderError::Malformed("short unix addresses")),
        1 => {
            let Some(a) = payload.get(..12) else {
                return Err(HeaderError::Malformed("short IPv4 addresses"));
            };
            let source = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let port = u16::from_be_bytes([a[8], a[9]]);
            Ok(Header::Proxied(SocketAddr::new(source.into(), port)))
        }
        2 => {
            let Some(a) = payload.get(..36) else {
                return Err(HeaderError::Malformed("short IPv6 addresses"));
            };
            let mut source = [0u8; 16];
            source.copy_from_slice(&a[..16]);
            let port = u16::from_be_bytes([a[32], a[33]]);
            Ok(Header::Proxied(SocketAddr::new(
                Ipv6Addr::from(source).into(),
                port,
            )))
        }
        _ => unreachable!("families are checked above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Reads a header from `bytes` followed by a request, and returns it
    /// with what was left unread.
    async fn read(bytes: &[u8]) -> (Result<Header, String>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(8192);
        client.write_all(bytes).await.unwrap();
        client.write_all(b"GET /ws").await.unwrap();
        drop(client);
        let header = read_header(&mut server).await.map_err(|e| e.to_string());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        (header, rest)
    }

    fn v2_header(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        header.extend_from_slice(payload);
        header
    }

    #[tokio::test]
    async fn version_1_names_the_source_and_leaves_what_follows() {
        let (header, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n").await;
        assert_eq!(
            header.unwrap(),
            Header::Proxied("203.0.113.7:51000".parse().unwrap())
        );
        assert_eq!(rest, b"GET /ws");
        let (header, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n").await;
        assert_eq!(
            header.unwrap(),
            Header::Proxied("[2001:db8::7]:51000".parse().unwrap())
        );
        let (header, rest) = read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").await;
        assert_eq!(header.unwrap(), Header::Local);
        assert_eq!(rest, b"GET /ws");
        let (header, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(header.unwrap(), Header::Local);
        let (header, rest) = read(b"PROXY UNKNOWN \xff\xfe\r\n").await;
        assert_eq!(header.unwrap(), Header::Local);
        assert_eq!(rest, b"GET /ws");
    }

    #[tokio::test]
    async fn a_proxy_that_closes_without_a_byte_is_told_apart() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Closed)
        ));
    }

    #[tokio::test]
    async fn version_1_refuses_what_is_not_exactly_a_header() {
        for bad in [
            &b"GET /ws HTTP/1.1\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 51000 443\r\n",
            b"PROXY TCP6 203.0.113.7 10.0.0.1 51000 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 +1 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 443\r\n",
            b"PROXY TCP4  203.0.113.7 10.0.0.1 1 443\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 1 443 5\r\n",
            // Cut short: the connection ends before the line does.
            b"PROXY TCP4 203.0.113.7",
        ] {
            let (header, _) = read(bad).await;
            assert!(header.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert!(read(long.as_bytes()).await.0.is_err());
    }

    #[tokio::test]
    async fn version_2_names_the_source_and_skips_its_tlvs() {
        let mut ipv4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
        ipv4.extend_from_slice(&51000u16.to_be_bytes());
        ipv4.extend_from_slice(&443u16.to_be_bytes());
        // A TLV (type 0xEA, AWS's VPC endpoint id), ignored.
        ipv4.extend_from_slice(&[0xea, 0, 3, b'v', b'p', b'c']);
        let (header, rest) = read(&v2_header(1, 0x11, &ipv4)).await;
        assert_eq!(
            header.unwrap(),
            Header::Proxied("203.0.113.7:51000".parse().unwrap())
        );
        assert_eq!(rest, b"GET /ws");

        let source: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let mut ipv6 = source.octets().to_vec();
        ipv6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        ipv6.extend_from_slice(&51000u16.to_be_bytes());
        ipv6.extend_from_slice(&443u16.to_be_bytes());
        let (header, _) = read(&v2_header(1, 0x21, &ipv6)).await;
        assert_eq!(
            header.unwrap(),
            Header::Proxied("[2001:db8::7]:51000".parse().unwrap())
        );

        // A health check: the proxy speaks for itself.
        let (header, rest) = read(&v2_header(0, 0x00, &[])).await;
        assert_eq!(header.unwrap(), Header::Local);
        assert_eq!(rest, b"GET /ws");
        let (header, _) = read(&v2_header(1, 0x31, &[0; 216])).await;
        assert_eq!(header.unwrap(), Header::Local);
    }

    #[tokio::test]
    async fn version_2_refuses_what_it_cannot_read() {
        let addresses = [0u8; 12];
        let mut wrong_version = v2_header(1, 0x11, &addresses);
        wrong_version[12] = 0x11;
        let mut bad_signature = v2_header(1, 0x11, &addresses);
        bad_signature[10] = b'X';
        let mut too_long = V2_SIGNATURE.to_vec();
        too_long.extend_from_slice(&[0x21, 0x11, 0x20, 0x00]);
        for bad in [
            wrong_version,
            bad_signature,
            too_long,
            v2_header(2, 0x11, &addresses),
            // A datagram, an unknown family, pairs the specification
            // does not define.
            v2_header(1, 0x12, &addresses),
            v2_header(1, 0x41, &addresses),
            v2_header(1, 0x10, &addresses),
            v2_header(1, 0x01, &addresses),
            // AF_UNIX without its two paths.
            v2_header(1, 0x31, &[0; 100]),
            // Shorter than the family's addresses.
            v2_header(1, 0x11, &addresses[..11]),
            v2_header(1, 0x21, &addresses),
            // The length says more than arrives.
            v2_header(1, 0x11, &addresses)[..20].to_vec(),
        ] {
            assert!(read(&bad).await.0.is_err(), "{bad:?}");
        }
    }
}
