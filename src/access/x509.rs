//! Just enough DER to read the names in a client certificate: the subject's common name
//! and the DNS and URI entries of its subject alternative name extension.
//!
//! The TLS layer has verified the certificate before anything here reads it, so this is
//! no validator: it walks the structure, skips what it does not need, and gives up with
//! an error on anything it cannot follow. It never panics on any input.

use super::ClientIdentity;
use crate::error::{Error, ErrorKind, Result};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
/// `[0] EXPLICIT`: the version field of a v2/v3 certificate.
const VERSION: u8 = 0xa0;
/// `[3] EXPLICIT`: the extensions of a v3 certificate.
const EXTENSIONS: u8 = 0xa3;
/// `GeneralName` choices (context-specific, implicit, primitive).
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;

/// 2.5.4.3, id-at-commonName.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17, id-ce-subjectAltName.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

fn malformed(what: &str) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!("malformed certificate: {what}"),
    )
}

/// A cursor over consecutive DER elements.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element's tag and contents.
    fn next(&mut self) -> Result<(u8, &'a [u8])> {
        let [tag, first, rest @ ..] = self.0 else {
            return Err(malformed("truncated element"));
        };
        if tag & 0x1f == 0x1f {
            return Err(malformed("multi-byte tag"));
        }
        let (len, rest) = if *first < 0x80 {
            (usize::from(*first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(malformed("bad length"));
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(malformed("element runs past its container"));
        }
        let (contents, rest) = rest.split_at(len);
        self.0 = rest;
        Ok((*tag, contents))
    }

    /// The next element's contents, which must have tag `tag`.
    fn expect(&mut self, tag: u8, what: &str) -> Result<&'a [u8]> {
        match self.next()? {
            (t, contents) if t == tag => Ok(contents),
            _ => Err(malformed(&format!("expected {what}"))),
        }
    }
}

/// Reads the names of the DER certificate `cert`.
pub fn identity_from_der(cert: &[u8]) -> Result<ClientIdentity> {
    let mut outer = Der(cert);
    let mut certificate = Der(outer.expect(SEQUENCE, "the certificate")?);
    let mut tbs = Der(certificate.expect(SEQUENCE, "the certificate body")?);
    if tbs.peek_tag() == Some(VERSION) {
        tbs.next()?;
    }
    tbs.next()?; // serial number
    tbs.expect(SEQUENCE, "the signature algorithm")?;
    tbs.expect(SEQUENCE, "the issuer")?;
    tbs.expect(SEQUENCE, "the validity")?;
    let subject = tbs.expect(SEQUENCE, "the subject")?;
    tbs.expect(SEQUENCE, "the public key")?;

    let mut identity = ClientIdentity {
        common_name: common_name(subject)?,
        ..ClientIdentity::default()
    };
    // Optional unique ids ([1], [2]) come before the extensions.
    while !tbs.is_empty() {
        let (tag, contents) = tbs.next()?;
        if tag == EXTENSIONS {
            read_extensions(contents, &mut identity)?;
        }
    }
    Ok(identity)
}

/// The last common name of a distinguished name (the most specific one, when a name
/// has several).
fn common_name(name: &[u8]) -> Result<Option<String>> {
    let mut found = None;
    let mut rdns = Der(name);
    while !rdns.is_empty() {
        let mut attributes = Der(rdns.expect(SET, "a name component")?);
        while !attributes.is_empty() {
            let mut attribute = Der(attributes.expect(SEQUENCE, "a name attribute")?);
            let oid = attribute.expect(OID, "an attribute type")?;
            let (tag, value) = attribute.next()?;
            if oid == OID_COMMON_NAME {
                found = directory_string(tag, value);
            }
        }
    }
    Ok(found)
}

/// The text of a `DirectoryString` in one of the encodings certificates use; `None`
/// for other encodings, invalid text, or text with control characters.
fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const IA5_STRING: u8 = 0x16;
    const BMP_STRING: u8 = 0x1e;
    let text = match tag {
        UTF8_STRING => std::str::from_utf8(value).ok()?.to_owned(),
        PRINTABLE_STRING | IA5_STRING => ascii(value)?,
        BMP_STRING => {
            if value.len() % 2 != 0 {
                return None;
            }
            let units = value
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()?
        }
        _ => return None,
    };
    printable(text)
}

fn ascii(value: &[u8]) -> Option<String> {
    if value.is_ascii() {
        printable(String::from_utf8(value.to_vec()).ok()?)
    } else {
        None
    }
}

/// Names with control characters are dropped: they would only confuse logs and rules.
fn printable(text: String) -> Option<String> {
    if text.is_empty() || text.chars().any(char::is_control) {
        None
    } else {
        Some(text)
    }
}

fn read_extensions(explicit: &[u8], identity: &mut ClientIdentity) -> Result<()> {
    let mut outer = Der(explicit);
    let mut extensions = Der(outer.expect(SEQUENCE, "the extension list")?);
    while !extensions.is_empty() {
        let mut extension = Der(extensions.expect(SEQUENCE, "an extension")?);
        let oid = extension.expect(OID, "an extension id")?;
        if extension.peek_tag() == Some(BOOLEAN) {
            extension.next()?; // critical
        }
        let value = extension.expect(OCTET_STRING, "an extension value")?;
        if oid == OID_SUBJECT_ALT_NAME {
            read_alt_names(value, identity)?;
        }
    }
    Ok(())
}

fn read_alt_names(value: &[u8], identity: &mut ClientIdentity) -> Result<()> {
    let mut outer = Der(value);
    let mut names = Der(outer.expect(SEQUENCE, "the alternative names")?);
    while !names.is_empty() {
        let (tag, contents) = names.next()?;
        match tag {
            SAN_DNS => identity.dns_names.extend(ascii(contents)),
            SAN_URI => identity.uris.extend(ascii(contents)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert_der(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn params(cn: Option<&str>, sans: Vec<SanType>) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Strata tests");
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p
    }

    #[test]
    fn reads_common_name_and_alternative_names() {
        let der = cert_der(params(
            Some("client-a"),
            vec![
                SanType::DnsName("a.example".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
                SanType::URI("spiffe://example/a".try_into().unwrap()),
                SanType::DnsName("b.example".try_into().unwrap()),
            ],
        ));
        let id = identity_from_der(&der).unwrap();
        assert_eq!(id.common_name.as_deref(), Some("client-a"));
        assert_eq!(id.dns_names, ["a.example", "b.example"]);
        assert_eq!(id.uris, ["spiffe://example/a"]);
    }

    #[test]
    fn certificate_without_names() {
        let id = identity_from_der(&cert_der(params(None, vec![]))).unwrap();
        assert!(id.is_empty(), "{id:?}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let der = cert_der(params(
            Some("client-a"),
            vec![SanType::DnsName("a.example".try_into().unwrap())],
        ));
        for len in 0..der.len() {
            assert!(identity_from_der(&der[..len]).is_err(), "length {len}");
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = identity_from_der(&flipped);
            flipped[i] ^= 0xff;
        }
    }

    #[test]
    fn directory_strings() {
        assert_eq!(directory_string(0x0c, "é".as_bytes()).as_deref(), Some("é"));
        assert_eq!(directory_string(0x13, b"abc").as_deref(), Some("abc"));
        assert_eq!(
            directory_string(0x1e, &[0, b'h', 0, b'i']).as_deref(),
            Some("hi")
        );
        assert_eq!(directory_string(0x1e, &[0, b'h', 0]), None);
        assert_eq!(directory_string(0x13, "é".as_bytes()), None);
        assert_eq!(directory_string(0x0c, b"a\nb"), None);
        assert_eq!(directory_string(0x0c, b""), None);
        assert_eq!(directory_string(0x14, b"teletex"), None);
    }
}
