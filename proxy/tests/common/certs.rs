//! A test CA made with rcgen, and leaf certificates it signs.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A test CA that signs server and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` valid for `days` from now (negative: expired).
    pub fn leaf(&self, names: &[&str], days: i64) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now + time::Duration::days(days);
        if days < 0 {
            params.not_before = now - time::Duration::days(10 - days);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl Leaf {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, &self.cert).unwrap();
        std::fs::write(&k, &self.key).unwrap();
        (c, k)
    }
}

/// The `tls:` section serving `certs` (`(cert, key)` files), plus `extra`
/// fields (`", client_ca: ..."`).
pub fn tls_yaml(certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k)| format!("{{ cert: \"{}\", key: \"{}\" }}", c.display(), k.display()))
        .collect();
    format!("tls: {{ certificates: [{}]{extra} }}", list.join(", "))
}
