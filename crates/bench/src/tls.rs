//! The certificates of a `--tls` run, made fresh (rcgen) in a temporary
//! directory that goes with the run: a CA, the servers' certificate, and a
//! client certificate naming the app `bench` (the runs are mTLS, as a
//! deployment that verifies callers would be).

use std::path::PathBuf;

use rpc_core::net::ClientTls;
use tern_e2e::certs::{Ca, Issued};

pub struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    server: Issued,
    client: Issued,
}

impl Pki {
    /// # Errors
    ///
    /// The temporary directory cannot be written.
    pub fn new(run: &str) -> anyhow::Result<Pki> {
        let dir = std::env::temp_dir().join(format!("tern-bench-{run}-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::new(&dir, "bench");
        Ok(Pki {
            server: ca.issue("server"),
            client: ca.issue("bench"),
            ca: ca.cert.clone(),
            dir,
        })
    }

    /// A server's flags: its certificate, key, and the CA its clients' come from.
    pub fn server_args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            path(&self.server.cert),
            "--tls-key".into(),
            path(&self.server.key),
            "--tls-client-ca".into(),
            path(&self.ca),
        ]
    }

    /// A server's flags without client verification: TLS that asks callers
    /// for no certificate.
    pub fn server_args_one_way(&self) -> Vec<String> {
        let mut args = self.server_args();
        args.truncate(4);
        args
    }

    /// A client's TLS that presents no certificate.
    ///
    /// # Errors
    ///
    /// The CA file cannot be read.
    pub fn anonymous_client(&self) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::new(&self.ca)?)
    }

    /// A client's TLS: the CA, and the certificate naming `bench`.
    ///
    /// # Errors
    ///
    /// The files cannot be read.
    pub fn client(&self) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::with_identity(&self.ca, &self.client.cert, &self.client.key)?)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
