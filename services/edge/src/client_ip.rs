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
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
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
                Some(prefix) => prefix
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| {
                        format!("trusted proxy {entry:?}: the prefix must be 1 to {max}")
                    })?,
            };
            if prefix == 0 {
                return Err(format!(
                    "trusted proxy {entry:?}: a prefix of 0 would trust every address"
                ));
            }
            // Peers' addresses are compared as IPv4 when they are IPv4
            // written as IPv6, so such a network is kept as IPv4 too.
            let address = canonical(written);
            let prefix = match (written, address) {
                (IpAddr::V6(_), IpAddr::V4(_)) => prefix.checked_sub(96).ok_or_else(|| {
                    format!("trusted proxy {entry:?}: an IPv4-mapped network needs a prefix of 97 to 128")
                })?,
                _ => prefix,
            };
            if prefix == 0 {
                return Err(format!(
                    "trusted proxy {entry:?}: a prefix of 96 would trust every IPv4 address"
                ));
            }
            networks.push(Network { address, prefix });
        }
        Ok(TrustedProxies { networks, header })
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client's address: the socket's, unless the socket is a trusted
    /// proxy. Then the forwarding chain (the header's hops, then the
    /// socket) is read from the right, past every trusted proxy; the first
    /// hop that is not one is the client. A hop there that is no address
    /// (`unknown`, an obfuscated name) leaves the client unknown, and the
    /// last trusted proxy stands for it: nothing the client wrote is taken.
    pub fn resolve(&self, socket: IpAddr, headers: &HeaderMap) -> IpAddr {
        let socket = canonical(socket);
        if !self.trusts(socket) {
            return socket;
        }
        let mut hops: Vec<Option<IpAddr>> = Vec::new();
        // A proxy may add a header line of its own instead of extending
        // the last one: lines are hops in the order they arrived.
        for value in headers.get_all(self.header.name()) {
            let Ok(value) = value.to_str() else {
                hops.push(None);
                continue;
            };
            match self.header {
                ForwardedHeader::XForwardedFor => {
                    hops.extend(value.split(',').map(|hop| address_of(hop.trim())));
                }
                ForwardedHeader::Forwarded => hops.extend(forwarded_for(value)),
                ForwardedHeader::XRealIp => hops.push(address_of(value.trim())),
            }
        }
        if self.header == ForwardedHeader::XRealIp && hops.len() > 1 {
            // One address is the header's whole meaning; several lines
            // mean something other than the proxy wrote it.
            return socket;
        }
        let mut client = socket;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if self.trusts(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
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

/// IPv4 addresses written as IPv6 (`::ffff:10.0.0.1`) are IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// An address as proxies write a hop: bare, `[v6]`, `[v6]:port`,
/// `v4:port`, optionally quoted; `None` for anything else.
fn address_of(hop: &str) -> Option<IpAddr> {
    let hop = hop
        .strip_prefix('"')
        .and_then(|h| h.strip_suffix('"'))
        .unwrap_or(hop)
        .trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return inside.parse::<IpAddr>().ok().map(canonical);
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

/// The `for=` of each element of an RFC 7239 `Forwarded` value, in order;
/// an element without one, or with one that is no address, is an unknown
/// hop.
fn forwarded_for(value: &str) -> Vec<Option<IpAddr>> {
    split_unquoted(value, ',')
        .into_iter()
        .map(|element| {
            split_unquoted(element, ';').into_iter().find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| address_of(value.trim()))
            })?
        })
        .collect()
}

/// `value` split at `delimiter`s outside double quotes.
fn split_unquoted(value: &str, delimiter: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == delimiter && !quoted => {
                parts.push(value[start..i].trim());
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(value[start..].trim());
    parts
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
        assert!(!parsed.trusts(ip("fd00::2")));
        assert_eq!(
            "Forwarded".parse::<ForwardedHeader>(),
            Ok(ForwardedHeader::Forwarded)
        );
        assert!("via".parse::<ForwardedHeader>().is_err());
    }
}
