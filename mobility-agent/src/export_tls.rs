//! The host's NBD exports over TCP (`nbd_listen`), TLS required: what `nbds://` clients
//! (nbdinfo, nbdcopy, nbdfuse, fio's `nbd` engine, qemu) reach from outside the host's user.
//!
//! One listener per host serves every running machine's disks as `MACHINE/DISK`
//! ([`crate::export::HostExports`]). A client first upgrades with `NBD_OPT_STARTTLS`, then
//! proves a certificate of the lab CA that the CS has not revoked (the host's own verifier, the
//! one its gRPC port uses), and only an operator's certificate may go on: agents and
//! components have no business with a machine's disks. Revoking the certificate cuts its open
//! connections. The address actually bound is written to `DATA_DIR/nbd/listen`, where
//! `srctl vm export` finds it.
//!
//! Hosts' certificates carry `127.0.0.1` and `localhost` among their names, so a client
//! verifying the server's name against the address it dialed accepts the host on loopback:
//! there, a client checks that it talks to a host of this lab, not to which one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use failback_common::component::Registered;
use failback_common::identity::{Identity, Role};
use failback_common::trust::{Trust, fingerprint_der};
use failback_nbd::{Authorized, TlsPolicy};
use tokio_util::sync::CancellationToken;

use crate::export::HostExports;

/// Most NBD connections open at once on the TCP listener.
pub const MAX_CONNECTIONS: usize = 256;

/// Where the host records the address its NBD listener is bound to.
pub fn listen_file(data_dir: &Path) -> PathBuf {
    data_dir.join("nbd").join("listen")
}

/// Binds `addr` and serves `exports` on it until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    data_dir: &Path,
    host: &Registered,
    exports: Arc<HostExports>,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve NBD on {addr} (nbd_listen): {e}"))?;
    let bound = listener.local_addr()?;
    let mut config = (*host.credentials.server_config(host.trust.clone())?).clone();
    // NBD negotiates no application protocol.
    config.alpn_protocols.clear();
    let trust = host.trust.clone();
    let policy = Arc::new(TlsPolicy::new(Arc::new(config), move |chain| {
        authorize(&trust, chain)
    }));
    let file = listen_file(data_dir);
    if let Some(dir) = file.parent() {
        failback_common::tls::private_dir(dir)?;
    }
    failback_common::durable::write(&file, bound.to_string().as_bytes(), 0o600)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
    tracing::info!(address = %bound, "NBD exports over TLS (nbds://)");
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        failback_nbd::serve_tcp(listener, exports, policy, MAX_CONNECTIONS, shutdown).await;
        let _ = std::fs::remove_file(&file);
    });
    Ok(bound)
}

/// Operators only; the connection is registered with `trust`, which cuts it on revocation.
fn authorize(
    trust: &Arc<Trust>,
    chain: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Authorized, String> {
    let leaf = chain
        .first()
        .ok_or("no client certificate: connect with the lab certificates of an operator")?;
    let identity = Identity::from_certificate_der(leaf)?;
    if identity.role != Role::Operator {
        return Err(format!(
            "{identity} may not use machines' disks: NBD exports are for operators (a \
             certificate from `config-server operator add`)"
        ));
    }
    let token = CancellationToken::new();
    let id = trust.opened(fingerprint_der(leaf), token.clone());
    tracing::info!(operator = %identity, "NBD client over TLS");
    Ok(Authorized {
        token,
        guard: Some(Box::new(Closed {
            trust: trust.clone(),
            id,
        })),
    })
}

/// Unregisters a connection from [`Trust`] when dropped.
struct Closed {
    trust: Arc<Trust>,
    id: u64,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.trust.closed(self.id);
    }
}
