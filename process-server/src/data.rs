//! The process server's data plane: agents' replication streams in, the durable cache, and
//! one forwarder per item out to the target the CS assigned.
//!
//! Receive path: check the batch (CRC-32 of the payload, sequence), compress it (LZ4: see
//! the README's measurement), append it to the cache (fsync), then acknowledge. A corrupted
//! or out-of-order batch is refused with a clear status and nothing is cached. Below 20 %
//! free cache the PS throttles agents by delaying acknowledgements.
//!
//! Forward path: dial the target, learn the last batch it journaled, release the cache up
//! to it, stream the rest in order, release on every acknowledgement.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use failback_common::enroll::Backoff;
use failback_common::identity::{AllowedSender, Role, authorize, check_sender, peer_fingerprint};
use failback_common::renewal::CredentialsCell;
use failback_common::tls::describe_error;
use failback_proto::pb::data::{
    AgentBatch, BatchAck, ChecksumRequest, ChecksumResponse, Codec, StreamOpen, TargetBatch,
    process_server_data_server::ProcessServerData, target_data_client::TargetDataClient,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{AppendOutcome, Cache, CacheError};

/// Where the CS told this PS to forward an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub target: String,
    pub address: String,
    /// The machine's agent: the one certificate whose batches this PS takes for the item.
    #[serde(default)]
    pub source: AllowedSender,
    /// The item is moving to another process server: its agent's batches are refused, what
    /// the cache holds is still forwarded. Kept across restarts; a route set again (the CS
    /// re-sends routes on reconnect, or a switch was given up) takes batches again. Should
    /// that happen after the drain was reported, the agent's next process server holds less
    /// than the agent was acknowledged, which the agent treats as a lost cache (a resync):
    /// never a silent loss.
    #[serde(default)]
    pub draining: bool,
}

/// Most bytes in flight to a target.
const FORWARD_WINDOW: u64 = 32 << 20;
const CODEC_NONE: u8 = 0;
const CODEC_LZ4: u8 = 1;

/// The cached form of a batch: codec, CRC of the raw payload, raw length, data. Compressed
/// straight behind the 13-byte head, so the data is copied once.
fn frame(raw: &[u8], crc: u32) -> Vec<u8> {
    let mut out = vec![0u8; 13 + lz4_flex::block::get_maximum_output_size(raw.len())];
    match lz4_flex::block::compress_into(raw, &mut out[13..]) {
        Ok(n) if n < raw.len() => {
            out.truncate(13 + n);
            out[0] = CODEC_LZ4;
        }
        _ => {
            out.truncate(13);
            out.extend_from_slice(raw);
            out[0] = CODEC_NONE;
        }
    }
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out[5..13].copy_from_slice(&(raw.len() as u64).to_le_bytes());
    out
}

fn unframe(item: &str, seq: u64, bytes: Bytes) -> Result<TargetBatch, String> {
    if bytes.len() < 13 {
        return Err(format!("cached batch {seq} of {item} is truncated"));
    }
    let codec = match bytes[0] {
        CODEC_NONE => Codec::None,
        CODEC_LZ4 => Codec::Lz4,
        other => {
            return Err(format!(
                "cached batch {seq} of {item} has unknown codec {other}"
            ));
        }
    };
    let crc = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[5..13]);
    let payload = bytes.slice(13..);
    Ok(TargetBatch {
        open: None,
        seq,
        payload,
        crc32: crc,
        codec: codec as i32,
        raw_len: u64::from_le_bytes(len),
    })
}

/// The PS's data-plane state.
pub struct DataPlane {
    pub cache: Arc<Cache>,
    pub credentials: CredentialsCell,
    routes: Mutex<HashMap<String, Route>>,
    routes_path: PathBuf,
    forwarders: Mutex<HashMap<String, (Route, CancellationToken)>>,
    /// One live agent stream per item.
    fence: failback_common::fence::Fence,
    /// Highest seq per item the target acknowledged (sent on to agents for end-to-end lag),
    /// one watch per item: an acknowledgement wakes that item's agent stream only (one watch
    /// over all items woke every stream on every item's acknowledgement, and each sent its
    /// agent an acknowledgement that said nothing new: N² messages at N items).
    target_acked: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// Bytes the targets acknowledged since start (the upload rate behind the estimate of
    /// how long the cache takes to drain).
    pub uploaded_bytes: std::sync::atomic::AtomicU64,
    /// Payload bytes agents sent, and what the cache stored of them (compressed): the
    /// compression ratio.
    pub received_bytes: std::sync::atomic::AtomicU64,
    pub stored_bytes: std::sync::atomic::AtomicU64,
    /// The last estimate of how long the backlog takes to upload (seconds, f64 bits).
    pub upload_estimate_s: std::sync::atomic::AtomicU64,
    /// Connections to targets for checksum requests, by (target, address).
    checksum_channels: Mutex<HashMap<(String, String), tonic::transport::Channel>>,
    shutdown: CancellationToken,
}

impl DataPlane {
    /// Bytes in the cache not yet acknowledged by their targets.
    pub fn backlog_bytes(&self) -> u64 {
        self.cache
            .items()
            .iter()
            .map(|i| self.cache.pending_bytes(i))
            .sum()
    }

    pub fn new(
        cache: Arc<Cache>,
        credentials: CredentialsCell,
        data_dir: &std::path::Path,
        shutdown: CancellationToken,
    ) -> Arc<DataPlane> {
        let routes_path = data_dir.join("routes.json");
        let routes: HashMap<String, Route> = std::fs::read(&routes_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let dp = Arc::new(DataPlane {
            cache,
            credentials,
            routes: Mutex::new(routes.clone()),
            routes_path,
            forwarders: Mutex::new(HashMap::new()),
            fence: Default::default(),
            target_acked: Mutex::new(HashMap::new()),
            uploaded_bytes: Default::default(),
            received_bytes: Default::default(),
            stored_bytes: Default::default(),
            upload_estimate_s: Default::default(),
            checksum_channels: Mutex::new(HashMap::new()),
            shutdown,
        });
        // Cached batches of known routes are forwarded at once, even before the CS answers.
        for (item, route) in routes {
            dp.ensure_forwarder(&item, route);
        }
        dp
    }

    /// Records (and persists) a route and starts or redirects the item's forwarder (ending a
    /// drain). `start_after` (non-zero after a switch from a
    /// process server that drained the item) is where an item this cache holds nothing of
    /// continues.
    pub fn set_route(
        self: &Arc<Self>,
        item: &str,
        route: Route,
        start_after: u64,
    ) -> Result<(), String> {
        failback_common::identity::validate_name(item)?;
        if start_after > 0
            && self
                .cache
                .start_after(item, start_after)
                .map_err(|e| format!("cannot continue {item} after batch {start_after}: {e}"))?
        {
            tracing::info!(%item, "continues after batch {start_after}, which the previous process server forwarded");
        }
        {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            routes.insert(item.to_string(), route.clone());
            self.persist_routes(&routes)?;
        }
        self.ensure_forwarder(item, route);
        Ok(())
    }

    fn persist_routes(&self, routes: &HashMap<String, Route>) -> Result<(), String> {
        let bytes = serde_json::to_vec(routes).map_err(|e| e.to_string())?;
        failback_common::durable::write(&self.routes_path, &bytes, 0o600)
            .map_err(|e| format!("cannot persist routes: {e}"))
    }

    /// Whether the item's agent may no longer send here.
    fn draining(&self, item: &str) -> bool {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(item)
            .is_some_and(|r| r.draining)
    }

    /// "Switch process server", on the process server the item leaves: from now on no batch
    /// of the item is taken (the open stream is fenced off, new ones are refused), and what
    /// the cache holds goes on to the target. Returns (highest batch held, highest batch the
    /// target acknowledged); drained once they are equal. `resume` takes batches again.
    pub async fn drain(&self, item: &str, resume: bool) -> Result<(u64, u64), String> {
        failback_common::identity::validate_name(item)?;
        {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let Some(route) = routes.get_mut(item) else {
                return Err(format!(
                    "this process server has no route for item `{item}`"
                ));
            };
            if route.draining == resume {
                route.draining = !resume;
                self.persist_routes(&routes)?;
                tracing::info!(%item, "{}", if resume { "taking the agent's batches again" } else { "draining: the agent's batches are refused, the cache is forwarded" });
            }
        }
        if !resume {
            // Waits for an append in progress; every later one sees the flag under this lock.
            let ticket = self.fence.open(item).await;
            drop(ticket.lock().await);
        }
        Ok((self.cache.last_seq(item), self.cache.released_seq(item)))
    }

    /// Forgets the item's route, stops its forwarder and drops what the cache holds for it
    /// ("Disable replication"). Unknown items are fine: the call is idempotent.
    pub fn remove_route(&self, item: &str) -> Result<(), String> {
        failback_common::identity::validate_name(item)?;
        if let Some((_, fw)) = self
            .forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(item)
        {
            fw.cancel();
        }
        self.target_acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(item);
        {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if routes.remove(item).is_some() {
                self.persist_routes(&routes)?;
            }
        }
        self.cache
            .drop_item(item)
            .map_err(|e| format!("cannot drop the cached batches of {item}: {e}"))
    }

    /// The watch of the highest batch of `item` its target acknowledged.
    fn target_watch(&self, item: &str) -> tokio::sync::watch::Sender<u64> {
        self.target_acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(item.to_string())
            .or_insert_with(|| tokio::sync::watch::Sender::new(0))
            .clone()
    }

    fn route(&self, item: &str) -> Option<Route> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(item)
            .cloned()
    }

    fn ensure_forwarder(self: &Arc<Self>, item: &str, route: Route) {
        let mut fw = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, _)) = fw.get(item)
            && *r == route
        {
            return;
        }
        if let Some((_, old)) = fw.remove(item) {
            old.cancel();
        }
        let cancel = self.shutdown.child_token();
        fw.insert(item.to_string(), (route.clone(), cancel.clone()));
        tokio::spawn(forward(self.clone(), item.to_string(), route, cancel));
    }
}

async fn forward(dp: Arc<DataPlane>, item: String, route: Route, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let started = Instant::now();
        let result = forward_session(&dp, &item, &route, &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        tracing::warn!(
            %item,
            "forwarding to {} at {}: {}; retrying in {wait:?}",
            route.target,
            route.address,
            result.err().unwrap_or_else(|| "closed".into())
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

async fn forward_session(
    dp: &DataPlane,
    item: &str,
    route: &Route,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let channel = dp
        .credentials
        .endpoint(&route.address, Role::MasterTarget, &route.target)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| describe_error(&e))?;
    let mut client = TargetDataClient::new(channel)
        .max_decoding_message_size(failback_common::server::MAX_MESSAGE)
        .max_encoding_message_size(failback_common::server::MAX_MESSAGE);
    let (tx, rx) = mpsc::channel::<TargetBatch>(8);
    tx.send(TargetBatch {
        open: Some(StreamOpen {
            item: item.to_string(),
        }),
        ..Default::default()
    })
    .await
    .map_err(|_| "stream closed")?;
    let mut acks = client
        .apply(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let first = acks
        .message()
        .await
        .map_err(|s| s.message().to_string())?
        .ok_or("target closed the stream")?;
    let release = |seq: u64| {
        let cache = dp.cache.clone();
        let item = item.to_string();
        async move {
            tokio::task::spawn_blocking(move || cache.release(&item, seq))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        }
    };
    release(first.seq).await?;
    let target_acked = dp.target_watch(item);
    target_acked.send_replace(first.seq);
    let mut sent = first.seq.max(dp.cache.released_seq(item));
    let mut acked = sent;
    let mut in_flight: std::collections::VecDeque<(u64, u64)> = Default::default();
    let notify = dp.cache.notifier(item);
    loop {
        let window: u64 = in_flight.iter().map(|(_, b)| b).sum();
        let wake = notify.notified();
        if window < FORWARD_WINDOW {
            let cache = dp.cache.clone();
            let it = item.to_string();
            let batches = tokio::task::spawn_blocking(move || cache.read_after(&it, sent, 8 << 20))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if !batches.is_empty() {
                for (seq, bytes) in batches {
                    let len = bytes.len() as u64;
                    let batch = unframe(item, seq, bytes)?;
                    tokio::select! {
                        r = tx.send(batch) => r.map_err(|_| "stream closed")?,
                        _ = cancel.cancelled() => return Ok(()),
                    }
                    in_flight.push_back((seq, len));
                    sent = seq;
                }
                continue;
            }
        }
        tokio::select! {
            _ = wake, if window < FORWARD_WINDOW => {}
            // A safety net only: an append stores a permit in the notifier, so none is
            // missed. (At 200 ms, 200 idle forwarders read their caches 1,000 times a second.)
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            ack = acks.message() => match ack {
                Ok(Some(a)) => {
                    while let Some((_, len)) = in_flight.front().copied().filter(|(s, _)| *s <= a.seq) {
                        in_flight.pop_front();
                        dp.uploaded_bytes
                            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    }
                    if a.seq > acked {
                        acked = a.seq;
                        target_acked.send_replace(acked);
                        release(acked).await?;
                    }
                }
                Ok(None) => return Err("target closed the stream".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// The `ProcessServerData` service (agents only).
pub struct DataService {
    pub dp: Arc<DataPlane>,
}

type AckStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl ProcessServerData for DataService {
    type ReplicateStream = AckStream;

    async fn replicate(
        &self,
        request: Request<Streaming<AgentBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let who = authorize(&request, "ProcessServerData.Replicate", &[Role::Agent])?;
        let fingerprint = peer_fingerprint(&request).unwrap_or_default();
        let mut inbound = request.into_inner();
        let item = match inbound.message().await? {
            Some(AgentBatch { open: Some(o), .. }) => o.item,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must open an item",
                ));
            }
        };
        failback_common::identity::validate_name(&item).map_err(Status::invalid_argument)?;
        let source = self.dp.route(&item).map(|r| r.source);
        check_sender(&who, &fingerprint, source.as_ref(), &item)?;
        let dp = self.dp.clone();
        let (tx, rx) = mpsc::channel(64);
        let ticket = dp.fence.open(&item).await;
        let last = {
            let _guard = ticket.lock().await;
            if dp.draining(&item) {
                return Err(moving_away(&item));
            }
            dp.cache.last_seq(&item)
        };
        let target_seq = *dp.target_watch(&item).borrow();
        tx.send(Ok(BatchAck {
            seq: last,
            target_seq,
        }))
        .await
        .map_err(|_| Status::cancelled("agent gone"))?;
        tokio::spawn(async move {
            if let Err(status) = receive(&dp, &item, &ticket, &mut inbound, &tx).await {
                tracing::warn!(%item, "replication stream refused: {}", status.message());
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn block_checksums(
        &self,
        request: Request<ChecksumRequest>,
    ) -> Result<Response<ChecksumResponse>, Status> {
        let who = authorize(&request, "ProcessServerData.BlockChecksums", &[Role::Agent])?;
        let fingerprint = peer_fingerprint(&request).unwrap_or_default();
        let req = request.into_inner();
        let source = self.dp.route(&req.item).map(|r| r.source);
        check_sender(&who, &fingerprint, source.as_ref(), &req.item)?;
        let route = self.dp.route(&req.item).ok_or_else(|| {
            Status::failed_precondition(format!(
                "no route for item `{}` on this process server",
                req.item
            ))
        })?;
        // One connection per target for checksum requests (a resync sends many): a TLS
        // handshake each would cost a round trip and about 3 KB across the link.
        let key = (route.target.clone(), route.address.clone());
        let cached = self
            .dp
            .checksum_channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = self
                    .dp
                    .credentials
                    .endpoint(&route.address, Role::MasterTarget, &route.target)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .connect()
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "target {}: {}",
                            route.target,
                            describe_error(&e)
                        ))
                    })?;
                self.dp
                    .checksum_channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), c.clone());
                c
            }
        };
        let result = TargetDataClient::new(channel)
            .max_decoding_message_size(failback_common::server::MAX_MESSAGE)
            .block_checksums(req)
            .await;
        if result
            .as_ref()
            .is_err_and(|s| matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown))
        {
            // The connection may be dead (target restarted, link reset): dial again next time.
            self.dp
                .checksum_channels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        result
    }
}

/// The refusal while an item moves to another process server.
fn moving_away(item: &str) -> Status {
    Status::unavailable(format!(
        "item {item} is moving to another process server (switch process server): this one \
         takes no more of its batches; the agent is told where to send them"
    ))
}

async fn receive(
    dp: &DataPlane,
    item: &str,
    ticket: &failback_common::fence::Ticket,
    inbound: &mut Streaming<AgentBatch>,
    tx: &mpsc::Sender<Result<BatchAck, Status>>,
) -> Result<(), Status> {
    let mut targets = dp.target_watch(item).subscribe();
    let target_seq = |t: &tokio::sync::watch::Receiver<u64>| *t.borrow();
    let mut last_appended = dp.cache.last_seq(item);
    loop {
        let batch = tokio::select! {
            m = inbound.message() => match m? {
                Some(b) => b,
                None => return Ok(()),
            },
            // The target got further: tell the agent (its end-to-end lag).
            changed = targets.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let ack = BatchAck { seq: last_appended, target_seq: target_seq(&targets) };
                if tx.send(Ok(ack)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let seq = batch.seq;
        if crc32fast::hash(&batch.payload) != batch.crc32 {
            return Err(Status::data_loss(format!(
                "batch {seq} of {item} failed its checksum: refused, nothing cached; the agent sends it again"
            )));
        }
        let framed = Bytes::from(frame(&batch.payload, batch.crc32));
        let (raw_len, stored_len) = (batch.payload.len() as u64, framed.len() as u64);
        let cache = dp.cache.clone();
        let it = item.to_string();
        let Some(guard) = ticket.lock().await else {
            return Err(Status::aborted(format!(
                "a newer replication stream of {item} took over; this one is closed"
            )));
        };
        if dp.draining(item) {
            return Err(moving_away(item));
        }
        let outcome = tokio::task::spawn_blocking(move || cache.append(&it, seq, framed))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(guard);
        match outcome {
            Ok(AppendOutcome::Appended) => {
                use std::sync::atomic::Ordering::Relaxed;
                dp.received_bytes.fetch_add(raw_len, Relaxed);
                dp.stored_bytes.fetch_add(stored_len, Relaxed);
            }
            Ok(AppendOutcome::Duplicate) => {}
            Err(e @ CacheError::OutOfOrder { .. }) => {
                return Err(Status::invalid_argument(e.to_string()));
            }
            Err(e @ CacheError::Full { .. }) => {
                return Err(Status::resource_exhausted(e.to_string()));
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        }
        last_appended = last_appended.max(seq);
        // Throttle agents while the cache is nearly full (ASR: below 20 % free).
        if dp.cache.health().1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ack = BatchAck {
            seq,
            target_seq: target_seq(&targets),
        };
        if tx.send(Ok(ack)).await.is_err() {
            return Ok(());
        }
    }
}
