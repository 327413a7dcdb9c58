//! Steal time: how long the hypervisor ran other work while this VM's vCPUs were ready
//! to run (the `steal` column of /proc/stat). A figure sampled while the host took a vCPU
//! away reads the host's contention, not vsva's (the two-thread figures most of all:
//! their second thread waits on the other vCPU), and the report says so per probe.

use std::time::{Duration, Instant};

/// The machine's steal time so far, all vCPUs together (the `cpu` line of /proc/stat,
/// its eighth value, in clock ticks); `None` when it cannot be read.
pub fn steal_so_far() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_steal(&stat, rustix::param::clock_ticks_per_second())
}

/// The steal time of `stat` (/proc/stat's text) with `hz` ticks a second.
fn parse_steal(stat: &str, hz: u64) -> Option<Duration> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// One probe's run: its wall time and the steal time the machine counted meanwhile.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSteal {
    /// The probe's name.
    pub name: String,
    /// How long the probe ran.
    pub wall: Duration,
    /// Steal time over that run, all vCPUs together; `None` when /proc/stat was not
    /// readable.
    pub steal: Option<Duration>,
}

/// A probe's run being timed for [`ProbeSteal`].
pub struct StealWatch {
    start: Instant,
    steal: Option<Duration>,
}

impl StealWatch {
    /// Starts watching.
    pub fn start() -> StealWatch {
        StealWatch {
            start: Instant::now(),
            steal: steal_so_far(),
        }
    }

    /// The run of `name` from the start until now.
    pub fn stop(self, name: &str) -> ProbeSteal {
        ProbeSteal {
            name: name.to_string(),
            wall: self.start.elapsed(),
            steal: self
                .steal
                .zip(steal_so_far())
                .map(|(before, after)| after.saturating_sub(before)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_value_of_the_cpu_line() {
        let stat = "cpu  6401718 36404 383080 1308902 15946 0 2046 4118 924 0\n\
                    cpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_steal(stat, 100), Some(Duration::from_millis(41_180)));
        assert_eq!(parse_steal("cpu0 1 2 3 4 5 6 7 8\n", 100), None);
        assert_eq!(parse_steal("cpu  1 2 3\n", 100), None);
        assert_eq!(parse_steal(stat, 0), None);
    }

    #[test]
    fn this_machines_proc_stat_has_a_steal_column() {
        let before = steal_so_far().expect("/proc/stat's cpu line has steal since Linux 2.6.11");
        let run = StealWatch::start().stop("t");
        let after = steal_so_far().expect("read again");
        assert!(run.steal.expect("read twice") <= after - before, "{run:?}");
    }
}
