//! First-start material for running on embedded defaults.
//!
//! `porthole serve` without a config file must work with no external service,
//! so on first start it writes, into the state folder: a development token
//! signing key pair (Ed25519, with its JWK set), a bearer key for the issuance
//! API, and a development CA with a server certificate for `localhost`,
//! `127.0.0.1` and `::1` (TLS listeners and native clients use them). Later
//! starts reuse what is there. Private files are created mode 0600.
//!
//! The resulting [`RawConfig`] goes through the same validation as a file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::config::{
    DEFAULT_SPICE_TLS_ADDR, DEFAULT_VNC_ADDR, RawBackend, RawConfig, RawIssuance, RawKey,
    RawSpiceBackend,
};
use crate::token::signing::{KeyKind, generate, random_token};

/// The key id of the development signing key.
pub const DEV_KID: &str = "porthole-dev";

/// Paths of the development material in the state folder.
#[derive(Debug, Clone)]
pub struct DevState {
    /// The state folder.
    pub dir: PathBuf,
    /// Ed25519 private key (PKCS#8 PEM) that signs development tokens.
    pub signing_key: PathBuf,
    /// Its public key (SPKI PEM).
    pub public_key: PathBuf,
    /// Its public JWK set.
    pub jwks: PathBuf,
    /// Bearer key for the issuance API.
    pub issuance_key: PathBuf,
    /// Development CA certificate: what native clients are told to trust.
    pub ca_cert: PathBuf,
    /// Development CA private key.
    pub ca_key: PathBuf,
    /// Server certificate for localhost / 127.0.0.1 / ::1, signed by the CA.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// The SPICE ticket the demo VM is given, and Porthole presents to it.
    pub demo_spice_password: PathBuf,
}

impl DevState {
    fn paths(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            signing_key: dir.join("dev-signing-key.pem"),
            public_key: dir.join("dev-signing-key.pub.pem"),
            jwks: dir.join("dev-jwks.json"),
            issuance_key: dir.join("issuance-bearer.key"),
            ca_cert: dir.join("dev-ca.pem"),
            ca_key: dir.join("dev-ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            demo_spice_password: dir.join("demo-spice-password"),
        }
    }

    /// Creates whatever is missing in `dir` and returns the paths.
    pub fn ensure(dir: &Path) -> anyhow::Result<DevState> {
        let s = Self::paths(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if !s.signing_key.exists() || !s.public_key.exists() || !s.jwks.exists() {
            let key = generate(KeyKind::Ed25519, DEV_KID)?;
            write_private(&s.signing_key, key.private.expose(), true)?;
            write_public(&s.public_key, key.public_pem.as_deref().unwrap_or_default())?;
            write_public(&s.jwks, &serde_json::to_string_pretty(&key.jwks)?)?;
        }
        if !s.issuance_key.exists() {
            write_private(&s.issuance_key, &random_token(24), true)?;
        }
        if !s.demo_spice_password.exists() {
            write_private(&s.demo_spice_password, &random_token(12), true)?;
        }
        if !s.ca_cert.exists() || !s.server_cert.exists() || !s.server_key.exists() {
            s.write_pki()?;
        }
        Ok(s)
    }

    fn write_pki(&self) -> anyhow::Result<()> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
        };
        let mut ca = CertificateParams::default();
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::CommonName, "Porthole development CA");
        ca.distinguished_name
            .push(DnType::OrganizationName, "Porthole");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_pem_key = ca_key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(ca, ca_key)?;

        let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        server
            .subject_alt_names
            .push(SanType::IpAddress("::1".parse()?));
        server.distinguished_name = DistinguishedName::new();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server
            .distinguished_name
            .push(DnType::OrganizationName, "Porthole");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let cert = server.signed_by(&server_key, &issuer)?;

        write_private(&self.ca_key, &ca_pem_key, true)?;
        write_public(&self.ca_cert, &issuer.pem())?;
        write_private(&self.server_key, &server_key.serialize_pem(), true)?;
        write_public(&self.server_cert, &cert.pem())?;
        Ok(())
    }

    /// The configuration embedded defaults stand for: loopback listeners, the
    /// development key, the issuance API with the development bearer key, and
    /// loopback as the only hypervisor network.
    pub fn embedded_config(&self) -> RawConfig {
        let mut raw = RawConfig {
            state_dir: Some(self.dir.clone()),
            ..RawConfig::default()
        };
        raw.tokens.keys.push(RawKey {
            kid: Some(DEV_KID.into()),
            algorithm: Some("EdDSA".into()),
            public_key: Some(self.public_key.clone()),
            ..RawKey::default()
        });
        raw.issuance = Some(RawIssuance {
            bearer_key_files: vec![self.issuance_key.clone()],
            signing_key: Some(self.signing_key.clone()),
            signing_kid: Some(DEV_KID.into()),
            ..RawIssuance::default()
        });
        raw.backends.push(RawBackend {
            name: Some("loopback".into()),
            networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            hostnames: vec!["localhost".into()],
            ports: Some(vec!["1024-65535".into()]),
            ports_by_type: Default::default(),
            spice: Some(RawSpiceBackend {
                password_file: Some(self.demo_spice_password.clone()),
                ..RawSpiceBackend::default()
            }),
            vnc: None,
        });
        raw.vnc.listen = Some(DEFAULT_VNC_ADDR.into());
        // Native SPICE clients: TLS with the development certificate.
        raw.spice.listen_tls = Some(DEFAULT_SPICE_TLS_ADDR.into());
        raw.spice.tls_cert = Some(self.server_cert.clone());
        raw.spice.tls_key = Some(self.server_key.clone());
        raw.spice.ca = Some(self.ca_cert.clone());
        raw
    }
}

fn write_public(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a file only its owner can read (mode 0600); refuses to replace an
/// existing one unless `overwrite`.
pub(crate) fn write_private(path: &Path, content: &str, overwrite: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    if overwrite {
        options.write(true).create(true).truncate(true);
    } else {
        options.write(true).create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(content.as_bytes())?;
    Ok(())
}
