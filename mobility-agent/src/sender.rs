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
use failback_common::identity::Role;
use failback_common::renewal::CredentialsCell;
use failback_common::tls::describe_error;
use failback_proto::pb::control::{
    ComponentMessage, DiskProgress, DiskState, ItemProgress, ReplicationPhase, Report,
    WriteThrottle, component_message, report,
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
use crate::scripts::{AppScripts, Stage};

/// Largest batch the sender builds.
const BATCH_BYTES: u64 = 4 << 20;
/// Most unacknowledged bytes on the wire.
const WINDOW_BYTES: u64 = 48 << 20;
/// Initial-copy chunk.
const COPY_CHUNK: u64 = 1 << 20;
/// Resync compares checksums of blocks of this size (rsync-like).
pub const RESYNC_BLOCK: u64 = 64 << 10;
/// Marker in a machine's state directory: tracking was lost (a disk was resized), the next
/// replication starts with a full checksum resync.
pub const RESYNC_REQUIRED_FILE: &str = "resync-required";
/// Bytes compared per checksum request.
const COMPARE_CHUNK: u64 = 8 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub item: String,
    pub process_server: String,
    pub ps_address: String,
    /// None: the CS coordinates tags (replication group members).
    pub crash_interval: Option<Duration>,
    pub app_interval: Option<Duration>,
    pub verify_tags: bool,
    /// The target was seeded with an older copy of the disks (original-location reprotect):
    /// the initial synchronisation compares checksums of the whole disks instead of copying.
    pub compare_initial: bool,
    /// The machine, and its pre and post scripts around app-consistent points.
    pub machine: String,
    pub scripts: Option<AppScripts>,
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
    let bytes = serde_json::to_vec(p).map_err(std::io::Error::other)?;
    failback_common::durable::write(path, &bytes, 0o600)
}

/// The process server the item replicates to now: a name and an address.
#[derive(Debug, Clone, PartialEq)]
struct PsEndpoint {
    name: String,
    address: String,
}

/// Shared between the three tasks.
struct Shared {
    params: Params,
    /// The item's series on the host's metrics endpoint.
    metrics: crate::metrics::ItemMetrics,
    /// Changed in place by "Switch process server": the open stream ends and the next one
    /// goes to the new process server, with the batches in flight resent there.
    ps: tokio::sync::watch::Sender<PsEndpoint>,
    capture: Arc<Capture>,
    state_path: PathBuf,
    persisted: std::sync::Mutex<Persisted>,
    /// The replica is consistent (initial copy or resync acknowledged): tags may be taken.
    consistent: AtomicBool,
    /// Log entry id whose acknowledgement completes the copy phase (0 = not yet known).
    copy_end_entry: AtomicU64,
    /// Per disk: (bytes to copy, bytes copied).
    copy_progress: std::sync::Mutex<Vec<(u64, u64)>>,
    /// A resync (after a crash, or asked for) is running rather than the initial copy.
    resyncing: AtomicBool,
    /// Set once a session learned what the PS holds (the resync barrier needs it).
    connected_once: AtomicBool,
    /// Tracking was lost (the PS lost its cache): a full resync is queued.
    resync_required: AtomicBool,
    /// Switched away from a process server that was down: the next session resyncs as after
    /// a lost cache, whatever the new process server holds.
    batches_lost: AtomicBool,
    /// Asks the copier for a checksum resync of every allocated block.
    resync_requests: tokio::sync::Notify,
    resync_bytes: AtomicU64,
    resync_blocks: AtomicU64,
    bytes_sent: AtomicU64,
    /// Highest seq durable at the target (from the PS's acks).
    target_seq: AtomicU64,
    /// When (Unix ms) `target_seq` last moved.
    target_seq_at_ms: std::sync::atomic::AtomicI64,
    /// Batches the PS has but the target may not yet: (seq, capture time of the oldest write).
    awaiting_target: std::sync::Mutex<VecDeque<(u64, Instant)>>,
    /// Capture -> target-journal lag samples of the last 10 s: (when, lag).
    lag: std::sync::Mutex<VecDeque<(Instant, Duration)>>,
    /// Highest seq the PS acknowledged (in memory; `persisted` has it within
    /// [`PERSIST_ACKED_EVERY`]), and the last log entry it covers.
    acked_seq: AtomicU64,
    acked_entry: AtomicU64,
    /// When `acked_seq` was last made durable.
    acked_saved_at: std::sync::Mutex<Instant>,
    /// Since when (Unix ms) no replication stream to the PS is up; 0 while one is.
    ps_down_since_ms: std::sync::atomic::AtomicI64,
    /// Wakes the reporter early (a phase changed).
    report_now: tokio::sync::Notify,
    /// Why the last app-consistent point became crash-consistent ("" when it did not).
    app_error: std::sync::Mutex<String>,
    /// The pre script's outcome for the multi-VM app-consistent point being held (its id):
    /// it ran before the hold, the tag follows.
    held_app: std::sync::Mutex<Option<(String, Result<(), String>)>>,
}

/// A running replication; dropping it does not stop it, `stop` does.
pub struct Replication {
    pub params: Params,
    cancel: CancellationToken,
    shared: Arc<Shared>,
}

impl Replication {
    pub fn stop(&self) {
        self.cancel.cancel();
        self.shared.metrics.forget();
    }

    /// Whether `params` differ from this replication's only in the process server.
    pub fn only_ps_differs(&self, params: &Params) -> bool {
        let mut same = params.clone();
        same.process_server = self.params.process_server.clone();
        same.ps_address = self.params.ps_address.clone();
        same == self.params
    }

    /// "Switch process server": replication goes on to `process_server` at `ps_address`
    /// without starting over. The open stream ends; the next one opens there, and what the
    /// old one had not acknowledged is sent again (the CS had the old process server forward
    /// everything it held, so the new one continues after it; if it could not, the new one
    /// holds less than was acknowledged and a checksum resync follows, as after a lost cache).
    /// With `batches_lost` (the old process server was down) the item reports "Resync
    /// required" from now on, and the first session with the new one starts the resync.
    pub fn switch_ps(&mut self, process_server: String, ps_address: String, batches_lost: bool) {
        if batches_lost {
            let s = &self.shared;
            s.batches_lost.store(true, Ordering::SeqCst);
            s.consistent.store(false, Ordering::SeqCst);
            s.resyncing.store(true, Ordering::SeqCst);
            s.resync_required.store(true, Ordering::SeqCst);
            s.report_now.notify_one();
        }
        self.params.process_server = process_server.clone();
        self.params.ps_address = ps_address.clone();
        self.shared.ps.send_replace(PsEndpoint {
            name: process_server,
            address: ps_address,
        });
    }

    /// Starts a checksum resync of every allocated block (refused while one runs or while
    /// initial replication is not complete).
    pub fn resync(&self) -> Result<(), String> {
        if !self.shared.consistent.load(Ordering::SeqCst) {
            return Err(if self.shared.resyncing.load(Ordering::SeqCst) {
                "a resynchronization is already in progress".into()
            } else {
                "initial replication is not complete yet; nothing to resynchronize".into()
            });
        }
        // Reported from now on (the CS moves the item to "Resynchronization in progress" once
        // this command is answered, and back to Protected on the next consistent report).
        self.shared.consistent.store(false, Ordering::SeqCst);
        self.shared.resyncing.store(true, Ordering::SeqCst);
        self.shared.resync_requests.notify_one();
        Ok(())
    }
}

/// Starts replicating `capture` per `params`.
pub fn start(
    params: Params,
    metrics: crate::metrics::ItemMetrics,
    capture: Arc<Capture>,
    credentials: CredentialsCell,
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
    let forced = state_dir.join(RESYNC_REQUIRED_FILE).exists() && persisted.initial_done;
    let resync = persisted.initial_done;
    let acked = persisted.acked_seq;
    let disks = capture.disk_ids().len();
    let shared = Arc::new(Shared {
        ps: tokio::sync::watch::Sender::new(PsEndpoint {
            name: params.process_server.clone(),
            address: params.ps_address.clone(),
        }),
        params: params.clone(),
        metrics,
        capture: capture.clone(),
        state_path,
        persisted: std::sync::Mutex::new(persisted),
        consistent: AtomicBool::new(false),
        copy_end_entry: AtomicU64::new(0),
        copy_progress: std::sync::Mutex::new(vec![(0, 0); disks]),
        resyncing: AtomicBool::new(resync),
        connected_once: AtomicBool::new(false),
        resync_required: AtomicBool::new(forced),
        batches_lost: AtomicBool::new(false),
        resync_requests: tokio::sync::Notify::new(),
        resync_bytes: AtomicU64::new(0),
        resync_blocks: AtomicU64::new(0),
        bytes_sent: AtomicU64::new(0),
        target_seq: AtomicU64::new(0),
        target_seq_at_ms: std::sync::atomic::AtomicI64::new(0),
        awaiting_target: std::sync::Mutex::new(VecDeque::new()),
        lag: std::sync::Mutex::new(VecDeque::new()),
        acked_seq: AtomicU64::new(acked),
        acked_entry: AtomicU64::new(0),
        acked_saved_at: std::sync::Mutex::new(Instant::now() - PERSIST_ACKED_EVERY),
        ps_down_since_ms: std::sync::atomic::AtomicI64::new(now_ms()),
        report_now: tokio::sync::Notify::new(),
        app_error: std::sync::Mutex::new(String::new()),
        held_app: std::sync::Mutex::new(None),
    });
    capture.set_logging(true);
    let cancel = shutdown.child_token();
    tokio::spawn(copier(shared.clone(), credentials.clone(), cancel.clone()));
    tokio::spawn(tagger(shared.clone(), cancel.clone()));
    tokio::spawn(reporter(shared.clone(), outbox, cancel.clone()));
    tokio::spawn(sender(shared.clone(), credentials, cancel.clone()));
    Ok(Replication {
        params,
        cancel,
        shared,
    })
}

/// Queues the initial copy, or after a crash a checksum resync of the hot regions; then
/// serves resync requests (every allocated block) until cancelled.
async fn copier(shared: Arc<Shared>, credentials: CredentialsCell, cancel: CancellationToken) {
    let capture = shared.capture.clone();
    let disks = capture.disk_ids();
    let first = if shared.resync_required.load(Ordering::SeqCst) {
        // Tracking lost (a disk was resized): compare every allocated block.
        shared.resync_required.store(false, Ordering::SeqCst);
        allocated(&capture)
    } else if shared.resyncing.load(Ordering::SeqCst) {
        disks
            .iter()
            .enumerate()
            .map(|(i, _)| {
                capture
                    .hot_regions()
                    .into_iter()
                    .filter(|(d, _, _)| *d == i)
                    .map(|(_, o, l)| (o, l))
                    .collect()
            })
            .collect()
    } else if shared.params.compare_initial {
        // Against a seeded replica every block may differ, holes included (a block the old
        // disk holds but this one never wrote must become zeros there too).
        capture
            .disk_ids()
            .iter()
            .map(|(_, size)| vec![(0, *size)])
            .collect()
    } else {
        allocated(&capture)
    };
    let resync = shared.resyncing.load(Ordering::SeqCst) || shared.params.compare_initial;
    if !run_copy(&shared, &credentials, &cancel, first, resync).await {
        return;
    }
    loop {
        tokio::select! {
            _ = shared.resync_requests.notified() => {}
            _ = cancel.cancelled() => return,
        }
        shared.consistent.store(false, Ordering::SeqCst);
        shared.resyncing.store(true, Ordering::SeqCst);
        shared.resync_required.store(false, Ordering::SeqCst);
        shared.copy_end_entry.store(0, Ordering::SeqCst);
        let plan = allocated(&capture);
        if !run_copy(&shared, &credentials, &cancel, plan, true).await {
            return;
        }
    }
}

fn allocated(capture: &Capture) -> Vec<Vec<(u64, u64)>> {
    capture
        .disk_ids()
        .iter()
        .enumerate()
        .map(|(i, (disk_id, size))| {
            capture.allocated_extents(i).unwrap_or_else(|e| {
                tracing::error!("cannot map the extents of disk {disk_id}: {e}; using all of it");
                vec![(0, *size)]
            })
        })
        .collect()
}

/// Copies `plan` (per disk: extents) into the log: everything (initial copy) or, with
/// `compare`, only the blocks whose checksum differs from the replica's. Returns false if
/// cancelled or failed.
async fn run_copy(
    shared: &Arc<Shared>,
    credentials: &CredentialsCell,
    cancel: &CancellationToken,
    plan: Vec<Vec<(u64, u64)>>,
    compare: bool,
) -> bool {
    let capture = &shared.capture;
    if let Ok(mut p) = shared.copy_progress.lock() {
        for (i, ext) in plan.iter().enumerate() {
            p[i] = (ext.iter().map(|(_, l)| l).sum(), 0);
        }
    }
    shared.resync_bytes.store(0, Ordering::SeqCst);
    shared.resync_blocks.store(0, Ordering::SeqCst);
    if compare {
        // Barrier: compare only once the target holds everything sent before the resync.
        while !shared.connected_once.load(Ordering::SeqCst) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = cancel.cancelled() => return false,
            }
        }
    }
    let min_seq = shared.acked_seq.load(Ordering::SeqCst);
    // ASR copies at most 3 disks of a machine at a time; here they go one after the other.
    let step = if compare { COMPARE_CHUNK } else { COPY_CHUNK };
    let chunks: Vec<(usize, u64, u64)> = plan
        .into_iter()
        .enumerate()
        .flat_map(|(disk, extents)| {
            extents.into_iter().flat_map(move |(off, len)| {
                (off..off + len)
                    .step_by(step as usize)
                    .map(move |pos| (disk, pos, step.min(off + len - pos)))
            })
        })
        .collect();
    let result = if compare {
        compare_chunks(shared, credentials, chunks, min_seq, cancel).await
    } else {
        let mut r = Ok(());
        for (disk, pos, n) in chunks {
            if cancel.is_cancelled() {
                return false;
            }
            if let Err(e) = capture.copy(disk, pos, n).await {
                r = Err(format!(
                    "copy of disk {} at {pos}: {e}",
                    capture.disk_id(disk)
                ));
                break;
            }
            if let Ok(mut p) = shared.copy_progress.lock() {
                p[disk].1 += n;
            }
        }
        r
    };
    if let Err(e) = result {
        if !cancel.is_cancelled() {
            tracing::error!(item = %shared.params.item, "{e}");
        }
        return false;
    }
    // Consistent once the PS acknowledged a marker entry queued after the copies.
    if capture.copy(0, 0, 0).await.is_err() {
        return false;
    }
    let marker = capture.last_entry_id();
    shared.copy_end_entry.store(marker.max(1), Ordering::SeqCst);
    tracing::info!(
        item = %shared.params.item,
        resync_bytes = shared.resync_bytes.load(Ordering::SeqCst),
        "{} queued; consistent once acknowledged",
        if compare { "resync" } else { "initial copy" }
    );
    true
}

/// Checksum requests in flight at once: the answers of the next chunks travel while this
/// one is compared, so a link's round trip is paid once, not per chunk.
const COMPARE_PIPELINE: usize = 4;
/// Bytes of each block's digest the replica returns (all of it).
const DIGEST_BYTES: usize = failback_common::blocks::DIGEST_LEN;

/// Compares each chunk block by block with the replica (checksums fetched through the PS,
/// several chunks ahead, while this side digests the same chunks on a blocking thread) and
/// queues the blocks that differ, in order.
async fn compare_chunks(
    shared: &Shared,
    credentials: &CredentialsCell,
    chunks: Vec<(usize, u64, u64)>,
    min_seq: u64,
    cancel: &CancellationToken,
) -> Result<(), String> {
    use futures::StreamExt;
    let p = &shared.params;
    let ps = shared.ps.borrow().clone();
    let channel = credentials
        .endpoint(&ps.address, Role::ProcessServer, &ps.name)
        .map_err(|e| e.to_string())?
        .connect_lazy();
    let client = ProcessServerDataClient::new(channel)
        .max_decoding_message_size(failback_common::server::MAX_MESSAGE);
    let capture = &shared.capture;
    let mut answers = futures::stream::iter(chunks.into_iter().map(|(disk, offset, len)| {
        let request = pb::ChecksumRequest {
            item: p.item.clone(),
            disk: capture.disk_id(disk),
            offset,
            length: len,
            block_size: RESYNC_BLOCK,
            min_seq,
            digest_bytes: DIGEST_BYTES as u32,
        };
        let client = client.clone();
        let local = {
            let capture = capture.clone();
            tokio::task::spawn_blocking(move || {
                capture.block_checksums(disk, offset, len, RESYNC_BLOCK)
            })
        };
        async move {
            let remote = remote_checksums(client, request, cancel).await;
            (disk, offset, len, remote, local.await)
        }
    }))
    .buffered(COMPARE_PIPELINE);
    while let Some((disk, offset, len, remote, local)) = answers.next().await {
        let remote = remote
            .map_err(|e| format!("compare of disk {} at {offset}: {e}", capture.disk_id(disk)))?;
        let local = local
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for (i, sum) in local.iter().enumerate() {
            shared.resync_blocks.fetch_add(1, Ordering::Relaxed);
            let theirs = remote.get(i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES);
            if theirs != Some(&sum[..DIGEST_BYTES]) {
                let block_off = offset + i as u64 * RESYNC_BLOCK;
                let block_len = RESYNC_BLOCK.min(offset + len - block_off);
                capture
                    .copy(disk, block_off, block_len)
                    .await
                    .map_err(|e| e.to_string())?;
                shared.resync_bytes.fetch_add(block_len, Ordering::Relaxed);
            }
        }
        if let Ok(mut p) = shared.copy_progress.lock() {
            p[disk].1 += len;
        }
    }
    Ok(())
}

/// One chunk's checksums from the replica, retried for a minute (the PS or the target may be
/// restarting, or still catching up to `min_seq`).
async fn remote_checksums(
    mut client: ProcessServerDataClient<tonic::transport::Channel>,
    request: pb::ChecksumRequest,
    cancel: &CancellationToken,
) -> Result<Bytes, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.block_checksums(request.clone()).await {
            Ok(r) => return Ok(r.into_inner().checksums),
            Err(s) if Instant::now() < deadline => {
                tracing::debug!("block checksums: {}; retrying", s.message());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = cancel.cancelled() => return Err("cancelled".into()),
                }
            }
            Err(s) => return Err(format!("block checksums from the replica: {}", s.message())),
        }
    }
}

async fn tagger(shared: Arc<Shared>, cancel: CancellationToken) {
    let p = &shared.params;
    let never = Duration::from_secs(365 * 24 * 3600);
    let crash_every = p.crash_interval.unwrap_or(never);
    let app_every = p.app_interval.unwrap_or(never);
    let mut crash = tokio::time::interval(crash_every);
    let mut app = tokio::time::interval_at(tokio::time::Instant::now() + app_every, app_every);
    loop {
        let kind = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = crash.tick() => "crash",
            _ = app.tick() => "app",
        };
        if p.crash_interval.is_none() || !shared.consistent.load(Ordering::SeqCst) {
            continue;
        }
        let id = format!("{kind}-{}", now_ms());
        if let Err(e) = take_tag(&shared, id, kind).await {
            tracing::error!("cannot take a {kind} tag: {e}");
        }
    }
}

/// Takes a tag now. App-consistent kinds run the machine's pre script first (unless it ran
/// before the hold of a multi-VM point), quiesce the workload (writes wait on the capture
/// lock), flush the disks and tag, then run the post script. A failed pre script makes the
/// tag crash-consistent (`app` -> `crash` in its kind) and the item shows why.
async fn take_tag(shared: &Arc<Shared>, id: String, kind: &str) -> Result<(), String> {
    let p = &shared.params;
    let app = kind.ends_with("app");
    let mut kind = kind.to_string();
    let scripts = p.scripts.clone().filter(|_| app);
    let mut app_ok = app;
    if let Some(scripts) = &scripts {
        let held = shared
            .held_app
            .lock()
            .ok()
            .and_then(|mut h| h.take_if(|(held, _)| *held == id))
            .map(|(_, r)| r);
        let pre = match held {
            Some(r) => r,
            None => scripts.run(Stage::Pre, &p.machine, &id, None).await,
        };
        if let Err(e) = pre {
            tracing::warn!(machine = %p.machine, point = %id, "{e}: the point is crash-consistent");
            kind = format!("{}crash", kind.trim_end_matches("app"));
            app_ok = false;
            if let Ok(mut a) = shared.app_error.lock() {
                *a = format!("{e} (point {id})");
            }
        }
    }
    let capture = shared.capture.clone();
    let verify = p.verify_tags;
    let flush = kind.ends_with("app");
    let tag_id = id.clone();
    let tagged =
        tokio::task::spawn_blocking(move || capture.tag(tag_id, &kind, now_ms(), verify, flush))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string());
    if let Some(scripts) = &scripts
        && let Err(e) = scripts.run(Stage::Post, &p.machine, &id, None).await
    {
        tracing::warn!(machine = %p.machine, point = %id, "{e}");
    }
    if app_ok
        && tagged.is_ok()
        && let Ok(mut a) = shared.app_error.lock()
    {
        a.clear();
    }
    tagged
}

impl Replication {
    /// Before the hold of a multi-VM app-consistent point: runs the pre script (within
    /// `limit`, the time the hold may take) and keeps its outcome for the tag.
    pub async fn prepare_app_point(&self, id: &str, limit: Duration) {
        let shared = &self.shared;
        let Some(scripts) = &shared.params.scripts else {
            return;
        };
        let r = scripts
            .run(Stage::Pre, &shared.params.machine, id, Some(limit))
            .await;
        if let Ok(mut h) = shared.held_app.lock() {
            *h = Some((id.to_string(), r));
        }
    }

    /// A multi-VM point abandoned after its pre script ran: the post script lets the
    /// application go on.
    pub async fn abandon_app_point(&self, id: &str) {
        let shared = &self.shared;
        let ran = shared
            .held_app
            .lock()
            .ok()
            .and_then(|mut h| h.take_if(|(held, _)| held == id))
            .is_some();
        if ran
            && let Some(scripts) = &shared.params.scripts
            && let Err(e) = scripts
                .run(Stage::Post, &shared.params.machine, id, None)
                .await
        {
            tracing::warn!(machine = %shared.params.machine, point = %id, "{e}");
        }
    }

    /// A tag the CS asked for (replication groups share its id across members).
    pub async fn tag(&self, id: String, kind: &str) -> Result<(), String> {
        if !self.shared.consistent.load(Ordering::SeqCst) {
            return Err(
                "the replica is not consistent yet (initial replication or resync running)".into(),
            );
        }
        take_tag(&self.shared, id, kind).await
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
    captured: Instant,
    last_entry: u64,
    bytes: u64,
    payload: Bytes,
    crc: u32,
}

async fn sender(shared: Arc<Shared>, credentials: CredentialsCell, cancel: CancellationToken) {
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut switched = shared.ps.subscribe();
    loop {
        let started = Instant::now();
        let ps = switched.borrow_and_update().clone();
        // A switch ends the session wherever it is (a dead process server may take long to
        // refuse a connection); batches in flight stay queued for the next one.
        let result = tokio::select! {
            r = session(&shared, &credentials, &cancel, &mut inflight) => r,
            _ = switched.changed() => Ok(()),
        };
        if cancel.is_cancelled() {
            return;
        }
        if *shared.ps.borrow() != ps {
            tracing::info!(
                item = %shared.params.item,
                "switched from {} to {}: continuing there",
                ps.name,
                shared.ps.borrow().name
            );
            backoff.reset();
            continue;
        }
        let _ = shared.ps_down_since_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if started.elapsed() > Duration::from_secs(5) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        tracing::warn!(
            item = %shared.params.item,
            "replication stream to {} at {}: {}; reconnecting in {wait:?}",
            ps.name,
            ps.address,
            result.err().unwrap_or_else(|| "closed".into())
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = switched.changed() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

fn on_ack(
    shared: &Shared,
    inflight: &mut VecDeque<InFlight>,
    seq: u64,
    target_seq: u64,
) -> Result<(), String> {
    while inflight.front().is_some_and(|f| f.seq <= seq) {
        let Some(f) = inflight.pop_front() else { break };
        shared.metrics.replicated.inc_by(f.bytes);
        if let Ok(mut w) = shared.awaiting_target.lock() {
            w.push_back((f.seq, f.captured));
        }
        shared.acked_entry.store(f.last_entry, Ordering::SeqCst);
        shared.capture.acked(f.bytes);
    }
    record_target(shared, target_seq);
    shared.acked_seq.fetch_max(seq, Ordering::SeqCst);
    persist_acked(shared, false)?;
    let end = shared.copy_end_entry.load(Ordering::SeqCst);
    if end != 0
        && !shared.consistent.load(Ordering::SeqCst)
        && shared.acked_entry.load(Ordering::SeqCst) >= end
    {
        shared.consistent.store(true, Ordering::SeqCst);
        // The CS learns at once that the copy is complete (Protected), not at the next tick.
        shared.report_now.notify_one();
        shared.resyncing.store(false, Ordering::SeqCst);
        if let Some(dir) = shared.state_path.parent() {
            let _ = std::fs::remove_file(dir.join(RESYNC_REQUIRED_FILE));
        }
        if let Ok(mut p) = shared.persisted.lock() {
            p.initial_done = true;
            save(&shared.state_path, &p)
                .map_err(|e| format!("cannot persist replication state: {e}"))?;
        }
        tracing::info!(item = %shared.params.item, "replica consistent: delta replication");
    }
    Ok(())
}

/// How often at most the acknowledged sequence is made durable (and regions cooled).
const PERSIST_ACKED_EVERY: Duration = Duration::from_millis(500);

/// Makes the acknowledged sequence durable, then cools the regions it covers, at most every
/// [`PERSIST_ACKED_EVERY`] unless `now`. In that order: a region is never cold on disk
/// while the sequence that acknowledged it is not (after a restart, the agent tells a lost
/// cache from the persisted sequence, and resends what is still hot).
fn persist_acked(shared: &Shared, now: bool) -> Result<(), String> {
    let seq = shared.acked_seq.load(Ordering::SeqCst);
    let entry = shared.acked_entry.load(Ordering::SeqCst);
    let Ok(mut p) = shared.persisted.lock() else {
        return Err("replication state lock poisoned".into());
    };
    if p.acked_seq < seq {
        let Ok(mut saved_at) = shared.acked_saved_at.lock() else {
            return Err("replication state lock poisoned".into());
        };
        if !now && saved_at.elapsed() < PERSIST_ACKED_EVERY {
            return Ok(());
        }
        p.acked_seq = seq;
        save(&shared.state_path, &p)
            .map_err(|e| format!("cannot persist replication state: {e}"))?;
        *saved_at = Instant::now();
    }
    drop(p);
    shared
        .capture
        .cool(entry)
        .map_err(|e| format!("activity log: {e}"))
}

/// The PS holds less than it acknowledged: its cache was lost, and with it batches whose
/// regions already cooled down. Tracking is lost ("Resync required"): continue numbering after
/// what the target journaled, and compare every allocated block with the replica.
async fn cache_lost(
    shared: &Shared,
    client: &mut ProcessServerDataClient<tonic::transport::Channel>,
    inflight: &mut VecDeque<InFlight>,
    ps_seq: u64,
    acked: u64,
) -> Result<(), String> {
    tracing::warn!(
        item = %shared.params.item,
        "{} holds batch {ps_seq} but {acked} had been acknowledged: its cache was lost; resync \
         required (batches acknowledged but not forwarded are gone: a lost cache, or a switch \
         away from a process server that was down)",
        shared.ps.borrow().name
    );
    shared.consistent.store(false, Ordering::SeqCst);
    shared.resyncing.store(true, Ordering::SeqCst);
    shared.resync_required.store(true, Ordering::SeqCst);
    let target_seq = client
        .block_checksums(pb::ChecksumRequest {
            item: shared.params.item.clone(),
            disk: shared.capture.disk_id(0),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("asking the target how far it got: {}", s.message()))?
        .into_inner()
        .target_seq;
    // Batches in flight are superseded by the resync; their regions stay hot until then.
    let dropped: u64 = inflight.drain(..).map(|f| f.bytes).sum();
    shared.capture.release_buffer(dropped);
    if let Ok(mut w) = shared.awaiting_target.lock() {
        w.clear();
    }
    let resume = target_seq.max(ps_seq);
    shared.acked_seq.store(resume, Ordering::SeqCst);
    if let Ok(mut p) = shared.persisted.lock() {
        p.acked_seq = resume;
        save(&shared.state_path, &p)
            .map_err(|e| format!("cannot persist replication state: {e}"))?;
    }
    shared.copy_end_entry.store(0, Ordering::SeqCst);
    shared.resync_requests.notify_one();
    Ok(())
}

/// The target has everything up to `target_seq`: take lag samples of the batches it covers.
fn record_target(shared: &Shared, target_seq: u64) {
    if shared.target_seq.fetch_max(target_seq, Ordering::SeqCst) < target_seq {
        shared.target_seq_at_ms.store(now_ms(), Ordering::SeqCst);
    }
    let now = Instant::now();
    let (Ok(mut waiting), Ok(mut lag)) = (shared.awaiting_target.lock(), shared.lag.lock()) else {
        return;
    };
    while waiting.front().is_some_and(|(s, _)| *s <= target_seq) {
        if let Some((_, captured)) = waiting.pop_front() {
            shared.metrics.lag.observe((now - captured).as_secs_f64());
            lag.push_back((now, now - captured));
        }
    }
    while lag
        .front()
        .is_some_and(|(t, _)| now - *t > Duration::from_secs(10))
    {
        lag.pop_front();
    }
    // Batches the target will never confirm to this session (PS switch) must not pile up.
    while waiting.len() > 100_000 {
        waiting.pop_front();
    }
}

/// (p50, p99) of the capture -> target lag over the last 10 s, in ms.
fn lag_percentiles(shared: &Shared) -> (f64, f64) {
    let Ok(lag) = shared.lag.lock() else {
        return (0.0, 0.0);
    };
    let mut v: Vec<f64> = lag.iter().map(|(_, d)| d.as_secs_f64() * 1000.0).collect();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

async fn session(
    shared: &Arc<Shared>,
    credentials: &CredentialsCell,
    cancel: &CancellationToken,
    inflight: &mut VecDeque<InFlight>,
) -> Result<(), String> {
    let p = &shared.params;
    let ps = shared.ps.borrow().clone();
    let channel = credentials
        .endpoint(&ps.address, Role::ProcessServer, &ps.name)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| describe_error(&e))?;
    let mut client = ProcessServerDataClient::new(channel)
        .max_decoding_message_size(failback_common::server::MAX_MESSAGE)
        .max_encoding_message_size(failback_common::server::MAX_MESSAGE);
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
    // What any PS acknowledged (in memory: the persisted copy may be a moment behind).
    let acked_before = shared.acked_seq.load(Ordering::SeqCst);
    if first.seq < acked_before || shared.batches_lost.swap(false, Ordering::SeqCst) {
        // Numbering continues after what the PS and the target still have.
        cache_lost(shared, &mut client, inflight, first.seq, acked_before).await?;
    } else {
        // Everything the PS already holds is acknowledged; the rest is sent again.
        on_ack(shared, inflight, first.seq, first.target_seq)?;
    }
    shared.connected_once.store(true, Ordering::SeqCst);
    shared.ps_down_since_ms.store(0, Ordering::SeqCst);
    let mut next_seq = shared.acked_seq.load(Ordering::SeqCst).max(first.seq) + 1;
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
    // Makes the last acknowledgements durable once they stop coming.
    let mut persist_tick = tokio::time::interval(PERSIST_ACKED_EVERY);
    persist_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let window_full =
            inflight.iter().map(|f| f.payload.len() as u64).sum::<u64>() >= WINDOW_BYTES;
        let ready = shared.capture.data_ready.notified();
        if !window_full
            && let Some((entries, last_entry, captured)) = shared.capture.take_batch(BATCH_BYTES)
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
                captured,
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
                Ok(Some(a)) => on_ack(shared, inflight, a.seq, a.target_seq)?,
                Ok(None) => return Err("process server closed the stream".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
            _ = persist_tick.tick() => persist_acked(shared, true)?,
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

async fn reporter(
    shared: Arc<Shared>,
    outbox: mpsc::Sender<ComponentMessage>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(REPORT_TICK);
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    let mut sent_last: Option<(Instant, ItemProgress)> = None;
    loop {
        let asked = tokio::select! {
            _ = tick.tick() => false,
            _ = shared.report_now.notified() => true,
            _ = cancel.cancelled() => return,
        };
        let sent = shared.bytes_sent.load(Ordering::Relaxed);
        let dt = last.0.elapsed().as_secs_f64();
        if dt > 0.0 {
            let inst = (sent - last.1) as f64 / dt;
            rate = if rate == 0.0 {
                inst
            } else {
                0.7 * rate + 0.3 * inst
            };
            // The average only approaches zero; below 1 KiB/s an idle item says it is idle.
            if inst == 0.0 && rate < IDLE_RATE {
                rate = 0.0;
            }
        }
        last = (Instant::now(), sent);
        let lag = lag_percentiles(&shared);
        let throttle = match shared.capture.throttle() {
            Some((crate::budget::Throttle::MachineBuffer, limit)) => {
                (WriteThrottle::MachineBuffer, limit)
            }
            Some((crate::budget::Throttle::HostBudget, limit)) => {
                (WriteThrottle::HostBudget, limit)
            }
            None => (WriteThrottle::Unspecified, 0),
        };
        let consistent = shared.consistent.load(Ordering::SeqCst);
        let phase = if consistent {
            ReplicationPhase::Delta
        } else if shared.resync_required.load(Ordering::SeqCst) {
            ReplicationPhase::ResyncRequired
        } else if shared.resyncing.load(Ordering::SeqCst) {
            ReplicationPhase::Resync
        } else {
            ReplicationPhase::Initial
        };
        let ids = shared.capture.disk_ids();
        let progress = shared
            .copy_progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        // Out of sync: what was captured but not yet acknowledged, and, until the replica is
        // consistent, what the copy or resync still has to go through.
        let copying: u64 = if consistent {
            0
        } else {
            progress.iter().map(|(t, d)| t.saturating_sub(*d)).sum()
        };
        shared
            .metrics
            .outofsync
            .set((shared.capture.buffered() + copying) as f64);
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
                    DiskState::Complete
                } else if i == first_unfinished {
                    DiskState::InProgress
                } else {
                    DiskState::InQueue
                };
                DiskProgress {
                    id: id.clone(),
                    state: state as i32,
                    percent: pct,
                }
            })
            .collect();
        let progress = ItemProgress {
            item: shared.params.item.clone(),
            phase: phase as i32,
            disks,
            bytes_sent: sent,
            bytes_per_second: rate,
            acked_seq: shared.acked_seq.load(Ordering::SeqCst),
            pending_bytes: shared.capture.buffered(),
            resync_bytes: shared.resync_bytes.load(Ordering::Relaxed),
            target_seq: shared.target_seq.load(Ordering::SeqCst),
            target_seq_at_ms: shared.target_seq_at_ms.load(Ordering::SeqCst),
            lag_p50_ms: lag.0,
            lag_p99_ms: lag.1,
            resync_blocks_compared: shared.resync_blocks.load(Ordering::Relaxed),
            ps_down_since_ms: shared.ps_down_since_ms.load(Ordering::SeqCst),
            app_consistency_error: shared
                .app_error
                .lock()
                .map(|a| a.clone())
                .unwrap_or_default(),
            write_throttle: throttle.0 as i32,
            throttle_limit_bytes: throttle.1,
        };
        let wait = match &sent_last {
            _ if asked => false,
            None => false,
            // A new phase is news at once (Protected, resync required).
            Some((_, prev)) if prev.phase != progress.phase => false,
            Some((at, prev)) if same(prev, &progress) => at.elapsed() < REPORT_AT_LEAST_EVERY,
            Some((at, _)) => at.elapsed() < REPORT_CHANGED_EVERY,
        };
        if wait {
            continue;
        }
        let msg = ComponentMessage {
            kind: Some(component_message::Kind::Report(Report {
                kind: Some(report::Kind::Progress(progress.clone())),
            })),
        };
        // Progress is periodic: if the control stream is down, dropping one is fine (the
        // next change or keepalive carries the state again).
        if outbox.try_send(msg).is_ok() {
            sent_last = Some((Instant::now(), progress));
        }
    }
}

/// How often the reporter looks at the item's progress.
const REPORT_TICK: Duration = Duration::from_millis(250);
/// An unchanged progress is still sent this often. Between, only a change is: a thousand
/// idle machines reporting four times a second kept the CS busy with nothing new.
const REPORT_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// A changed progress (bytes, sequences, lag) is sent at most this often, a new phase at once.
const REPORT_CHANGED_EVERY: Duration = Duration::from_secs(1);

/// A transfer rate (bytes/s) under this is idle: an idle item's recovery-point tags alone
/// lift it to a few hundred bytes a second for a tick, which is no news.
const IDLE_RATE: f64 = 1024.0;

/// A lag percentile moving by less than this (or a tenth) is not news.
const LAG_SLACK_MS: f64 = 20.0;

/// Whether two lag percentiles (ms) differ by no more than noise: samples age out of the 10 s
/// window between two points, and an idle item's p99 going from 15 ms to 9 ms is not worth a
/// report (at 1,000 items it was half of all progress reports).
fn lag_same(a: f64, b: f64) -> bool {
    (a - b).abs() <= (0.1 * a.max(b)).max(LAG_SLACK_MS)
}

/// Whether `next` tells the CS nothing `prev` did not: equal but for the transfer rate, which
/// decays smoothly and counts as changed only when it moves by a tenth (or crosses
/// [`IDLE_RATE`]), and the lag percentiles, which count only when they move past
/// [`lag_same`].
fn same(prev: &ItemProgress, next: &ItemProgress) -> bool {
    let (a, b) = (prev.bytes_per_second, next.bytes_per_second);
    let rate_same = (a < IDLE_RATE && b < IDLE_RATE)
        || (a >= IDLE_RATE && b >= IDLE_RATE && (a - b).abs() <= 0.1 * a);
    // Every field but the rate, compared in place (this runs per item every tick).
    let ItemProgress {
        item,
        phase,
        disks,
        bytes_sent,
        bytes_per_second: _,
        acked_seq,
        pending_bytes,
        resync_bytes,
        resync_blocks_compared,
        target_seq,
        lag_p50_ms,
        lag_p99_ms,
        ps_down_since_ms,
        app_consistency_error,
        write_throttle,
        throttle_limit_bytes,
        target_seq_at_ms,
    } = prev;
    rate_same
        && *item == next.item
        && *phase == next.phase
        && *disks == next.disks
        && *bytes_sent == next.bytes_sent
        && *acked_seq == next.acked_seq
        && *pending_bytes == next.pending_bytes
        && *resync_bytes == next.resync_bytes
        && *resync_blocks_compared == next.resync_blocks_compared
        && *target_seq == next.target_seq
        && lag_same(*lag_p50_ms, next.lag_p50_ms)
        && lag_same(*lag_p99_ms, next.lag_p99_ms)
        && *ps_down_since_ms == next.ps_down_since_ms
        && *app_consistency_error == next.app_consistency_error
        && *write_throttle == next.write_throttle
        && *throttle_limit_bytes == next.throttle_limit_bytes
        && *target_seq_at_ms == next.target_seq_at_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(acked: u64, rate: f64) -> ItemProgress {
        ItemProgress {
            item: "vm1-1".into(),
            phase: ReplicationPhase::Delta as i32,
            acked_seq: acked,
            bytes_per_second: rate,
            ..Default::default()
        }
    }

    #[test]
    fn an_unchanged_progress_is_the_same_and_any_other_field_is_news() {
        assert!(same(&progress(7, 0.0), &progress(7, 0.0)));
        assert!(!same(&progress(7, 0.0), &progress(8, 0.0)));
        let mut resync = progress(7, 0.0);
        resync.phase = ReplicationPhase::Resync as i32;
        assert!(!same(&progress(7, 0.0), &resync));
    }

    #[test]
    fn the_lag_counts_as_changed_only_past_the_noise() {
        let lag = |p99: f64| ItemProgress {
            lag_p99_ms: p99,
            ..progress(7, 0.0)
        };
        assert!(same(&lag(15.0), &lag(9.0)), "samples ageing out at idle");
        assert!(same(&lag(15.0), &lag(0.0)), "the window emptied");
        assert!(!same(&lag(15.0), &lag(80.0)), "a real rise");
        assert!(same(&lag(1000.0), &lag(1090.0)));
        assert!(!same(&lag(1000.0), &lag(1200.0)));
    }

    #[test]
    fn the_rate_counts_as_changed_only_by_a_tenth_or_leaving_idle() {
        assert!(same(&progress(7, 10_000.0), &progress(7, 10_500.0)));
        assert!(!same(&progress(7, 10_000.0), &progress(7, 8_000.0)));
        assert!(
            !same(&progress(7, 0.0), &progress(7, 50_000.0)),
            "writes began"
        );
        assert!(
            !same(&progress(7, 50_000.0), &progress(7, 0.0)),
            "writes stopped"
        );
        assert!(
            same(&progress(7, 0.0), &progress(7, 400.0)),
            "a tag's few bytes are not a transfer"
        );
        assert!(same(&progress(7, 280.0), &progress(7, 0.0)));
    }
}
