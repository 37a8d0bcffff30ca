//! Replication of one machine to its process server.
//!
//! Three tasks per replicated machine: the *copier* puts the initial copy (allocated extents
//! only, regions never written are skipped) or, after a crash, the hot regions of the activity
//! log into the replication log; the *tagger* adds crash- and app-consistent tags on the
//! policy's timers once the replica is consistent; the *sender* cuts the log into batches,
//! streams them to the PS and clears them on the PS's acknowledgements (the durability chain:
//! nothing is forgotten before the PS has it on disk). On reconnect the PS says the last
//! batch it holds; the sender re-sends the rest. The highest acknowledged sequence number
//! persists in `replication.json`, so numbering never goes backwards, even across a PS switch.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use failback_common::control::now_ms;
use failback_common::enroll::Backoff;
use failback_common::tls::{Credentials, describe_error};
use failback_proto::pb::control::{
    ComponentMessage, DiskProgress, ItemProgress, Report, component_message, report,
};
use failback_proto::pb::data::{
    self as pb, AgentBatch, StreamOpen, process_server_data_client::ProcessServerDataClient,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::capture::{Capture, LogEntry};

/// Largest batch the sender builds.
const BATCH_BYTES: u64 = 4 << 20;
/// Most unacknowledged bytes on the wire.
const WINDOW_BYTES: u64 = 48 << 20;
/// Initial-copy chunk.
const COPY_CHUNK: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub item: String,
    pub process_server: String,
    pub ps_address: String,
    pub crash_interval: Duration,
    pub app_interval: Option<Duration>,
    pub verify_tags: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Persisted {
    item: String,
    initial_done: bool,
    /// Highest seq a PS acknowledged as durable. After a restart the agent continues after
    /// the larger of this and what the PS says it holds: batches sent but never received died
    /// with the process (their regions are still hot and get re-sent), and a new PS after a
    /// switch starts where the old one had got to.
    acked_seq: u64,
}

fn load(path: &Path) -> Persisted {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(path: &Path, p: &Persisted) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(p).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Shared between the three tasks.
struct Shared {
    params: Params,
    capture: Arc<Capture>,
    state_path: PathBuf,
    persisted: std::sync::Mutex<Persisted>,
    /// The replica is consistent (initial copy or resync acknowledged): tags may be taken.
    consistent: AtomicBool,
    /// Log entry id whose acknowledgement completes the copy phase (0 = not yet known).
    copy_end_entry: AtomicU64,
    /// Per disk: (bytes to copy, bytes copied).
    copy_progress: std::sync::Mutex<Vec<(u64, u64)>>,
    resync: bool,
    bytes_sent: AtomicU64,
    acked_seq: AtomicU64,
    acked_entry: AtomicU64,
}

/// A running replication; dropping it does not stop it, `stop` does.
pub struct Replication {
    pub params: Params,
    cancel: CancellationToken,
}

impl Replication {
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Starts replicating `capture` per `params`.
pub fn start(
    params: Params,
    capture: Arc<Capture>,
    credentials: Credentials,
    state_dir: &Path,
    outbox: mpsc::Sender<ComponentMessage>,
    shutdown: &CancellationToken,
) -> std::io::Result<Replication> {
    let state_path = state_dir.join("replication.json");
    let mut persisted = load(&state_path);
    if persisted.item != params.item {
        persisted = Persisted {
            item: params.item.clone(),
            initial_done: false,
            acked_seq: 0,
        };
        save(&state_path, &persisted)?;
    }
    let resync = persisted.initial_done;
    let disks = capture.disk_ids().len();
    let shared = Arc::new(Shared {
        params: params.clone(),
        capture: capture.clone(),
        state_path,
        persisted: std::sync::Mutex::new(persisted),
        consistent: AtomicBool::new(false),
        copy_end_entry: AtomicU64::new(0),
        copy_progress: std::sync::Mutex::new(vec![(0, 0); disks]),
        resync,
        bytes_sent: AtomicU64::new(0),
        acked_seq: AtomicU64::new(0),
        acked_entry: AtomicU64::new(0),
    });
    capture.set_logging(true);
    let cancel = shutdown.child_token();
    tokio::spawn(copier(shared.clone(), cancel.clone()));
    tokio::spawn(tagger(shared.clone(), cancel.clone()));
    tokio::spawn(reporter(shared.clone(), outbox, cancel.clone()));
    tokio::spawn(sender(shared, credentials, cancel.clone()));
    Ok(Replication { params, cancel })
}

async fn copier(shared: Arc<Shared>, cancel: CancellationToken) {
    let capture = &shared.capture;
    let mut plan: Vec<Vec<(u64, u64)>> = Vec::new();
    let disks = capture.disk_ids();
    for (i, (disk_id, disk_size)) in disks.iter().enumerate() {
        let extents = if shared.resync {
            capture
                .hot_regions()
                .into_iter()
                .filter(|(d, _, _)| *d == i)
                .map(|(_, o, l)| (o, l))
                .collect()
        } else {
            capture.allocated_extents(i).unwrap_or_else(|e| {
                tracing::error!("cannot map the extents of disk {disk_id}: {e}; copying all of it");
                vec![(0, *disk_size)]
            })
        };
        plan.push(extents);
    }
    if let Ok(mut p) = shared.copy_progress.lock() {
        for (i, ext) in plan.iter().enumerate() {
            p[i].0 = ext.iter().map(|(_, l)| l).sum();
        }
    }
    // ASR copies at most 3 disks of a machine at a time; here they go one after the other.
    for (disk, extents) in plan.into_iter().enumerate() {
        for (off, len) in extents {
            let mut pos = off;
            while pos < off + len {
                if cancel.is_cancelled() {
                    return;
                }
                let n = COPY_CHUNK.min(off + len - pos);
                if let Err(e) = capture.copy(disk, pos, n).await {
                    tracing::error!("initial copy of disk {disk} at {pos}: {e}");
                    return;
                }
                pos += n;
                if let Ok(mut p) = shared.copy_progress.lock() {
                    p[disk].1 += n;
                }
            }
        }
    }
    // The copy is complete once the PS acknowledged a marker entry after it: an empty copy.
    let _ = capture.copy(0, 0, 0).await;
    let marker = capture.last_entry_id();
    shared.copy_end_entry.store(marker.max(1), Ordering::SeqCst);
    tracing::info!(
        item = %shared.params.item,
        "{} queued; consistent once acknowledged",
        if shared.resync { "resync of hot regions" } else { "initial copy" }
    );
}

async fn tagger(shared: Arc<Shared>, cancel: CancellationToken) {
    let p = &shared.params;
    let mut crash = tokio::time::interval(p.crash_interval);
    let app_every = p
        .app_interval
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut app = tokio::time::interval_at(tokio::time::Instant::now() + app_every, app_every);
    loop {
        let kind = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = crash.tick() => "crash",
            _ = app.tick() => "app",
        };
        if !shared.consistent.load(Ordering::SeqCst) {
            continue;
        }
        let capture = shared.capture.clone();
        let verify = p.verify_tags;
        let time_ms = now_ms();
        let id = format!("{}-{time_ms}", if kind == "app" { "app" } else { "crash" });
        // App-consistent: the workload is quiesced (writes wait on the capture lock) and the
        // disks flushed before the tag.
        let result = tokio::task::spawn_blocking(move || {
            capture.tag(id, kind, time_ms, verify, kind == "app")
        })
        .await;
        if let Ok(Err(e)) | Err(e) = result.map_err(std::io::Error::other) {
            tracing::error!("cannot take a {kind} tag: {e}");
        }
    }
}

fn encode(capture: &Capture, entries: &[LogEntry]) -> Bytes {
    let entries = entries
        .iter()
        .map(|e| pb::Entry {
            kind: Some(match e {
                LogEntry::Write { disk, offset, data } => pb::entry::Kind::Write(pb::Write {
                    disk: capture.disk_id(*disk),
                    offset: *offset,
                    data: data.clone(),
                }),
                LogEntry::Tag(t) => pb::entry::Kind::Tag(pb::Tag {
                    id: t.id.clone(),
                    kind: t.kind.clone(),
                    time_ms: t.time_ms,
                    digests: t
                        .digests
                        .iter()
                        .map(|(disk, blake3)| pb::DiskDigest {
                            disk: disk.clone(),
                            blake3: blake3.clone(),
                        })
                        .collect(),
                }),
            }),
        })
        .collect();
    Bytes::from(pb::Entries { entries }.encode_to_vec())
}

struct InFlight {
    seq: u64,
    last_entry: u64,
    bytes: u64,
    payload: Bytes,
    crc: u32,
}

async fn sender(shared: Arc<Shared>, credentials: Credentials, cancel: CancellationToken) {
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let started = Instant::now();
        let result = session(&shared, &credentials, &cancel, &mut inflight).await;
        if cancel.is_cancelled() {
            return;
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        tracing::warn!(
            item = %shared.params.item,
            "replication stream to {} at {}: {}; reconnecting in {wait:?}",
            shared.params.process_server,
            shared.params.ps_address,
            result.err().unwrap_or_else(|| "closed".into())
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

fn on_ack(shared: &Shared, inflight: &mut VecDeque<InFlight>, seq: u64) -> Result<(), String> {
    while inflight.front().is_some_and(|f| f.seq <= seq) {
        let Some(f) = inflight.pop_front() else { break };
        shared.acked_entry.store(f.last_entry, Ordering::SeqCst);
        shared
            .capture
            .acked(f.last_entry, f.bytes)
            .map_err(|e| format!("activity log: {e}"))?;
    }
    if shared.acked_seq.fetch_max(seq, Ordering::SeqCst) < seq
        && let Ok(mut p) = shared.persisted.lock()
    {
        p.acked_seq = p.acked_seq.max(seq);
        save(&shared.state_path, &p)
            .map_err(|e| format!("cannot persist replication state: {e}"))?;
    }
    let end = shared.copy_end_entry.load(Ordering::SeqCst);
    if end != 0
        && !shared.consistent.load(Ordering::SeqCst)
        && shared.acked_entry.load(Ordering::SeqCst) >= end
    {
        shared.consistent.store(true, Ordering::SeqCst);
        if let Ok(mut p) = shared.persisted.lock() {
            p.initial_done = true;
            save(&shared.state_path, &p)
                .map_err(|e| format!("cannot persist replication state: {e}"))?;
        }
        tracing::info!(item = %shared.params.item, "replica consistent: delta replication");
    }
    Ok(())
}

async fn session(
    shared: &Arc<Shared>,
    credentials: &Credentials,
    cancel: &CancellationToken,
    inflight: &mut VecDeque<InFlight>,
) -> Result<(), String> {
    let p = &shared.params;
    let channel = credentials
        .endpoint(&p.ps_address, &p.process_server)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| describe_error(&e))?;
    let mut client = ProcessServerDataClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<AgentBatch>(8);
    tx.send(AgentBatch {
        open: Some(StreamOpen {
            item: p.item.clone(),
        }),
        ..Default::default()
    })
    .await
    .map_err(|_| "stream closed")?;
    let mut acks = client
        .replicate(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let first = acks
        .message()
        .await
        .map_err(|s| s.message().to_string())?
        .ok_or("stream closed before the first acknowledgement")?;
    // Everything the PS already holds is acknowledged; the rest is sent again.
    on_ack(shared, inflight, first.seq)?;
    let mut next_seq = {
        let persisted = shared.persisted.lock().map_err(|_| "poisoned")?;
        persisted.acked_seq.max(first.seq) + 1
    };
    if let Some(f) = inflight.front() {
        next_seq = next_seq.min(f.seq);
    }
    for f in inflight.iter() {
        tx.send(AgentBatch {
            open: None,
            seq: f.seq,
            payload: f.payload.clone(),
            crc32: f.crc,
        })
        .await
        .map_err(|_| "stream closed")?;
        next_seq = f.seq + 1;
    }
    loop {
        let window_full =
            inflight.iter().map(|f| f.payload.len() as u64).sum::<u64>() >= WINDOW_BYTES;
        let ready = shared.capture.data_ready.notified();
        if !window_full && let Some((entries, last_entry)) = shared.capture.take_batch(BATCH_BYTES)
        {
            let bytes: u64 = entries.iter().map(LogEntry::bytes).sum();
            let payload = encode(&shared.capture, &entries);
            let crc = crc32fast::hash(&payload);
            let seq = next_seq;
            next_seq += 1;
            shared
                .bytes_sent
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
            inflight.push_back(InFlight {
                seq,
                last_entry,
                bytes,
                payload: payload.clone(),
                crc,
            });
            tokio::select! {
                r = tx.send(AgentBatch { open: None, seq, payload, crc32: crc }) => r.map_err(|_| "stream closed")?,
                _ = cancel.cancelled() => return Ok(()),
            }
            continue;
        }
        tokio::select! {
            _ = ready, if !window_full => {}
            ack = acks.message() => match ack {
                Ok(Some(a)) => on_ack(shared, inflight, a.seq)?,
                Ok(None) => return Err("process server closed the stream".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

async fn reporter(
    shared: Arc<Shared>,
    outbox: mpsc::Sender<ComponentMessage>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let sent = shared.bytes_sent.load(Ordering::Relaxed);
        let dt = last.0.elapsed().as_secs_f64();
        if dt > 0.0 {
            let inst = (sent - last.1) as f64 / dt;
            rate = if rate == 0.0 {
                inst
            } else {
                0.7 * rate + 0.3 * inst
            };
        }
        last = (Instant::now(), sent);
        let consistent = shared.consistent.load(Ordering::SeqCst);
        let phase = if consistent {
            "delta"
        } else if shared.resync {
            "resync"
        } else {
            "initial"
        };
        let ids = shared.capture.disk_ids();
        let progress = shared
            .copy_progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let disks = ids
            .iter()
            .zip(progress.iter())
            .enumerate()
            .map(|(i, ((id, _), (total, done)))| {
                let pct = if consistent
                    || *total == 0 && shared.copy_end_entry.load(Ordering::SeqCst) != 0
                {
                    100.0
                } else if *total == 0 {
                    0.0
                } else {
                    (*done as f64 / *total as f64 * 100.0).min(99.9)
                };
                let first_unfinished = progress
                    .iter()
                    .position(|(t, d)| d < t)
                    .unwrap_or(usize::MAX);
                let state = if pct >= 100.0 || (*total > 0 && done >= total) {
                    "Complete"
                } else if i == first_unfinished {
                    "In progress"
                } else {
                    "In queue"
                };
                DiskProgress {
                    id: id.clone(),
                    state: state.into(),
                    percent: pct,
                }
            })
            .collect();
        let msg = ComponentMessage {
            kind: Some(component_message::Kind::Report(Report {
                kind: Some(report::Kind::Progress(ItemProgress {
                    item: shared.params.item.clone(),
                    phase: phase.into(),
                    disks,
                    bytes_sent: sent,
                    bytes_per_second: rate,
                    acked_seq: shared.acked_seq.load(Ordering::SeqCst),
                    pending_bytes: shared.capture.buffered(),
                })),
            })),
        };
        // Progress is periodic: if the control stream is down, dropping one is fine.
        let _ = outbox.try_send(msg);
    }
}
