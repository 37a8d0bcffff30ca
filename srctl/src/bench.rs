//! `srctl bench ...`: benchmarks that print ratios against a baseline measured in the same
//! run, never absolute pass/fail timings.
//!
//! `bench replication` starts a one-machine lab in a temporary directory and measures:
//! 1. the baseline: the same bytes, in the same 4 MiB batches, over one mutual-TLS gRPC stream
//!    on loopback to a sink that acknowledges without touching a disk;
//! 2. the full path: the machine's disk pre-filled with those bytes, then "Enable protection":
//!    agent (read, CRC) -> PS (LZ4, cache fsync) -> vpn-link relay -> target (CRC, journal
//!    fsync), timed from the request until the target has journaled the last batch;
//! 3. replication lag (capture -> target journal) p50/p99 under a steady 20 MB/s workload.
//!
//! `bench compression` measures the codecs the process server could use (LZ4 and zstd) on the
//! same data: the measurement behind the PS's choice of LZ4.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use failback_common::enroll::{CsSettings, enroll_once};
use failback_common::identity::{Identity, Role, Site};
use failback_proto::pb::data::{
    AgentBatch, BatchAck, ChecksumRequest, ChecksumResponse, StreamOpen,
    process_server_data_client::ProcessServerDataClient,
    process_server_data_server::{ProcessServerData, ProcessServerDataServer},
};
use failback_proto::pb::operator::{EnableItemRequest, WorkloadRequest};
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
    let router = failback_common::server::builder(server.server_tls())?.add_service(
        ProcessServerDataServer::new(Sink)
            .max_decoding_message_size(failback_common::server::MAX_MESSAGE),
    );
    let serve = tokio::spawn(failback_common::server::serve(
        router,
        listener,
        stop.clone(),
    ));
    let channel = client.endpoint(&addr, "bench-sink")?.connect().await?;
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
}

fn temp_lab() -> PathBuf {
    std::env::temp_dir().join(format!(
        "failback-bench-{}-{}",
        std::process::id(),
        failback_common::control::now_ms()
    ))
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
    let dir = temp_lab();
    let say = |m: &str| {
        if progress {
            eprintln!("bench: {m}");
        }
    };
    say(&format!("starting a one-machine lab in {}", dir.display()));
    let opts = lab::UpOptions {
        machines: 1,
        disk_size: size.max(64 << 20),
        timeout: Duration::from_secs(60),
    };
    lab::up(&dir, &opts).await?;
    let result = async {
        let data = Bytes::from(payload(BATCH * 8, compressible, 7));
        say("baseline: one mutual-TLS gRPC stream, no disk");
        let base = baseline(&dir, &data, size).await?;

        say("full path: pre-filling the source disk");
        {
            use std::os::unix::fs::FileExt;
            let disk = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("datastores/ds-onprem/vm1/disk0.img"))?;
            let mut off = 0u64;
            while off < size {
                let n = (data.len() as u64).min(size - off) as usize;
                disk.write_all_at(&data[..n], off)?;
                off += n as u64;
            }
            disk.sync_all()?;
        }
        let link0 = link_bytes(&dir).await?;
        say("full path: enable protection and wait until the target journaled everything");
        let start = Instant::now();
        item::enable(
            &dir,
            EnableItemRequest {
                machine: "vm1".into(),
                ..Default::default()
            },
        )
        .await?;
        loop {
            let i = item::list(&dir, "vm1").await?.into_iter().next();
            if let Some(i) = i
                && i.state == "Protected"
                && i.acked_seq > 0
                && i.target_seq >= i.acked_seq
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(1800) {
                anyhow::bail!("full path did not finish in 30 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let full = size as f64 / start.elapsed().as_secs_f64();
        let link = link_bytes(&dir).await? - link0;

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
        })
    }
    .await;
    let _ = lab::down(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
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
    pub baseline_full_copy_s: f64,
    pub latest_processed_s: f64,
    pub latest_s: f64,
    pub ratio_latest_processed_to_copy: f64,
}

/// Failover time with a full retention window of points under a write load, against a
/// plain full copy of the same disk (what disk creation would cost without block sharing).
pub async fn failover(size: u64, progress: bool) -> anyhow::Result<FailoverReport> {
    let size = size.div_ceil(1 << 20) * (1 << 20);
    let dir = temp_lab();
    let say = |m: &str| {
        if progress {
            eprintln!("bench: {m}");
        }
    };
    say(&format!(
        "starting a one-machine lab with a {} MiB disk in {}",
        size >> 20,
        dir.display()
    ));
    lab::up(
        &dir,
        &lab::UpOptions {
            machines: 1,
            disk_size: size,
            timeout: Duration::from_secs(60),
        },
    )
    .await?;
    let retention_s = 30;
    let result = async {
        // Half the disk written before protection.
        let data = Bytes::from(payload(BATCH * 8, 0.5, 3));
        {
            use std::os::unix::fs::FileExt;
            let disk = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("datastores/ds-onprem/vm1/disk0.img"))?;
            let mut off = 0u64;
            while off < size / 2 {
                let n = (data.len() as u64).min(size / 2 - off) as usize;
                disk.write_all_at(&data[..n], off)?;
                off += n as u64;
            }
        }
        item::create_policy(
            &dir,
            failback_proto::pb::operator::Policy {
                name: "bench".into(),
                rpo_threshold_s: 60,
                retention_s,
                crash_interval_s: 2,
                app_interval_s: 0,
                failback_of: String::new(),
            },
            false,
        )
        .await?;
        item::enable(
            &dir,
            EnableItemRequest {
                machine: "vm1".into(),
                policy: "bench".into(),
                ..Default::default()
            },
        )
        .await?;
        say("initial replication");
        loop {
            let i = item::list(&dir, "vm1").await?.into_iter().next();
            if i.is_some_and(|i| i.state == "Protected" && i.target_seq >= i.acked_seq) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

        say("baseline: a full copy of the replica disk");
        let replica = dir.join("datastores/azure-storage/replicas/vm1-1/disks/disk0.img");
        let copy = dir.join("datastores/azure-storage/bench-copy.img");
        let start = Instant::now();
        std::fs::copy(&replica, &copy)?;
        std::fs::File::open(&copy)?.sync_all()?;
        let baseline = start.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&copy);

        let run = |kind: &'static str, point: &'static str| {
            let dir = dir.clone();
            async move {
                let start = Instant::now();
                item::failover(
                    &dir,
                    failback_proto::pb::operator::FailoverRequest {
                        machine: "vm1".into(),
                        point: point.into(),
                        shutdown: false,
                        kind: kind.into(),
                    },
                )
                .await?;
                Ok::<f64, anyhow::Error>(start.elapsed().as_secs_f64())
            }
        };
        say("test failover to the latest processed point");
        let lp = run("test", "latest-processed").await?;
        item::cleanup_test(&dir, "vm1").await?;
        say("failover to latest (process everything, make a new point)");
        let latest = run("unplanned", "latest").await?;
        Ok(FailoverReport {
            disk_bytes: size,
            retention_s,
            points,
            baseline_full_copy_s: baseline,
            latest_processed_s: lp,
            latest_s: latest,
            ratio_latest_processed_to_copy: lp / baseline,
        })
    }
    .await;
    let _ = lab::down(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn print_failover(r: &FailoverReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!(r))?);
        return Ok(());
    }
    println!(
        "failover benchmark: {} MiB disk, {} s retention window ({} points) under 10 MB/s of writes",
        r.disk_bytes >> 20,
        r.retention_s,
        r.points
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
    println!("  (the VM's agent registers after the configured boot delay, not included)");
    Ok(())
}
