//! What a backend is and what it supports.

use serde::{Deserialize, Serialize};

/// How strongly a backend separates a job from the host and from other jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Isolation {
    /// Nothing runs (dry-run).
    None,
    /// Scripts run on the host's filesystem, in namespaces of their own or
    /// none (`unshare`, plain bash): jobs can see the host's files and each
    /// other's, so no filesystem-isolation check applies to them.
    Host,
    /// A private root filesystem and process namespace, shared kernel and devices (chroot, bwrap).
    Filesystem,
    /// A container: namespaces for everything, its own init (nspawn).
    Container,
    /// A virtual machine.
    VirtualMachine,
}

/// What a backend supports; the conformance suite checks what is declared and
/// skips, with the reason, what is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Stage scripts really run (false for dry-run).
    pub executes_scripts: bool,
    /// SIGTERM stops a running stage promptly.
    pub cancel: bool,
    /// `reap` removes environments of jobs that are gone.
    pub reap: bool,
    /// Jobs choose among admin-provided images with `image:`.
    pub images: bool,
    /// Two jobs can run at the same time; with an isolation of
    /// [`Isolation::Filesystem`] or stronger, without seeing each other's
    /// files or processes (the conformance suite's `isolation.concurrent`).
    pub concurrent_jobs: bool,
    /// A job running as root cannot act as root on the host: its root is an
    /// unprivileged user of the host, it cannot reach host devices, kernel
    /// settings or host files. The conformance suite's containment section
    /// (`containment.*`) checks it. Absent from the descriptions of plugins
    /// built before it existed, which therefore do not claim it.
    #[serde(default)]
    pub contains_root: bool,
}

impl Capabilities {
    /// No capabilities.
    pub fn none() -> Self {
        Self::default()
    }
    /// With `executes_scripts`.
    pub fn executes_scripts(mut self, yes: bool) -> Self {
        self.executes_scripts = yes;
        self
    }
    /// With `cancel`.
    pub fn cancel(mut self, yes: bool) -> Self {
        self.cancel = yes;
        self
    }
    /// With `reap`.
    pub fn reap(mut self, yes: bool) -> Self {
        self.reap = yes;
        self
    }
    /// With `images`.
    pub fn images(mut self, yes: bool) -> Self {
        self.images = yes;
        self
    }
    /// With `concurrent_jobs`.
    pub fn concurrent_jobs(mut self, yes: bool) -> Self {
        self.concurrent_jobs = yes;
        self
    }
    /// With `contains_root`.
    pub fn contains_root(mut self, yes: bool) -> Self {
        self.contains_root = yes;
        self
    }
}

/// A backend's description: the `driver` line of the job log and the input
/// of the conformance suite (`berth describe --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Description {
    /// Short name, e.g. `nspawn`.
    pub name: String,
    /// The backend's version.
    pub version: String,
    /// One line saying what it does.
    pub summary: String,
    /// How strongly jobs are separated.
    pub isolation: Isolation,
    /// What it supports.
    pub capabilities: Capabilities,
}

impl Description {
    /// A description with no capabilities and no isolation.
    pub fn new(name: impl Into<String>, version: impl Into<String>, summary: impl Into<String>) -> Self {
        Description {
            name: name.into(),
            version: version.into(),
            summary: summary.into(),
            isolation: Isolation::None,
            capabilities: Capabilities::none(),
        }
    }

    /// With this isolation level.
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// With these capabilities.
    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// What of this description contradicts itself, one line each; berth
    /// refuses a backend whose description has any (a declared capability
    /// decides which conformance checks run, so a wrong one would go
    /// unnoticed):
    /// - isolation `none` means nothing runs, so not `executes_scripts`;
    /// - `cancel` stops a running stage, so it needs `executes_scripts`;
    /// - `contains_root` is a claim about where scripts run, so it needs
    ///   `executes_scripts`, and an isolation other than `none` or `host`;
    /// - isolation `filesystem` or stronger is a claim about running
    ///   scripts, so it needs `executes_scripts`.
    pub fn contradictions(&self) -> Vec<String> {
        let caps = &self.capabilities;
        let isolation = serde_json::to_value(self.isolation).ok();
        let level = isolation.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
        let mut out = Vec::new();
        if self.isolation == Isolation::None && caps.executes_scripts {
            out.push(
                "isolation \"none\" means nothing runs, but executes_scripts is true: scripts on the host's root, \
                 in namespaces of their own or not, are isolation \"host\""
                    .to_owned(),
            );
        }
        if caps.cancel && !caps.executes_scripts {
            out.push("cancel is true, but executes_scripts is false: there is no running stage to stop".to_owned());
        }
        if caps.contains_root && !caps.executes_scripts {
            out.push("contains_root is true, but executes_scripts is false: no job runs to be contained".to_owned());
        }
        if caps.contains_root && matches!(self.isolation, Isolation::None | Isolation::Host) {
            out.push(format!(
                "contains_root is true with isolation \"{level}\": a job whose root is the host's cannot be contained"
            ));
        }
        if !caps.executes_scripts
            && matches!(self.isolation, Isolation::Filesystem | Isolation::Container | Isolation::VirtualMachine)
        {
            out.push(format!("isolation \"{level}\" separates running jobs, but executes_scripts is false"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contradictory_declarations_are_named_and_consistent_ones_pass() {
        let caps = Capabilities::none;
        let of = |isolation, caps| Description::new("x", "1", "x").isolation(isolation).capabilities(caps);
        for (description, said) in [
            (of(Isolation::None, caps().executes_scripts(true)), "isolation \"none\" means nothing runs"),
            (of(Isolation::None, caps().cancel(true)), "no running stage to stop"),
            (of(Isolation::Container, caps().contains_root(true)), "no job runs to be contained"),
            (of(Isolation::Host, caps().executes_scripts(true).contains_root(true)), "isolation \"host\""),
            (of(Isolation::Container, caps()), "isolation \"container\" separates running jobs"),
        ] {
            let found = description.contradictions();
            assert!(found.iter().any(|line| line.contains(said)), "{description:?}: {found:?}");
        }
        for consistent in [
            of(Isolation::None, caps().concurrent_jobs(true)),
            of(Isolation::Host, caps().executes_scripts(true).cancel(true).concurrent_jobs(true)),
            of(Isolation::Container, caps().executes_scripts(true).cancel(true).contains_root(true)),
        ] {
            assert_eq!(consistent.contradictions(), Vec::<String>::new(), "{consistent:?}");
        }
    }

    #[test]
    fn a_description_from_before_contains_root_still_parses_and_claims_nothing() {
        let json = r#"{"name":"old","version":"0.1.0","summary":"a plugin built before contains_root","isolation":"container",
            "capabilities":{"executes_scripts":true,"cancel":true,"reap":false,"images":false,"concurrent_jobs":true}}"#;
        let description: Description = serde_json::from_str(json).unwrap();
        assert!(description.capabilities.executes_scripts);
        assert!(!description.capabilities.contains_root);
    }

    #[test]
    fn contains_root_crosses_the_abi_as_json() {
        let description = Description::new("new", "1.0.0", "contains root")
            .isolation(Isolation::Container)
            .capabilities(Capabilities::none().executes_scripts(true).contains_root(true));
        let json = serde_json::to_string(&description).unwrap();
        assert!(json.contains(r#""contains_root":true"#), "{json}");
        assert_eq!(serde_json::from_str::<Description>(&json).unwrap(), description);
    }
}
