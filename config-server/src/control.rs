//! The `Control` service: one long-lived stream per component (and per machine's agent).
//!
//! The first message must be a `Hello` that matches the caller's certificate; the certificate
//! must be the one this CS issued for that name (a removed or re-enrolled identity is
//! refused). The CS records the registration, answers `Welcome`, acknowledges heartbeats,
//! and drops a stream that stays silent past `heartbeat_timeout`; the component then shows
//! "not connected" until it reconnects. A newer stream of the same component replaces the
//! older one.
//!
//! A busy CS asks for fewer heartbeats: a stream opening while many are open gets an interval
//! that keeps all of them near [`HEARTBEATS_PER_SECOND`] (never under `heartbeat_interval`,
//! at most [`MAX_HEARTBEAT_INTERVAL`]), and is dropped only after four such intervals of
//! silence (never sooner than `heartbeat_timeout`). At 1,000 streams a heartbeat a second each
//! cost the CS more than a tenth of a core in wakeups and socket writes alone.

use std::pin::Pin;
use std::sync::Arc;

use failback_common::control::now_ms;
use failback_common::identity::{Identity, Role, authorize};
use failback_proto::pb::control::{
    ComponentMessage, CsMessage, HeartbeatAck, Hello, Renewed, Revocations, Welcome,
    component_message, control_server::Control, cs_message, report,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::reports::FollowUp;
use crate::sessions::Session;
use crate::state::State;

pub struct ControlService {
    pub state: Arc<State>,
    /// For what a report asks the CS to start (an automatic resync).
    pub jobs: Arc<crate::jobs::Jobs>,
}

/// Heartbeats are written to the database at most this often per component (the live one is
/// in the session).
const PERSIST_HEARTBEAT_MS: i64 = 30_000;
/// Heartbeats a second the CS plans for across all its control streams: up to 100 streams
/// keep the configured interval; 1,000 beat every 10 s (ASR's components beat every few
/// minutes). A stream that closes is noticed at once; the silence timeout only catches a
/// peer that hangs with its connection open.
pub const HEARTBEATS_PER_SECOND: usize = 100;
/// The longest heartbeat interval a busy CS asks for.
pub const MAX_HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The heartbeat interval for a stream opening while `open` streams are open, and the silence
/// after which it is dropped.
pub fn heartbeat_for(
    interval: std::time::Duration,
    timeout: std::time::Duration,
    open: usize,
) -> (std::time::Duration, std::time::Duration) {
    let spread = std::time::Duration::from_secs_f64(open as f64 / HEARTBEATS_PER_SECOND as f64)
        .min(MAX_HEARTBEAT_INTERVAL);
    let interval = interval.max(spread);
    (interval, timeout.max(interval * 4))
}

/// A report's kind, as the metrics name it.
fn report_kind(r: &failback_proto::pb::control::Report) -> &'static str {
    match &r.kind {
        Some(report::Kind::Progress(_)) => "progress",
        Some(report::Kind::PointAdded(_)) => "point_added",
        Some(report::Kind::PointsPruned(_)) => "points_pruned",
        Some(report::Kind::ReplicaDamaged(_)) => "replica_damaged",
        Some(report::Kind::PsStatus(_)) => "ps_status",
        None => "report_empty",
    }
}

/// Counts `m` in [`crate::metrics::MESSAGES`] by its kind (a lone report by the report's
/// kind, a batch of them as `reports`).
fn count(m: ComponentMessage) -> ComponentMessage {
    use component_message::Kind;
    let kind = match &m.kind {
        Some(Kind::Heartbeat(_)) => "heartbeat",
        Some(Kind::Report(r)) => report_kind(r),
        Some(Kind::Reports(_)) => "reports",
        Some(Kind::Result(_)) => "result",
        Some(Kind::Renew(_)) => "renew",
        Some(Kind::Hello(_)) => "hello",
        None => "empty",
    };
    crate::metrics::MESSAGES.with_label_values(&[kind]).inc();
    m
}

fn check_hello(hello: &Hello, who: &Identity) -> Result<(), Status> {
    if hello.name != who.name || hello.role != who.role.as_str() || hello.site != who.site.as_str()
    {
        return Err(Status::permission_denied(format!(
            "hello names {} `{}` ({}), but the certificate is for {who}",
            hello.role, hello.name, hello.site
        )));
    }
    validate_hello(hello).map_err(|e| {
        tracing::warn!(%who, "hello refused: {e}");
        Status::invalid_argument(format!("hello refused, nothing stored: {e}"))
    })
}

/// Signs a renewal CSR for the session's own identity (whatever the CSR names) and records
/// the new certificate's fingerprint.
async fn renew(state: &Arc<State>, who: &Identity, csr_pem: &str) -> Result<String, String> {
    if csr_pem.len() > 16 << 10 {
        return Err("CSR larger than 16 KiB".into());
    }
    let (pem, fingerprint) = state
        .ca
        .sign_csr(csr_pem, who, state.config.cert_lifetime)
        .map_err(|e| e.to_string())?;
    let name = who.name.clone();
    state
        .store
        .call(move |db| db.set_fingerprint(&name, &fingerprint))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(%who, "certificate renewed");
    Ok(pem)
}

/// Most datastores, disks, machines and snapshots one Hello may describe.
const MAX_LISTED: usize = 1024;
/// Longest path or free-form string accepted in a Hello.
const MAX_TEXT: usize = 4096;

/// What a component says about itself is stored and sent on to others (disk paths end up in
/// master-target and host commands): every name is a plain name, every path absolute and
/// without `..`, every list and string bounded. The first problem found, naming its field.
fn validate_hello(hello: &Hello) -> Result<(), String> {
    use failback_common::identity::validate_name;
    use failback_common::paths::is_plain_absolute;
    let field = |f: String, e: String| format!("{f}: {e}");
    let text = |f: &str, s: &str| -> Result<(), String> {
        if s.len() > MAX_TEXT {
            Err(format!("{f}: longer than {MAX_TEXT} bytes"))
        } else {
            Ok(())
        }
    };
    let path = |f: String, p: &str| -> Result<(), String> {
        if p.len() > MAX_TEXT || !is_plain_absolute(p) {
            Err(format!(
                "{f}: `{p}` is not an absolute path without `.` or `..`"
            ))
        } else {
            Ok(())
        }
    };
    let count = |f: &str, n: usize| -> Result<(), String> {
        if n > MAX_LISTED {
            Err(format!("{f}: more than {MAX_LISTED} entries"))
        } else {
            Ok(())
        }
    };
    text("version", &hello.version)?;
    count("addresses", hello.addresses.len())?;
    for (site, address) in &hello.addresses {
        site.parse::<failback_common::identity::Site>()
            .map_err(|e| field(format!("addresses[{site}]"), e))?;
        text(&format!("addresses[{site}]"), address)?;
    }
    count("datastores", hello.datastores.len())?;
    for (i, ds) in hello.datastores.iter().enumerate() {
        validate_name(&ds.name).map_err(|e| field(format!("datastores[{i}].name"), e))?;
        path(format!("datastores[{i}].path"), &ds.path)?;
    }
    if let Some(m) = &hello.machine {
        if !m.host.is_empty() {
            validate_name(&m.host).map_err(|e| field("machine.host".into(), e))?;
        }
        text("machine.power_state", &m.power_state)?;
        count("machine.disks", m.disks.len())?;
        for (i, d) in m.disks.iter().enumerate() {
            validate_name(&d.id).map_err(|e| field(format!("machine.disks[{i}].id"), e))?;
            validate_name(&d.datastore)
                .map_err(|e| field(format!("machine.disks[{i}].datastore"), e))?;
            path(format!("machine.disks[{i}].path"), &d.path)?;
        }
    }
    count("machines", hello.machines.len())?;
    for (i, m) in hello.machines.iter().enumerate() {
        validate_name(m).map_err(|e| field(format!("machines[{i}]"), e))?;
    }
    count("snapshots", hello.snapshots.len())?;
    for (i, s) in hello.snapshots.iter().enumerate() {
        text(&format!("snapshots[{i}]"), s)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Control for ControlService {
    type SessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<CsMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<ComponentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = authorize(
            &request,
            "Control.Session",
            &[
                Role::ProcessServer,
                Role::MasterTarget,
                Role::Host,
                Role::Agent,
                Role::VpnLink,
            ],
        )?;
        let fingerprint = request
            .peer_certs()
            .and_then(|c| c.first().map(|c| hex::encode(Sha256::digest(c.as_ref()))))
            .unwrap_or_default();
        let state = self.state.clone();
        if state.stopping.is_cancelled() {
            return Err(Status::unavailable("configuration server shutting down"));
        }
        let name = who.name.clone();
        // Any unrevoked certificate of a registered identity is its own (revoked ones never
        // get past the handshake): one other than the recorded one is a renewal whose answer
        // was lost, so it becomes the recorded one, and the data plane is told.
        let changed = match state.store.call(move |db| db.component(&name)).await? {
            None => {
                return Err(Status::permission_denied(format!(
                    "{who} is not registered with this configuration server (removed, or the CS \
                     was restored from an older backup); delete the component's identity \
                     directory and enroll again"
                )));
            }
            Some(row) => row.cert_fingerprint != fingerprint,
        };
        if changed {
            let (name, fp) = (who.name.clone(), fingerprint.clone());
            state
                .store
                .call(move |db| db.set_fingerprint(&name, &fp))
                .await?;
            crate::reports::reassign(state.clone(), who.clone());
        }
        let mut inbound = request.into_inner();
        let timeout = state.config.heartbeat_timeout;
        let hello = match tokio::time::timeout(timeout, inbound.message()).await {
            Ok(Ok(Some(ComponentMessage {
                kind: Some(component_message::Kind::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument("the first message must be Hello"));
            }
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before Hello")),
            Ok(Err(s)) => return Err(s),
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no Hello within the heartbeat timeout",
                ));
            }
        };
        check_hello(&hello, &who)?;
        let now = now_ms();
        let registered = hello.clone();
        let registered_count = state
            .store
            .call(move |db| {
                db.register(&registered, now)?;
                db.component_count()
            })
            .await?;
        if who.role == Role::MasterTarget {
            state.set_snapshots(&who.name, hello.snapshots.clone());
        }

        let (interval, silence) = heartbeat_for(
            state.config.heartbeat_interval,
            state.config.heartbeat_timeout,
            // Planned for every registered component, not only those connected so far: after a
            // CS restart all reconnect at once, and the first to come back would otherwise keep
            // the interval of an empty CS (1,000 streams made 600 heartbeats a second, not 250).
            state.sessions.lock().len().max(registered_count),
        );
        let (tx, rx) = mpsc::channel(64);
        tx.send(Ok(CsMessage {
            kind: Some(cs_message::Kind::Welcome(Welcome {
                heartbeat_interval_ms: interval.as_millis() as u32,
                cs_version: failback_common::VERSION.to_string(),
                renew_within_ms: (state.config.cert_lifetime / 3).as_millis() as u64,
            })),
        }))
        .await
        .map_err(|_| Status::cancelled("peer gone"))?;
        let fingerprints = state.store.call(|db| db.revoked()).await?;
        tx.send(Ok(CsMessage {
            kind: Some(cs_message::Kind::Revocations(Revocations { fingerprints })),
        }))
        .await
        .map_err(|_| Status::cancelled("peer gone"))?;

        let conn_id = state.sessions.next_conn_id();
        let cancel = CancellationToken::new();
        let replaced = state.sessions.open(
            &who.name,
            Session {
                conn_id,
                tx: tx.clone(),
                cancel: cancel.clone(),
                last_heartbeat_ms: now,
            },
        );
        if replaced {
            tracing::info!(%who, "new control stream replaces the previous one");
        }
        tracing::info!(%who, version = %hello.version, "connected");
        crate::reports::resume(state.clone(), who.clone());

        state.notify();
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            let stream = Stream {
                conn_id,
                cancel,
                silence,
            };
            let reason = pump(&state, &jobs, &who, &stream, inbound, tx).await;
            if state.sessions.close(&who.name, conn_id) {
                tracing::warn!(%who, "not connected: {reason}");
                state.notify();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Most reports one `ReportBatch` may carry (components send up to 256).
const MAX_BATCHED_REPORTS: usize = 1024;

/// Takes one report (alone or from a batch) and starts what it calls for.
async fn report(
    state: &Arc<State>,
    jobs: &Arc<crate::jobs::Jobs>,
    who: &Identity,
    r: failback_proto::pb::control::Report,
) {
    crate::metrics::REPORTS
        .with_label_values(&[report_kind(&r)])
        .inc();
    match crate::reports::on_report(state, who, r).await {
        Ok(FollowUp::Nothing) => {}
        Ok(FollowUp::Resync { item, reason }) => {
            let jobs = jobs.clone();
            tokio::spawn(async move {
                crate::jobs::resync::start_automatic(&jobs, &item, &reason).await
            });
        }
        Err(e) => tracing::error!(%who, "report: {e}"),
    }
}

/// One open control stream as the CS keeps it.
struct Stream {
    conn_id: u64,
    /// Cancelled when a newer stream of the same component replaces it.
    cancel: CancellationToken,
    /// Silence after which it is dropped ([`heartbeat_for`]).
    silence: std::time::Duration,
}

/// Reads the component's messages until the stream ends; returns why it ended.
async fn pump(
    state: &Arc<State>,
    jobs: &Arc<crate::jobs::Jobs>,
    who: &Identity,
    stream: &Stream,
    mut inbound: Streaming<ComponentMessage>,
    tx: mpsc::Sender<Result<CsMessage, Status>>,
) -> String {
    let (conn_id, cancel, timeout) = (stream.conn_id, &stream.cancel, stream.silence);
    let mut persisted_ms = 0i64;
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(timeout, inbound.message()) => m,
            _ = cancel.cancelled() => return "replaced by a newer control stream".into(),
            _ = state.stopping.cancelled() => return "configuration server shutting down".into(),
        };
        match msg {
            Err(_) => return format!("no heartbeat for {timeout:?}"),
            Ok(Err(s)) => return format!("stream error: {}", s.message()),
            Ok(Ok(None)) => return "control stream closed".into(),
            Ok(Ok(Some(m))) => match count(m).kind {
                Some(component_message::Kind::Heartbeat(hb)) => {
                    let now = now_ms();
                    if let Some(s) = state.sessions.lock().get_mut(&who.name) {
                        s.last_heartbeat_ms = now;
                    }
                    if now - persisted_ms >= PERSIST_HEARTBEAT_MS {
                        persisted_ms = now;
                        let name = who.name.clone();
                        // Submitted, not waited for: a slow disk must not delay the ack.
                        if let Err(e) = state
                            .store
                            .submit(
                                move |db| db.heartbeat(&name, now),
                                |r| {
                                    if let Err(e) = r {
                                        tracing::error!("{e}");
                                    }
                                },
                            )
                            .await
                        {
                            tracing::error!("{e}");
                        }
                    }
                    let ack = CsMessage {
                        kind: Some(cs_message::Kind::HeartbeatAck(HeartbeatAck {
                            sequence: hb.sequence,
                        })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return "peer gone".into();
                    }
                }
                Some(component_message::Kind::Result(r)) => {
                    state.sessions.result(&who.name, conn_id, r)
                }
                Some(component_message::Kind::Renew(r)) => {
                    match renew(state, who, &r.csr_pem).await {
                        Ok(certificate_pem) => {
                            let renewed = CsMessage {
                                kind: Some(cs_message::Kind::Renewed(Renewed { certificate_pem })),
                            };
                            if tx.send(Ok(renewed)).await.is_err() {
                                return "peer gone".into();
                            }
                            crate::reports::reassign(state.clone(), who.clone());
                        }
                        Err(e) => tracing::warn!(%who, "renewal refused: {e}"),
                    }
                }
                Some(component_message::Kind::Report(r)) => report(state, jobs, who, r).await,
                Some(component_message::Kind::Reports(b)) => {
                    if b.reports.len() > MAX_BATCHED_REPORTS {
                        let _ = tx
                            .send(Err(Status::invalid_argument(format!(
                                "{} reports in one message: at most {MAX_BATCHED_REPORTS}",
                                b.reports.len()
                            ))))
                            .await;
                        return "protocol error: too many reports in one message".into();
                    }
                    for r in b.reports {
                        report(state, jobs, who, r).await;
                    }
                }
                Some(component_message::Kind::Hello(_)) => {
                    let _ = tx
                        .send(Err(Status::invalid_argument(
                            "Hello may only be sent first",
                        )))
                        .await;
                    return "protocol error: second Hello".into();
                }
                None => {
                    let _ = tx
                        .send(Err(Status::invalid_argument("empty message")))
                        .await;
                    return "protocol error: empty message".into();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_busy_cs_asks_for_fewer_heartbeats_and_waits_longer() {
        let (i, t) = (Duration::from_secs(1), Duration::from_secs(4));
        assert_eq!(
            heartbeat_for(i, t, 10),
            (i, t),
            "a small lab keeps its settings"
        );
        assert_eq!(
            heartbeat_for(i, t, 1000),
            (Duration::from_secs(10), Duration::from_secs(40))
        );
        assert_eq!(
            heartbeat_for(i, t, 200),
            (Duration::from_secs(2), Duration::from_secs(8))
        );
        assert_eq!(
            heartbeat_for(i, t, 100_000),
            (MAX_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL * 4),
            "bounded"
        );
        let slow = Duration::from_secs(30);
        assert_eq!(heartbeat_for(slow, slow * 3, 1000), (slow, slow * 4));
    }
}
