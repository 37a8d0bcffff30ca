//! Runtime shaping and faults of the link ([`Settings`]): added latency with jitter, a
//! bandwidth cap per direction shared by every connection (one token bucket per direction,
//! [`Bucket`]), what `down` does to live connections ([`DownMode`]), flapping, and a one-way
//! blackhole. Also the textual forms (`100ms`, `10Mbit`, `off`) used by the config file, and
//! the conversions to and from `failback.link.v1.LinkSettings`.
//!
//! Toxiproxy is the yardstick: latency/jitter (`latency` toxic), bandwidth (`bandwidth`
//! toxic, but shared by the whole tunnel here), reset (`reset_peer`), stall (`timeout` with
//! no timeout), blackhole (`limit_data`-like silent drop).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use failback_proto::pb::link as pb;
use tokio::time::Instant;

use failback_common::identity::Site;

/// Largest latency or jitter accepted.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Shortest flap period accepted (shorter would only thrash).
pub const MIN_FLAP: Duration = Duration::from_millis(50);
/// Longest flap period accepted.
pub const MAX_FLAP: Duration = Duration::from_secs(24 * 3600);
/// Smallest non-zero bandwidth accepted, bytes per second (8 kbit/s).
pub const MIN_BANDWIDTH: u64 = 1000;

/// What taking the link down does to the connections it already relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DownMode {
    /// Reset them (RST on both sides).
    #[default]
    Reset,
    /// Keep them open but move no bytes until the link is up again.
    Stall,
}

impl DownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DownMode::Reset => "reset",
            DownMode::Stall => "stall",
        }
    }

    /// `reset` or `stall`.
    pub fn parse(s: &str) -> Result<DownMode, String> {
        match s.trim() {
            "reset" => Ok(DownMode::Reset),
            "stall" => Ok(DownMode::Stall),
            other => Err(format!("must be \"reset\" or \"stall\", got {other:?}")),
        }
    }
}

impl fmt::Display for DownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shaping and fault settings; the default is a clean link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// Added one-way delay of each chunk, each direction.
    pub latency: Duration,
    /// Each chunk's delay is `latency` ± a uniform random offset up to this (never < 0).
    pub jitter: Duration,
    /// Bytes per second each way for the whole tunnel; 0 is unlimited.
    pub bandwidth: u64,
    pub down_mode: DownMode,
    /// Down/up alternating with this period; `None` is no flapping.
    pub flap: Option<Duration>,
    /// Bytes sent from this site are read and dropped; `None` is no blackhole.
    pub blackhole: Option<Site>,
}

impl Settings {
    /// The protobuf form, every field present.
    pub fn to_pb(&self) -> pb::LinkSettings {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        pb::LinkSettings {
            latency_ms: Some(ms(self.latency)),
            jitter_ms: Some(ms(self.jitter)),
            bandwidth_bytes_per_sec: Some(self.bandwidth),
            down_mode: Some(match self.down_mode {
                DownMode::Reset => pb::DownMode::Reset,
                DownMode::Stall => pb::DownMode::Stall,
            } as i32),
            flap_period_ms: Some(self.flap.map_or(0, ms)),
            blackhole: Some(match self.blackhole {
                None => pb::Blackhole::Off,
                Some(Site::Onprem) => pb::Blackhole::OnpremToAzure,
                Some(Site::Azure) => pb::Blackhole::AzureToOnprem,
            } as i32),
        }
    }

    /// Applies every field present in `p` (absent ones are kept). On error, names the
    /// offending field; `self` may then be partly changed, so apply to a copy.
    pub fn merge_pb(&mut self, p: &pb::LinkSettings) -> Result<(), String> {
        let named = |field: &'static str| move |m: String| format!("{field}: {m}");
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        if let Some(v) = p.latency_ms {
            self.latency = check_delay(ms(v)).map_err(named("latency_ms"))?;
        }
        if let Some(v) = p.jitter_ms {
            self.jitter = check_delay(ms(v)).map_err(named("jitter_ms"))?;
        }
        if let Some(v) = p.bandwidth_bytes_per_sec {
            self.bandwidth = check_bandwidth(v).map_err(named("bandwidth_bytes_per_sec"))?;
        }
        if let Some(v) = p.down_mode {
            self.down_mode = match pb::DownMode::try_from(v) {
                Ok(pb::DownMode::Reset) => DownMode::Reset,
                Ok(pb::DownMode::Stall) => DownMode::Stall,
                _ => return Err(format!("down_mode: must be RESET or STALL, got {v}")),
            };
        }
        if let Some(v) = p.flap_period_ms {
            self.flap = check_flap(ms(v)).map_err(named("flap_period_ms"))?;
        }
        if let Some(v) = p.blackhole {
            self.blackhole = match pb::Blackhole::try_from(v) {
                Ok(pb::Blackhole::Off) => None,
                Ok(pb::Blackhole::OnpremToAzure) => Some(Site::Onprem),
                Ok(pb::Blackhole::AzureToOnprem) => Some(Site::Azure),
                _ => {
                    return Err(format!(
                        "blackhole: must be OFF, ONPREM_TO_AZURE or AZURE_TO_ONPREM, got {v}"
                    ));
                }
            };
        }
        Ok(())
    }
}

/// Latency and jitter: at most [`MAX_DELAY`].
pub fn check_delay(d: Duration) -> Result<Duration, String> {
    if d > MAX_DELAY {
        return Err(format!("at most {}s, got {d:?}", MAX_DELAY.as_secs()));
    }
    Ok(d)
}

/// 0 (unlimited) or at least [`MIN_BANDWIDTH`] bytes/s.
pub fn check_bandwidth(bps: u64) -> Result<u64, String> {
    if bps != 0 && bps < MIN_BANDWIDTH {
        return Err(format!(
            "at least {MIN_BANDWIDTH} bytes/s (8kbit) or 0 for unlimited, got {bps} bytes/s"
        ));
    }
    Ok(bps)
}

/// Zero is off; otherwise between [`MIN_FLAP`] and [`MAX_FLAP`].
pub fn check_flap(d: Duration) -> Result<Option<Duration>, String> {
    if d.is_zero() {
        return Ok(None);
    }
    if d < MIN_FLAP || d > MAX_FLAP {
        return Err(format!(
            "must be 0/off or between {}ms and 24h, got {d:?}",
            MIN_FLAP.as_millis()
        ));
    }
    Ok(Some(d))
}

/// `250ms`, `2s`, `1.5s`, `1m`, `500us`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration like 100ms, 2s or 0, got {s:?}");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" if n == 0.0 => 0.0,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// A flap period: a duration, or `off` (also `0`).
pub fn parse_flap(s: &str) -> Result<Option<Duration>, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    check_flap(parse_duration(s)?)
}

/// A bandwidth in bytes per second: `10Mbit`, `500kbit`, `1Gbit` (bits, decimal prefixes;
/// `bps`/`kbps`/`mbps`/`gbps` too), `1MB`, `64kB`, `123B` or a bare number (bytes, decimal
/// prefixes), `1MiB` (binary), and `0` or `off` for unlimited. Case-insensitive, so `Mb`
/// reads as megabytes: write `Mbit` for megabits.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a rate like 10Mbit, 500kbit, 1MB or off, got {s:?}");
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let bytes_per_unit: f64 = match unit {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "bit" | "bps" => 1.0 / 8.0,
        "kbit" | "kbps" => 1e3 / 8.0,
        "mbit" | "mbps" => 1e6 / 8.0,
        "gbit" | "gbps" => 1e9 / 8.0,
        _ => return Err(bad()),
    };
    let bps = (n * bytes_per_unit).round();
    if !bps.is_finite() || bps >= u64::MAX as f64 {
        return Err(bad());
    }
    check_bandwidth(bps as u64)
}

/// `onprem-to-azure`, `azure-to-onprem`, or `off`: the site whose outgoing bytes are
/// dropped.
pub fn parse_blackhole(s: &str) -> Result<Option<Site>, String> {
    match s.trim() {
        "onprem-to-azure" => Ok(Some(Site::Onprem)),
        "azure-to-onprem" => Ok(Some(Site::Azure)),
        "off" => Ok(None),
        other => Err(format!(
            "must be \"onprem-to-azure\", \"azure-to-onprem\" or \"off\", got {other:?}"
        )),
    }
}

/// A token bucket in bytes, for one direction of the tunnel. Reservations may run the
/// bucket into debt: a reservation of `n` bytes is granted at once and the caller waits
/// until the debt it leaves is paid back, so concurrent senders are served in the order they
/// reserved and the long-run rate never exceeds the cap by more than one burst.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new() -> Self {
        Bucket {
            rate: 0,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Reserves `n` bytes at `rate` bytes/s (0: unlimited) and returns how long to wait
    /// before sending them. A change of rate forgives any debt and empties the bucket.
    pub(crate) fn reserve(&mut self, n: usize, rate: u64, now: Instant) -> Duration {
        if rate != self.rate {
            self.rate = rate;
            self.tokens = 0.0;
            self.last = now;
        }
        if rate == 0 {
            return Duration::ZERO;
        }
        let rate_f = rate as f64;
        let burst = (rate_f / 10.0).max(1024.0);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate_f).min(burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate_f)
        }
    }
}

/// How many bytes one read may take with `rate` bytes/s (0: unlimited): about 50 ms worth,
/// so connections sharing the cap interleave finely.
pub(crate) fn chunk_len(rate: u64, max: usize) -> usize {
    if rate == 0 {
        return max;
    }
    usize::try_from(rate / 20).unwrap_or(max).clamp(1024, max)
}

/// The per-chunk delay: latency ± jitter, from a small PRNG (SplitMix64) seeded per pump.
pub(crate) struct Delay {
    state: u64,
}

impl Delay {
    pub(crate) fn new() -> Self {
        Delay {
            state: RandomState::new().build_hasher().finish(),
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn sample(&mut self, s: &Settings) -> Duration {
        if s.jitter.is_zero() {
            return s.latency;
        }
        let j = u64::try_from(s.jitter.as_micros()).unwrap_or(u64::MAX / 4);
        let offset = self.next() % (2 * j + 1);
        let latency = u64::try_from(s.latency.as_micros()).unwrap_or(u64::MAX / 4);
        Duration::from_micros((latency + offset).saturating_sub(j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bandwidths() {
        assert_eq!(parse_bandwidth("10Mbit"), Ok(1_250_000));
        assert_eq!(parse_bandwidth("500kbit"), Ok(62_500));
        assert_eq!(parse_bandwidth("1MB"), Ok(1_000_000));
        assert_eq!(parse_bandwidth("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bandwidth("4 Mbps"), Ok(500_000));
        assert_eq!(parse_bandwidth("2000"), Ok(2000));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        assert_eq!(parse_bandwidth("off"), Ok(0));
        assert!(parse_bandwidth("10").is_err(), "below the minimum");
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("10Mfoo").is_err());
    }

    #[test]
    fn parses_durations_and_flap() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("100").is_err(), "a unit is required");
        assert_eq!(parse_flap("off"), Ok(None));
        assert_eq!(parse_flap("0s"), Ok(None));
        assert_eq!(parse_flap("2s"), Ok(Some(Duration::from_secs(2))));
        assert!(parse_flap("1ms").is_err());
    }

    #[test]
    fn pb_round_trip_and_merge() {
        let s = Settings {
            latency: Duration::from_millis(100),
            jitter: Duration::from_millis(20),
            bandwidth: 1_250_000,
            down_mode: DownMode::Stall,
            flap: Some(Duration::from_secs(2)),
            blackhole: Some(Site::Azure),
        };
        let mut back = Settings::default();
        back.merge_pb(&s.to_pb()).expect("merge");
        assert_eq!(back, s);
        // Absent fields are kept.
        back.merge_pb(&pb::LinkSettings {
            latency_ms: Some(5),
            ..Default::default()
        })
        .expect("merge latency");
        assert_eq!(back.latency, Duration::from_millis(5));
        assert_eq!(back.bandwidth, s.bandwidth);
        let err = back
            .merge_pb(&pb::LinkSettings {
                down_mode: Some(0),
                ..Default::default()
            })
            .expect_err("unspecified");
        assert!(err.starts_with("down_mode"), "{err}");
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let s = Settings {
            latency: Duration::from_millis(10),
            jitter: Duration::from_millis(20),
            ..Settings::default()
        };
        let mut d = Delay::new();
        for _ in 0..1000 {
            assert!(d.sample(&s) <= Duration::from_millis(30));
        }
    }

    #[test]
    fn bucket_paces_reservations() {
        let mut b = Bucket::new();
        let t0 = Instant::now();
        // 1000 B/s; the bucket starts empty and reservations queue up behind the debt.
        assert_eq!(b.reserve(1000, 1000, t0), Duration::from_secs(1));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.reserve(500, 1000, t1), Duration::from_millis(500));
    }
}
