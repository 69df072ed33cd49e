//! The containment section: a backend that declares `contains_root` runs
//! other people's jobs as root and promises that this root is not the host's.
//! These checks try to cross that boundary from inside a job.
//!
//! Every job script here must stay harmless when it runs directly on the host
//! as root, which is what a backend that does not contain its jobs does (the
//! host-test fixture with `fault = "claim-containment"` proves it): it reads,
//! opens files for append without writing, creates files only in fresh
//! directories of its own, and never modifies host binaries, kernel settings
//! or devices. The two probes that change the job's system (remounting /proc,
//! wrapping the job's binaries) run only once the job has shown it does not
//! see a marker file the suite made on the host.

use std::path::PathBuf;

use berth_backend_api::JobResponse;

use super::case::{expect_exit, tail, Case};
use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

mod cache;
use berth_runner_imitation::runner::{Exit, HookResult};
pub(super) use cache::{CONTAINMENT_CACHE_NOSUID, CONTAINMENT_CACHE_PER_PROJECT};

/// The variable the suite puts in every hook's environment; no process of a
/// job may see its value.
const SENTINEL_KEY: &str = "BERTH_CONFORMANCE_SENTINEL";

/// A value no other run of the suite uses.
fn nonce() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// `text` as a grep/glob pattern that matches `text` but not itself
/// (`[b]erth-...`), so a script can look for a value without carrying it.
fn unquotable_pattern(text: &str) -> String {
    let mut chars = text.chars();
    let first = chars.next().unwrap_or('x');
    format!("[{first}]{}", chars.as_str())
}

/// A fresh directory on the host with a marker file in it (in /run, or the
/// temp dir when /run is not writable), removed with everything in it on drop.
struct HostMarker {
    dir: PathBuf,
}

impl HostMarker {
    fn new() -> Result<Self, Finding> {
        let name = format!("berth-conformance-{}", nonce());
        let run = PathBuf::from("/run").join(&name);
        let dir = match std::fs::create_dir(&run) {
            Ok(()) => run,
            Err(_) => {
                let tmp = std::env::temp_dir().join(&name);
                std::fs::create_dir(&tmp).map_err(|e| format!("failed to create {}: {e}", tmp.display()))?;
                tmp
            }
        };
        let marker = HostMarker { dir };
        std::fs::write(marker.marker(), "berth conformance marker\n")
            .map_err(|e| format!("failed to write {}: {e}", marker.marker().display()))?;
        Ok(marker)
    }

    fn marker(&self) -> PathBuf {
        self.dir.join("marker")
    }

    /// Where job-binaries' wrappers try to append when they run on the host.
    fn ran(&self) -> PathBuf {
        self.dir.join("ran")
    }

    /// A script fragment that stops the stage with exit code 3 when the job
    /// sees the marker: it then runs on the host's filesystem, and must not
    /// change anything.
    fn guard(&self) -> String {
        format!(
            "if test -e '{}'; then echo \"berth-probe: the job sees the host's file {}\"; exit 3; fi\n",
            self.marker().display(),
            self.marker().display()
        )
    }

    fn seen_error(&self) -> String {
        format!(
            "the job sees the host's file {}: it runs on the host's filesystem, so a job's root could rewrite host files",
            self.marker().display()
        )
    }
}

impl Drop for HostMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A case whose hooks all get the sentinel variable; returns it with its value.
fn case_with_sentinel<'a>(
    target: &'a Target,
    edit: impl FnOnce(&mut JobResponse),
) -> Result<(Case<'a>, String), Finding> {
    let mut case = Case::with(target, edit)?;
    let value = format!("berth-sentinel-{}", nonce());
    case.driver.env.push((SENTINEL_KEY.into(), value.clone().into()));
    Ok((case, value))
}

/// Runs `probe` on a prepared `case`, then cleans up: with the leak check
/// when the probe passed, and still cleaning up (ignoring how) when it failed.
fn then_finish(mut case: Case<'_>, probe: impl FnOnce(&mut Case<'_>) -> CheckOutcome) -> CheckOutcome {
    match probe(&mut case) {
        Ok(()) => case.finish(),
        Err(e) => {
            let _ = case.cleanup();
            Err(e)
        }
    }
}

/// The lines of a stage's output that start with `prefix`, without it.
fn tagged(result: &HookResult, prefix: &str) -> Vec<String> {
    result.output().lines().filter_map(|l| l.strip_prefix(prefix)).map(str::to_owned).collect()
}

/// The probe stage ended with `Exit::Success` or `Exit::Build { code: 3 }`
/// (the marker guard); anything else is reported.
fn probe_ran(result: &HookResult, host: &HostMarker, what: &str) -> CheckOutcome {
    match &result.exit {
        Exit::Success => Ok(()),
        Exit::Build { code: 3, .. } => Err(Finding::Fail(host.seen_error())),
        other => Err(Finding::Fail(format!("{what} failed: {other:?}\n{}", tail(&result.output())))),
    }
}

pub(super) const CONTAINMENT_OWN_ROOT: Check = Check {
    id: "containment.own-root",
    level: Level::Must,
    statement: "a job sees none of the host's files, and what it writes at / stays out of the host's /",
    protocol: "security: a job's root filesystem must not be the host's",
    needs: Needs::Containment,
    run: own_root,
};

fn own_root(target: &Target) -> CheckOutcome {
    let host = HostMarker::new()?;
    let mut case = Case::new(target)?;
    case.prepare()?;
    let written = PathBuf::from(format!("/berth-probe-{}", case.id()));
    then_finish(case, |case| {
        let body = format!("{}: > '{}' 2>/dev/null || true\n", host.guard(), written.display());
        let result = case.run("build_script", &body);
        probe_ran(&result, &host, "the probe stage")?;
        if written.exists() {
            let _ = std::fs::remove_file(&written);
            return Err(Finding::Fail(format!(
                "a file the job wrote at {} appeared in the host's /: the job's root is the host's",
                written.display()
            )));
        }
        Ok(())
    })
}

pub(super) const CONTAINMENT_ROOT_UNMAPPED: Check = Check {
    id: "containment.root-unmapped",
    level: Level::Must,
    statement: "the job's uid 0 is not the host's uid 0 (/proc/self/uid_map has no `0 0 N`)",
    protocol: "security: a job's root must not be the host's root",
    needs: Needs::Containment,
    run: root_unmapped,
};

fn root_unmapped(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    then_finish(case, |case| {
        let body = "while read -r inside outside count; do echo \"berth-uid-map: $inside $outside $count\"; done < /proc/self/uid_map\n\
                    echo \"berth-userns: $(readlink /proc/self/ns/user)\"\n";
        let result = case.run_ok("build_script", body)?;
        let map = tagged(&result, "berth-uid-map: ");
        if map.is_empty() {
            return Err(Finding::Fail(format!(
                "the job could not read /proc/self/uid_map\n{}",
                tail(&result.output())
            )));
        }
        let shown = map.join("; ");
        if map.iter().any(|line| line.split_whitespace().take(2).eq(["0", "0"])) {
            return Err(Finding::Fail(format!(
                "the job's uid 0 is the host's uid 0 (uid_map: {shown}): a job's root is the host's root"
            )));
        }
        let host_ns = std::fs::read_link("/proc/self/ns/user").map(|l| l.display().to_string()).unwrap_or_default();
        if tagged(&result, "berth-userns: ").iter().any(|ns| !host_ns.is_empty() && *ns == host_ns) {
            return Err(Finding::Fail(format!(
                "the job runs in the host's user namespace {host_ns} (uid_map: {shown}): a job's root is the host's root"
            )));
        }
        Ok(())
    })
}

/// `(major, minor)` of the block device holding the host's `/`, unless it is
/// a virtual one (major 0: overlayfs, tmpfs, ...).
fn root_device() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/").ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    (major != 0).then_some((major, minor))
}

pub(super) const CONTAINMENT_NO_DEVICES: Check = Check {
    id: "containment.no-devices",
    level: Level::Must,
    statement: "root in a job cannot create and open host devices (/dev/mem, /dev/kmsg, the disk of /)",
    protocol: "security: host devices must be out of a job's reach",
    needs: Needs::Containment,
    run: no_devices,
};

fn no_devices(target: &Target) -> CheckOutcome {
    let mut devices = vec![("mem", 'c', 1, 1), ("kmsg", 'c', 1, 11)];
    if let Some((major, minor)) = root_device() {
        devices.push(("root-disk", 'b', major, minor));
    }
    let mut case = Case::new(target)?;
    case.prepare()?;
    then_finish(case, |case| {
        // Creates the nodes in a fresh directory of each writable filesystem
        // (one mounted nodev would hide what the others allow), opens each
        // for reading (reading nothing) and removes them.
        let mut body = String::from(
            "command -v mknod > /dev/null || { echo 'berth-device: no mknod command in the job'; exit 4; }\n\
             probe() {\n\
             \x20 if ! why=$(mknod \"$dir/$1\" \"$2\" \"$3\" \"$4\" 2>&1); then echo \"berth-device: $1 $base refused: $why\"\n\
             \x20 elif ( exec 3< \"$dir/$1\" ) 2>/dev/null; then echo \"berth-device: $1 $base opened\"\n\
             \x20 else echo \"berth-device: $1 $base created, open refused\"; fi\n\
             }\n\
             for base in / /var/tmp /tmp /dev/shm; do\n\
             \x20 dir=$(mktemp -d \"${base%/}/berth-probe-dev.XXXXXX\" 2>/dev/null) || continue\n",
        );
        for (name, kind, major, minor) in &devices {
            body.push_str(&format!("  probe {name} {kind} {major} {minor}\n"));
        }
        body.push_str("  rm -rf \"$dir\"\ndone\n");
        let result = case.run("build_script", &body);
        if matches!(result.exit, Exit::Build { code: 4, .. }) {
            return Err("the job's image has no mknod command: the check cannot run".into());
        }
        expect_exit(&result, &Exit::Success, "the device probe")?;
        let lines = tagged(&result, "berth-device: ");
        for (name, kind, major, minor) in &devices {
            let mine: Vec<&String> = lines.iter().filter(|l| l.split(' ').next() == Some(name)).collect();
            if let Some(line) = mine.iter().find(|l| l.ends_with(" opened")) {
                let base = line.split(' ').nth(1).unwrap_or("?");
                return Err(Finding::Fail(format!(
                    "as root, the job created a device node for the host's {name} ({kind} {major}:{minor}) in {base} \
                     and opened it: a job can read host devices (memory, kernel log, disks)"
                )));
            }
            if mine.is_empty() {
                return Err(Finding::Fail(format!(
                    "the device probe could not make a directory to try {name} in\n{}",
                    tail(&result.output())
                )));
            }
        }
        Ok(())
    })
}

pub(super) const CONTAINMENT_SYSCTL_READONLY: Check = Check {
    id: "containment.sysctl-readonly",
    level: Level::Must,
    statement: "root in a job cannot open kernel settings for writing, even after remounting /proc",
    protocol: "security: a job must not change the host's kernel settings",
    needs: Needs::Containment,
    run: sysctl_readonly,
};

fn sysctl_readonly(target: &Target) -> CheckOutcome {
    let host = HostMarker::new()?;
    let mut case = Case::new(target)?;
    case.prepare()?;
    then_finish(case, |case| {
        // `: >> FILE` opens for append and writes nothing. The remount is
        // tried only when nothing was writable and the job does not see the
        // host's files (where it would remount the host's /proc).
        let body = format!(
            "writable() {{\n\
             \x20 for f in /proc/sys/kernel/core_pattern /proc/sysrq-trigger; do\n\
             \x20   if test -e \"$f\" && ( : >> \"$f\" ) 2>/dev/null; then echo \"berth-writable: $f $1\"; fi\n\
             \x20 done\n\
             }}\n\
             found=$(writable '')\n\
             if test -z \"$found\" && test ! -e '{marker}'; then\n\
             \x20 mount -o remount,rw /proc/sys > /dev/null 2>&1 || true\n\
             \x20 mount -o remount,rw /proc > /dev/null 2>&1 || true\n\
             \x20 found=$(writable '(after remounting /proc/sys and /proc read-write)')\n\
             fi\n\
             echo \"$found\"\n",
            marker = host.marker().display()
        );
        let result = case.run_ok("build_script", &body)?;
        if let Some(line) = tagged(&result, "berth-writable: ").first() {
            let (file, when) = line.split_once(' ').unwrap_or((line, ""));
            return Err(Finding::Fail(format!(
                "as root, the job could open {file} for writing{}: a job can change the host's kernel settings",
                if when.is_empty() { String::new() } else { format!(" {when}") }
            )));
        }
        Ok(())
    })
}

pub(super) const CONTAINMENT_ENV_PRIVATE: Check = Check {
    id: "containment.env-private",
    level: Level::Must,
    statement: "no process a job can see holds the hooks' environment",
    protocol: "security: the runner's environment, with its tokens and credentials, must not reach a job",
    needs: Needs::Containment,
    run: env_private,
};

fn env_private(target: &Target) -> CheckOutcome {
    let (mut case, sentinel) = case_with_sentinel(target, |_| {})?;
    case.prepare()?;
    then_finish(case, |case| {
        let pattern = unquotable_pattern(&sentinel);
        let body = format!(
            "if [[ $(env) == *{pattern}* ]]; then echo 'berth-env: in its own environment'; fi\n\
             for f in $(grep -lsa -- '{pattern}' /proc/[0-9]*/environ || true); do\n\
             \x20 pid=${{f#/proc/}}; pid=${{pid%/environ}}\n\
             \x20 echo \"berth-env: in /proc/$pid/environ ($(cat /proc/$pid/comm 2>/dev/null))\"\n\
             done\n"
        );
        let result = case.run_ok("build_script", &body)?;
        let seen = tagged(&result, "berth-env: ");
        if !seen.is_empty() {
            return Err(Finding::Fail(format!(
                "the job saw {SENTINEL_KEY}, set only in the hook's environment, {}: a job can read the runner's \
                 environment (its tokens and credentials)",
                seen.join(", ")
            )));
        }
        Ok(())
    })
}

/// Where job-binaries keeps what it moved aside, inside the job.
const ORIG: &str = "/usr/lib/berth-probe-orig";

/// The stage that replaces every executable of the usual directories with a
/// wrapper that records who runs it (its name, uid map, whether its
/// environment holds the sentinel, its mount namespace) in `ORIG/probe.log`
/// and in the host directory of the marker, then runs the original. The
/// wrappers run under a copy of the job's bash, so they never wrap themselves.
fn wrap_binaries(host: &HostMarker, sentinel: &str) -> String {
    let pattern = unquotable_pattern(sentinel);
    format!(
        r##"{guard}shopt -s nullglob
orig={ORIG}; tools={ORIG}/tools
mkdir -p "$tools"
cp -L "$(command -v bash)" "$(command -v mv)" "$(command -v chmod)" "$(command -v readlink)" "$tools/"
(umask 0; : > "$orig/probe.log")
# The directories to wrap, each once (/bin is often a link to /usr/bin).
declare -A seen; dirs=()
for d in /usr/bin /bin /usr/sbin /sbin /usr/local/bin; do
  real=$(cd -P "$d" 2>/dev/null && pwd -P) || continue
  if test -z "${{seen[$real]-}}"; then seen[$real]=1; dirs+=("$real"); fi
done
# Links are resolved before anything moves: each wrapper runs what its link pointed to.
all=()
for d in "${{dirs[@]}}"; do for p in "$d"/*; do if test -L "$p"; then all+=("$p"); fi; done; done
resolved=()
if test ${{#all[@]}} -gt 0; then mapfile -t resolved <<< "$(readlink -m -- "${{all[@]}}" 2>/dev/null || true)"; fi
if test ${{#resolved[@]}} -ne ${{#all[@]}}; then  # a readlink of one file at a time (busybox)
  resolved=(); for p in "${{all[@]}}"; do resolved+=("$(readlink -f "$p" 2>/dev/null || true)"); done
fi
links=(); targets=()
for i in "${{!all[@]}}"; do
  t=${{resolved[$i]}}
  test -f "$t" && test -x "$t" || continue
  if test -n "${{seen[${{t%/*}}]-}}"; then t=$orig$t; fi
  links+=("${{all[$i]}}"); targets+=("$t")
done
wrapped=()
wrap() {{  # PATH ORIGINAL
  printf '%s\n' "#!$tools/bash" \
    '{{ read -r a b c < /proc/self/uid_map; sentinel=no' \
    '  while IFS= read -r -d "" v; do [[ $v == *{pattern}* ]] && sentinel=yes; done < /proc/$$/environ' \
    "  line=\"\$0 uid_map=[\$a \$b \$c] sentinel=\$sentinel mnt=\$($tools/readlink /proc/\$\$/ns/mnt)\"" \
    "  echo \"\$line\" >> $orig/probe.log; echo \"\$line\" >> {ran}; }} 2>/dev/null" \
    "exec -a \"\$0\" '$2' \"\$@\"" > "$1"
  wrapped+=("$1")
}}
for d in "${{dirs[@]}}"; do mkdir -p "$orig$d" "$orig/links$d"; done
# Each directory's files and links move aside in one go (mkdir, mv, ... are among them).
for d in "${{dirs[@]}}"; do
  files=(); here=()
  for p in "$d"/*; do
    if ! test -L "$p" && test -f "$p" && test -x "$p"; then files+=("$p"); fi
  done
  for i in "${{!links[@]}}"; do
    if test "${{links[$i]%/*}}" = "$d"; then here+=("$i"); fi
  done
  if test ${{#files[@]}} -gt 0; then "$tools/mv" -- "${{files[@]}}" "$orig$d/"; fi
  for p in "${{files[@]}}"; do wrap "$p" "$orig$p"; done
  if test ${{#here[@]}} -gt 0; then
    moved=(); for i in "${{here[@]}}"; do moved+=("${{links[$i]}}"); done
    "$tools/mv" -- "${{moved[@]}}" "$orig/links$d/"
    for i in "${{here[@]}}"; do wrap "${{links[$i]}}" "${{targets[$i]}}"; done
  fi
done
"$tools/chmod" 755 "${{wrapped[@]}}"
echo "berth-wrapped: ${{#wrapped[@]}}"
"##,
        guard = host.guard(),
        ran = host.ran().display(),
    )
}

/// Reads the wrappers' log, then puts every original back (the job's root is
/// discarded at cleanup anyway; this keeps the probe harmless for a backend
/// that keeps it).
const UNWRAP: &str = r#"shopt -s nullglob
orig=/usr/lib/berth-probe-orig
while IFS= read -r line; do echo "berth-ran: $line"; done < "$orig/probe.log"
for kind in "" /links; do
  for d in /usr/bin /usr/sbin /usr/local/bin /bin /sbin; do
    set -- "$orig$kind$d"/*
    if test $# -gt 0 && ! test -L "$d"; then "$orig/tools/mv" -f -- "$@" "$d/"; fi
  done
done
rm -rf "$orig"
"#;

pub(super) const CONTAINMENT_JOB_BINARIES: Check = Check {
    id: "containment.job-binaries",
    level: Level::Must,
    statement: "binaries a job replaces never run with the host's privileges or environment",
    protocol: "security: the host must not run code a job planted",
    needs: Needs::Containment,
    run: job_binaries,
};

fn job_binaries(target: &Target) -> CheckOutcome {
    let host = HostMarker::new()?;
    let (mut case, sentinel) = case_with_sentinel(target, |_| {})?;
    case.prepare()?;
    let result = then_finish(case, |case| {
        let wrapped = case.run("prepare_script", &wrap_binaries(&host, &sentinel));
        probe_ran(&wrapped, &host, "wrapping the job's binaries")?;
        if tagged(&wrapped, "berth-wrapped: ").first().is_none_or(|n| n == "0") {
            return Err(Finding::Fail(format!("the probe found no executable to wrap\n{}", tail(&wrapped.output()))));
        }
        let stages = [
            ("get_sources", "ls / > /dev/null\nid -u\nsh -c 'exit 0'\nenv > /dev/null\n"),
            ("build_script", "cat /proc/self/uid_map > /dev/null\nuname -r\ntrue\n"),
        ];
        for (stage, body) in stages {
            case.run_ok(stage, body).map_err(|e| format!("a stage after wrapping the job's binaries failed: {e}"))?;
        }
        let read = case.run_ok("after_script", UNWRAP)?;
        let ran = tagged(&read, "berth-ran: ");
        if ran.is_empty() {
            return Err("no wrapped binary ran in the stages after wrapping: the probe did not work".into());
        }
        if let Some(line) = ran.iter().find(|l| l.contains(" sentinel=yes ")) {
            return Err(Finding::Fail(format!(
                "a binary the job replaced ran with the hook's environment ({line}): the host runs job binaries"
            )));
        }
        if let Some(line) = ran.iter().find(|l| l.contains("uid_map=[0 0 ")) {
            return Err(Finding::Fail(format!(
                "a binary the job replaced ran as the host's root ({line}): the host runs job binaries with its \
                 privileges"
            )));
        }
        Ok(())
    });
    if let Ok(line) = std::fs::read_to_string(host.ran()) {
        return Err(Finding::Fail(format!(
            "a binary the job replaced was run on the host, during the job or its cleanup: {}",
            line.lines().next().unwrap_or("")
        )));
    }
    result
}

/// Runs `perl` (else `python3`) code in a fresh temporary directory of the
/// job: the shell fragment that does it, printing `berth-interpreter: none`
/// when the image has neither.
fn with_interpreter(perl: &str, python: &str) -> String {
    format!(
        "cd \"$(mktemp -d)\"\n\
         if command -v perl >/dev/null 2>&1; then perl -e '{perl}'\n\
         elif command -v python3 >/dev/null 2>&1; then python3 -c '{python}'\n\
         else echo 'berth-interpreter: none'; fi\n"
    )
}

const NO_INTERPRETER: &str =
    "the job's image has neither perl nor python3, which this probe needs to make the system calls";

pub(super) const CONTAINMENT_CHROOT_ESCAPE: Check = Check {
    id: "containment.chroot-escape",
    level: Level::Should,
    statement: "the classic chroot escape (chroot into a subdirectory, \"..\" up, chroot \".\") stays in the job's root (probed with perl or python3)",
    protocol: "security: a job's root must be the root of its own mount namespace, not a chroot in the host's",
    needs: Needs::Containment,
    run: chroot_escape,
};

fn chroot_escape(target: &Target) -> CheckOutcome {
    let host = HostMarker::new()?;
    let mut case = Case::new(target)?;
    case.prepare()?;
    let written = PathBuf::from(format!("/berth-probe-escape-{}", case.id()));
    let (marker, out) = (host.marker().display().to_string(), written.display().to_string());
    then_finish(case, |case| {
        // chroot into a subdirectory, climb out of it with "..", and make
        // wherever that ends the root: the classic escape from a chroot.
        let perl = format!(
            "mkdir \"x\"; chroot \"x\" or do {{ print \"berth-escape: refused\\n\"; exit 0 }}; chdir \"..\" for 1..64; \
             chroot \".\"; print \"berth-escape: \", (-e \"{marker}\" ? \"host\" : \"own\"), \"\\n\"; \
             if (-e \"{marker}\") {{ exit 0 }} open(F, \">>\", \"{out}\")"
        );
        let python = format!(
            "import os\nos.mkdir(\"x\")\ntry:\n os.chroot(\"x\")\nexcept OSError:\n print(\"berth-escape: refused\"); raise SystemExit\n\
             for _ in range(64): os.chdir(\"..\")\nos.chroot(\".\")\nseen = os.path.exists(\"{marker}\")\n\
             print(\"berth-escape: \" + (\"host\" if seen else \"own\"))\nif not seen: open(\"{out}\", \"a\")"
        );
        let body = format!("{}{}", host.guard(), with_interpreter(&perl, &python));
        let result = case.run("build_script", &body);
        probe_ran(&result, &host, "the escape probe")?;
        let landed = written.exists();
        let _ = std::fs::remove_file(&written);
        let seen = tagged(&result, "berth-escape: ");
        if landed || seen.iter().any(|s| s == "host") {
            return Err(Finding::Fail(
                "the classic chroot escape (chroot into a subdirectory, then \"..\" up and chroot \".\") reached \
                        the host's /: the job's root must be the root of its own mount namespace (pivot_root), not a \
                        chroot in the host's"
                    .to_owned(),
            ));
        }
        if !tagged(&result, "berth-interpreter: ").is_empty() {
            return Err(Finding::Fail(NO_INTERPRETER.to_owned()));
        }
        if seen.is_empty() {
            return Err(Finding::Fail(format!("the escape probe printed nothing\n{}", tail(&result.output()))));
        }
        Ok(())
    })
}

pub(super) const CONTAINMENT_OPEN_BY_HANDLE: Check = Check {
    id: "containment.open-by-handle",
    level: Level::Should,
    statement: "open_by_handle_at is refused in a job (probed with perl or python3)",
    protocol: "security: a file handle of a bound filesystem must not open the host's files",
    needs: Needs::Containment,
    run: open_by_handle,
};

fn open_by_handle(target: &Target) -> CheckOutcome {
    let host = HostMarker::new()?;
    let mut case = Case::new(target)?;
    case.prepare()?;
    then_finish(case, |case| {
        // open_by_handle_at(AT_FDCWD, NULL, 0): refused (EPERM, or ENOSYS
        // from a filter) where it is out of a job's reach; EFAULT where the
        // job could open any file of a filesystem it can name a handle on.
        let perl = "my %nr = (x86_64 => 304, aarch64 => 265); my $nr = $nr{(POSIX::uname())[4]}; \
                    if (!defined $nr) { print \"berth-handle: unknown-arch\\n\"; exit 0 } \
                    syscall($nr, -100, 0, 0); print \"berth-handle: \", $!+0, \"\\n\"";
        let python = "import ctypes, os\nnr = {\"x86_64\": 304, \"aarch64\": 265}.get(os.uname().machine)\n\
                      libc = ctypes.CDLL(None, use_errno=True)\n\
                      print(\"berth-handle: unknown-arch\" if nr is None else \"berth-handle: %d\" % (libc.syscall(nr, -100, None, 0) and ctypes.get_errno()))";
        let body = format!("{}{}", host.guard(), with_interpreter(&format!("use POSIX; {perl}"), python));
        let result = case.run("build_script", &body);
        probe_ran(&result, &host, "the open_by_handle_at probe")?;
        if !tagged(&result, "berth-interpreter: ").is_empty() {
            return Err(Finding::Fail(NO_INTERPRETER.to_owned()));
        }
        match tagged(&result, "berth-handle: ").first().map(String::as_str) {
            Some("1") | Some("38") => Ok(()),
            Some("unknown-arch") => Err(Finding::Fail("the probe knows the system call number of x86_64 and aarch64 only".to_owned())),
            Some(errno) => Err(Finding::Fail(format!(
                "open_by_handle_at is open to the job (errno {errno}, not EPERM): with a handle of a file on a filesystem \
                 bound into the job (the cache), a job opens any file of that filesystem on the host; refuse it \
                 (no CAP_DAC_READ_SEARCH of the host, or a system call filter)"
            ))),
            None => Err(Finding::Fail(format!("the open_by_handle_at probe printed nothing\n{}", tail(&result.output())))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_matches_the_value_but_not_itself() {
        assert_eq!(unquotable_pattern("berth-sentinel-1f"), "[b]erth-sentinel-1f");
    }
}
