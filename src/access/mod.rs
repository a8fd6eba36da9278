//! Who may use an export: client networks and certificate identities.
//!
//! Pure data and decisions, no I/O: the server describes each connection as a [`Client`]
//! (where it comes from, and the identity of its verified TLS certificate, if any) and
//! asks an export's [`Access`] whether that client may see and open it. The command line
//! builds one `Access` for all its exports; a configuration file can build one per export
//! from the same parts ([`parse_cidr`], [`NetworkRule`]).
//!
//! A client that is not allowed is treated as if the export did not exist: it is left
//! out of listings and opening it fails as for an unknown name, so the refusal reveals
//! nothing about which exports there are.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};

mod x509;

/// An IPv4 or IPv6 network: an address prefix of `prefix` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network's first address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True if `addr` is inside this network. IPv4 addresses never match IPv6 networks or
    /// the other way round; callers pass IPv4-mapped IPv6 addresses in canonical form.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = mask_u32(self.prefix);
                u32::from(a) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = mask_u128(self.prefix);
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_u32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_u128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        parse_cidr(s)
    }
}

/// Parses `ADDR/PREFIX` (`10.0.0.0/8`, `fd00::/8`) or a single address (`192.0.2.7`,
/// `::1`, taken as `/32` or `/128`).
///
/// An address with bits set past the prefix (`10.1.2.3/8`) is refused rather than
/// silently widened: it usually means a mistyped prefix, and for access rules a mistake
/// should be loud.
pub fn parse_cidr(s: &str) -> Result<Cidr> {
    let bad = |why: &str| {
        Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "invalid network {s:?}: {why} (expected ADDR/PREFIX, e.g. 10.0.0.0/8 or fd00::/8)"
            ),
        )
    };
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let network: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
    let max = if network.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            // Digits only: u8's parser would also take a sign.
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the prefix length is not a number"));
            }
            let p: u8 = p
                .parse()
                .map_err(|_| bad("the prefix length is too large"))?;
            if p > max {
                return Err(bad(&format!("the prefix length is larger than {max}")));
            }
            p
        }
    };
    let masked = match network {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_u32(prefix)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_u128(prefix)).into()),
    };
    if masked != network {
        return Err(bad(&format!(
            "bits are set past the prefix; the network is {masked}/{prefix}"
        )));
    }
    Ok(Cidr { network, prefix })
}

/// One entry of an export's network rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkRule {
    /// TCP clients from this network.
    Net(Cidr),
    /// Clients on a Unix socket, who have no address; whoever may open the socket file
    /// (its permissions decide) gets in.
    Unix,
}

impl FromStr for NetworkRule {
    type Err = Error;

    /// `unix`, or a network as [`parse_cidr`] takes it.
    fn from_str(s: &str) -> Result<Self> {
        if s == "unix" {
            Ok(NetworkRule::Unix)
        } else {
            parse_cidr(s).map(NetworkRule::Net)
        }
    }
}

impl fmt::Display for NetworkRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkRule::Net(c) => c.fmt(f),
            NetworkRule::Unix => f.write_str("unix"),
        }
    }
}

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// A TCP client.
    Tcp(SocketAddr),
    /// A client on a Unix socket.
    Unix,
}

impl ClientAddr {
    /// The client's IP address, with IPv4-mapped IPv6 addresses (how a dual-stack
    /// listener sees IPv4 clients) turned back into IPv4, so IPv4 rules apply to them.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            ClientAddr::Tcp(a) => Some(a.ip().to_canonical()),
            ClientAddr::Unix => None,
        }
    }
}

/// The names a verified client certificate carries, any of which identity rules match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject's common name (CN), if it has one.
    pub common_name: Option<String>,
    /// DNS names from the subject alternative name extension.
    pub dns_names: Vec<String>,
    /// URIs from the subject alternative name extension (e.g. SPIFFE ids).
    pub uris: Vec<String>,
}

impl ClientIdentity {
    /// Reads the names of a DER-encoded X.509 certificate, which the TLS layer has
    /// already verified.
    pub fn from_der(cert: &[u8]) -> Result<Self> {
        x509::identity_from_der(cert)
    }

    /// True if `name` is one of the certificate's names. DNS names compare without
    /// regard to ASCII case, as DNS does; the common name and URIs compare exactly.
    pub fn has_name(&self, name: &str) -> bool {
        self.common_name.as_deref() == Some(name)
            || self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(name))
            || self.uris.iter().any(|u| u == name)
    }

    /// True when the certificate names nothing rules could match.
    pub fn is_empty(&self) -> bool {
        self.common_name.is_none() && self.dns_names.is_empty() && self.uris.is_empty()
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if let Some(cn) = &self.common_name {
            names.push(format!("CN={cn}"));
        }
        names.extend(self.dns_names.iter().map(|d| format!("DNS:{d}")));
        names.extend(self.uris.iter().map(|u| format!("URI:{u}")));
        if names.is_empty() {
            f.write_str("(no names)")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// One connection, as access rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Where it connects from.
    pub addr: ClientAddr,
    /// The identity of its verified TLS client certificate: `None` without TLS, or when
    /// the server does not ask for client certificates.
    pub identity: Option<ClientIdentity>,
    /// Whether the connection has been upgraded to TLS, with or without a certificate.
    pub tls: bool,
}

/// Who may use an export. Empty rule lists restrict nothing; a client must pass both the
/// network rules and the identity rules, and when TLS is required, be on TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    networks: Vec<NetworkRule>,
    identities: Vec<String>,
    /// Plaintext clients may not see the export even when the server lets them in
    /// (`--tls optional`), so one server can serve some exports to plaintext clients
    /// and others only over TLS.
    tls_required: bool,
}

impl Access {
    /// Everyone may use the export.
    pub fn open() -> Self {
        Access::default()
    }

    /// Only clients that match one of `networks` (any client if it is empty) and present
    /// a certificate with one of `identities` (any client if it is empty).
    pub fn new(networks: Vec<NetworkRule>, identities: Vec<String>) -> Self {
        Access {
            networks,
            identities,
            tls_required: false,
        }
    }

    /// Also requires the client to have upgraded to TLS (a client certificate is not
    /// needed for this; identity rules ask for one).
    #[must_use]
    pub fn with_tls_required(mut self, required: bool) -> Self {
        self.tls_required = required;
        self
    }

    /// True if only TLS clients may use the export.
    pub fn tls_required(&self) -> bool {
        self.tls_required
    }

    /// The network rules.
    pub fn networks(&self) -> &[NetworkRule] {
        &self.networks
    }

    /// The certificate names allowed.
    pub fn identities(&self) -> &[String] {
        &self.identities
    }

    /// True if the rules restrict nothing.
    pub fn is_open(&self) -> bool {
        self.networks.is_empty() && self.identities.is_empty() && !self.tls_required
    }

    /// May `client` see and open the export?
    pub fn allows(&self, client: &Client) -> bool {
        (client.tls || !self.tls_required)
            && self.network_allows(client.addr)
            && self.identity_allows(client.identity.as_ref())
    }

    fn network_allows(&self, addr: ClientAddr) -> bool {
        if self.networks.is_empty() {
            return true;
        }
        match addr.ip() {
            None => self.networks.contains(&NetworkRule::Unix),
            Some(ip) => self.networks.iter().any(|rule| match rule {
                NetworkRule::Net(net) => net.contains(ip),
                NetworkRule::Unix => false,
            }),
        }
    }

    fn identity_allows(&self, identity: Option<&ClientIdentity>) -> bool {
        if self.identities.is_empty() {
            return true;
        }
        identity.is_some_and(|id| self.identities.iter().any(|name| id.has_name(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        parse_cidr(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tcp(s: &str) -> Client {
        Client {
            addr: ClientAddr::Tcp(SocketAddr::new(ip(s), 40000)),
            identity: None,
            tls: false,
        }
    }

    #[test]
    fn parses_networks_and_single_addresses() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(cidr("::/0").prefix(), 0);
        assert_eq!(cidr("192.0.2.128/25").network(), ip("192.0.2.128"));
    }

    #[test]
    fn refuses_malformed_networks() {
        for s in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/0008",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "host.example/24",
            "10.0.0.0 /8",
            "[::1]/128",
        ] {
            assert!(parse_cidr(s).is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn refuses_host_bits_and_names_the_network() {
        let e = parse_cidr("10.1.2.3/8").unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        let e = parse_cidr("fd00::1/64").unwrap_err();
        assert!(e.to_string().contains("fd00::/64"), "{e}");
    }

    #[test]
    fn contains_by_prefix() {
        let net = cidr("192.0.2.0/24");
        assert!(net.contains(ip("192.0.2.0")));
        assert!(net.contains(ip("192.0.2.255")));
        assert!(!net.contains(ip("192.0.3.0")));
        assert!(!net.contains(ip("::ffff:192.0.2.1")), "families never mix");
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("127.0.0.1/32").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1/32").contains(ip("127.0.0.2")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("::1/128").contains(ip("::1")));
    }

    #[test]
    fn open_access_allows_everyone() {
        let open = Access::open();
        assert!(open.is_open());
        assert!(open.allows(&tcp("203.0.113.9")));
        assert!(open.allows(&Client {
            addr: ClientAddr::Unix,
            identity: None,
            tls: false,
        }));
    }

    #[test]
    fn network_rules() {
        let access = Access::new(
            vec!["127.0.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()],
            vec![],
        );
        assert!(access.allows(&tcp("127.0.0.1")));
        assert!(access.allows(&tcp("fd12::1")));
        assert!(!access.allows(&tcp("127.0.0.2")));
        assert!(!access.allows(&tcp("::1")));
        // A dual-stack listener sees IPv4 clients as mapped addresses.
        assert!(access.allows(&tcp("::ffff:127.0.0.1")));
        // Unix-socket clients need the `unix` rule once networks are listed.
        let unix = Client {
            addr: ClientAddr::Unix,
            identity: None,
            tls: false,
        };
        assert!(!access.allows(&unix));
        let with_unix = Access::new(vec![NetworkRule::Unix], vec![]);
        assert!(with_unix.allows(&unix));
        assert!(!with_unix.allows(&tcp("127.0.0.1")));
        assert_eq!("unix".parse::<NetworkRule>().unwrap(), NetworkRule::Unix);
        assert!("unix:".parse::<NetworkRule>().is_err());
    }

    #[test]
    fn identity_rules() {
        let access = Access::new(vec![], vec!["client-a".into(), "spiffe://x/y".into()]);
        let with = |identity: ClientIdentity| Client {
            addr: ClientAddr::Unix,
            identity: Some(identity),
            tls: true,
        };
        assert!(!access.allows(&tcp("127.0.0.1")), "no certificate");
        assert!(access.allows(&with(ClientIdentity {
            common_name: Some("client-a".into()),
            ..ClientIdentity::default()
        })));
        assert!(access.allows(&with(ClientIdentity {
            dns_names: vec!["Client-A".into()],
            ..ClientIdentity::default()
        })));
        assert!(access.allows(&with(ClientIdentity {
            uris: vec!["spiffe://x/y".into()],
            ..ClientIdentity::default()
        })));
        assert!(!access.allows(&with(ClientIdentity {
            common_name: Some("Client-A".into()),
            uris: vec!["spiffe://x/Y".into()],
            dns_names: vec!["client-b".into()],
        })));
        assert!(!access.allows(&with(ClientIdentity::default())));
    }

    #[test]
    fn both_kinds_of_rules_must_pass() {
        let access = Access::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec!["client-a".into()],
        );
        let id = ClientIdentity {
            common_name: Some("client-a".into()),
            ..ClientIdentity::default()
        };
        let mut c = tcp("127.0.0.1");
        assert!(!access.allows(&c));
        c.identity = Some(id.clone());
        c.tls = true;
        assert!(access.allows(&c));
        let mut far = tcp("192.0.2.1");
        far.identity = Some(id);
        far.tls = true;
        assert!(!access.allows(&far));
    }

    #[test]
    fn required_tls_hides_the_export_from_plaintext_clients() {
        let access =
            Access::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]).with_tls_required(true);
        assert!(access.tls_required() && !access.is_open());
        let mut c = tcp("127.0.0.1");
        assert!(!access.allows(&c), "plaintext");
        c.tls = true;
        assert!(access.allows(&c), "TLS without a certificate is enough");
        let mut far = tcp("192.0.2.1");
        far.tls = true;
        assert!(!access.allows(&far), "the network rules still apply");
        assert!(Access::open().with_tls_required(true).allows(&c));
        assert!(!Access::open().with_tls_required(true).is_open());
    }

    #[test]
    fn identity_display_lists_every_name() {
        let id = ClientIdentity {
            common_name: Some("a".into()),
            dns_names: vec!["b.example".into()],
            uris: vec!["spiffe://c".into()],
        };
        assert_eq!(id.to_string(), "CN=a, DNS:b.example, URI:spiffe://c");
        assert_eq!(ClientIdentity::default().to_string(), "(no names)");
    }
}
