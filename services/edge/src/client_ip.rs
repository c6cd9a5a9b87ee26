//! Which address a peer connects from, when proxies stand in front of the
//! edge. Forwarding headers are believed only from the proxies an operator
//! names, and only the part of the chain those proxies wrote: everything to
//! the left of the first hop that is not a trusted proxy could have been
//! written by the client itself.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// Where a peer is: its socket's address, and the client's address as
/// resolved through trusted proxies (the socket's when there are none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddress {
    pub(crate) socket: SocketAddr,
    pub(crate) client: IpAddr,
}

/// The header a trusted proxy writes the client's address into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, Envoy, most
    /// cloud load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
    /// `X-Real-IP: client`, one address the proxy overwrites.
    XRealIp,
}

impl ForwardedHeader {
    pub const NAMES: [&str; 3] = ["x-forwarded-for", "forwarded", "x-real-ip"];

    fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => Self::NAMES[0],
            ForwardedHeader::Forwarded => Self::NAMES[1],
            ForwardedHeader::XRealIp => Self::NAMES[2],
        }
    }
}

impl FromStr for ForwardedHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            "x-real-ip" => Ok(ForwardedHeader::XRealIp),
            other => Err(format!(
                "unknown forwarding header {other:?} (one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// One trusted address or network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// `ip` with the bits past this network's prefix cleared.
    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(ip) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(ip) & mask).into())
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(ip) & mask).into())
            }
        }
    }

    fn masked(&self) -> IpAddr {
        self.mask(self.address)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.address.is_ipv4() && self.mask(ip) == self.address
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// The proxies whose forwarding headers the edge believes, and the header
/// they write. Empty (the default): no header is believed, and a peer's
/// address is its socket's.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<Network>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Addresses (`10.0.0.7`) and networks (`10.0.0.0/8`, `fd00::/8`).
    /// A network of prefix 0 is refused: it would let every client name
    /// its own address.
    pub fn parse<S: AsRef<str>>(
        entries: &[S],
        header: ForwardedHeader,
    ) -> Result<TrustedProxies, String> {
        let mut networks = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_ref().trim();
            let (address, prefix) = match entry.split_once('/') {
                Some((address, prefix)) => (address, Some(prefix)),
                None => (entry, None),
            };
            let written: IpAddr = address
                .trim()
                .parse()
                .map_err(|_| format!("trusted proxy {entry:?}: not an IP address"))?;
            let max = if written.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(prefix) => Some(prefix.trim())
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|p| p.parse::<u8>().ok())
                    .filter(|p| *p <= max)
                    .ok_or_else(|| {
                        format!("trusted proxy {entry:?}: the prefix must be 1 to {max}")
                    })?,
            };
            // Peers' addresses are compared as IPv4 when they are IPv4
            // written as IPv6, so such a network is kept as IPv4 too.
            let address = written.to_canonical();
            let prefix = match (written, address) {
                (IpAddr::V6(_), IpAddr::V4(_)) => prefix.checked_sub(96).ok_or_else(|| {
                    format!("trusted proxy {entry:?}: an IPv4-mapped network needs a prefix of 97 to 128")
                })?,
                _ => prefix,
            };
            if prefix == 0 {
                return Err(format!(
                    "trusted proxy {entry:?}: would trust every address"
                ));
            }
            let network = Network { address, prefix };
            // `10.0.0.7/8` is most likely a mistake for one host, and it
            // would trust sixteen million: the network must be written as
            // such.
            if network.masked() != network.address {
                return Err(format!(
                    "trusted proxy {entry:?}: has bits set past its prefix \
                     (the network is {}/{prefix}; one address needs no prefix)",
                    network.masked(),
                ));
            }
            networks.push(network);
        }
        Ok(TrustedProxies { networks, header })
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client's address: the socket's, unless the socket is a trusted
    /// proxy. Then the forwarding chain (the header's hops, then the
    /// socket) is read from the right, past every trusted proxy; the first
    /// hop that is not one is the client. A hop there that is no address
    /// (`unknown`, an obfuscated name) leaves the client unknown, and the
    /// last trusted proxy stands for it: nothing the client wrote is taken.
    pub fn resolve(&self, socket: IpAddr, headers: &HeaderMap) -> IpAddr {
        let socket = socket.to_canonical();
        if !self.trusts(socket) {
            return socket;
        }
        let lines = headers.get_all(self.header.name());
        if self.header == ForwardedHeader::XRealIp {
            // One address is the header's whole meaning; several lines
            // mean something other than the proxy wrote it.
            let mut lines = lines.iter();
            return match (lines.next(), lines.next()) {
                (Some(line), None) => hop_address(line.as_bytes()).unwrap_or(socket),
                _ => socket,
            };
        }
        // Hops are taken from the raw bytes, nearest proxy first, and only
        // as far as the first that is not a trusted proxy: a stray quote or
        // a byte that is not ASCII in a hop the client wrote spoils that
        // hop alone, never the proxies' hops to its right. A proxy may add
        // a line of its own instead of extending the last: lines are hops
        // in the order they arrived.
        let mut client = socket;
        for line in lines.iter().rev() {
            for hop in line.as_bytes().rsplit(|b| *b == b',') {
                let hop = match self.header {
                    ForwardedHeader::Forwarded => forwarded_for(hop),
                    _ => hop_address(hop),
                };
                match hop {
                    Some(ip) if self.trusts(ip) => client = ip,
                    Some(ip) => return ip,
                    None => return client,
                }
            }
        }
        client
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let networks: Vec<String> = self.networks.iter().map(Network::to_string).collect();
        write!(f, "{} via {}", networks.join(", "), self.header.name())
    }
}

/// A hop's address; `None` when it is not one (or not UTF-8).
fn hop_address(hop: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(hop).ok().and_then(address_of)
}

/// An address as proxies write a hop: bare, `[v6]`, `[v6]:port`,
/// `v4:port`, optionally quoted; `None` for anything else.
fn address_of(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let hop = hop
        .strip_prefix('"')
        .and_then(|h| h.strip_suffix('"'))
        .unwrap_or(hop)
        .trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return inside.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    }
    let (host, port) = hop.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    match host.parse::<IpAddr>().ok()? {
        ip @ IpAddr::V4(_) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// The `for=` of one element of an RFC 7239 `Forwarded` value; `None`
/// when it has none or it is no address. The element is split at every
/// `;`, quoted or not: a `for=` value never holds one, and honouring
/// quotes would let a client's unmatched quote swallow the proxies'
/// elements after it.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    element.split(|b| *b == b';').find_map(|pair| {
        let pair = std::str::from_utf8(pair).ok()?;
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| address_of(value))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn proxies(entries: &[&str], header: ForwardedHeader) -> TrustedProxies {
        TrustedProxies::parse(entries, header).unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_socket_is_the_client() {
        let none = TrustedProxies::default();
        let h = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(none.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn an_untrusted_socket_cannot_name_another_address() {
        let trusted = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(trusted.resolve(ip("192.0.2.1"), &h), ip("192.0.2.1"));
    }

    #[test]
    fn the_chain_is_read_from_the_right_past_trusted_proxies() {
        let trusted = proxies(&["10.0.0.0/8", "fd00::1"], ForwardedHeader::XForwardedFor);
        // The client wrote "1.1.1.1" itself; 203.0.113.9 is what the first
        // trusted proxy saw.
        let h = headers("x-forwarded-for", &["1.1.1.1, 203.0.113.9, 10.2.3.4"]);
        assert_eq!(trusted.resolve(ip("10.9.9.9"), &h), ip("203.0.113.9"));
        // Two header lines are one chain.
        let h = headers("x-forwarded-for", &["1.1.1.1, 203.0.113.9", "fd00::1"]);
        assert_eq!(trusted.resolve(ip("10.9.9.9"), &h), ip("203.0.113.9"));
        // All trusted: the left-most hop is the client.
        let h = headers("x-forwarded-for", &["10.1.1.1"]);
        assert_eq!(trusted.resolve(ip("10.9.9.9"), &h), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(
            trusted.resolve(ip("10.9.9.9"), &HeaderMap::new()),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn an_unreadable_hop_leaves_the_last_trusted_proxy() {
        let trusted = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["203.0.113.9, garbage, 10.2.3.4"]);
        assert_eq!(trusted.resolve(ip("10.9.9.9"), &h), ip("10.2.3.4"));
        let h = headers("x-forwarded-for", &[""]);
        assert_eq!(trusted.resolve(ip("10.9.9.9"), &h), ip("10.9.9.9"));
    }

    #[test]
    fn ports_brackets_quotes_and_mapped_addresses() {
        let trusted = proxies(&["::ffff:10.0.0.0/104"], ForwardedHeader::XForwardedFor);
        assert_eq!(
            trusted.resolve(
                ip("::ffff:10.0.0.5"),
                &headers("x-forwarded-for", &["198.51.100.4:5123"])
            ),
            ip("198.51.100.4")
        );
        assert_eq!(address_of("[2001:db8::17]:4711"), Some(ip("2001:db8::17")));
        assert_eq!(address_of("\"[2001:db8::17]\""), Some(ip("2001:db8::17")));
        assert_eq!(address_of("::ffff:192.0.2.1"), Some(ip("192.0.2.1")));
        assert_eq!(address_of("2001:db8::17:80x"), None);
        assert_eq!(address_of("[2001:db8::17]x"), None);
        assert_eq!(address_of("unknown"), None);
    }

    #[test]
    fn forwarded_elements_give_their_for() {
        let trusted = proxies(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        let h = headers(
            "forwarded",
            &[
                "for=1.1.1.1, for=\"[2001:db8:cafe::17]:4711\";proto=https;by=10.0.0.2, For=10.0.0.3",
            ],
        );
        assert_eq!(trusted.resolve(ip("10.0.0.4"), &h), ip("2001:db8:cafe::17"));
        let h = headers("forwarded", &["for=203.0.113.9, for=unknown, for=10.0.0.3"]);
        assert_eq!(trusted.resolve(ip("10.0.0.4"), &h), ip("10.0.0.3"));
        // Another header is not read.
        let h = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(trusted.resolve(ip("10.0.0.4"), &h), ip("10.0.0.4"));
    }

    #[test]
    fn what_a_client_writes_spoils_only_its_own_hop() {
        let forwarded = proxies(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        // An unmatched quote must not swallow the proxy's element after it.
        let h = headers("forwarded", &["for=6.6.6.6;x=\", for=203.0.113.9"]);
        assert_eq!(forwarded.resolve(ip("10.0.0.4"), &h), ip("203.0.113.9"));
        let h = headers("forwarded", &["x=\", for=203.0.113.9"]);
        assert_eq!(forwarded.resolve(ip("10.0.0.4"), &h), ip("203.0.113.9"));
        // A byte that is not ASCII spoils the client's hop, not the line.
        let xff = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff, 203.0.113.9").unwrap(),
        );
        assert_eq!(xff.resolve(ip("10.0.0.4"), &h), ip("203.0.113.9"));
        h.insert(
            "forwarded",
            axum::http::HeaderValue::from_bytes(b"for=\xff, for=203.0.113.9").unwrap(),
        );
        assert_eq!(forwarded.resolve(ip("10.0.0.4"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn x_real_ip_is_one_address() {
        let trusted = proxies(&["127.0.0.1"], ForwardedHeader::XRealIp);
        let h = headers("x-real-ip", &["203.0.113.9"]);
        assert_eq!(trusted.resolve(ip("127.0.0.1"), &h), ip("203.0.113.9"));
        let h = headers("x-real-ip", &["203.0.113.9", "198.51.100.1"]);
        assert_eq!(trusted.resolve(ip("127.0.0.1"), &h), ip("127.0.0.1"));
    }

    #[test]
    fn entries_are_addresses_or_networks_never_everything() {
        for bad in [
            "0.0.0.0/0",
            "::/0",
            "::ffff:0.0.0.0/96",
            "::ffff:0.0.0.0/90",
            "10.0.0.0/33",
            "fd00::/129",
            "proxy",
            "10.0.0.0/x",
            "",
            "10.0.0.7/8",
            "10.0.0.0/+8",
            "fd00::1/64",
            "10.0.0.0/",
        ] {
            assert!(
                TrustedProxies::parse(&[bad], ForwardedHeader::default()).is_err(),
                "{bad}"
            );
        }
        let parsed = proxies(&[" 10.0.0.0/8 ", "fd00::1"], ForwardedHeader::default());
        assert_eq!(
            parsed.to_string(),
            "10.0.0.0/8, fd00::1/128 via x-forwarded-for"
        );
        assert!(parsed.trusts(ip("10.255.0.1")));
        assert!(!parsed.trusts(ip("11.0.0.1")));
        assert!(parsed.trusts(ip("fd00::1")));
        assert!(parsed.trusts(ip("::ffff:10.1.2.3")));
        let single = proxies(
            &["10.0.0.7/32", "::ffff:192.168.0.0/112"],
            ForwardedHeader::default(),
        );
        assert!(single.trusts(ip("10.0.0.7")));
        assert!(!single.trusts(ip("10.0.0.8")));
        assert!(single.trusts(ip("192.168.7.1")));
        assert!(!single.trusts(ip("192.169.0.1")));
        assert!(!parsed.trusts(ip("fd00::2")));
        assert_eq!(
            "Forwarded".parse::<ForwardedHeader>(),
            Ok(ForwardedHeader::Forwarded)
        );
        assert!("via".parse::<ForwardedHeader>().is_err());
    }
}
