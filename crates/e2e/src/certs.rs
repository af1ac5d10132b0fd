//! Test certificates, made fresh in each run (rcgen): never a committed
//! key. A [`Ca`] issues server certificates for loopback and client
//! certificates whose subject CN names an app, written as PEM files into
//! a directory of the caller's.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority for one test.
pub struct Ca {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate (PEM file).
    pub cert: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.name)
            .field("cert", &self.cert)
            .finish()
    }
}

impl Ca {
    /// A new CA called `name`, its files in `dir` (created if missing).
    ///
    /// # Panics
    ///
    /// The directory cannot be written.
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).expect("certificate directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).expect("CA file");
        Ca {
            dir: dir.to_owned(),
            name: name.to_owned(),
            issuer: Issuer::new(params, key),
            cert: path,
        }
    }

    /// A certificate whose subject CN is `cn`, valid for `localhost`,
    /// 127.0.0.1 and ::1 (so it serves on loopback and, as a client
    /// certificate, names the app `cn`).
    ///
    /// # Panics
    ///
    /// The files cannot be written.
    pub fn issue(&self, cn: &str) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("names");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let issued = Issued {
            cert: self.dir.join(format!("{}-{cn}.crt", self.name)),
            key: self.dir.join(format!("{}-{cn}.key", self.name)),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("certificate file");
        std::fs::write(&issued.key, key.serialize_pem()).expect("key file");
        issued
    }
}
