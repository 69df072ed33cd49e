//! `[runners.NAME.settings]` of the nspawn backend.

use std::path::PathBuf;
use std::time::Duration;

pub use berth_backend_support::cache::CacheScope;
use berth_backend_support::settings::Bind;
use serde::Deserialize;

/// How containers are started and reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `systemd` when PID 1 is systemd, else `standalone`.
    #[default]
    Auto,
    /// A transient unit per job (machine.slice, Delegate=yes), registered with
    /// systemd-machined; stages through `systemd-run --machine`.
    Systemd,
    /// No systemd on the host: nspawn started detached, stages entered through
    /// the container leader's namespaces.
    Standalone,
}

pub use berth_backend_support::limits::{DEFAULT_DISK_MAX, DEFAULT_MEMORY_MAX};

/// systemd-nspawn arguments `nspawn_args` may not hold: they would undo the
/// containment berth sets up (user namespace, capabilities, system call
/// filter, device access), or are berth's own to set.
pub const REFUSED_NSPAWN_ARGS: &[&str] = &[
    "--private-users",
    "-U",
    "--capability",
    "--system-call-filter",
    "--bind",
    "--bind-ro",
    "--overlay",
    "--overlay-ro",
    "--directory",
    "-D",
    "--image",
    "-i",
    "--machine",
    "-M",
    "--keep-unit",
    "--register",
    "--settings",
    "--volatile",
    "--private-users-ownership",
    "--property",
    "--slice",
    "--notify-ready",
    "--boot",
    "-b",
    "--as-pid2",
    "-a",
];

/// Checks `nspawn_args` against [`REFUSED_NSPAWN_ARGS`].
pub fn check_nspawn_args(args: &[String]) -> Result<(), String> {
    for arg in args {
        let name = arg.split('=').next().unwrap_or(arg);
        if REFUSED_NSPAWN_ARGS.contains(&name) || (name.starts_with("-U") && name.len() == 2) {
            return Err(format!(
                "nspawn_args: {arg:?} is refused: berth sets the container's user namespace, capabilities, system call filter, mounts and registration itself (use the settings bind, private_users, ...)"
            ));
        }
    }
    Ok(())
}

/// `boot_timeout` as written: seconds, or a duration in humantime's syntax.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum BootTimeout {
    /// Seconds.
    Seconds(u64),
    /// A duration (`"90s"`, `"2m"`).
    Text(String),
}

/// The nspawn backend's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// `auto` (default), `systemd` or `standalone`.
    #[serde(default)]
    pub mode: Mode,
    /// Where the images are: one root filesystem directory per image
    /// (default `/var/lib/berth/images`).
    pub images_dir: Option<PathBuf>,
    /// The image for jobs without `image:`.
    pub default_image: Option<String>,
    /// Globs of the image names jobs may use (default: every image in images_dir).
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// The host directory behind the job's cache dir; survives jobs
    /// (default `<state_dir>/cache/<runner>`).
    pub cache_host_dir: Option<PathBuf>,
    /// The gitlab-runner binary to bind into containers, for the cache and
    /// artifact stages (default: `gitlab-runner` found on PATH).
    pub gitlab_runner: Option<PathBuf>,
    /// How long to wait for the container's systemd to be ready: seconds, or
    /// a duration such as `"90s"` or `"2m"` (default 60 seconds).
    pub boot_timeout: Option<BootTimeout>,
    /// The container's memory limit, systemd syntax (`4G`, `50%`, `infinity`).
    /// This and the other limits hold in both host modes ([`berth_backend_support::limits`]).
    pub memory_max: Option<String>,
    /// The container's CPU quota (`200%` = two CPUs, `12.5%`).
    pub cpu_quota: Option<String>,
    /// The container's CPU weight (1-10000; the default weight is 100).
    pub cpu_weight: Option<u32>,
    /// The container's task (process and thread) limit (default 4096).
    pub tasks_max: Option<berth_backend_support::limits::TasksMax>,
    /// What a job can write to disk: its writable layer, `/tmp` and `/var/tmp`
    /// included, on a filesystem of this size (default [`DEFAULT_DISK_MAX`];
    /// `infinity`: the layer lies on the state directory's filesystem, unbounded).
    pub disk_max: Option<String>,
    /// Root in the container is an unprivileged host uid range of the job's
    /// own (default true). `false` runs jobs as host root, for images that
    /// need it: every such job's log says so.
    pub private_users: Option<bool>,
    /// `project` (default): every project has a cache directory of its own
    /// under `cache_host_dir`; `runner`: all projects share one.
    #[serde(default)]
    pub cache_scope: CacheScope,
    /// A private network namespace with only loopback (default: the host's network).
    #[serde(default)]
    pub private_network: bool,
    /// Extra bind mounts.
    #[serde(default)]
    pub bind: Vec<Bind>,
    /// Extra arguments for systemd-nspawn, placed before `--boot`.
    #[serde(default)]
    pub nspawn_args: Vec<String>,
    /// Warm containers kept booted per image jobs ask for (default 0: none;
    /// at most [`MAX_POOL_SIZE`]): a job takes one instead of waiting for a
    /// boot. Each idle one costs its memory.
    #[serde(default)]
    pub pool_size: u32,
    /// Arguments for the container's init (systemd), kernel-command-line style
    /// (default: none).
    pub init_args: Option<Vec<String>>,
    /// Units masked in every container, on the job's overlay (default
    /// [`DEFAULT_MASK_UNITS`]: services a throw-away CI container does not use
    /// and timers that would only compete with the job); `[]` masks none.
    pub mask_units: Option<Vec<String>>,
    /// systemd generators masked in every container, on the job's overlay
    /// (default [`DEFAULT_MASK_GENERATORS`], without the debug and run
    /// generators when `init_args` is set, since they read it); `[]` masks none.
    pub mask_generators: Option<Vec<String>>,
}

/// The largest `pool_size`: warm containers cost memory while idle.
pub const MAX_POOL_SIZE: u32 = 64;

/// Units masked by default (`mask_units`). Every one is either meaningless in a
/// container that lives for one job (a console getty, logins, utmp records,
/// moving the journal to disk, users the image already has, remounting the
/// root) or a timer that would only compete with the job (apt's daily runs take
/// the dpkg lock that a job's `apt-get` needs).
pub const DEFAULT_MASK_UNITS: &[&str] = &[
    "console-getty.service",
    "systemd-logind.service",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-sysusers.service",
    "systemd-remount-fs.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "logrotate.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
];

/// Generators masked by default (`mask_generators`): every boot runs each
/// generator as a process (about 6 ms of CPU each here), and these find nothing
/// to do in a container: block devices (cryptsetup, integrity, verity, GPT
/// partitions, hibernation), consoles, offline updates, and the kernel command
/// line (debug, run: kept when `init_args` is set). The fstab, SysV and
/// rc.local generators still run: an image can configure them.
pub const DEFAULT_MASK_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-getty-generator",
    "systemd-system-update-generator",
    "systemd-debug-generator",
    "systemd-run-generator",
];

/// Generators that read the container's init arguments.
const COMMAND_LINE_GENERATORS: &[&str] = &["systemd-debug-generator", "systemd-run-generator"];

/// Checks that `name` is a unit name: no path, a known unit type.
pub fn check_unit_name(name: &str) -> Result<(), String> {
    const TYPES: &[&str] =
        &["service", "socket", "target", "timer", "path", "mount", "automount", "swap", "slice", "scope", "device"];
    let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c));
    let (stem, kind) = name.rsplit_once('.').unwrap_or((name, ""));
    if name.len() > 255 || stem.is_empty() || name.starts_with('.') || !valid_chars || !TYPES.contains(&kind) {
        return Err(format!(
            "{name:?} is not a unit name (NAME.service, .socket, .timer, .target, ...; letters, digits and :_.\\@-)"
        ));
    }
    Ok(())
}

/// Checks that `name` is a file name a generator could have.
pub fn check_generator_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(format!("{name:?} is not a generator's file name (letters, digits and _.-)"));
    }
    Ok(())
}

impl Settings {
    /// `boot_timeout`, or what is wrong with it (`boot_timeout: ...`).
    pub fn boot_timeout(&self) -> Result<Duration, String> {
        let timeout = match &self.boot_timeout {
            None => return Ok(Duration::from_secs(60)),
            Some(BootTimeout::Seconds(secs)) => Duration::from_secs(*secs),
            Some(BootTimeout::Text(text)) => humantime::parse_duration(text.trim()).map_err(|e| {
                format!("boot_timeout: {text:?}: {e} (give seconds, like 60, or a duration, like \"90s\" or \"2m\")")
            })?,
        };
        if timeout < Duration::from_secs(1) {
            return Err("boot_timeout: under a second no container boots; the default is 60".to_owned());
        }
        Ok(timeout)
    }

    /// `pool_size`, checked.
    pub fn pool_size(&self) -> Result<u32, String> {
        if self.pool_size > MAX_POOL_SIZE {
            return Err(format!(
                "pool_size: {} warm containers per image is more than the {MAX_POOL_SIZE} berth keeps (each idle one costs its memory)",
                self.pool_size
            ));
        }
        Ok(self.pool_size)
    }

    /// The limit settings, for [`berth_backend_support::limits::Limits::of`].
    pub fn limits(&self) -> berth_backend_support::limits::LimitSettings<'_> {
        berth_backend_support::limits::LimitSettings {
            memory_max: self.memory_max.as_deref(),
            cpu_quota: self.cpu_quota.as_deref(),
            cpu_weight: self.cpu_weight,
            tasks_max: self.tasks_max.as_ref(),
            disk_max: self.disk_max.as_deref(),
        }
    }

    /// The units to mask, checked.
    pub fn masked_units(&self) -> Result<Vec<String>, String> {
        let units = match &self.mask_units {
            Some(units) => units.clone(),
            None => DEFAULT_MASK_UNITS.iter().map(|u| (*u).to_owned()).collect(),
        };
        for unit in &units {
            check_unit_name(unit).map_err(|e| format!("mask_units: {e}"))?;
        }
        Ok(units)
    }

    /// The generators to mask, checked.
    pub fn masked_generators(&self) -> Result<Vec<String>, String> {
        let generators = match &self.mask_generators {
            Some(generators) => generators.clone(),
            None => DEFAULT_MASK_GENERATORS
                .iter()
                .filter(|g| self.init_args.is_none() || !COMMAND_LINE_GENERATORS.contains(g))
                .map(|g| (*g).to_owned())
                .collect(),
        };
        for generator in &generators {
            check_generator_name(generator).map_err(|e| format!("mask_generators: {e}"))?;
        }
        Ok(generators)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Settings {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn boot_timeout_is_seconds_or_a_duration_and_at_least_a_second() {
        assert_eq!(settings("").boot_timeout(), Ok(Duration::from_secs(60)));
        assert_eq!(settings("boot_timeout = 90").boot_timeout(), Ok(Duration::from_secs(90)));
        assert_eq!(settings("boot_timeout = \"90s\"").boot_timeout(), Ok(Duration::from_secs(90)));
        assert_eq!(settings("boot_timeout = \"2m\"").boot_timeout(), Ok(Duration::from_secs(120)));
        assert!(settings("boot_timeout = 0").boot_timeout().unwrap_err().starts_with("boot_timeout: under a second"));
        let err = settings("boot_timeout = \"soon\"").boot_timeout().unwrap_err();
        assert!(err.starts_with("boot_timeout: \"soon\": ") && err.contains("\"90s\""), "{err}");
    }

    #[test]
    fn tasks_max_takes_systemds_infinity() {
        use berth_backend_support::limits::{Amount, Limits};
        let limits = |text: &str| Limits::of(&settings(text).limits()).map(|l| l.tasks);
        assert_eq!(limits("tasks_max = \"infinity\""), Ok(Some(Amount::Max)));
        assert_eq!(limits("tasks_max = 100"), Ok(Some(Amount::Value(100))));
        assert!(limits("tasks_max = \"many\"").unwrap_err().starts_with("tasks_max: \"many\""));
    }

    #[test]
    fn pool_size_defaults_to_none_and_is_bounded() {
        assert_eq!(settings("").pool_size(), Ok(0));
        assert_eq!(settings("pool_size = 2").pool_size(), Ok(2));
        let err = settings("pool_size = 65").pool_size().unwrap_err();
        assert!(err.starts_with("pool_size: 65 ") && err.contains("64"), "{err}");
        assert!(toml::from_str::<Settings>("pool_size = -1").is_err());
    }

    #[test]
    fn unit_names_are_checked() {
        for ok in ["apt-daily.timer", "getty@tty1.service", "dev-hugepages.mount", "x\\x2d.slice"] {
            assert_eq!(check_unit_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".service", "apt-daily", "../../etc/passwd.service", "a/b.service", "x.conf", "a b.service"] {
            assert!(check_unit_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn nspawn_args_that_undo_containment_are_refused() {
        for bad in ["--capability=all", "--private-users=no", "-U", "--system-call-filter=~@mount", "--bind=/:/host"] {
            assert!(check_nspawn_args(&[bad.to_owned()]).is_err(), "{bad} accepted");
        }
        assert_eq!(check_nspawn_args(&["--drop-capability=CAP_NET_RAW".into(), "--hostname=x".into()]), Ok(()));
    }

    #[test]
    fn generator_names_are_checked() {
        assert_eq!(check_generator_name("systemd-gpt-auto-generator"), Ok(()));
        for bad in ["", ".", "..", "../x", "a/b", ".hidden"] {
            assert!(check_generator_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn defaults_keep_the_command_line_generators_for_init_args() {
        let default = Settings::default();
        assert_eq!(default.masked_generators().unwrap().len(), DEFAULT_MASK_GENERATORS.len());
        assert_eq!(default.masked_units().unwrap().len(), DEFAULT_MASK_UNITS.len());
        let with_args = Settings { init_args: Some(vec!["systemd.mask=foo.service".into()]), ..Settings::default() };
        let masked = with_args.masked_generators().unwrap();
        assert!(!masked.iter().any(|g| g == "systemd-debug-generator" || g == "systemd-run-generator"), "{masked:?}");
        assert!(masked.iter().any(|g| g == "systemd-gpt-auto-generator"));
        let none = Settings { mask_units: Some(vec![]), mask_generators: Some(vec![]), ..Settings::default() };
        assert!(none.masked_units().unwrap().is_empty() && none.masked_generators().unwrap().is_empty());
        let bad = Settings { mask_units: Some(vec!["../x.service".into()]), ..Settings::default() };
        assert!(bad.masked_units().unwrap_err().starts_with("mask_units: "));
    }
}
