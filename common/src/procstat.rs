//! What Linux's /proc says a process has used (its CPU time, its peak resident memory) and
//! how much memory the machine (or the container's cgroup) has. The process server's CPU
//! health rule and `srctl bench scale`'s per-process table read the same numbers; a host
//! checks its replication budget against the memory.

/// User plus system CPU seconds from a /proc `stat` file (`/proc/self/stat`,
/// `/proc/thread-self/stat`, `/proc/PID/stat`); `None` if it can't be read.
pub fn cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space on every architecture.
    Some(ticks as f64 / 100.0)
}

/// CPU seconds of process `pid` so far.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// The most memory process `pid` has held resident (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Memory this process may use: the machine's `MemTotal`, or the cgroup v2 `memory.max`
/// when that is lower (a container with a memory limit). `None` if neither can be read.
pub fn memory_limit_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let kib: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_cpu_and_memory() {
        // Burn a little CPU so the count is above zero even on a fast machine.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert_ne!(x, 7);
        let cpu = process_cpu_seconds(std::process::id()).unwrap_or(-1.0);
        assert!(cpu > 0.0, "cpu seconds {cpu}");
        let rss = peak_rss_bytes(std::process::id()).unwrap_or(0);
        assert!(rss > 1 << 20, "peak rss {rss}");
        assert_eq!(process_cpu_seconds(u32::MAX), None);
        let memory = memory_limit_bytes().unwrap_or(0);
        assert!(memory > rss, "memory {memory}, this process {rss}");
    }
}
