//! Client side of the control stream every component keeps to the configuration server.
//!
//! A supervisor task dials the CS, sends `Hello` (rebuilt on every connect, so it reports the
//! current state), then heartbeats at the interval the CS asks for in `Welcome`. It forwards
//! the CS's commands to the component and the component's reports to the CS. When the stream
//! breaks, or the CS stops acknowledging heartbeats (a stalled link), it reconnects by itself
//! with exponential backoff, logging why. Revocations the CS sends are applied to the
//! component's [`Trust`] here, whatever else the component does; and once less than the CS's
//! `renew_within` remains of the certificate, a new one is asked for (fresh key, CSR) and
//! put in the component's [`CredentialsCell`] when it arrives. Whether the stream is up is published in a
//! `watch` channel. Every attempt to open the stream, and every one that the CS welcomed, is
//! counted per component in [`CONNECTS`] (served by each process's metrics), so a reconnect
//! storm shows as a number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::{HashMap, VecDeque};

use failback_proto::pb::control::{
    CommandResult, ComponentMessage, CsMessage, ErrorCode, Heartbeat, Hello, Renew, command_result,
    component_message, control_client::ControlClient, cs_message,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use prometheus::IntCounterVec;

use crate::enroll::Backoff;
use crate::identity::{CS_NAME, Role};
use crate::renewal::CredentialsCell;
use crate::tls::{Credentials, describe_error};
use crate::trust::Trust;

/// Builds the `Hello` sent on each (re)connect.
pub type HelloFn = Arc<dyn Fn() -> Hello + Send + Sync>;

/// The component's end of the control stream.
pub struct ControlHandle {
    /// `true` while a session with the CS is established (Welcome received).
    pub connected: watch::Receiver<bool>,
    /// Commands from the CS (everything but Welcome and heartbeat acks).
    pub commands: mpsc::Receiver<CsMessage>,
    /// Reports to the CS; held while disconnected and sent after the next Hello.
    pub outbox: mpsc::Sender<ComponentMessage>,
}

/// Where the control stream goes: the CS's address, dialed with the credentials of the
/// moment (they change when renewed).
#[derive(Clone)]
pub struct Dial {
    pub cell: CredentialsCell,
    pub address: String,
}

impl Dial {
    fn endpoint(&self) -> Result<Endpoint, String> {
        self.cell
            .endpoint(&self.address, Role::ConfigServer, CS_NAME)
            .map_err(|e| format!("bad configuration server address {}: {e}", self.address))
    }
}

/// `flab_control_connects_total{component, outcome}`: control-stream attempts of this process
/// (`outcome="attempted"`, counted when dialing starts) and those the CS welcomed
/// (`outcome="welcomed"`), by the component that made them (a host counts each of its
/// machines' agents under the machine's name).
pub static CONNECTS: std::sync::LazyLock<IntCounterVec> = std::sync::LazyLock::new(|| {
    IntCounterVec::new(
        prometheus::Opts::new(
            "flab_control_connects_total",
            "Control-stream connections to the configuration server: attempted, and welcomed by it.",
        ),
        &["component", "outcome"],
    )
    .unwrap_or_else(|e| panic!("{e}"))
});

/// Starts the supervisor; it runs until `shutdown` is cancelled. Revocations the CS sends
/// go to `trust` (the component's listeners consult it).
pub fn spawn(
    dial: Dial,
    hello: HelloFn,
    trust: Arc<Trust>,
    shutdown: CancellationToken,
) -> (ControlHandle, tokio::task::JoinHandle<()>) {
    let (connected_tx, connected) = watch::channel(false);
    let (commands_tx, commands) = mpsc::channel(256);
    let (outbox, outbox_rx) = mpsc::channel(256);
    let task = tokio::spawn(supervise(
        dial,
        hello,
        trust,
        shutdown,
        connected_tx,
        commands_tx,
        outbox_rx,
    ));
    (
        ControlHandle {
            connected,
            commands,
            outbox,
        },
        task,
    )
}

async fn supervise(
    dial: Dial,
    hello: HelloFn,
    trust: Arc<Trust>,
    shutdown: CancellationToken,
    connected: watch::Sender<bool>,
    commands: mpsc::Sender<CsMessage>,
    mut outbox: mpsc::Receiver<ComponentMessage>,
) {
    let address = dial.address.clone();
    let name = hello().name;
    let attempted = CONNECTS.with_label_values(&[name.as_str(), "attempted"]);
    let welcomed = CONNECTS.with_label_values(&[name.as_str(), "welcomed"]);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut ends = Ends {
        connected,
        commands,
        outbox: &mut outbox,
        ever_connected: false,
        welcomed,
    };
    loop {
        let started = Instant::now();
        attempted.inc();
        let result = session(&dial, &hello, &trust, &shutdown, &mut ends).await;
        let _ = ends.connected.send(false);
        if shutdown.is_cancelled() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        match result {
            Ok(()) => tracing::warn!(
                "configuration server at {address} closed the control stream; reconnecting in {wait:?}"
            ),
            Err(e) => tracing::warn!(
                "control stream to the configuration server at {address}: {e}; reconnecting in {wait:?}"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The supervisor's side of the component: what one session publishes to and reads from.
struct Ends<'a> {
    connected: watch::Sender<bool>,
    commands: mpsc::Sender<CsMessage>,
    outbox: &'a mut mpsc::Receiver<ComponentMessage>,
    ever_connected: bool,
    /// This component's count of sessions the CS welcomed.
    welcomed: prometheus::IntCounter,
}

async fn session(
    dial: &Dial,
    hello: &HelloFn,
    trust: &Trust,
    shutdown: &CancellationToken,
    ends: &mut Ends<'_>,
) -> Result<(), String> {
    let Ends {
        connected,
        commands,
        outbox,
        ever_connected,
        welcomed,
    } = ends;
    let channel = dial
        .endpoint()?
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {}", describe_error(&e)))?;
    let mut client = ControlClient::new(channel);
    let (tx, rx) = mpsc::channel::<ComponentMessage>(64);
    tx.send(ComponentMessage {
        kind: Some(component_message::Kind::Hello(hello())),
    })
    .await
    .map_err(|_| "stream closed before hello".to_string())?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("refused: {}", s.message()))?
        .into_inner();

    let welcome = match inbound.message().await {
        Ok(Some(CsMessage {
            kind: Some(cs_message::Kind::Welcome(w)),
        })) => w,
        Ok(Some(_)) => return Err("protocol error: first message was not Welcome".into()),
        Ok(None) => return Err("stream closed before Welcome".into()),
        Err(s) => return Err(format!("refused: {}", s.message())),
    };
    let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(50)));
    if *ever_connected {
        tracing::info!("reconnected to the configuration server");
    } else {
        tracing::info!(cs_version = %welcome.cs_version, "registered with the configuration server");
    }
    *ever_connected = true;
    welcomed.inc();
    let _ = connected.send(true);

    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let mut last_ack = Instant::now();
    let renew_within = i64::try_from(welcome.renew_within_ms).unwrap_or(i64::MAX);
    // The key of a renewal asked for on this session, until its certificate arrives.
    let mut renewing: Option<rcgen::KeyPair> = None;
    let mut reports = crate::coalesce::Coalescer::default();
    loop {
        let due = reports.due();
        tokio::select! {
            _ = ticker.tick() => {
                if last_ack.elapsed() > interval * 5 {
                    return Err(format!("no heartbeat acknowledgement for {:?}", last_ack.elapsed()));
                }
                if renewing.is_none()
                    && renew_within > 0
                    && dial.cell.not_after_ms() - now_ms() < renew_within
                {
                    match crate::tls::new_key_and_csr(&dial.cell.identity()) {
                        Ok((key, csr_pem)) => {
                            tracing::info!(
                                expires_in_s = (dial.cell.not_after_ms() - now_ms()) / 1000,
                                "asking the configuration server to renew the certificate"
                            );
                            let renew = ComponentMessage {
                                kind: Some(component_message::Kind::Renew(Renew { csr_pem })),
                            };
                            if tx.send(renew).await.is_err() {
                                return Err("stream closed".into());
                            }
                            renewing = Some(key);
                        }
                        Err(e) => tracing::warn!("cannot make a key to renew the certificate: {e}"),
                    }
                }
                sequence += 1;
                let hb = Heartbeat { sequence, sent_at_ms: now_ms() };
                if tx.send(ComponentMessage { kind: Some(component_message::Kind::Heartbeat(hb)) }).await.is_err() {
                    return Err("stream closed".into());
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(CsMessage { kind: Some(cs_message::Kind::HeartbeatAck(_)) })) => {
                    last_ack = Instant::now();
                }
                Ok(Some(CsMessage { kind: Some(cs_message::Kind::Revocations(r)) })) => {
                    last_ack = Instant::now();
                    let cut = trust.revoke(r.fingerprints);
                    tracing::debug!(cut, "revocations from the configuration server applied");
                }
                Ok(Some(CsMessage { kind: Some(cs_message::Kind::Renewed(r)) })) => {
                    last_ack = Instant::now();
                    let Some(key) = renewing.take() else {
                        tracing::warn!("a renewed certificate nobody asked for: ignored");
                        continue;
                    };
                    let current = dial.cell.get();
                    let renewed = Credentials {
                        identity: current.identity.clone(),
                        cert_pem: r.certificate_pem,
                        key_pem: key.serialize_pem(),
                        ca_pem: current.ca_pem.clone(),
                    };
                    match dial.cell.replace(renewed) {
                        Ok(()) => tracing::info!(
                            valid_for_s = (dial.cell.not_after_ms() - now_ms()) / 1000,
                            "certificate renewed"
                        ),
                        Err(e) => tracing::warn!("the renewed certificate is unusable: {e}; asking again"),
                    }
                }
                Ok(Some(other)) => {
                    last_ack = Instant::now();
                    if commands.send(other).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
            Some(m) = outbox.recv() => {
                for out in reports.push(m, Instant::now()) {
                    if tx.send(out).await.is_err() {
                        return Err("stream closed".into());
                    }
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                if let Some(out) = reports.flush(Instant::now())
                    && tx.send(out).await.is_err()
                {
                    return Err("stream closed".into());
                }
            }
            _ = shutdown.cancelled() => {
                if let Some(out) = reports.flush(Instant::now()) {
                    let _ = tx.send(out).await;
                }
                return Ok(());
            }
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a component did not carry out a command: a code the CS acts on, a message it shows.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    /// The command names something this component does not have.
    pub fn not_found(message: impl Into<String>) -> Refusal {
        Refusal {
            code: ErrorCode::NotFound,
            message: message.into(),
        }
    }
}

impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal {
            code: ErrorCode::Failed,
            message,
        }
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Refusal {
        Refusal::from(message.to_string())
    }
}

/// What carrying out a command gave: its typed detail (if the command has one), or why not.
pub type Outcome = Result<Option<command_result::Detail>, Refusal>;

/// The result message for command `id`.
pub fn result_of(id: u64, outcome: Outcome) -> CommandResult {
    match outcome {
        Ok(detail) => CommandResult {
            id,
            ok: true,
            error: String::new(),
            code: ErrorCode::Unspecified as i32,
            detail,
        },
        Err(r) => CommandResult {
            id,
            ok: false,
            error: r.message,
            code: r.code as i32,
            detail: None,
        },
    }
}

/// Answers command `id`. Returns false when the control stream's outbox is gone (the
/// component is stopping).
pub async fn reply(outbox: &mpsc::Sender<ComponentMessage>, result: CommandResult) -> bool {
    outbox
        .send(ComponentMessage {
            kind: Some(component_message::Kind::Result(result)),
        })
        .await
        .is_ok()
}

/// The commands a component carried out lately, by id: a command re-sent with the same id (a
/// job the CS resumed after a restart) is answered with the same result and not carried out
/// again. Only successes are kept: a command that failed is tried again.
#[derive(Default)]
pub struct Answered {
    results: HashMap<u64, CommandResult>,
    order: VecDeque<u64>,
}

/// How many answers [`Answered`] keeps.
const ANSWERED: usize = 1024;

impl Answered {
    /// The answer already given to command `id`, if any.
    pub fn get(&self, id: u64) -> Option<CommandResult> {
        self.results.get(&id).cloned()
    }

    /// Keeps `result` if it is a success.
    pub fn record(&mut self, result: &CommandResult) {
        if !result.ok || self.results.contains_key(&result.id) {
            return;
        }
        if self.order.len() >= ANSWERED
            && let Some(old) = self.order.pop_front()
        {
            self.results.remove(&old);
        }
        self.order.push_back(result.id);
        self.results.insert(result.id, result.clone());
    }
}

/// Answers command `id` with what `run` gives, unless a command of that id was carried out
/// already (then with the answer given then). Returns false when the outbox is gone.
pub async fn answer<Fut>(
    outbox: &mpsc::Sender<ComponentMessage>,
    answered: &mut Answered,
    id: u64,
    run: impl FnOnce() -> Fut,
) -> bool
where
    Fut: std::future::Future<Output = Outcome>,
{
    let result = match answered.get(id) {
        Some(done) => {
            tracing::info!(id, "command already carried out: answered again");
            done
        }
        None => {
            let r = result_of(id, run().await);
            answered.record(&r);
            r
        }
    };
    reply(outbox, result).await
}

/// The next command from the CS on a control stream (anything else is skipped); `None` once
/// the stream's supervisor is gone.
pub async fn next_command(
    commands: &mut mpsc::Receiver<CsMessage>,
) -> Option<failback_proto::pb::control::Command> {
    while let Some(msg) = commands.recv().await {
        if let Some(cs_message::Kind::Command(cmd)) = msg.kind {
            return Some(cmd);
        }
    }
    None
}
