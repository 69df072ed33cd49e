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

use berth_backend_api::{JobResponse, ResponseVariable};

use super::{expect_exit, tail, Case, Target};
use crate::runner::{Exit, HookResult};

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
    fn new() -> Result<Self, String> {
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
) -> Result<(Case<'a>, String), String> {
    let mut case = Case::with(target, edit)?;
    let value = format!("berth-sentinel-{}", nonce());
    case.driver.env.push((SENTINEL_KEY.into(), value.clone().into()));
    Ok((case, value))
}

/// Runs `probe` on a prepared `case`, then cleans up: with the leak check
/// when the probe passed, and still cleaning up (ignoring how) when it failed.
fn then_finish(mut case: Case<'_>, probe: impl FnOnce(&mut Case<'_>) -> Result<(), String>) -> Result<(), String> {
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
fn probe_ran(result: &HookResult, host: &HostMarker, what: &str) -> Result<(), String> {
    match &result.exit {
        Exit::Success => Ok(()),
        Exit::Build { code: 3, .. } => Err(host.seen_error()),
        other => Err(format!("{what} failed: {other:?}\n{}", tail(&result.output()))),
    }
}

pub(super) fn own_root(target: &Target) -> Result<(), String> {
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
            return Err(format!(
                "a file the job wrote at {} appeared in the host's /: the job's root is the host's",
                written.display()
            ));
        }
        Ok(())
    })
}

pub(super) fn root_unmapped(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    then_finish(case, |case| {
        let body = "while read -r inside outside count; do echo \"berth-uid-map: $inside $outside $count\"; done < /proc/self/uid_map\n\
                    echo \"berth-userns: $(readlink /proc/self/ns/user)\"\n";
        let result = case.run_ok("build_script", body)?;
        let map = tagged(&result, "berth-uid-map: ");
        if map.is_empty() {
            return Err(format!("the job could not read /proc/self/uid_map\n{}", tail(&result.output())));
        }
        let shown = map.join("; ");
        if map.iter().any(|line| line.split_whitespace().take(2).eq(["0", "0"])) {
            return Err(format!(
                "the job's uid 0 is the host's uid 0 (uid_map: {shown}): a job's root is the host's root"
            ));
        }
        let host_ns = std::fs::read_link("/proc/self/ns/user").map(|l| l.display().to_string()).unwrap_or_default();
        if tagged(&result, "berth-userns: ").iter().any(|ns| !host_ns.is_empty() && *ns == host_ns) {
            return Err(format!(
                "the job runs in the host's user namespace {host_ns} (uid_map: {shown}): a job's root is the host's root"
            ));
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

pub(super) fn no_devices(target: &Target) -> Result<(), String> {
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
                return Err(format!(
                    "as root, the job created a device node for the host's {name} ({kind} {major}:{minor}) in {base} \
                     and opened it: a job can read host devices (memory, kernel log, disks)"
                ));
            }
            if mine.is_empty() {
                return Err(format!(
                    "the device probe could not make a directory to try {name} in\n{}",
                    tail(&result.output())
                ));
            }
        }
        Ok(())
    })
}

pub(super) fn sysctl_readonly(target: &Target) -> Result<(), String> {
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
            return Err(format!(
                "as root, the job could open {file} for writing{}: a job can change the host's kernel settings",
                if when.is_empty() { String::new() } else { format!(" {when}") }
            ));
        }
        Ok(())
    })
}

pub(super) fn env_private(target: &Target) -> Result<(), String> {
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
            return Err(format!(
                "the job saw {SENTINEL_KEY}, set only in the hook's environment, {}: a job can read the runner's \
                 environment (its tokens and credentials)",
                seen.join(", ")
            ));
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

pub(super) fn job_binaries(target: &Target) -> Result<(), String> {
    let host = HostMarker::new()?;
    let (mut case, sentinel) = case_with_sentinel(target, |_| {})?;
    case.prepare()?;
    let result = then_finish(case, |case| {
        let wrapped = case.run("prepare_script", &wrap_binaries(&host, &sentinel));
        probe_ran(&wrapped, &host, "wrapping the job's binaries")?;
        if tagged(&wrapped, "berth-wrapped: ").first().is_none_or(|n| n == "0") {
            return Err(format!("the probe found no executable to wrap\n{}", tail(&wrapped.output())));
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
            return Err(format!(
                "a binary the job replaced ran with the hook's environment ({line}): the host runs job binaries"
            ));
        }
        if let Some(line) = ran.iter().find(|l| l.contains("uid_map=[0 0 ")) {
            return Err(format!(
                "a binary the job replaced ran as the host's root ({line}): the host runs job binaries with its \
                 privileges"
            ));
        }
        Ok(())
    });
    if let Ok(line) = std::fs::read_to_string(host.ran()) {
        return Err(format!(
            "a binary the job replaced was run on the host, during the job or its cleanup: {}",
            line.lines().next().unwrap_or("")
        ));
    }
    result
}

/// The job's cache dir, from config's answer.
fn cache_dir(case: &Case<'_>) -> String {
    case.job.config.cache_dir.clone().unwrap_or_else(|| "/cache".into())
}

/// `\040`-style escapes of /proc/self/mountinfo decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| {
            (d.len() == 3 && d.bytes().all(|b| (b'0'..=b'7').contains(&b))).then(|| u8::from_str_radix(d, 8).ok())?
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount of `mountinfo` (lines of /proc/self/mountinfo) that holds `path`:
/// its mount point and per-mount options.
fn mount_holding(mountinfo: &[String], path: &str) -> Option<(String, String)> {
    let under = |point: &str| point == "/" || path == point || path.starts_with(&format!("{point}/"));
    mountinfo
        .iter()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            Some((unescape(fields.get(4)?), fields.get(5)?.to_string()))
        })
        .filter(|(point, _)| under(point))
        // The deepest mount point; among equal ones, the last mounted.
        .fold(None, |best: Option<(String, String)>, (point, options)| match &best {
            Some((b, _)) if b.len() > point.len() => best,
            _ => Some((point, options)),
        })
}

pub(super) fn cache_nosuid(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let cache = cache_dir(&case);
    then_finish(case, |case| {
        // The runner's own scripts create the cache dir when it is missing.
        let body = format!(
            "mkdir -p '{cache}' 2>/dev/null || true\n\
             if test -d '{cache}'; then echo \"berth-cache: $(cd -P '{cache}' && pwd -P)\"; fi\n\
             while IFS= read -r line; do echo \"berth-mount: $line\"; done < /proc/self/mountinfo\n"
        );
        let result = case.run_ok("build_script", &body)?;
        let Some(real) = tagged(&result, "berth-cache: ").pop() else {
            return Err(format!(
                "the cache dir {cache} does not exist in the job and cannot be created, so it is not a mount point \
                 of its own (it must be a mount with nosuid,nodev)"
            ));
        };
        let mounts = tagged(&result, "berth-mount: ");
        let Some((point, options)) = mount_holding(&mounts, &real) else {
            return Err(format!("no mount in the job's /proc/self/mountinfo holds the cache dir {real}"));
        };
        if point != real {
            return Err(format!(
                "the cache dir {cache} is not a mount point of its own (it lies on {point}, mounted {options}): \
                 it must be a mount with nosuid,nodev, or a job could leave a setuid binary or a device node \
                 there for the next job"
            ));
        }
        let missing: Vec<&str> =
            ["nosuid", "nodev"].into_iter().filter(|o| !options.split(',').any(|have| have == *o)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "the cache dir {cache} is mounted without {} ({options}): a setuid binary or a device node a job \
                 leaves in the cache works in the next job",
                missing.join(",")
            ));
        }
        Ok(())
    })
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

pub(super) fn chroot_escape(target: &Target) -> Result<(), String> {
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
            return Err(
                "the classic chroot escape (chroot into a subdirectory, then \"..\" up and chroot \".\") reached \
                        the host's /: the job's root must be the root of its own mount namespace (pivot_root), not a \
                        chroot in the host's"
                    .to_owned(),
            );
        }
        if !tagged(&result, "berth-interpreter: ").is_empty() {
            return Err(NO_INTERPRETER.to_owned());
        }
        if seen.is_empty() {
            return Err(format!("the escape probe printed nothing\n{}", tail(&result.output())));
        }
        Ok(())
    })
}

pub(super) fn open_by_handle(target: &Target) -> Result<(), String> {
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
            return Err(NO_INTERPRETER.to_owned());
        }
        match tagged(&result, "berth-handle: ").first().map(String::as_str) {
            Some("1") | Some("38") => Ok(()),
            Some("unknown-arch") => Err("the probe knows the system call number of x86_64 and aarch64 only".to_owned()),
            Some(errno) => Err(format!(
                "open_by_handle_at is open to the job (errno {errno}, not EPERM): with a handle of a file on a filesystem \
                 bound into the job (the cache), a job opens any file of that filesystem on the host; refuse it \
                 (no CAP_DAC_READ_SEARCH of the host, or a system call filter)"
            )),
            None => Err(format!("the open_by_handle_at probe printed nothing\n{}", tail(&result.output()))),
        }
    })
}

/// A payload edit: the job belongs to project `id`.
fn project(id: u64) -> impl FnOnce(&mut JobResponse) {
    move |r: &mut JobResponse| {
        r.job_info.project_id = id;
        r.variables.push(ResponseVariable::new("CI_PROJECT_ID", id.to_string()));
    }
}

/// Runs `body` in one stage of a new job of `project_id` and returns the
/// stage's result and the job's cache dir.
fn cache_job(target: &Target, project_id: u64, body: impl Fn(&str) -> String) -> Result<HookResult, String> {
    let mut case = Case::with(target, project(project_id))?;
    case.prepare()?;
    let cache = cache_dir(&case);
    let mut result = None;
    then_finish(case, |case| {
        result = Some(case.run("build_script", &body(&cache)));
        Ok(())
    })?;
    result.ok_or_else(|| "the stage did not run".to_owned())
}

pub(super) fn cache_per_project(target: &Target) -> Result<(), String> {
    let file = format!("berth-cache-probe-{}", nonce());
    let a = cache_job(target, 1, |cache| format!("mkdir -p '{cache}'\necho project-1 > '{cache}/{file}'\n"))?;
    expect_exit(&a, &Exit::Success, "job A (project 1) writing a file into its cache dir")?;
    let b = cache_job(target, 2, |cache| {
        format!("if test -e '{cache}/{file}'; then rm -f '{cache}/{file}'; exit 3; fi\n")
    })?;
    if matches!(b.exit, Exit::Build { code: 3, .. }) {
        return Err(format!(
            "job B, of project 2, saw the file {file} job A of project 1 left in its cache: projects share a cache, \
             so a job can poison another project's builds and read what it cached"
        ));
    }
    expect_exit(&b, &Exit::Success, "job B (project 2) looking into its cache dir")?;
    let c = cache_job(target, 1, |cache| format!("test -e '{cache}/{file}' || exit 4\nrm -f '{cache}/{file}'\n"))?;
    if matches!(c.exit, Exit::Build { code: 4, .. }) {
        return Err(format!(
            "job C, of project 1 again, did not see the file {file} job A of project 1 left in its cache: \
             caches must survive jobs"
        ));
    }
    expect_exit(&c, &Exit::Success, "job C (project 1) finding job A's file in its cache dir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_holding_a_path_is_the_deepest_and_last() {
        let info: Vec<String> = [
            "20 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
            "30 20 0:40 / /cache rw,relatime - tmpfs tmpfs rw",
            "31 20 0:41 / /cache rw,nosuid,nodev - tmpfs tmpfs rw",
            "32 20 0:42 / /cache\\040dir rw - tmpfs tmpfs rw",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(mount_holding(&info, "/cache"), Some(("/cache".into(), "rw,nosuid,nodev".into())));
        assert_eq!(mount_holding(&info, "/cache/x"), Some(("/cache".into(), "rw,nosuid,nodev".into())));
        assert_eq!(mount_holding(&info, "/cachex"), Some(("/".into(), "rw,relatime".into())));
        assert_eq!(mount_holding(&info, "/cache dir"), Some(("/cache dir".into(), "rw".into())));
    }

    #[test]
    fn a_pattern_matches_the_value_but_not_itself() {
        assert_eq!(unquotable_pattern("berth-sentinel-1f"), "[b]erth-sentinel-1f");
    }
}
