//! The seed design's drivers (`benches/reference/`), run with the same trivial
//! job on the same host and image as berth: the yardstick of issue #13's
//! "whole trivial job ≤ 0.5× the seed's scripts".

use std::path::Path;
use std::time::Duration;

use crate::bench::Bench;
use crate::host::stop_processes_naming;
use crate::IMAGE;

/// How long a reference driver's containers get to stop after its cleanup.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// One of the seed's drivers: `bash SCRIPT ROOTFS STATE HOOK [ARGS]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// `seed-scripts.sh`: systemd-run + machined; needs systemd as PID 1.
    Systemd,
    /// `seed-design-standalone.sh`: detached nspawn + nsenter, for hosts without systemd.
    Standalone,
}

impl Seed {
    pub fn file(self) -> &'static str {
        match self {
            Seed::Systemd => "seed-scripts.sh",
            Seed::Standalone => "seed-design-standalone.sh",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Seed::Systemd => include_str!("../reference/seed-scripts.sh"),
            Seed::Standalone => include_str!("../reference/seed-design-standalone.sh"),
        }
    }

    /// Why the driver cannot run here, if it cannot.
    pub fn can_run(self) -> Result<(), String> {
        let (tool, why) = match self {
            Seed::Systemd => ("machinectl", "systemd-container"),
            Seed::Standalone => ("pgrep", "procps"),
        };
        if berth_backend_support::settings::which(tool).is_none() {
            return Err(format!("{tool} is not installed ({why})"));
        }
        let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        if self == Seed::Systemd && init.trim() != "systemd" {
            return Err(format!("PID 1 is {:?}, not systemd", init.trim()));
        }
        Ok(())
    }

    /// A bench of the driver on the current generation of the bench's image.
    pub fn bench(self, images: &Path) -> Reference {
        let rootfs = images.join(IMAGE).join("current").canonicalize().expect("the image has a current generation");
        let bench = Bench::new(self.file(), Path::new("/bin/bash"), |dir| {
            let script = dir.join(self.file());
            std::fs::write(&script, self.text()).expect("failed to write the reference driver");
            vec![script.into(), rootfs.into(), dir.join("state").into()]
        });
        Reference { bench }
    }
}

/// A reference driver's bench; its containers are stopped when it is dropped,
/// on failure paths too.
pub struct Reference {
    pub bench: Bench,
}

impl Reference {
    /// Waits for the containers of cleaned-up jobs to be gone (seed-scripts.sh's
    /// cleanup returns while its container stops), then stops what is left:
    /// what had to be stopped.
    pub fn settle(&self) -> Vec<String> {
        stop_processes_naming(&self.bench.state, STOP_GRACE)
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let stopped = self.settle();
        if !stopped.is_empty() {
            eprintln!("{}: stopped what its jobs left:\n  {}", self.bench.label, stopped.join("\n  "));
        }
    }
}
