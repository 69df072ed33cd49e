//! A runner's resource limits, checked once, the same settings for every
//! backend that bounds its jobs.
//!
//! The settings use systemd's syntax (systemd.resource-control(5)), since in
//! the nspawn backend's systemd mode they become properties of the
//! container's unit. Otherwise berth writes them into the job's own cgroup
//! (the [`crate::cgroup`] module), in the cgroup2 or the cgroup v1 files,
//! whichever the host has.

/// A job's memory bound when `memory_max` is not set: half the host's memory.
pub const DEFAULT_MEMORY_MAX: &str = "50%";
/// What a job may write to disk by default: enough for large builds, and a
/// bound that keeps one job from filling the host's disk.
pub const DEFAULT_DISK_MAX: &str = "20G";

/// What a runner of backend `kind` says at `berth config` whatever its
/// backend: a disk bound the host cannot make, and jobs that run as root of
/// the host.
pub fn host_warnings(kind: &str, runner: &str, limits: &Limits, private_users: bool) -> Vec<String> {
    let mut out = Vec::new();
    if limits.disk.is_some() && !std::path::Path::new("/dev/loop-control").exists() {
        out.push(format!(
            "{kind} runner {runner}: settings.disk_max cannot be enforced: this host has no /dev/loop-control (modprobe loop), so prepare will fail; set disk_max = \"infinity\" to run jobs without a disk bound"
        ));
    }
    if !private_users {
        out.push(format!(
            "{kind} runner {runner}: settings.private_users = false: jobs run as root of the host and can take it over"
        ));
    }
    out
}

/// `tasks_max` as written in a runner's TOML: a number of tasks, or
/// `infinity` (systemd's `TasksMax=` syntax).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum TasksMax {
    /// At most this many processes and threads.
    Count(u32),
    /// `infinity` (anything else is refused).
    Word(String),
}

impl TasksMax {
    /// The limit, or what is wrong with it.
    pub fn amount(&self) -> Result<Amount, String> {
        match self {
            TasksMax::Count(0) => Err("0 would not even let the job's first process run".to_owned()),
            TasksMax::Count(n) => Ok(Amount::Value(u64::from(*n))),
            TasksMax::Word(word) if word == "infinity" => Ok(Amount::Max),
            TasksMax::Word(word) => Err(format!("{word:?} is not a number of tasks (like 4096) or infinity")),
        }
    }
}

/// The limit settings of a runner, as written in its TOML (each backend's
/// settings hold these keys).
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitSettings<'a> {
    /// `memory_max`, systemd syntax (`4G`, `50%`, `infinity`).
    pub memory_max: Option<&'a str>,
    /// `cpu_quota` (`200%` = two CPUs).
    pub cpu_quota: Option<&'a str>,
    /// `cpu_weight` (1-10000).
    pub cpu_weight: Option<u32>,
    /// `tasks_max`.
    pub tasks_max: Option<&'a TasksMax>,
    /// `disk_max` (`20G`, `infinity`).
    pub disk_max: Option<&'a str>,
}

/// A limit that can also be lifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// No limit (`infinity`).
    Max,
    /// At most this many (bytes, tasks).
    Value(u64),
}

/// The limits of every container of a runner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory_max`: bytes of memory, page cache included.
    pub memory: Option<Amount>,
    /// `tasks_max`: processes and threads (default 4096).
    pub tasks: Option<Amount>,
    /// `cpu_quota`: hundredths of a percent of one CPU (20000 = two CPUs).
    pub cpu_quota: Option<u64>,
    /// `cpu_weight`: 1-10000 (the default weight is 100). In standalone mode it
    /// weighs a container against the other berth containers of the host.
    pub cpu_weight: Option<u64>,
    /// `disk_max`: bytes a job may write (its layer's filesystem), `None` for no bound.
    pub disk: Option<u64>,
}

/// Tasks a container may have when `tasks_max` is not set (systemd mode's default too).
pub const DEFAULT_TASKS_MAX: u64 = 4096;
/// The period `cpu_quota` is enforced over, in microseconds (systemd's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The largest `cpu_quota`: 1024 CPUs, in hundredths of a percent.
const MAX_CPU_QUOTA: u64 = 1024 * 100 * 100;

/// The quota of `cpu_quota` hundredths of a percent of one CPU per [`CPU_PERIOD_US`], in microseconds.
pub fn quota_us(cpu_quota: u64) -> u64 {
    (cpu_quota * CPU_PERIOD_US / 10_000).max(1000)
}

impl Limits {
    /// The limits of `settings`, or what is wrong with one of them (`memory_max: ...`).
    pub fn of(settings: &LimitSettings<'_>) -> Result<Limits, String> {
        let memory = Some(
            parse_bytes(settings.memory_max.unwrap_or(DEFAULT_MEMORY_MAX), physical_memory)
                .map_err(|e| format!("memory_max: {e}"))?,
        );
        let disk = crate::diskfs::parse_size(settings.disk_max.unwrap_or(DEFAULT_DISK_MAX))
            .map_err(|e| format!("disk_max: {e}"))?;
        let tasks = Some(match settings.tasks_max {
            None => Amount::Value(DEFAULT_TASKS_MAX),
            Some(tasks) => tasks.amount().map_err(|e| format!("tasks_max: {e}"))?,
        });
        let cpu_quota =
            settings.cpu_quota.map(|v| parse_percent(v).map_err(|e| format!("cpu_quota: {e}"))).transpose()?;
        let cpu_weight = settings.cpu_weight.map(u64::from);
        if let Some(weight) = cpu_weight {
            if !(1..=10000).contains(&weight) {
                return Err(format!("cpu_weight: {weight} is not in 1..=10000"));
            }
        }
        Ok(Limits { memory, tasks, cpu_quota, cpu_weight, disk })
    }
}

/// An amount of memory the way systemd's `MemoryMax=` takes it: `4G`, `512M`,
/// `1.5G`, `512 M`, `1073741824`, `64B` (1024-based K, M, G, T, P, E), `50%`
/// of the host's memory, or `infinity`.
pub fn parse_bytes(text: &str, total: impl FnOnce() -> u64) -> Result<Amount, String> {
    let value = text.trim();
    let bad = || format!("{text:?} is not an amount of memory (like 4G, 512M, 50% or infinity)");
    if value == "infinity" {
        return Ok(Amount::Max);
    }
    let bytes = if let Some(percent) = value.strip_suffix('%') {
        let percent = decimal(percent).filter(|p| *p <= 100.0).ok_or_else(bad)?;
        total() as f64 * percent / 100.0
    } else {
        let split = value.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(value.len());
        let (number, suffix) = value.split_at(split);
        let exponent = match suffix.trim_start() {
            "" | "B" => 0,
            "K" => 1,
            "M" => 2,
            "G" => 3,
            "T" => 4,
            "P" => 5,
            "E" => 6,
            _ => return Err(bad()),
        };
        decimal(number).ok_or_else(bad)? * 1024f64.powi(exponent)
    };
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(bad());
    }
    Ok(Amount::Value(bytes as u64))
}

/// A non-negative decimal number without exponent (`12`, `1.5`).
fn decimal(text: &str) -> Option<f64> {
    let valid = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|b| *b == b'.').count() <= 1
        && text.bytes().next().is_some_and(|b| b.is_ascii_digit());
    valid.then(|| text.parse().ok()).flatten()
}

/// A CPU quota the way systemd's `CPUQuota=` takes it: a percentage of one
/// CPU with up to two decimals (`20%`, `12.5%`, `200%` for two CPUs), in
/// hundredths of a percent.
pub fn parse_percent(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a CPU quota (a percentage of one CPU: 50%, 12.5%, 200% for two CPUs)");
    let number = text.trim().strip_suffix('%').ok_or_else(bad)?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 7 || fraction.len() > 2 || !digits(whole) || !digits(fraction) {
        return Err(bad());
    }
    let hundredths =
        whole.parse::<u64>().map_err(|_| bad())? * 100 + format!("{fraction:0<2}").parse::<u64>().unwrap_or(0);
    if hundredths == 0 || hundredths > MAX_CPU_QUOTA {
        return Err(bad());
    }
    Ok(hundredths)
}

/// The host's physical memory, in bytes.
fn physical_memory() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    let value = |var| sysconf(var).ok().flatten().unwrap_or(-1).max(0) as u64;
    value(SysconfVar::_PHYS_PAGES).saturating_mul(value(SysconfVar::PAGE_SIZE))
}

/// systemd's conversion of a CPU weight to cgroup v1 `cpu.shares`.
pub fn weight_to_shares(weight: u64) -> u64 {
    (weight * 1024 / 100).clamp(2, 262_144)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_amounts_use_systemd_syntax() {
        let total = || 8 << 30;
        assert_eq!(parse_bytes("4G", total), Ok(Amount::Value(4 << 30)));
        assert_eq!(parse_bytes("512M", total), Ok(Amount::Value(512 << 20)));
        assert_eq!(parse_bytes("1.5G", total), Ok(Amount::Value(3 << 29)));
        assert_eq!(parse_bytes("1048576", total), Ok(Amount::Value(1 << 20)));
        assert_eq!(parse_bytes("64B", total), Ok(Amount::Value(64)));
        assert_eq!(parse_bytes("512 M", total), Ok(Amount::Value(512 << 20)));
        assert_eq!(parse_bytes("1P", total), Ok(Amount::Value(1 << 50)));
        assert_eq!(parse_bytes("25%", total), Ok(Amount::Value(2 << 30)));
        assert_eq!(parse_bytes("12.5%", total), Ok(Amount::Value(1 << 30)));
        assert_eq!(parse_bytes("infinity", total), Ok(Amount::Max));
        // What systemd refuses too (64KB), and what would be no memory at all.
        for bad in ["", "G", "4X", "64KB", "-1G", "0", "0%", "150%", ".5G", "1.2.3G", "1e3", "99999E"] {
            assert!(parse_bytes(bad, total).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn cpu_quotas_are_percentages() {
        assert_eq!(parse_percent("50%"), Ok(5000));
        assert_eq!(parse_percent("200%"), Ok(20000));
        assert_eq!(parse_percent("12.5%"), Ok(1250));
        assert_eq!(parse_percent("0.25%"), Ok(25));
        assert_eq!(quota_us(5000), 50_000);
        assert_eq!(quota_us(20000), 200_000);
        for bad in ["50", "0%", "0.00%", "-5%", "x%", "1.234%", "%", ".5%", "99999999%", "200000%"] {
            assert!(parse_percent(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn settings_become_limits_or_name_the_bad_one() {
        let limits = Limits::of(&LimitSettings::default()).unwrap();
        // Bounds by default: tasks, half the host's memory, 20G of disk.
        assert_eq!(limits.tasks, Some(Amount::Value(DEFAULT_TASKS_MAX)));
        assert_eq!(limits.memory, Some(Amount::Value(physical_memory() / 2)));
        assert_eq!(limits.disk, Some(20 << 30));
        assert_eq!((limits.cpu_quota, limits.cpu_weight), (None, None));
        let unbounded =
            LimitSettings { memory_max: Some("infinity"), disk_max: Some("infinity"), ..LimitSettings::default() };
        let limits = Limits::of(&unbounded).unwrap();
        assert_eq!((limits.memory, limits.disk), (Some(Amount::Max), None));
        let bad = LimitSettings { disk_max: Some("lots"), ..LimitSettings::default() };
        assert!(Limits::of(&bad).unwrap_err().starts_with("disk_max: "));
        let settings = LimitSettings {
            memory_max: Some("2G"),
            cpu_quota: Some("150%"),
            cpu_weight: Some(50),
            tasks_max: Some(&TasksMax::Count(100)),
            ..LimitSettings::default()
        };
        let limits = Limits::of(&settings).unwrap();
        assert_eq!(limits.memory, Some(Amount::Value(2 << 30)));
        assert_eq!(
            (limits.cpu_quota, limits.cpu_weight, limits.tasks),
            (Some(15000), Some(50), Some(Amount::Value(100)))
        );
        let bad = LimitSettings { memory_max: Some("lots"), ..LimitSettings::default() };
        assert!(Limits::of(&bad).unwrap_err().starts_with("memory_max: \"lots\""));
        let bad = LimitSettings { cpu_weight: Some(0), ..LimitSettings::default() };
        assert!(Limits::of(&bad).unwrap_err().starts_with("cpu_weight:"));
        let bad = LimitSettings { tasks_max: Some(&TasksMax::Count(0)), ..LimitSettings::default() };
        assert!(Limits::of(&bad).unwrap_err().starts_with("tasks_max:"));
        let lifted = LimitSettings { tasks_max: Some(&TasksMax::Word("infinity".into())), ..LimitSettings::default() };
        assert_eq!(Limits::of(&lifted).unwrap().tasks, Some(Amount::Max), "systemd's syntax: infinity lifts it");
        let bad = LimitSettings { tasks_max: Some(&TasksMax::Word("lots".into())), ..LimitSettings::default() };
        assert_eq!(
            Limits::of(&bad).unwrap_err(),
            "tasks_max: \"lots\" is not a number of tasks (like 4096) or infinity"
        );
    }

    #[test]
    fn weights_convert_like_systemd() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10000), 102_400);
    }
}
