//! The target's data plane: process servers' `Apply` streams into the replica store of each
//! item, the applier (journal -> disks, retention pruning), recovery points reported to the
//! CS, and verification of a point against the digests the source recorded.
//!
//! Each batch is checked (decompression, CRC-32 of the raw payload, decoding, sequence)
//! before anything is journaled: a corrupted, truncated or out-of-order batch is refused
//! with a clear status and changes nothing. A batch is acknowledged only once durable in the
//! journal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failback_common::component::DatastoreConfig;
use failback_common::control::{Refusal, now_ms};
use failback_common::identity::{AllowedSender, Role, authorize, check_sender, peer_fingerprint};
use failback_common::paths::relative_inside;
use failback_proto::pb::control::{
    ComponentMessage, DiskComparison, DiskDigest, DiskInfo, Materialize, MaterializeResult,
    PlacedDisk, PointAdded, PointsPruned, PrepareReplica, ReplicaDamaged, Report, VerifyResult,
    component_message, report,
};
use failback_proto::pb::data::{
    self as pb, BatchAck, ChecksumRequest, ChecksumResponse, Codec, TargetBatch,
    target_data_server::TargetData,
};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::replica::{AppendOutcome, DiskSpec, Entry, PlaceMode, ReplicaError, ReplicaStore};

/// One item's replica on this target.
pub struct ItemReplica {
    pub item: String,
    pub dir: PathBuf,
    pub store: Mutex<ReplicaStore>,
    retention_ms: std::sync::atomic::AtomicU64,
    apply: Notify,
    /// Bytes journaled since the applier last started a round (wakes it before APPLY_AFTER).
    journaled_bytes: std::sync::atomic::AtomicU64,
    /// Whether a replica disk was an overlay over a frozen base at the applier's last round
    /// (it then looks every 2 s whether the base can be folded back; otherwise every 30 s).
    overlaid: std::sync::atomic::AtomicBool,
    /// Stops the applier (the replica is removed).
    stop: CancellationToken,
    /// When each batch not yet applied was journaled (the apply lag).
    pub journaled_at: Mutex<std::collections::VecDeque<(u64, std::time::Instant)>>,
}

impl ItemReplica {
    fn store(&self) -> std::sync::MutexGuard<'_, ReplicaStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// All replicas of this target.
pub struct Replicas {
    pub name: String,
    datastores: Vec<DatastoreConfig>,
    /// How failover disks are made (copy or overlay).
    failover_disks: crate::FailoverDisks,
    items: Mutex<HashMap<String, Arc<ItemReplica>>>,
    /// Per item, the one process server certificate whose batches and checksum requests
    /// are taken (from the CS's latest `PrepareReplica`; none until it arrives).
    senders: Mutex<HashMap<String, AllowedSender>>,
    /// One live PS stream per item.
    fence: failback_common::fence::Fence,
    outbox: mpsc::Sender<ComponentMessage>,
    shutdown: CancellationToken,
}

fn report(outbox: &mpsc::Sender<ComponentMessage>, kind: report::Kind) {
    let _ = outbox.try_send(ComponentMessage {
        kind: Some(component_message::Kind::Report(Report { kind: Some(kind) })),
    });
}

fn point_added(item: &str, p: &crate::replica::RecoveryPoint) -> report::Kind {
    report::Kind::PointAdded(PointAdded {
        item: item.to_string(),
        id: p.id.clone(),
        seq: p.seq,
        time_ms: p.time_ms,
        kind: p.kind.to_string(),
    })
}

impl Replicas {
    pub fn new(
        name: String,
        datastores: Vec<DatastoreConfig>,
        failover_disks: crate::FailoverDisks,
        outbox: mpsc::Sender<ComponentMessage>,
        shutdown: CancellationToken,
    ) -> Arc<Replicas> {
        Arc::new(Replicas {
            name,
            datastores,
            failover_disks,
            items: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            fence: Default::default(),
            outbox,
            shutdown,
        })
    }

    /// Every open replica.
    pub fn all(&self) -> Vec<Arc<ItemReplica>> {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, item: &str) -> Option<Arc<ItemReplica>> {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(item)
            .cloned()
    }

    /// Opens (creating) the replica of an item; idempotent. Reports its points to the CS.
    /// The process server allowed to send for `item`.
    fn sender(&self, item: &str) -> Option<AllowedSender> {
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(item)
            .cloned()
    }

    pub async fn prepare(self: &Arc<Self>, p: PrepareReplica) -> Result<(), String> {
        failback_common::identity::validate_name(&p.item)?;
        if let Some(sender) = p.sender.clone() {
            self.senders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(p.item.clone(), sender.into());
        }
        if let Some(existing) = self.get(&p.item) {
            existing
                .retention_ms
                .store(p.retention_ms, Ordering::Relaxed);
            // A source disk that grew: the replica grows with it (the agent resyncs).
            {
                let mut store = existing.store();
                for d in &p.disks {
                    store
                        .grow_disk(&d.id, d.size_bytes)
                        .map_err(|e| e.to_string())?;
                }
            }
            for point in existing.store().points() {
                report(&self.outbox, point_added(&p.item, &point));
            }
            return Ok(());
        }
        let ds = self
            .datastores
            .iter()
            .find(|d| d.name == p.datastore)
            .ok_or_else(|| {
                format!(
                    "datastore `{}` is not accessible from {} (ASR 8061); it sees: {}",
                    p.datastore,
                    self.name,
                    self.datastores
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let dir = ds.path.join("replicas").join(&p.item);
        let disks: Vec<DiskSpec> = p
            .disks
            .iter()
            .map(|d| DiskSpec {
                id: d.id.clone(),
                size: d.size_bytes,
            })
            .collect();
        let seeds = p
            .seed
            .iter()
            .map(|s| Ok((s.id.clone(), relative_inside(&ds.path, &s.path)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let retention = (!p.retention_drive.is_empty())
            .then(|| PathBuf::from(&p.retention_drive).join(&p.item));
        let open_dir = dir.clone();
        let expected = p.existing;
        let store = tokio::task::spawn_blocking(move || {
            let mut lost = None;
            if !open_dir.exists() {
                if expected {
                    tracing::error!(dir = %open_dir.display(), "the replica's directory is gone: made anew; the item needs a resync");
                    lost = Some(format!("replica directory {} was missing", open_dir.display()));
                }
                create_replica_dir(&open_dir, &disks, &seeds, retention.as_deref())?;
            }
            let mut store = ReplicaStore::open(&open_dir, &disks).map_err(|e| e.to_string())?;
            if let Some(reason) = lost {
                store.lost_everything(reason);
            }
            // Points read through disks that lost data: none of them can be trusted.
            let mut dropped = Vec::new();
            if store.damage().is_some() {
                dropped = store.points().into_iter().map(|p| p.id).collect();
                store.drop_points().map_err(|e| e.to_string())?;
            }
            Ok::<_, String>((store, dropped))
        })
        .await
        .map_err(|e| e.to_string())??;
        let (store, ids) = store;
        if let Some(reason) = store.damage() {
            if !ids.is_empty() {
                report(
                    &self.outbox,
                    report::Kind::PointsPruned(PointsPruned {
                        item: p.item.clone(),
                        ids,
                    }),
                );
            }
            report(
                &self.outbox,
                report::Kind::ReplicaDamaged(ReplicaDamaged {
                    item: p.item.clone(),
                    reason: reason.to_string(),
                }),
            );
        }
        let points = store.points();
        let replica = Arc::new(ItemReplica {
            item: p.item.clone(),
            dir,
            store: Mutex::new(store),
            retention_ms: std::sync::atomic::AtomicU64::new(p.retention_ms),
            apply: Notify::new(),
            journaled_bytes: std::sync::atomic::AtomicU64::new(0),
            overlaid: std::sync::atomic::AtomicBool::new(true),
            stop: self.shutdown.child_token(),
            journaled_at: Mutex::default(),
        });
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(p.item.clone(), replica.clone());
        for point in points {
            report(&self.outbox, point_added(&p.item, &point));
        }
        tokio::spawn(applier(
            replica.clone(),
            self.outbox.clone(),
            replica.stop.clone(),
        ));
        tracing::info!(item = %p.item, datastore = %ds.name, "replica prepared");
        Ok(())
    }

    /// The datastore directory of `item`'s replica.
    fn datastore_of(&self, replica: &ItemReplica) -> Option<PathBuf> {
        // DATASTORE/replicas/ITEM
        replica
            .dir
            .parent()
            .and_then(|p| p.parent())
            .map(PathBuf::from)
    }

    /// Writes the item's disks as of `point` into DATASTORE/vms/VM (replacing what was there),
    /// or, with `place` (original location), into those disks in place; returns the disks,
    /// the digests the source recorded at the point and the bytes written in place.
    pub async fn materialize(&self, m: Materialize) -> Result<MaterializeResult, Refusal> {
        let Materialize {
            item,
            point,
            vm,
            place,
            sync,
        } = m;
        failback_common::identity::validate_name(&vm).map_err(Refusal::from)?;
        let replica = self.get(&item).ok_or_else(|| {
            Refusal::not_found(format!("no replica of `{item}` on {}", self.name))
        })?;
        let ds = self
            .datastore_of(&replica)
            .ok_or("replica outside a datastore")?;
        if !place.is_empty() {
            let mode = match sync.as_str() {
                "" | "before-failover" => PlaceMode::Delta,
                "full-download" => PlaceMode::Full,
                other => {
                    return Err(format!(
                        "unknown data synchronisation `{other}` (before-failover or full-download)"
                    )
                    .into());
                }
            };
            let places = place
                .iter()
                .map(|d| Ok((d.id.clone(), relative_inside(&ds, &d.path)?)))
                .collect::<Result<Vec<_>, String>>()?;
            return tokio::task::spawn_blocking(move || {
                place_point(&replica, &point, &places, mode)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(Refusal::from);
        }
        let out = ds.join("vms").join(&vm);
        let share = self.failover_disks.share_in(&ds);
        tokio::task::spawn_blocking(move || {
            if out.exists() {
                std::fs::remove_dir_all(&out)
                    .map_err(|e| Refusal::from(format!("cannot replace {}: {e}", out.display())))?;
            }
            std::fs::create_dir_all(&out)
                .map_err(|e| Refusal::from(format!("cannot create {}: {e}", out.display())))?;
            let mut store = replica.store();
            let p = store.point(&point).ok_or_else(|| {
                Refusal::not_found(format!("no recovery point `{point}` on the target"))
            })?;
            let started = std::time::Instant::now();
            let files = store
                .materialize_with(Some(&point), &out, share)
                .map_err(|e| Refusal::from(e.to_string()))?;
            let sizes: std::collections::HashMap<String, u64> = store
                .disks()
                .iter()
                .map(|d| (d.id.clone(), d.size))
                .collect();
            let overlays = files.iter().filter(|m| m.overlay).count();
            tracing::info!(
                item = %item,
                vm = %vm,
                point = %point,
                overlays,
                copies = files.len() - overlays,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "VM disks created"
            );
            let disks = files
                .into_iter()
                .map(|m| PlacedDisk {
                    size_bytes: sizes.get(&m.disk).copied().unwrap_or(0),
                    id: m.disk,
                    path: m.path.display().to_string(),
                })
                .collect();
            Ok(MaterializeResult {
                disks,
                digests: digests_of(p.digests),
                written_bytes: 0,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Deletes the replica of `item` and its journal (a reprotect took it over as its seed, or
    /// the machine is gone). Unknown items are fine: the call is idempotent.
    pub async fn remove(&self, item: &str) -> Result<String, String> {
        failback_common::identity::validate_name(item)?;
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(item);
        let removed = self
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(item);
        let dirs: Vec<PathBuf> = match &removed {
            Some(r) => vec![r.dir.clone()],
            None => self
                .datastores
                .iter()
                .map(|d| d.path.join("replicas").join(item))
                .collect(),
        };
        // Streams still open for the item become stale: nothing lands in a deleted replica.
        drop(self.fence.open(item).await);
        if let Some(r) = removed {
            r.stop.cancel();
            // Wait for the applier to let go of the store (it holds the flock).
            let _guard = r.store();
        }
        tokio::task::spawn_blocking(move || {
            for dir in dirs {
                for sub in ["journal", "undo"] {
                    if let Ok(target) = std::fs::read_link(dir.join(sub)) {
                        let _ = std::fs::remove_dir_all(target);
                    }
                }
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("cannot delete {}: {e}", dir.display())),
                }
            }
            Ok(String::new())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Deletes every recovery point of `item` (commit).
    pub async fn drop_points(&self, item: &str) -> Result<String, String> {
        let replica = self
            .get(item)
            .ok_or_else(|| format!("no replica of `{item}` on {}", self.name))?;
        let ids: Vec<String> = replica.store().points().into_iter().map(|p| p.id).collect();
        let r = replica.clone();
        tokio::task::spawn_blocking(move || r.store().drop_points())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        report(
            &self.outbox,
            report::Kind::PointsPruned(PointsPruned {
                item: item.to_string(),
                ids,
            }),
        );
        Ok(String::new())
    }

    /// BLAKE3 of each disk of the VM in DATASTORE/vms/VM, or at `place`.
    pub async fn digest_vm(
        &self,
        item: &str,
        vm: &str,
        place: &[DiskInfo],
    ) -> Result<VerifyResult, Refusal> {
        failback_common::identity::validate_name(vm).map_err(Refusal::from)?;
        let replica = self.get(item).ok_or_else(|| {
            Refusal::not_found(format!("no replica of `{item}` on {}", self.name))
        })?;
        let ds = self
            .datastore_of(&replica)
            .ok_or("replica outside a datastore")?;
        let dir = ds.join("vms").join(vm);
        let disks = replica
            .store()
            .disks()
            .iter()
            .map(|d| match place.iter().find(|p| p.id == d.id) {
                Some(p) => Ok((d.id.clone(), relative_inside(&ds, &p.path)?)),
                None => Ok((d.id.clone(), dir.join(format!("{}.img", d.id)))),
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(Refusal::from)?;
        let vm = vm.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (d, path) in disks {
                let digest = failback_common::vdisk::digest_path(&path)
                    .map_err(|e| Refusal::from(format!("{}: {e}", path.display())))?;
                out.push(DiskComparison {
                    disk: d,
                    source_blake3: String::new(),
                    replica_blake3: digest,
                });
            }
            Ok(VerifyResult {
                point: vm,
                equal: false,
                disks: out,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Materializes `point` and compares each disk with the digest the source recorded.
    pub async fn verify(&self, item: &str, point: &str) -> Result<VerifyResult, Refusal> {
        let replica = self.get(item).ok_or_else(|| {
            Refusal::not_found(format!("no replica of `{item}` on {}", self.name))
        })?;
        let point = point.to_string();
        tokio::task::spawn_blocking(move || {
            let mut store = replica.store();
            let p = store.point(&point).ok_or_else(|| {
                Refusal::not_found(format!("no recovery point `{point}` on the target"))
            })?;
            if p.digests.is_empty() {
                return Err(Refusal::from(format!(
                    "point `{point}` carries no source digests: the item's policy has \
                     verification off (`srctl policy update POLICY --verification digests`; \
                     points carry them once the item's replication restarts)"
                )));
            }
            let got = store
                .digest(Some(&point))
                .map_err(|e| Refusal::from(e.to_string()))?;
            let mut disks = Vec::new();
            let mut equal = true;
            for src in &p.digests {
                let replica = got
                    .iter()
                    .find(|d| d.disk == src.disk)
                    .map(|d| d.blake3.clone())
                    .unwrap_or_default();
                equal &= replica == src.blake3;
                disks.push(DiskComparison {
                    disk: src.disk.clone(),
                    source_blake3: src.blake3.clone(),
                    replica_blake3: replica,
                });
            }
            Ok(VerifyResult {
                point,
                equal,
                disks,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Creates a new replica directory atomically: disks seeded from older copies (original
/// location) and the journal on the retention drive, staged next to it and renamed into place,
/// so that a crash half-way leaves no half-seeded replica.
fn create_replica_dir(
    dir: &std::path::Path,
    disks: &[DiskSpec],
    seeds: &[(String, PathBuf)],
    retention: Option<&std::path::Path>,
) -> Result<(), String> {
    let name = dir
        .file_name()
        .ok_or("replica directory without a name")?
        .to_string_lossy()
        .into_owned();
    let staging = dir.with_file_name(format!(".{name}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("disks"))
        .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
    for (disk, src) in seeds {
        let spec = disks
            .iter()
            .find(|d| &d.id == disk)
            .ok_or_else(|| format!("seed for unknown disk `{disk}`"))?;
        let linked = crate::replica::seed_disk(
            src,
            &staging.join("disks").join(format!("{disk}.img")),
            spec.size,
        )
        .map_err(|e| format!("cannot seed disk {disk} from {}: {e}", src.display()))?;
        tracing::info!(
            disk = %disk,
            seed = %src.display(),
            "{}",
            if linked { "seeded: the replica took over the disk (hard link)" } else { "seeded by copy" }
        );
    }
    if let Some(r) = retention {
        for sub in ["journal", "undo"] {
            let target = r.join(sub);
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("retention drive: cannot create {}: {e}", target.display()))?;
            std::os::unix::fs::symlink(&target, staging.join(sub))
                .map_err(|e| format!("retention drive: {e}"))?;
        }
    }
    std::fs::rename(&staging, dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        failback_common::durable::sync_dir(parent)
            .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    }
    Ok(())
}

/// Whether two paths name the same file (inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Brings the disks at `places` to `point` in place (failback to the original location):
/// the point is materialized in the replica's scratch space, then written over each disk.
fn place_point(
    replica: &ItemReplica,
    point: &str,
    places: &[(String, PathBuf)],
    mode: PlaceMode,
) -> Result<MaterializeResult, String> {
    let scratch = replica.dir.join("tmp").join("place");
    let _ = std::fs::remove_dir_all(&scratch);
    let (files, p, sizes) = {
        let mut store = replica.store();
        let p = store
            .point(point)
            .ok_or_else(|| format!("no recovery point `{point}` on the target"))?;
        let files = store
            .materialize(Some(point), &scratch)
            .map_err(|e| e.to_string())?;
        let sizes: HashMap<String, u64> = store
            .disks()
            .iter()
            .map(|d| (d.id.clone(), d.size))
            .collect();
        (files, p, sizes)
    };
    let mut disks = Vec::new();
    let mut written = 0;
    for (id, src) in &files {
        let dst = &places
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| format!("no original-location disk given for disk `{id}`"))?
            .1;
        let replica_disk = replica.dir.join("disks").join(format!("{id}.img"));
        if same_file(dst, &replica_disk) {
            // The replica took the on-premises disk over (seeded by a hard link): the point
            // replaces it atomically, and the replica keeps its own state.
            std::fs::rename(src, dst)
                .map_err(|e| format!("cannot put {} in place: {e}", dst.display()))?;
            if let Some(dir) = dst.parent() {
                failback_common::durable::sync_dir(dir)
                    .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
            }
            written += std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
        } else {
            written += crate::replica::write_in_place(src, dst, mode).map_err(|e| e.to_string())?;
        }
        disks.push(PlacedDisk {
            id: id.clone(),
            path: dst.display().to_string(),
            size_bytes: sizes.get(id).copied().unwrap_or(0),
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(MaterializeResult {
        disks,
        digests: digests_of(p.digests),
        written_bytes: written,
    })
}

/// The digests a source recorded with a point, as a command result carries them.
fn digests_of(digests: Vec<crate::replica::DiskDigest>) -> Vec<DiskDigest> {
    digests
        .into_iter()
        .map(|d| DiskDigest {
            disk: d.disk,
            blake3: d.blake3,
        })
        .collect()
}

/// How long journaled batches wait to be applied together.
const APPLY_AFTER: Duration = Duration::from_secs(1);
/// Redo payload applied per step with the store held: an append waiting for the store waits
/// for at most one step (a few tens of ms on a disk of 200-300 MB/s), and a fast item is
/// applied as soon as this much is journaled rather than after [`APPLY_AFTER`].
const APPLY_STEP: usize = 4 << 20;

/// How often a replica looks for points past its retention: a twentieth of the window, from
/// 2 s to a minute (one PointsPruned report then carries several points, not one each).
fn prune_every(retention_ms: i64) -> Duration {
    Duration::from_millis((retention_ms / 20).clamp(2_000, 60_000) as u64)
}

/// Applies journaled batches to the replica disks and prunes points past retention.
async fn applier(
    replica: Arc<ItemReplica>,
    outbox: mpsc::Sender<ComponentMessage>,
    shutdown: CancellationToken,
) {
    // A thousand idle replicas each waking every 2 s to prune, apply nothing and look for a
    // base to fold kept a target busy: each wakes only when it has something to do, or as
    // often as its retention and its overlays call for.
    let mut next_prune = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let fold_every = if replica.overlaid.load(Ordering::Relaxed) {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(30)
        };
        tokio::select! {
            // Batches are applied in groups: one undo frame sync, one disk checkpoint
            // (fdatasync) and one state record for all batches journaled within APPLY_AFTER,
            // instead of each per batch. (At 200 ms, 200 machines writing a batch every half
            // second each cost four syncs per batch.) The journal holds them durably meanwhile;
            // whatever reads the disks (a checksum, a failover) applies first.
            _ = replica.apply.notified() => {
                let deadline = tokio::time::Instant::now() + APPLY_AFTER;
                while replica.journaled_bytes.load(Ordering::Relaxed) < APPLY_STEP as u64 {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = replica.apply.notified() => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            // Folds a disk back once nothing shares its base.
            _ = tokio::time::sleep(fold_every) => {}
            _ = tokio::time::sleep_until(next_prune) => {
                let r = replica.clone();
                let retention = r.retention_ms.load(Ordering::Relaxed) as i64;
                next_prune = tokio::time::Instant::now() + prune_every(retention);
                let pruned = tokio::task::spawn_blocking(move || {
                    let mut store = r.store();
                    let all: Vec<(String, i64)> = store.points().into_iter().map(|p| (p.id, p.time_ms)).collect();
                    let keep = crate::retention::keep(&all, now_ms(), retention);
                    store.prune(|p| keep.contains(&p.id))
                }).await;
                match pruned {
                    Ok(Ok(ids)) if !ids.is_empty() => report(&outbox, report::Kind::PointsPruned(PointsPruned {
                        item: replica.item.clone(),
                        ids,
                    })),
                    Ok(Err(e)) => tracing::error!(item = %replica.item, "pruning: {e}"),
                    _ => {}
                }
                continue;
            }
            _ = shutdown.cancelled() => return,
        }
        replica.journaled_bytes.store(0, Ordering::Relaxed);
        // Applying in bounded steps, the store released between them, then folding disks back
        // whose frozen base nothing shares any more (a test failover cleaned up, a failed-over
        // VM deleted).
        loop {
            let r = replica.clone();
            let step = move || {
                let mut store = r.store();
                if store.apply_some(APPLY_STEP)? {
                    return Ok::<bool, crate::replica::ReplicaError>(true);
                }
                store.fold_unshared()?;
                r.overlaid.store(store.has_overlay(), Ordering::Relaxed);
                Ok(false)
            };
            match tokio::task::spawn_blocking(step).await {
                Ok(Ok(true)) if !shutdown.is_cancelled() => continue,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(item = %replica.item, "applying the journal: {e}"),
                Err(e) => tracing::error!(item = %replica.item, "applier: {e}"),
            }
            break;
        }
    }
}

/// Most blocks one checksum request may ask for (the answer is 16 bytes a block).
const MAX_CHECKSUM_BLOCKS: u64 = 1 << 16;

/// A checksum request's size, bounded before anything is allocated for it: blocks of 4 KiB to
/// 16 MiB (whole pages), at most [`MAX_CHECKSUM_BLOCKS`] of them.
fn check_checksum_request(block_size: u64, length: u64) -> Result<(), Status> {
    if !(4096..=16 << 20).contains(&block_size) || !block_size.is_multiple_of(4096) {
        return Err(Status::invalid_argument(format!(
            "block_size {block_size} is out of range: a multiple of 4096 from 4 KiB to 16 MiB"
        )));
    }
    if length.div_ceil(block_size) > MAX_CHECKSUM_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "{length} bytes in blocks of {block_size} is more than {MAX_CHECKSUM_BLOCKS} blocks \
             in one request; ask for a shorter range"
        )));
    }
    Ok(())
}

fn decode(item: &str, batch: &TargetBatch) -> Result<Vec<Entry>, Status> {
    // The declared size is checked before anything is allocated for it: no batch an agent can
    // send decompresses to more than the largest message.
    if batch.raw_len > failback_common::server::MAX_MESSAGE as u64 {
        return Err(Status::invalid_argument(format!(
            "batch {} of {item} declares {} bytes uncompressed, more than the largest batch \
             ({} bytes); refused",
            batch.seq,
            batch.raw_len,
            failback_common::server::MAX_MESSAGE
        )));
    }
    let raw = match batch.codec() {
        Codec::None => batch.payload.clone(),
        Codec::Lz4 => lz4_flex::block::decompress(&batch.payload, batch.raw_len as usize)
            .map_err(|e| {
                Status::data_loss(format!(
                    "batch {} of {item} does not decompress: {e}; refused",
                    batch.seq
                ))
            })?
            .into(),
        Codec::Unspecified => {
            return Err(Status::invalid_argument(format!(
                "batch {} of {item} names no codec",
                batch.seq
            )));
        }
    };
    if raw.len() as u64 != batch.raw_len || crc32fast::hash(&raw) != batch.crc32 {
        return Err(Status::data_loss(format!(
            "batch {} of {item} failed its checksum: refused, nothing journaled",
            batch.seq
        )));
    }
    // Decoding from `Bytes` makes each write's data a view of `raw`, not a copy.
    let entries = pb::Entries::decode(raw).map_err(|e| {
        Status::invalid_argument(format!("batch {} of {item} is malformed: {e}", batch.seq))
    })?;
    entries
        .entries
        .into_iter()
        .map(|e| match e.kind {
            Some(pb::entry::Kind::Write(w)) => Ok(Entry::Write {
                disk: w.disk,
                offset: w.offset,
                data: w.data,
            }),
            Some(pb::entry::Kind::Tag(t)) => Ok(Entry::Tag {
                kind: t
                    .kind
                    .parse()
                    .map_err(|e: crate::replica::UnknownPointKind| {
                        Status::invalid_argument(e.to_string())
                    })?,
                id: t.id,
                time_ms: t.time_ms,
                digests: t
                    .digests
                    .into_iter()
                    .map(|d| crate::replica::DiskDigest {
                        disk: d.disk,
                        blake3: d.blake3,
                    })
                    .collect(),
            }),
            None => Err(Status::invalid_argument(format!(
                "batch {} of {item} has an empty entry",
                batch.seq
            ))),
        })
        .collect()
}

/// The `TargetData` service (process servers only).
pub struct TargetService {
    pub replicas: Arc<Replicas>,
}

type AckStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<BatchAck, Status>> + Send>>;

fn replica_status(e: ReplicaError) -> Status {
    match e {
        e @ ReplicaError::OutOfOrder { .. } => Status::invalid_argument(e.to_string()),
        e @ (ReplicaError::OutOfRange { .. } | ReplicaError::UnknownDisk(_)) => {
            Status::invalid_argument(e.to_string())
        }
        e => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl TargetData for TargetService {
    type ApplyStream = AckStream;

    async fn apply(
        &self,
        request: Request<Streaming<TargetBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let who = authorize(&request, "TargetData.Apply", &[Role::ProcessServer])?;
        let fingerprint = peer_fingerprint(&request).unwrap_or_default();
        let mut inbound = request.into_inner();
        let item = match inbound.message().await? {
            Some(TargetBatch { open: Some(o), .. }) => o.item,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must open an item",
                ));
            }
        };
        check_sender(
            &who,
            &fingerprint,
            self.replicas.sender(&item).as_ref(),
            &item,
        )?;
        let replica = self.replicas.get(&item).ok_or_else(|| {
            Status::failed_precondition(format!(
                "item `{item}` is not prepared on target {} (the CS prepares it when protection is enabled)",
                self.replicas.name
            ))
        })?;
        let outbox = self.replicas.outbox.clone();
        let (tx, rx) = mpsc::channel(64);
        let ticket = self.replicas.fence.open(&item).await;
        let last = {
            let _guard = ticket.lock().await;
            replica.store().last_seq()
        };
        tx.send(Ok(BatchAck {
            seq: last,
            target_seq: last,
        }))
        .await
        .map_err(|_| Status::cancelled("peer gone"))?;
        tokio::spawn(async move {
            let result: Result<(), Status> = async {
                while let Some(batch) = inbound.message().await? {
                    let seq = batch.seq;
                    let batch_bytes = batch.raw_len.max(batch.payload.len() as u64);
                    let entries = decode(&item, &batch)?;
                    let tags: Vec<String> = entries
                        .iter()
                        .filter_map(|e| match e {
                            Entry::Tag { id, .. } => Some(id.clone()),
                            _ => None,
                        })
                        .collect();
                    let r = replica.clone();
                    let Some(guard) = ticket.lock().await else {
                        return Err(Status::aborted(format!(
                            "a newer stream of {item} took over; this one is closed"
                        )));
                    };
                    let outcome =
                        tokio::task::spawn_blocking(move || r.store().append(seq, &entries))
                            .await
                            .map_err(|e| Status::internal(e.to_string()))?
                            .map_err(replica_status)?;
                    drop(guard);
                    if outcome == AppendOutcome::Appended {
                        replica
                            .journaled_bytes
                            .fetch_add(batch_bytes, Ordering::Relaxed);
                        if let Ok(mut j) = replica.journaled_at.lock() {
                            j.push_back((seq, std::time::Instant::now()));
                            // Bounded whatever happens to the applier.
                            while j.len() > 100_000 {
                                j.pop_front();
                            }
                        }
                        replica.apply.notify_one();
                        for id in tags {
                            let point = replica.store().point(&id);
                            if let Some(p) = point {
                                report(&outbox, point_added(&item, &p));
                            }
                        }
                    }
                    if tx
                        .send(Ok(BatchAck {
                            seq,
                            target_seq: seq,
                        }))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(())
            }
            .await;
            if let Err(status) = result {
                tracing::warn!(%item, "apply stream refused: {}", status.message());
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn block_checksums(
        &self,
        request: Request<ChecksumRequest>,
    ) -> Result<Response<ChecksumResponse>, Status> {
        let who = authorize(
            &request,
            "TargetData.BlockChecksums",
            &[Role::ProcessServer],
        )?;
        let fingerprint = peer_fingerprint(&request).unwrap_or_default();
        let req = request.into_inner();
        check_sender(
            &who,
            &fingerprint,
            self.replicas.sender(&req.item).as_ref(),
            &req.item,
        )?;
        let replica = self.replicas.get(&req.item).ok_or_else(|| {
            Status::failed_precondition(format!("item `{}` is not prepared here", req.item))
        })?;
        if req.length == 0 {
            let last = replica.store().last_seq();
            return Ok(Response::new(ChecksumResponse {
                checksums: Default::default(),
                target_seq: last,
            }));
        }
        check_checksum_request(req.block_size, req.length)?;
        let last = replica.store().last_seq();
        if last < req.min_seq {
            return Err(Status::unavailable(format!(
                "target has journaled {} batches of {}, the comparison needs {}: still catching up",
                last, req.item, req.min_seq
            )));
        }
        let sums = tokio::task::spawn_blocking(move || {
            replica
                .store()
                .block_checksums(&req.disk, req.offset, req.length, req.block_size)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(replica_status)?;
        let full = failback_common::blocks::DIGEST_LEN;
        let keep = match req.digest_bytes {
            0 => full,
            n => (n as usize).min(full),
        };
        let checksums: Vec<u8> = sums
            .iter()
            .flat_map(|s| s[..keep].iter().copied())
            .collect();
        Ok(Response::new(ChecksumResponse {
            checksums: checksums.into(),
            target_seq: last,
        }))
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    #[test]
    fn a_batch_declaring_a_huge_size_is_refused_before_allocating() {
        let batch = TargetBatch {
            open: None,
            seq: 7,
            payload: bytes::Bytes::from_static(&[0x1f, 0, 0, 0]),
            crc32: 0,
            codec: Codec::Lz4 as i32,
            raw_len: 1 << 62,
        };
        let e = decode("vm1-1", &batch).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("declares 4611686018427387904 bytes"),
            "{e}"
        );
        let none = TargetBatch {
            codec: Codec::Unspecified as i32,
            raw_len: 4,
            ..batch
        };
        let e = decode("vm1-1", &none).expect_err("no codec");
        assert!(e.message().contains("names no codec"), "{e}");
    }

    #[test]
    fn checksum_requests_are_bounded_in_block_size_and_count() {
        assert!(check_checksum_request(64 << 10, 8 << 20).is_ok());
        for (block, len) in [(1, 1 << 20), (0, 1), (4097, 1 << 20), (32 << 20, 1 << 30)] {
            let e = check_checksum_request(block, len).expect_err("refused");
            assert!(e.message().contains("block_size"), "{e}");
        }
        let e = check_checksum_request(4096, 1 << 40).expect_err("too many blocks");
        assert!(e.message().contains("more than 65536 blocks"), "{e}");
    }
}

#[cfg(test)]
mod paths {
    use super::*;

    /// A seed (an original-location disk the replica takes over) named through a symbolic
    /// link that leads out of the datastore is refused, and no replica is made.
    #[tokio::test]
    async fn a_seed_through_a_symlink_out_of_the_datastore_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ds = dir.path().join("ds");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(ds.join("vms")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("disk0.img"), vec![7u8; 4096]).expect("disk");
        std::os::unix::fs::symlink(&outside, ds.join("vms/vm1")).expect("symlink");
        let (outbox, _rx) = mpsc::channel(16);
        let replicas = Replicas::new(
            "mt".into(),
            vec![DatastoreConfig {
                name: "ds".into(),
                path: ds.clone(),
            }],
            crate::FailoverDisks::Auto,
            outbox,
            CancellationToken::new(),
        );
        let disk = |path: &str| DiskInfo {
            id: "disk0".into(),
            datastore: "ds".into(),
            path: path.into(),
            size_bytes: 4096,
        };
        let err = replicas
            .prepare(PrepareReplica {
                item: "vm1-1".into(),
                datastore: "ds".into(),
                disks: vec![disk("")],
                seed: vec![disk("vms/vm1/disk0.img")],
                ..Default::default()
            })
            .await
            .expect_err("a seed outside the datastore");
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!ds.join("replicas/vm1-1").exists(), "no replica made");
        let err = replicas
            .prepare(PrepareReplica {
                item: "vm1-1".into(),
                datastore: "ds".into(),
                disks: vec![disk("")],
                seed: vec![disk("../outside/disk0.img")],
                ..Default::default()
            })
            .await
            .expect_err("a seed with ..");
        assert!(err.contains("without `..`"), "{err}");
    }
}
