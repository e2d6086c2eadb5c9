//! Process memory, for benchmarks and budgets.

/// Peak resident memory of this process in MiB (`VmHWM` in `/proc/self/status`); `None` where
/// the platform does not report it.
pub fn peak_rss_mib() -> Option<f64> {
    status_kib("VmHWM:").map(|kb| kb / 1024.0)
}

/// Current resident memory of this process in MiB (`VmRSS`).
pub fn rss_mib() -> Option<f64> {
    status_kib("VmRSS:").map(|kb| kb / 1024.0)
}

fn status_kib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_is_at_least_current() {
        // Current first: the peak read afterwards can only have grown past it.
        let Some(c) = super::rss_mib() else { return };
        let p = super::peak_rss_mib().expect("VmHWM beside VmRSS");
        assert!(p >= c && c > 0.0, "peak {p} MiB < current {c} MiB");
    }
}
