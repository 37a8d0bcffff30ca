//! `srctl bench ...`: benchmarks that print ratios against a baseline measured in the same
//! run, never absolute pass/fail timings.
//!
//! `bench replication` starts a one-machine lab in a temporary directory and measures:
//! 1. the baseline: the same bytes, in the same 4 MiB batches, over one mutual-TLS gRPC stream
//!    on loopback to a sink that acknowledges without touching a disk;
//! 2. the full path: the machine's disk pre-filled with those bytes, then "Enable protection":
//!    agent (read, CRC) -> PS (LZ4, cache fsync) -> vpn-link relay -> target (CRC, journal
//!    fsync), timed from the request until the target has journaled the last batch;
//! 3. replication lag (capture -> target journal) p50/p99 under a steady 20 MB/s workload;
//!
//! and the physical limit the full path runs against ([`crate::bench_disk`]): the durable write
//! bandwidth of the lab's disk, the bytes every process wrote to storage per byte replicated
//! (source disk, PS cache, target journal, undo, replica: counted by the kernel), and
//! min(baseline, disk / amplification), which the full path is also given as a ratio of.
//!
//! `bench compression` measures the codecs the process server could use (LZ4 and zstd) on the
//! same data: the measurement behind the PS's choice of LZ4.
//!
//! `bench failover` measures failover times with a full retention window against a plain full
//! copy of the disk.
//!
//! `bench resync` measures an original-location reprotect after a planned failover (bytes across
//! the vpn link, time) against rsync (`--inplace --no-whole-file --ignore-times`) bringing the
//! same old on-premises disk image up to date with the same Azure disk image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use failback_common::enroll::{CsSettings, enroll_once};
use failback_common::identity::{Identity, Role, Site};
use failback_common::vdisk::{Share, VDisk};
use failback_proto::pb::data::{
    AgentBatch, BatchAck, ChecksumRequest, ChecksumResponse, StreamOpen,
    process_server_data_client::ProcessServerDataClient,
    process_server_data_server::{ProcessServerData, ProcessServerDataServer},
};
use failback_proto::pb::operator::{EnableItemRequest, ListItemsRequest, WorkloadRequest};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{item, lab};

const BATCH: usize = 4 << 20;

/// Data with the given compressible share, deterministic.
pub fn payload(len: usize, compressible: f64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    let block = 64 << 10;
    for chunk in out.chunks_mut(block) {
        let c = (chunk.len() as f64 * compressible) as usize;
        for (i, b) in chunk[..c].iter_mut().enumerate() {
            *b = b"failback lab benchmark "[i % 23];
        }
        rng.fill_bytes(&mut chunk[c..]);
    }
    out
}

/// A sink: acknowledges every batch, no disk.
struct Sink;

#[tonic::async_trait]
impl ProcessServerData for Sink {
    type ReplicateStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<BatchAck, Status>> + Send>>;

    async fn replicate(
        &self,
        request: Request<Streaming<AgentBatch>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(b)) = inbound.message().await {
                if tx
                    .send(Ok(BatchAck {
                        seq: b.seq,
                        target_seq: 0,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn block_checksums(
        &self,
        _: Request<ChecksumRequest>,
    ) -> Result<Response<ChecksumResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
}

/// Streams `data` (as 4 MiB batches, `total` bytes in all) over one mutual-TLS gRPC stream.
async fn baseline(dir: &Path, data: &Bytes, total: u64) -> anyhow::Result<f64> {
    let cs = CsSettings {
        address: lab::LabState::load(dir)?.cs_api,
        enroll_address: lab::LabState::load(dir)?.cs_enroll,
        ca_cert: dir.join("data/cs/ca.pem"),
        passphrase_file: Some(dir.join("data/cs/passphrase")),
        ..Default::default()
    };
    let server = enroll_once(
        &cs,
        &Identity::new(Role::ProcessServer, Site::Onprem, "bench-sink"),
    )
    .await?;
    let client = crate::client::operator_credentials(dir)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let trust = failback_common::trust::Trust::new();
    let secured = failback_common::server::Secured::new(
        server.server_config(trust.clone())?,
        trust,
        Default::default(),
    );
    let router = failback_common::server::builder().add_service(
        ProcessServerDataServer::new(Sink)
            .max_decoding_message_size(failback_common::server::MAX_MESSAGE),
    );
    let serve = tokio::spawn(failback_common::server::serve(
        router,
        listener,
        secured,
        stop.clone(),
    ));
    let channel = client
        .endpoint(&addr, Role::ProcessServer, "bench-sink")?
        .connect()
        .await?;
    let mut c = ProcessServerDataClient::new(channel)
        .max_encoding_message_size(failback_common::server::MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentBatch {
        open: Some(StreamOpen {
            item: "bench-1".into(),
        }),
        ..Default::default()
    })
    .await?;
    let start = Instant::now();
    let mut acks = c.replicate(ReceiverStream::new(rx)).await?.into_inner();
    let batches = total.div_ceil(BATCH as u64);
    let sender = {
        let data = data.clone();
        tokio::spawn(async move {
            for seq in 1..=batches {
                let off = ((seq - 1) as usize * BATCH) % data.len().max(1);
                let end = (off + BATCH).min(data.len());
                let payload = data.slice(off..end);
                // Same per-batch work on the sending side as the agent: a CRC of the payload.
                let crc32 = crc32fast::hash(&payload);
                if tx
                    .send(AgentBatch {
                        open: None,
                        seq,
                        payload,
                        crc32,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut last = 0;
    while last < batches {
        match acks.message().await? {
            Some(a) => last = a.seq,
            None => anyhow::bail!("baseline stream closed early"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    sender.abort();
    stop.cancel();
    let _ = serve.await;
    Ok(total as f64 / secs)
}

/// Results of `bench replication`.
#[derive(Debug, serde::Serialize)]
pub struct ReplicationReport {
    pub size_bytes: u64,
    pub compressible: f64,
    pub baseline_bytes_per_s: f64,
    pub full_path_bytes_per_s: f64,
    pub ratio: f64,
    pub link_bytes: u64,
    pub lag_write_rate_mb_s: f64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    /// Durable write bandwidth of the lab's disk (4 MiB writes, an fdatasync each).
    pub disk: crate::bench_disk::DiskBandwidth,
    /// Bytes written to storage during the full path, by process, and by `srctl` filling the
    /// source disk (`source`), as the kernel attributed them (`/proc/PID/io`): a breakdown.
    pub written: Vec<(String, u64)>,
    /// Bytes the lab's block device took from filling the source disk to the end of the full
    /// path (`None` on tmpfs).
    pub device_written: Option<u64>,
    /// `device_written` per byte replicated (0 where there is no block device).
    pub write_amplification: f64,
    /// What the path can reach on this machine: min(baseline, disk / write amplification).
    pub limit_bytes_per_s: f64,
    /// Full path / limit.
    pub ratio_to_limit: f64,
}

/// Set (to anything) to keep a shaped bench lab's directory, logs included, after the run.
const KEEP_LAB: &str = "FLAB_BENCH_KEEP_LAB";

fn temp_lab() -> PathBuf {
    std::env::temp_dir().join(format!(
        "failback-bench-{}-{}",
        std::process::id(),
        failback_common::control::now_ms()
    ))
}

/// vm1's disk in the on-premises datastore of a bench lab.
const ONPREM_DISK: &str = "datastores/ds-onprem/vm1/disk0.img";

/// Starts a one-machine lab (vm1, one disk of `disk_size` bytes) in a new temporary directory,
/// runs `body` with its directory, then stops the lab and removes the directory, whether `body`
/// succeeded or not.
pub(crate) async fn in_temp_lab<T, F, Fut>(
    disk_size: u64,
    progress: bool,
    body: F,
) -> anyhow::Result<T>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    in_temp_lab_with(disk_size, BTreeMap::new(), progress, body).await
}

/// [`in_temp_lab`] with environment settings for every component (config overrides).
async fn in_temp_lab_with<T, F, Fut>(
    disk_size: u64,
    env: BTreeMap<String, String>,
    progress: bool,
    body: F,
) -> anyhow::Result<T>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    if progress {
        eprintln!(
            "bench: starting a one-machine lab with a {} MiB disk",
            disk_size >> 20
        );
    }
    let opts = lab::UpOptions {
        topology: crate::topology::Topology::generated(1, 1, disk_size)
            .map_err(anyhow::Error::msg)?,
        timeout: Duration::from_secs(60),
        env,
        prometheus: false,
    };
    in_temp_lab_shaped(opts, body).await
}

/// Starts the lab `opts` describes in a new temporary directory, runs `body` with its
/// directory, then stops the lab and removes the directory, whether `body` succeeded or not.
pub(crate) async fn in_temp_lab_shaped<T, F, Fut>(
    opts: lab::UpOptions,
    body: F,
) -> anyhow::Result<T>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let dir = temp_lab();
    let result = match lab::up(&dir, &opts).await {
        Ok(_) => body(dir.clone()).await,
        Err(e) => Err(e),
    };
    let _ = lab::down(&dir).await;
    if std::env::var_os(KEEP_LAB).is_some() {
        eprintln!(
            "bench: the lab is kept at {} ({KEEP_LAB} is set)",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Writes the first `len` bytes of the disk image at `path` with `data` repeated, then fsyncs.
fn fill_disk(path: &Path, data: &[u8], len: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    anyhow::ensure!(!data.is_empty() || len == 0, "no data to fill a disk with");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut off = 0u64;
    while off < len {
        let n = (data.len() as u64).min(len - off) as usize;
        disk.write_all_at(&data[..n], off)?;
        off += n as u64;
    }
    disk.sync_all()?;
    Ok(())
}

/// Waits until `machine`'s item is Protected with everything acknowledged journaled at the
/// target, polling every `every`.
async fn wait_protected(
    dir: &Path,
    machine: &str,
    timeout: Duration,
    every: Duration,
) -> anyhow::Result<failback_proto::pb::operator::Item> {
    let start = Instant::now();
    // One connection for all polls: a handshake per poll costs the lab CPU the measurement
    // competes for.
    let mut client = crate::client::operator(dir).await?;
    loop {
        let i = client
            .list_items(ListItemsRequest {
                machine: machine.to_string(),
            })
            .await
            .map_err(|s| anyhow::anyhow!(crate::client::status_message(&s)))?
            .into_inner()
            .items
            .into_iter()
            .next();
        if let Some(i) = i
            && i.state == "Protected"
            && i.acked_seq > 0
            && i.target_seq >= i.acked_seq
        {
            return Ok(i);
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "`{machine}` was not Protected after {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// Seconds from `start_ms` (Unix ms) until `item`'s target held everything acknowledged, by
/// the agent's own clock of that moment: its progress reaches the CS at most once a second,
/// which a poll of the CS would add to a transfer of a second or two. Falls back to now when
/// the agent did not say.
pub(crate) fn seconds_until_caught_up(
    start_ms: i64,
    item: &failback_proto::pb::operator::Item,
) -> f64 {
    let now = failback_common::control::now_ms();
    let end = if item.target_seq_at_ms > start_ms {
        item.target_seq_at_ms.min(now)
    } else {
        now
    };
    (end - start_ms).max(1) as f64 / 1000.0
}

/// Enables protection of vm1 with `policy` (empty: the default) and waits until it is
/// Protected with everything journaled at the target, polling every `every`.
pub(crate) async fn enable_and_wait(
    dir: &Path,
    policy: &str,
    every: Duration,
) -> anyhow::Result<failback_proto::pb::operator::Item> {
    item::enable(
        dir,
        EnableItemRequest {
            machine: "vm1".into(),
            policy: policy.into(),
            ..Default::default()
        },
    )
    .await?;
    wait_protected(dir, "vm1", Duration::from_secs(1800), every).await
}

async fn link_bytes(dir: &Path) -> anyhow::Result<u64> {
    let s = crate::link::status(dir).await?;
    Ok(s.bytes_onprem_to_azure)
}

pub async fn replication(
    size: u64,
    compressible: f64,
    progress: bool,
) -> anyhow::Result<ReplicationReport> {
    if !(0.0..=1.0).contains(&compressible) {
        anyhow::bail!("--compressible must be within 0..1");
    }
    let size = size.div_ceil(1 << 20) * (1 << 20);
    let say = |m: &str| {
        if progress {
            eprintln!("bench: {m}");
        }
    };
    in_temp_lab(size.max(64 << 20), progress, |dir| async move {
        let data = Bytes::from(payload(BATCH * 8, compressible, 7));
        say("baseline: one mutual-TLS gRPC stream, no disk");
        let base = baseline(&dir, &data, size).await?;

        say("disk: durable 4 MiB writes (O_DIRECT where possible, fdatasync each), 3 passes");
        let disk = {
            let (dir, data) = (dir.clone(), data.clone());
            tokio::task::spawn_blocking(move || {
                crate::bench_disk::durable_bandwidth_median(&dir, size.min(512 << 20), &data, 3)
            })
            .await??
        };

        say("full path: pre-filling the source disk");
        let dev0 = crate::bench_disk::device_bytes_written(&dir);
        let own0 = crate::bench_disk::write_bytes("self");
        fill_disk(&dir.join(ONPREM_DISK), &data, size)?;
        let source = crate::bench_disk::write_bytes("self").saturating_sub(own0);
        let link0 = link_bytes(&dir).await?;
        let io0 = crate::bench_disk::lab_write_bytes(&dir)?;
        say("full path: enable protection and wait until the target journaled everything");
        let start_ms = failback_common::control::now_ms();
        let protected = enable_and_wait(&dir, "", Duration::from_millis(20))
            .await
            .map_err(|e| anyhow::anyhow!("full path: {e}"))?;
        let full = size as f64 / seconds_until_caught_up(start_ms, &protected);
        let link = link_bytes(&dir).await? - link0;
        let mut written =
            crate::bench_disk::written_between(&io0, &crate::bench_disk::lab_write_bytes(&dir)?);
        written.insert(0, ("source".to_string(), source));
        // Whatever is still dirty would reach the disk anyway.
        nix::unistd::sync();
        let device_written = dev0
            .zip(crate::bench_disk::device_bytes_written(&dir))
            .map(|(a, b)| b.saturating_sub(a));
        let write_amplification = device_written.unwrap_or(0) as f64 / size as f64;
        let limit = if write_amplification > 0.0 {
            base.min(disk.bytes_per_s / write_amplification)
        } else {
            base
        };

        say("lag: 20 MB/s of writes for 12 s");
        item::workload(
            &dir,
            WorkloadRequest {
                machine: "vm1".into(),
                action: "start".into(),
                rate_mb_s: 20.0,
                write_size: 64 << 10,
                pattern: "random".into(),
                compressible,
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(12)).await;
        let i = item::list(&dir, "vm1")
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("item gone"))?;
        Ok(ReplicationReport {
            size_bytes: size,
            compressible,
            baseline_bytes_per_s: base,
            full_path_bytes_per_s: full,
            ratio: full / base,
            link_bytes: link,
            lag_write_rate_mb_s: 20.0,
            lag_p50_ms: i.lag_p50_ms,
            lag_p99_ms: i.lag_p99_ms,
            disk,
            written,
            device_written,
            write_amplification,
            limit_bytes_per_s: limit,
            ratio_to_limit: full / limit,
        })
    })
    .await
}

pub fn print_replication(r: &ReplicationReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!(r))?);
        return Ok(());
    }
    let mb = |b: f64| b / 1e6;
    println!(
        "replication benchmark: {} MiB, {:.0} % compressible",
        r.size_bytes >> 20,
        r.compressible * 100.0
    );
    println!(
        "  baseline (1 mTLS gRPC stream, no disk)   {:>8.1} MB/s",
        mb(r.baseline_bytes_per_s)
    );
    println!(
        "  full path (agent->PS->link->target)      {:>8.1} MB/s",
        mb(r.full_path_bytes_per_s)
    );
    println!(
        "  ratio full/baseline                      {:>8.2}",
        r.ratio
    );
    println!(
        "  disk: durable 4 MiB writes ({})    {:>8.1} MB/s",
        if r.disk.direct {
            "O_DIRECT"
        } else {
            "buffered"
        },
        mb(r.disk.bytes_per_s)
    );
    let by: Vec<String> = r
        .written
        .iter()
        .map(|(name, b)| format!("{name} {:.2}", *b as f64 / r.size_bytes as f64))
        .collect();
    if r.write_amplification > 0.0 {
        println!(
            "  write amplification (device, counted)    {:>8.2}  (by process: {})",
            r.write_amplification,
            by.join(", ")
        );
    } else {
        println!(
            "  write amplification                      not counted: no block device holds the \
             lab (tmpfs?)"
        );
    }
    println!(
        "  limit min(baseline, disk / amplification) {:>7.1} MB/s",
        mb(r.limit_bytes_per_s)
    );
    println!(
        "  ratio full/limit                         {:>8.2}",
        r.ratio_to_limit
    );
    println!(
        "  bytes across the link                    {:>8.1} MB ({:.2} of the data: compression before the link)",
        mb(r.link_bytes as f64),
        r.link_bytes as f64 / r.size_bytes as f64
    );
    println!(
        "  lag at {:.0} MB/s (capture -> target)     p50 {:.0} ms, p99 {:.0} ms",
        r.lag_write_rate_mb_s, r.lag_p50_ms, r.lag_p99_ms
    );
    Ok(())
}

/// One codec's numbers.
#[derive(Debug, serde::Serialize)]
pub struct CodecResult {
    pub codec: String,
    pub compress_mb_s: f64,
    pub decompress_mb_s: f64,
    /// Compressed size / original size.
    pub ratio: f64,
}

/// LZ4 and zstd (levels 1 and 3) on 4 MiB batches of data with the given compressible share.
pub fn compression(size: u64, compressible: f64) -> anyhow::Result<Vec<CodecResult>> {
    let data = payload(size.max(BATCH as u64) as usize, compressible, 11);
    let mut out = Vec::new();
    type Codec = (
        &'static str,
        Box<dyn Fn(&[u8]) -> Vec<u8>>,
        Box<dyn Fn(&[u8], usize) -> anyhow::Result<Vec<u8>>>,
    );
    let codecs: Vec<Codec> = vec![
        (
            "lz4",
            Box::new(|b: &[u8]| lz4_flex::block::compress(b)),
            Box::new(|b: &[u8], n| Ok(lz4_flex::block::decompress(b, n)?)),
        ),
        (
            "zstd-1",
            Box::new(|b: &[u8]| zstd::bulk::compress(b, 1).unwrap_or_default()),
            Box::new(|b: &[u8], n| Ok(zstd::bulk::decompress(b, n)?)),
        ),
        (
            "zstd-3",
            Box::new(|b: &[u8]| zstd::bulk::compress(b, 3).unwrap_or_default()),
            Box::new(|b: &[u8], n| Ok(zstd::bulk::decompress(b, n)?)),
        ),
    ];
    for (name, compress, decompress) in codecs {
        let start = Instant::now();
        let packed: Vec<Vec<u8>> = data.chunks(BATCH).map(&compress).collect();
        let c_secs = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for (p, c) in packed.iter().zip(data.chunks(BATCH)) {
            let back = decompress(p, c.len())?;
            if back != c {
                anyhow::bail!("{name} did not round-trip");
            }
        }
        let d_secs = start.elapsed().as_secs_f64();
        let packed_len: usize = packed.iter().map(Vec::len).sum();
        out.push(CodecResult {
            codec: name.into(),
            compress_mb_s: data.len() as f64 / c_secs / 1e6,
            decompress_mb_s: data.len() as f64 / d_secs / 1e6,
            ratio: packed_len as f64 / data.len() as f64,
        });
    }
    Ok(out)
}

/// Results of `bench failover`.
#[derive(Debug, serde::Serialize)]
pub struct FailoverReport {
    pub disk_bytes: u64,
    pub retention_s: u64,
    pub points: usize,
    /// The replica's redo journal plus undo log when the failovers start: what a point's
    /// rollback reads from.
    pub journal_bytes: u64,
    pub baseline_full_copy_s: f64,
    pub latest_processed_s: f64,
    pub latest_s: f64,
    pub ratio_latest_processed_to_copy: f64,
    /// How the VM's disks were made ("overlay": over the frozen replica; "copy": a sparse
    /// copy, a reflink where the filesystem shares extents), for each run.
    pub layout_latest_processed: String,
    pub layout_latest: String,
    /// Bytes the VM's disk holds of its own (the overlay's delta, or the whole copy), each run.
    pub own_bytes_latest_processed: u64,
    pub own_bytes_latest: u64,
}

/// The layout of a VM disk and the bytes it holds of its own.
fn disk_layout(path: &Path) -> anyhow::Result<(String, u64)> {
    let disk = VDisk::open_read(path)
        .map_err(|e| anyhow::anyhow!("cannot open the VM's disk {}: {e}", path.display()))?;
    let layout = if disk.is_overlay() { "overlay" } else { "copy" };
    Ok((layout.to_string(), disk.own_bytes()?))
}

/// Failover time with a full retention window of points under a write load, against a
/// plain full copy of the same disk (what disk creation would cost without block sharing).
/// `failover_disks` is the master targets' setting (auto, copy or overlay).
pub async fn failover(
    size: u64,
    failover_disks: &str,
    progress: bool,
) -> anyhow::Result<FailoverReport> {
    let size = size.div_ceil(1 << 20) * (1 << 20);
    let say = |m: &str| {
        if progress {
            eprintln!("bench: {m}");
        }
    };
    let retention_s = 30;
    let env = BTreeMap::from([(
        "FBL_MT__FAILOVER_DISKS".to_string(),
        failover_disks.to_string(),
    )]);
    in_temp_lab_with(size, env, progress, |dir| async move {
        // Half the disk written before protection.
        let data = payload(BATCH * 8, 0.5, 3);
        fill_disk(&dir.join(ONPREM_DISK), &data, size / 2)?;
        item::create_policy(
            &dir,
            failback_proto::pb::operator::Policy {
                name: "bench".into(),
                rpo_threshold_s: 60,
                retention_s,
                crash_interval_s: 2,
                app_interval_s: 0,
                failback_of: String::new(),
                verification: failback_proto::pb::operator::Verification::Digests as i32,
            },
            false,
        )
        .await?;
        say("initial replication");
        enable_and_wait(&dir, "bench", Duration::from_millis(100)).await?;
        say(&format!(
            "filling a {retention_s} s retention window at 10 MB/s of writes"
        ));
        item::workload(
            &dir,
            WorkloadRequest {
                machine: "vm1".into(),
                action: "start".into(),
                rate_mb_s: 10.0,
                write_size: 64 << 10,
                pattern: "random".into(),
                compressible: 0.5,
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(retention_s + 5)).await;
        let points = item::list(&dir, "vm1")
            .await?
            .into_iter()
            .next()
            .map(|i| i.points.len())
            .unwrap_or(0);

        let replica_dir = dir.join("datastores/azure-storage/replicas/vm1-1");
        let journal_bytes = ["journal", "undo"]
            .iter()
            .flat_map(|sub| {
                std::fs::read_dir(replica_dir.join(sub))
                    .into_iter()
                    .flatten()
            })
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        say("baseline: a full copy of the replica disk");
        let replica = replica_dir.join("disks/disk0.img");
        let copy = dir.join("datastores/azure-storage/bench-copy.img");
        let start = Instant::now();
        std::fs::copy(&replica, &copy)?;
        std::fs::File::open(&copy)?.sync_all()?;
        let baseline = start.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&copy);

        let run = |kind: failback_proto::pb::operator::FailoverKind, point: &'static str| {
            let dir = dir.clone();
            async move {
                let start = Instant::now();
                item::failover(
                    &dir,
                    failback_proto::pb::operator::FailoverRequest {
                        machine: "vm1".into(),
                        point: point.into(),
                        shutdown: false,
                        kind: kind as i32,
                        sync: 0,
                    },
                )
                .await?;
                Ok::<f64, anyhow::Error>(start.elapsed().as_secs_f64())
            }
        };
        say("test failover to the latest processed point");
        let lp = run(
            failback_proto::pb::operator::FailoverKind::Test,
            "latest-processed",
        )
        .await?;
        let (layout_lp, own_lp) =
            disk_layout(&dir.join("datastores/azure-storage/vms/vm1-Test/disk0.img"))?;
        item::cleanup_test(&dir, "vm1").await?;
        say("failover to latest (process everything, make a new point)");
        let latest = run(
            failback_proto::pb::operator::FailoverKind::Unplanned,
            "latest",
        )
        .await?;
        let (layout_latest, own_latest) = disk_layout(&dir.join(AZURE_DISK))?;
        Ok(FailoverReport {
            disk_bytes: size,
            retention_s,
            points,
            journal_bytes,
            baseline_full_copy_s: baseline,
            latest_processed_s: lp,
            latest_s: latest,
            ratio_latest_processed_to_copy: lp / baseline,
            layout_latest_processed: layout_lp,
            layout_latest,
            own_bytes_latest_processed: own_lp,
            own_bytes_latest: own_latest,
        })
    })
    .await
}

pub fn print_failover(r: &FailoverReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!(r))?);
        return Ok(());
    }
    println!(
        "failover benchmark: {} MiB disk, {} s retention window ({} points, journal and undo log \
         {:.1} MiB) under 10 MB/s of writes",
        r.disk_bytes >> 20,
        r.retention_s,
        r.points,
        r.journal_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  baseline: full copy of the replica disk     {:>7.2} s",
        r.baseline_full_copy_s
    );
    println!(
        "  failover latest-processed (request -> VM started) {:>7.2} s  ({:.2} of a full copy)",
        r.latest_processed_s, r.ratio_latest_processed_to_copy
    );
    println!(
        "  failover latest (new point first)          {:>7.2} s",
        r.latest_s
    );
    println!(
        "  VM disk: {} ({:.1} MiB of its own) after latest-processed, {} ({:.1} MiB) after latest",
        r.layout_latest_processed,
        r.own_bytes_latest_processed as f64 / (1 << 20) as f64,
        r.layout_latest,
        r.own_bytes_latest as f64 / (1 << 20) as f64
    );
    println!("  (the VM's agent registers after the configured boot delay, not included)");
    Ok(())
}

/// The Azure VM's disk after a failover of vm1 (in the `azure-storage` datastore).
const AZURE_DISK: &str = "datastores/azure-storage/vms/vm1/disk0.img";
/// Granularity of the changes `bench resync` makes on the Azure disk.
const CHANGE_BLOCK: u64 = 64 << 10;

/// Results of `bench resync`.
#[derive(Debug, serde::Serialize)]
pub struct ResyncReport {
    pub size_bytes: u64,
    pub changed_fraction: f64,
    /// Bytes written on the Azure VM's disk after the failover (scattered 64 KiB blocks).
    pub changed_bytes: u64,
    /// Reprotect request -> the job ended (the item Protected in the reverse direction).
    pub reprotect_seconds: f64,
    /// Bytes across the vpn link during the reprotect, both directions.
    pub reprotect_link_bytes: u64,
    /// Bytes the agent found different and sent (the item's `resync_bytes`).
    pub resync_bytes_sent: u64,
    pub blocks_compared: u64,
    /// `rsync --inplace --no-whole-file --ignore-times --stats` of the same two disk images on
    /// this machine.
    pub rsync_seconds: f64,
    /// rsync's "Total bytes sent" + "Total bytes received": what would cross a link.
    pub rsync_bytes: u64,
    /// Ours / rsync.
    pub bytes_ratio: f64,
    /// Ours / rsync.
    pub time_ratio: f64,
    /// Fewer bytes and less time than rsync.
    pub target_met: bool,
    /// The reprotect job's steps and the seconds each took.
    pub reprotect_steps: Vec<JobStepTime>,
    /// The recovery point taken after the reprotect, verified byte-exact against the Azure
    /// VM's disk.
    pub verified_point: String,
}

/// One step of a job and the seconds it took (since the previous step, or the job's start).
#[derive(Debug, serde::Serialize)]
pub struct JobStepTime {
    pub name: String,
    pub seconds: f64,
}

fn step_times(job: &failback_proto::pb::operator::Job) -> Vec<JobStepTime> {
    let mut prev = job.started_ms;
    job.steps
        .iter()
        .map(|s| {
            let seconds = (s.time_ms - prev).max(0) as f64 / 1000.0;
            prev = s.time_ms;
            JobStepTime {
                name: s.name.clone(),
                seconds,
            }
        })
        .collect()
}

/// Bytes across the vpn link so far, both directions.
async fn link_total(dir: &Path) -> anyhow::Result<u64> {
    let s = crate::link::status(dir).await?;
    Ok(s.bytes_onprem_to_azure + s.bytes_azure_to_onprem)
}

const RSYNC_MISSING: &str = "rsync not found: install it (Debian: apt-get install rsync)";

/// Fails with a clear message when rsync is not installed.
fn check_rsync() -> anyhow::Result<()> {
    match std::process::Command::new("rsync")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(RSYNC_MISSING),
        Err(e) => anyhow::bail!("cannot run rsync: {e}"),
    }
}

/// A counter of rsync's `--stats` output ("Total bytes sent: 1,234"), without its separators.
fn rsync_stat(stats: &str, name: &str) -> anyhow::Result<u64> {
    let line = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .ok_or_else(|| anyhow::anyhow!("no `{name}` in rsync's statistics:\n{stats}"))?;
    let value = line.split_whitespace().next().unwrap_or_default();
    let digits: String = value.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() || value.chars().any(|c| c.is_ascii_alphabetic()) {
        anyhow::bail!("cannot read `{name}{line}` in rsync's statistics");
    }
    Ok(digits.parse()?)
}

/// Runs `rsync --inplace --no-whole-file --ignore-times --stats src dst` and returns the seconds
/// it took and the bytes it sent and received. `--ignore-times`: the two copies have the same
/// size and may have the same modification time, and rsync's quick check would then skip the
/// file without comparing it.
fn run_rsync(src: &Path, dst: &Path) -> anyhow::Result<(f64, u64)> {
    let start = Instant::now();
    let out = std::process::Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(RSYNC_MISSING),
            _ => anyhow::anyhow!("cannot run rsync: {e}"),
        })?;
    let secs = start.elapsed().as_secs_f64();
    let stats = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "rsync failed ({}): {}{}",
            out.status,
            stats,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bytes =
        rsync_stat(&stats, "Total bytes sent:")? + rsync_stat(&stats, "Total bytes received:")?;
    Ok((secs, bytes))
}

fn blake3_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(file)?;
    Ok(h.finalize())
}

/// Writes random data (seeded: the same blocks and bytes every run) into `fraction` of the
/// 64 KiB blocks of the disk image at `path`, chosen at random over the whole disk, with
/// pwrite, then fsyncs. Returns the bytes changed.
fn change_blocks(path: &Path, fraction: f64, seed: u64) -> anyhow::Result<u64> {
    let mut disk =
        VDisk::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let size = disk.len();
    let blocks = size.div_ceil(CHANGE_BLOCK) as usize;
    let count = ((blocks as f64 * fraction).round() as usize).min(blocks);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = rand::seq::index::sample(&mut rng, blocks, count).into_vec();
    chosen.sort_unstable();
    let mut buf = vec![0u8; CHANGE_BLOCK as usize];
    let mut changed = 0;
    for b in chosen {
        let off = b as u64 * CHANGE_BLOCK;
        let n = CHANGE_BLOCK.min(size - off) as usize;
        rng.fill_bytes(&mut buf[..n]);
        disk.write_at(&buf[..n], off)?;
        changed += n as u64;
    }
    disk.sync_all()?;
    Ok(changed)
}

/// Runs blocking file work (copies, hashes, rsync) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Original-location reprotect after a planned failover against rsync: vm1's disk (`size`
/// bytes of incompressible data) is protected, failed over (planned) and committed; once the
/// Azure VM's agent registered, `changed` of the Azure disk is rewritten in scattered 64 KiB
/// blocks. rsync (`--inplace --no-whole-file --ignore-times`) then brings a copy of the old
/// on-premises disk up to date with a copy of the Azure disk, and the reprotect does the same
/// through the lab (seeded from the old disk, block checksums compared, differing blocks sent
/// over the link).
///
/// rsync runs before the reprotect, while the lab is idle: once the item is Protected, its
/// recovery points (every few seconds, each with a BLAKE3 of the disk) would load the CPU
/// under rsync. The reprotect time is from the request to the job's end as the CS recorded it
/// (same clock), not rounded up to the job polling interval.
pub async fn resync(size: u64, changed: f64, progress: bool) -> anyhow::Result<ResyncReport> {
    if !(0.0..=1.0).contains(&changed) {
        anyhow::bail!("--changed must be within 0..1");
    }
    check_rsync()?;
    let size = size.div_ceil(1 << 20) * (1 << 20);
    anyhow::ensure!(size > 0, "--size must not be 0");
    let say = |m: &str| {
        if progress {
            eprintln!("bench: {m}");
        }
    };
    in_temp_lab(size, progress, |dir| async move {
        say("pre-filling vm1's disk with incompressible data");
        fill_disk(&dir.join(ONPREM_DISK), &payload(BATCH * 8, 0.0, 5), size)?;
        say("enable protection and wait for the initial replication");
        enable_and_wait(&dir, "", Duration::from_millis(100)).await?;

        say("planned failover to Azure (latest), commit");
        let job = item::failover(
            &dir,
            failback_proto::pb::operator::FailoverRequest {
                machine: "vm1".into(),
                point: "latest".into(),
                shutdown: true,
                kind: failback_proto::pb::operator::FailoverKind::Planned as i32,
                sync: 0,
            },
        )
        .await?;
        anyhow::ensure!(
            job.state == "Succeeded",
            "failover job {} {}: {}",
            job.id,
            job.state,
            job.error
        );
        item::commit(&dir, "vm1").await?;

        say("waiting for the Azure VM's agent to register");
        let start = Instant::now();
        loop {
            let up = crate::infra::list(&dir)
                .await?
                .into_iter()
                .any(|c| c.name == "vm1" && c.site == "azure" && c.status == "connected");
            if up {
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                anyhow::bail!("the Azure VM's agent (vm1) did not register within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let azure = dir.join(AZURE_DISK);
        let onprem = dir.join(ONPREM_DISK);
        say(&format!(
            "changing {:.1} % of the Azure VM's disk in scattered 64 KiB blocks",
            changed * 100.0
        ));
        let changed_bytes = {
            let azure = azure.clone();
            blocking(move || change_blocks(&azure, changed, 17)).await?
        };

        say("copying both disks for rsync (the Azure disk is the source)");
        let scratch = dir.join("bench-rsync");
        std::fs::create_dir_all(&scratch)?;
        let (src, dst) = (scratch.join("azure.img"), scratch.join("onprem.img"));
        {
            let (azure, onprem, src, dst) =
                (azure.clone(), onprem.clone(), src.clone(), dst.clone());
            blocking(move || {
                // Raw copies: rsync reads plain files (the Azure disk may be an overlay).
                for (from, to) in [(&azure, &src), (&onprem, &dst)] {
                    VDisk::open_read(from)?
                        .clone_to(to, Share::Copy)?
                        .0
                        .sync_all()?;
                }
                Ok(())
            })
            .await?;
        }

        say("baseline: rsync --inplace --no-whole-file --ignore-times of the same two images");
        let (rsync_seconds, rsync_bytes) = {
            let (src, dst) = (src.clone(), dst.clone());
            blocking(move || run_rsync(&src, &dst)).await?
        };

        say("reprotect to the original location");
        let link0 = link_total(&dir).await?;
        let requested_ms = failback_common::control::now_ms();
        let start = Instant::now();
        let job = item::reprotect(
            &dir,
            failback_proto::pb::operator::ReprotectRequest {
                machine: "vm1".into(),
                ..Default::default()
            },
        )
        .await?;
        let job = tokio::time::timeout(Duration::from_secs(1800), item::watch(&dir, job.id, false))
            .await
            .map_err(|_| anyhow::anyhow!("reprotect job {} did not end in 30 minutes", job.id))??;
        let elapsed = start.elapsed().as_secs_f64();
        let link_bytes = link_total(&dir).await? - link0;
        anyhow::ensure!(
            job.state == "Succeeded",
            "reprotect job {} {}: {}",
            job.id,
            job.state,
            job.error
        );
        let reprotect_seconds = if job.ended_ms >= requested_ms {
            (job.ended_ms - requested_ms) as f64 / 1000.0
        } else {
            elapsed
        };
        let item = item::list(&dir, "vm1")
            .await?
            .into_iter()
            .find(|i| i.id == job.item)
            .ok_or_else(|| anyhow::anyhow!("item {} is gone after the reprotect", job.item))?;
        anyhow::ensure!(
            item.state == "Protected",
            "after the reprotect, item {} is {}, not Protected",
            item.id,
            item.state
        );

        say("checking the reprotect: a recovery point after it, byte-exact against the Azure disk");
        let since = job.ended_ms;
        let start = Instant::now();
        let point = loop {
            let i = item::list(&dir, "vm1")
                .await?
                .into_iter()
                .find(|i| i.id == job.item);
            if let Some(p) = i.and_then(|i| i.points.into_iter().rev().find(|p| p.time_ms > since))
            {
                break p.id;
            }
            if start.elapsed() > Duration::from_secs(120) {
                anyhow::bail!(
                    "no recovery point on {} within 120 s of the reprotect",
                    job.item
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let v = item::verify(&dir, "vm1", &point).await?;
        anyhow::ensure!(
            v.equal,
            "after the reprotect, point {point} of {} differs from the Azure disk: {:?}",
            job.item,
            v.disks
        );

        say("checking the rsync baseline (destination == source)");
        let (a, b) = blocking(move || Ok((blake3_file(&src)?, blake3_file(&dst)?))).await?;
        anyhow::ensure!(
            a == b,
            "rsync's destination differs from its source after the sync ({a} vs {b})"
        );
        let _ = std::fs::remove_dir_all(&scratch);

        let bytes_ratio = link_bytes as f64 / rsync_bytes.max(1) as f64;
        let time_ratio = reprotect_seconds / rsync_seconds;
        Ok(ResyncReport {
            size_bytes: size,
            changed_fraction: changed,
            changed_bytes,
            reprotect_seconds,
            reprotect_link_bytes: link_bytes,
            resync_bytes_sent: item.resync_bytes,
            blocks_compared: item.resync_blocks_compared,
            rsync_seconds,
            rsync_bytes,
            bytes_ratio,
            time_ratio,
            target_met: link_bytes < rsync_bytes && reprotect_seconds < rsync_seconds,
            reprotect_steps: step_times(&job),
            verified_point: point,
        })
    })
    .await
}

pub fn print_resync(r: &ResyncReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!(r))?);
        return Ok(());
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "resync benchmark: {} MiB disk, {:.1} % changed after failover ({:.1} MB in scattered 64 KiB blocks)",
        r.size_bytes >> 20,
        r.changed_fraction * 100.0,
        mb(r.changed_bytes)
    );
    println!("  {:<44} {:>14} {:>10}", "", "bytes (link)", "seconds");
    println!(
        "  {:<44} {:>11.2} MB {:>8.2} s",
        "reprotect, original location (vpn-link)",
        mb(r.reprotect_link_bytes),
        r.reprotect_seconds
    );
    println!(
        "  {:<44} {:>11.2} MB {:>8.2} s",
        "rsync --inplace --no-whole-file -I (local)",
        mb(r.rsync_bytes),
        r.rsync_seconds
    );
    println!(
        "  {:<44} {:>14.2} {:>10.2}",
        "ratio reprotect/rsync", r.bytes_ratio, r.time_ratio
    );
    println!(
        "  reprotect compared {} blocks, sent {:.2} MB that differed; its steps:",
        r.blocks_compared,
        mb(r.resync_bytes_sent)
    );
    for s in &r.reprotect_steps {
        println!("    {:>7.2} s  {}", s.seconds, s.name);
    }
    println!(
        "  checks: item Protected, point {} byte-exact with the Azure disk, rsync destination == source",
        r.verified_point
    );
    let verdict = |ok: bool| if ok { "yes" } else { "no" };
    println!(
        "  target (fewer bytes and less time than rsync): {} (fewer bytes: {}, less time: {})",
        if r.target_met { "met" } else { "NOT met" },
        verdict(r.reprotect_link_bytes < r.rsync_bytes),
        verdict(r.reprotect_seconds < r.rsync_seconds)
    );
    Ok(())
}
