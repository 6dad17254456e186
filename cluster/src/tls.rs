//! Certificates and mutual TLS.
//!
//! `runnel certs init` makes a cluster CA and signs a certificate per node and
//! one for clients. A node certificate names its node as the DNS SAN
//! `node-<id>.runnel` (this binds the id to the certificate) and also carries
//! `cluster.runnel`, the name a node or client dials when it reaches a seed
//! whose id it does not know yet. A client certificate carries
//! `client.runnel` only, so it cannot pose as a node. Every connection in
//! both directions must present a certificate signed by the cluster CA.
//!
//! Files in a certificate directory: `ca.pem`, `ca.key`,
//! `node-<id>.pem`/`.key`, `client.pem`/`.key` (keys are written mode 0600).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{io_at, ClusterError, Result};
use crate::NodeId;

/// The name every node certificate carries, dialled when the id is unknown.
pub const CLUSTER_SERVER_NAME: &str = "cluster.runnel";
const CLIENT_NAME: &str = "client.runnel";

fn node_name(node: NodeId) -> String {
    format!("node-{}.runnel", node.0)
}

/// Paths of the files in a certificate directory.
#[derive(Clone, Debug)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> CertDir {
        CertDir { dir: dir.into() }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca(&self) -> (PathBuf, PathBuf) {
        (self.file("ca.pem"), self.file("ca.key"))
    }

    fn node(&self, node: NodeId) -> (PathBuf, PathBuf) {
        (
            self.file(&format!("node-{}.pem", node.0)),
            self.file(&format!("node-{}.key", node.0)),
        )
    }

    fn client(&self) -> (PathBuf, PathBuf) {
        (self.file("client.pem"), self.file("client.key"))
    }

    /// Creates a new CA, a certificate per node in `nodes`, and a client
    /// certificate. Refuses to overwrite an existing CA. Every node
    /// certificate also names `hosts` (DNS names or IP addresses), which
    /// clients that check host names (Kafka clients over TLS) dial.
    pub fn init(&self, nodes: &[NodeId], hosts: &[String]) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(io_at(&self.dir))?;
        let (ca_pem, ca_key) = self.ca();
        if ca_pem.exists() || ca_key.exists() {
            return Err(ClusterError::Tls(format!(
                "{} already holds a CA; not overwriting it",
                self.dir.display()
            )));
        }
        let key = KeyPair::generate().map_err(tls_err("generating the CA key"))?;
        let ca = CertifiedIssuer::self_signed(ca_params(), key).map_err(tls_err("signing the CA"))?;
        write_file(&ca_pem, ca.pem().as_bytes(), false)?;
        write_file(&ca_key, ca.key().serialize_pem().as_bytes(), true)?;
        for &node in nodes {
            self.issue(&ca, self.node(node), node_names(node, hosts))?;
        }
        self.issue(&ca, self.client(), vec![CLIENT_NAME.to_string()])
    }

    /// Signs a certificate for one more node (or a new one for a node, with
    /// other `hosts`) with the existing CA.
    pub fn issue_node(&self, node: NodeId, hosts: &[String]) -> Result<()> {
        let issuer = self.load_issuer()?;
        self.issue(&issuer, self.node(node), node_names(node, hosts))
    }

    fn load_issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let (ca_pem, ca_key) = self.ca();
        let key = std::fs::read_to_string(&ca_key).map_err(io_at(&ca_key))?;
        let key = KeyPair::from_pem(&key).map_err(tls_err("reading ca.key"))?;
        let pem = std::fs::read_to_string(&ca_pem).map_err(io_at(&ca_pem))?;
        Issuer::from_ca_cert_pem(&pem, key).map_err(tls_err("reading ca.pem"))
    }

    fn issue(
        &self,
        issuer: &Issuer<'_, KeyPair>,
        (pem, key_path): (PathBuf, PathBuf),
        names: Vec<String>,
    ) -> Result<()> {
        if let Some(bad) = names
            .iter()
            .find(|n| n.parse::<std::net::IpAddr>().is_err() && !is_dns_name(n))
        {
            return Err(ClusterError::Tls(format!(
                "{bad:?} is neither an IP address nor a DNS name (letters, digits, '-' and '.')"
            )));
        }
        let mut params = CertificateParams::new(names.clone()).map_err(tls_err("certificate names"))?;
        params.distinguished_name.push(DnType::CommonName, names[0].clone());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(tls_err("generating a key"))?;
        let cert = params
            .signed_by(&key, issuer)
            .map_err(tls_err("signing a certificate"))?;
        write_file(&pem, cert.pem().as_bytes(), false)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), true)
    }

    /// The identity node `node` presents; fails unless its certificate names it.
    pub fn node_identity(&self, node: NodeId) -> Result<TlsIdentity> {
        let identity = self.load_identity(self.node(node))?;
        if node_id_from_cert(&identity.chain[0]) != Some(node) {
            return Err(ClusterError::Tls(format!(
                "{} is not a certificate for node {node}",
                self.node(node).0.display()
            )));
        }
        Ok(identity)
    }

    /// The identity a client presents.
    pub fn client_identity(&self) -> Result<TlsIdentity> {
        self.load_identity(self.client())
    }

    fn load_identity(&self, (pem, key): (PathBuf, PathBuf)) -> Result<TlsIdentity> {
        let (ca_pem, _) = self.ca();
        let ca = CertificateDer::from_pem_file(&ca_pem).map_err(pem_err(&ca_pem))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(tls_err("adding the CA to the trust store"))?;
        let chain = CertificateDer::pem_file_iter(&pem)
            .map_err(pem_err(&pem))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(pem_err(&pem))?;
        if chain.is_empty() {
            return Err(ClusterError::Tls(format!("{} holds no certificate", pem.display())));
        }
        let key = PrivateKeyDer::from_pem_file(&key).map_err(pem_err(&key))?;
        Ok(TlsIdentity {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
        })
    }
}

/// A node certificate's names: its id's, the cluster's, then `hosts`.
fn node_names(node: NodeId, hosts: &[String]) -> Vec<String> {
    let mut names = vec![node_name(node), CLUSTER_SERVER_NAME.to_string()];
    names.extend(hosts.iter().cloned());
    names
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "runnel cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_at(path))?;
    file.write_all(bytes).map_err(io_at(path))
}

fn tls_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> ClusterError {
    move |e| ClusterError::Tls(format!("{what}: {e}"))
}

fn pem_err(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> ClusterError + '_ {
    move |e| ClusterError::Tls(format!("reading {}: {e}", path.display()))
}

fn is_dns_name(name: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
    };
    name.len() <= 253 && name.split('.').all(label)
}

/// A certificate chain, its key, and the cluster CA to check peers against.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// rustls server settings: client certificates from the cluster CA are
    /// mandatory; both ALPNs are offered.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let mut config = self.tcp_server_config()?;
        config.alpn_protocols = vec![
            crate::protocol::ALPN_PEER.to_vec(),
            crate::protocol::ALPN_CLIENT.to_vec(),
        ];
        Ok(config)
    }

    /// rustls server settings for a TCP listener (the Kafka listener): TLS
    /// 1.3, this certificate, client certificates from the cluster CA
    /// mandatory, no ALPN.
    pub fn tcp_server_config(&self) -> Result<rustls::ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(tls_err("client verifier"))?;
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("TLS versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err("server certificate"))
    }

    /// rustls client settings for one ALPN, verifying the server against the
    /// cluster CA.
    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig> {
        let verifier: Arc<dyn ServerCertVerifier> =
            rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
                .build()
                .map_err(tls_err("server verifier"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("TLS versions"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err("client certificate"))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// The node id a certificate names in its `node-<id>.runnel` SAN, if any.
pub fn node_id_from_cert(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let ids: Vec<NodeId> = cert
        .valid_dns_names()
        .filter_map(|name| name.strip_prefix("node-")?.strip_suffix(".runnel")?.parse().ok())
        .map(NodeId)
        .collect();
    // A certificate naming two nodes binds neither.
    match ids.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issues_certificates_bound_to_node_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = CertDir::new(dir.path());
        certs.init(&[NodeId(1), NodeId(2)], &[]).expect("init");
        let identity = certs.node_identity(NodeId(2)).expect("node 2");
        assert_eq!(node_id_from_cert(&identity.chain[0]), Some(NodeId(2)));
        let client = certs.client_identity().expect("client");
        assert_eq!(
            node_id_from_cert(&client.chain[0]),
            None,
            "a client certificate names no node"
        );
        assert!(certs.node_identity(NodeId(3)).is_err(), "no certificate for node 3 yet");
        let hosts = ["kafka-3.example.com".to_string(), "10.0.0.3".to_string()];
        certs.issue_node(NodeId(3), &hosts).expect("issue");
        let node_3 = certs.node_identity(NodeId(3)).expect("node 3");
        assert_eq!(node_id_from_cert(&node_3.chain[0]), Some(NodeId(3)));
        let cert = webpki::EndEntityCert::try_from(&node_3.chain[0]).expect("parse");
        let names: Vec<&str> = cert.valid_dns_names().collect();
        assert_eq!(names, ["node-3.runnel", "cluster.runnel", "kafka-3.example.com"]);
        let ip = rustls_pki_types::ServerName::try_from("10.0.0.3").expect("an IP");
        assert!(cert.verify_is_valid_for_subject_name(&ip).is_ok(), "the IP SAN");
        let refused = certs
            .issue_node(NodeId(5), &["not a host".to_string()])
            .expect_err("a bad name");
        assert!(
            refused
                .to_string()
                .contains("\"not a host\" is neither an IP address nor a DNS name"),
            "{refused}"
        );
        // Node 1's files renamed to node 4's are refused: the id is in the certificate.
        std::fs::copy(dir.path().join("node-1.pem"), dir.path().join("node-4.pem")).expect("copy");
        std::fs::copy(dir.path().join("node-1.key"), dir.path().join("node-4.key")).expect("copy");
        let err = certs
            .node_identity(NodeId(4))
            .expect_err("mislabelled certificate accepted");
        assert!(err.to_string().contains("not a certificate for node 4"), "{err}");
        assert!(certs.init(&[], &[]).is_err(), "an existing CA is not overwritten");
        identity.server_config().expect("server config");
        identity
            .client_config(crate::protocol::ALPN_PEER)
            .expect("client config");
    }
}
