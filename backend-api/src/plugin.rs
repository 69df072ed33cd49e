//! The plugin ABI: how a backend built as a shared library (`cdylib`) is
//! loaded by berth (`plugin = "/path/lib.so"` in a runner's TOML), and the SDK
//! that makes any [`NewBackend`] such a library with one line:
//!
//! ```text
//! berth_backend_api::export_backend!(MyBackend);
//! ```
//!
//! # The ABI, version 1.1 (C declarations in `include/berth_backend.h`)
//!
//! - The library exports one symbol, `berth_backend_v1`, a function returning
//!   a pointer to a static [`BerthPlugin`] table of function pointers.
//! - Every struct starts with its own `size`, so fields can be appended in
//!   later minor versions. The table and [`BerthHost`] carry `abi_major` and
//!   `abi_minor`, checked by the other side before anything else is trusted:
//!   the majors must be equal; a table shorter than the version it claims is
//!   refused. Either side may be the newer minor: each reads only the fields it
//!   knows and checks the other's `size` before reading a field added later.
//! - Inputs are JSON documents passed as [`BerthBytes`] the caller owns for the
//!   duration of the call. Outputs (JSON, messages, exit codes) are handed back
//!   through host callbacks that copy them: no memory is ever freed by the
//!   side that did not allocate it. Every document has a JSON Schema in the
//!   crate's `schema/` directory, checked by tests against what this crate
//!   writes: the description, config's output ([`ConfigDoc`]), the job
//!   ([`JobDoc`]), the state ([`StateDoc`]), the settings and the runner
//!   ([`RunnerInfo`]) given to `create`, the known jobs and reap's output.
//! - Every operation returns a [`Status`] code.
//! - The job log is the process's stdout and stderr, which the plugin writes
//!   to directly; runner-side diagnostics go through [`BerthHost::log`].
//! - Cancellation: [`BerthHost::cancel_fd`] becomes readable on SIGTERM (poll
//!   it), and [`BerthHost::is_cancelled`] answers directly.
//! - A panic never crosses the boundary: the SDK catches it and reports a
//!   system failure.
//!
//! Compatibility promise: within major version 1, fields are only appended,
//! meanings never change, and new operations are new trailing table entries
//! that an older host does not call.
//!
//! ## What each minor version added
//!
//! - **1.0**: the table, the host callbacks, the documents.
//! - **1.1**: the job document's `context` ([`ContextDoc`]): the job as the
//!   host's [`JobContext`] describes it (the trusted key and id, the payload's
//!   `job_info`, the image, the timeout, the variables with their masked,
//!   file and raw flags, `job_env`, the strings to redact, the runner's
//!   `builds_dir`/`cache_dir`, the runner's tmpdir and exit-code file), so a
//!   plugin not written in Rust needs not re-read the job payload. A host of
//!   1.1 sends it to every plugin (a 1.0 plugin ignores it); config's output
//!   may leave out `output` or `warnings`. No struct or table changed.
//!
//! # Safety
//!
//! All `unsafe` of the plugin side is in this module; the host side is in
//! `berth`'s `plugin` module.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    Backend, Cancel, ConfigOutput, Failure, JobContext, JobInfo, JobKey, JobRecord, JobState, NewBackend, RunnerInfo,
};

/// The ABI major version this crate implements.
pub const ABI_MAJOR: u16 = 1;
/// The ABI minor version this crate implements.
pub const ABI_MINOR: u16 = 1;
/// The entry symbol a plugin exports (NUL-terminated).
pub const ENTRY_SYMBOL: &[u8] = b"berth_backend_v1\0";

/// Borrowed bytes: valid for the duration of the call they are passed to.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BerthBytes {
    /// The first byte (may be null when `len` is 0).
    pub ptr: *const u8,
    /// The number of bytes.
    pub len: usize,
}

impl BerthBytes {
    /// Bytes borrowing `slice`.
    pub fn new(slice: &[u8]) -> Self {
        BerthBytes { ptr: slice.as_ptr(), len: slice.len() }
    }

    /// The bytes as a slice.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that outlive the returned slice.
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// What an operation returned.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The script exited non-zero; the code was given with `set_exit_code`.
    ScriptExited = 1,
    /// A job-caused refusal; the message was given with `set_message`.
    Refused = 2,
    /// A system failure; the message was given with `set_message`.
    SystemFailure = 3,
    /// Cancelled by the runner.
    Cancelled = 4,
    /// The operation is not supported by this plugin.
    Unsupported = 5,
}

/// Levels of [`BerthHost::log`].
pub mod level {
    /// Errors.
    pub const ERROR: i32 = 1;
    /// Warnings.
    pub const WARN: i32 = 2;
    /// Information.
    pub const INFO: i32 = 3;
    /// Debugging.
    pub const DEBUG: i32 = 4;
}

/// What the host offers the plugin during one call.
#[repr(C)]
#[derive(Debug)]
pub struct BerthHost {
    /// `size_of::<BerthHost>()` as the host knows it.
    pub size: u32,
    /// The host's ABI major version.
    pub abi_major: u16,
    /// The host's ABI minor version.
    pub abi_minor: u16,
    /// The host's context, passed back to every callback.
    pub ctx: *mut c_void,
    /// Becomes readable when the runner asks to stop (SIGTERM); -1 when the
    /// operation cannot be cancelled. Owned by the host: do not close it.
    pub cancel_fd: i32,
    /// A runner-side log line (not the job log).
    pub log: extern "C" fn(ctx: *mut c_void, level: i32, message: BerthBytes),
    /// The operation's output document (JSON), copied by the host.
    pub set_output: extern "C" fn(ctx: *mut c_void, bytes: BerthBytes),
    /// The message of a failure, copied by the host.
    pub set_message: extern "C" fn(ctx: *mut c_void, bytes: BerthBytes),
    /// The script's exit code, with [`Status::ScriptExited`].
    pub set_exit_code: extern "C" fn(ctx: *mut c_void, code: i32),
    /// Non-zero once the runner asked to stop.
    pub is_cancelled: extern "C" fn(ctx: *mut c_void) -> i32,
}

/// The table a plugin exports (through `berth_backend_v1`).
#[repr(C)]
#[derive(Debug)]
pub struct BerthPlugin {
    /// `size_of::<BerthPlugin>()` as the plugin knows it.
    pub size: u32,
    /// The plugin's ABI major version.
    pub abi_major: u16,
    /// The plugin's ABI minor version.
    pub abi_minor: u16,
    /// Builds an instance from `settings` (JSON object) for `runner` (JSON
    /// [`RunnerInfo`]); stores it in `*instance`.
    pub create: unsafe extern "C" fn(
        host: *const BerthHost,
        settings: BerthBytes,
        runner: BerthBytes,
        instance: *mut *mut c_void,
    ) -> i32,
    /// Destroys an instance.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
    /// Output: the [`crate::Description`] as JSON.
    pub describe: unsafe extern "C" fn(instance: *mut c_void, host: *const BerthHost) -> i32,
    /// `job`: a [`JobDoc`]. Output: a [`ConfigDoc`].
    pub config: unsafe extern "C" fn(instance: *mut c_void, host: *const BerthHost, job: BerthBytes) -> i32,
    /// `job`: a [`JobDoc`]; `state`: a [`StateDoc`].
    pub prepare:
        unsafe extern "C" fn(instance: *mut c_void, host: *const BerthHost, job: BerthBytes, state: BerthBytes) -> i32,
    /// As prepare, plus the script path and stage name (UTF-8).
    pub run: unsafe extern "C" fn(
        instance: *mut c_void,
        host: *const BerthHost,
        job: BerthBytes,
        state: BerthBytes,
        script: BerthBytes,
        stage: BerthBytes,
    ) -> i32,
    /// `state`: a [`StateDoc`].
    pub cleanup: unsafe extern "C" fn(instance: *mut c_void, host: *const BerthHost, state: BerthBytes) -> i32,
    /// `known`: a JSON array of job keys. Output: a JSON array of lines.
    pub reap_orphans: unsafe extern "C" fn(instance: *mut c_void, host: *const BerthHost, known: BerthBytes) -> i32,
}

/// The job, as passed to a plugin (`schema/job.schema.json`): the runner's
/// name and the hook's environment variables berth's job context is built
/// from (ABI 1.0), and that context itself (ABI 1.1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDoc {
    /// The runner's name.
    pub runner: String,
    /// `CUSTOM_ENV_*` and the runner's own variables (`JOB_RESPONSE_FILE`, ...).
    pub vars: Vec<(String, String)>,
    /// ABI 1.1: the job as the host's [`JobContext`] describes it. A host of
    /// ABI 1.0 sends none; a plugin of ABI 1.0 ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextDoc>,
}

/// The job as berth's [`JobContext`] describes it (ABI 1.1), for plugins that
/// do not build a [`JobContext`] themselves: the trusted identity, the
/// variables with their flags, what to redact, the runner's directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextDoc {
    /// [`JobContext::key`]: trusted, from the job payload.
    pub key: JobKey,
    /// GitLab's job id ([`JobKey::id`]).
    pub id: u64,
    /// The payload's `job_info`; `None` without a payload.
    pub job: Option<JobInfo>,
    /// [`JobContext::image`]: untrusted.
    pub image: Option<String>,
    /// [`JobContext::timeout`], in seconds.
    pub timeout_secs: Option<u64>,
    /// [`JobContext::variables`], with the payload's flags.
    pub variables: Vec<VariableDoc>,
    /// [`JobContext::job_env`].
    pub job_env: BTreeMap<String, String>,
    /// [`crate::Redactor::forms`]: every string to replace with [`crate::MASK`].
    pub redact: Vec<String>,
    /// [`RunnerInfo::builds_dir`]: the runner's TOML override, as the job sees it.
    pub builds_dir: Option<String>,
    /// [`RunnerInfo::cache_dir`]: the runner's TOML override, as the job sees it.
    pub cache_dir: Option<String>,
    /// [`JobContext::tmpdir`].
    pub tmpdir: Option<PathBuf>,
    /// [`JobContext::build_exit_code_file`].
    pub build_exit_code_file: Option<PathBuf>,
}

/// One job variable in a [`ContextDoc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariableDoc {
    /// The name, without `CUSTOM_ENV_`.
    pub key: String,
    /// The value (user-controlled).
    pub value: String,
    /// Masked: never write the value to a log or a file.
    pub masked: bool,
    /// A file-type variable.
    pub file: bool,
    /// Not expanded by the runner.
    pub raw: bool,
}

/// A job's state, as passed to a plugin (the host holds the lock;
/// `schema/state.schema.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateDoc {
    /// The job.
    pub key: JobKey,
    /// Its directory.
    pub dir: PathBuf,
    /// Its record.
    pub record: Option<JobRecord>,
}

/// config's output, as passed back by a plugin (`schema/config.schema.json`):
/// either member may be left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigDoc {
    /// What to tell the runner.
    #[serde(default)]
    pub output: ConfigOutput,
    /// [`ConfigOutput::warnings`].
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl JobDoc {
    /// The document of `job`, served by `runner`: the context as `job`
    /// describes it, and the hook environment it was built from (taken from
    /// this process, as [`JobContext::from_env`] does) for plugins of ABI 1.0.
    pub fn of(job: &JobContext, runner: &RunnerInfo) -> JobDoc {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("CUSTOM_ENV_") || crate::context::RUNNER_KEYS.contains(&k.as_str()))
            .collect();
        JobDoc { runner: job.key().runner().to_owned(), vars, context: Some(ContextDoc::of(job, runner)) }
    }
}

impl ContextDoc {
    /// The document of `job`, served by `runner`.
    pub fn of(job: &JobContext, runner: &RunnerInfo) -> ContextDoc {
        let response = job.response();
        let raw = |key: &str| response.is_some_and(|r| r.variables.iter().any(|v| v.key == key && v.raw));
        ContextDoc {
            key: job.key().clone(),
            id: job.key().id(),
            job: response.map(|r| r.job_info.clone()),
            image: job.image().map(str::to_owned),
            timeout_secs: job.timeout(),
            variables: job
                .variables()
                .iter()
                .map(|v| VariableDoc {
                    key: v.key.clone(),
                    value: v.value.clone(),
                    masked: v.masked,
                    file: v.file,
                    raw: raw(&v.key),
                })
                .collect(),
            job_env: job.job_env().clone(),
            redact: job.redactor().forms().to_vec(),
            builds_dir: runner.builds_dir.clone(),
            cache_dir: runner.cache_dir.clone(),
            tmpdir: job.tmpdir().map(Path::to_owned),
            build_exit_code_file: job.build_exit_code_file().map(Path::to_owned),
        }
    }
}

impl StateDoc {
    /// The document of `state`.
    pub fn of(state: &JobState) -> StateDoc {
        StateDoc { key: state.key().clone(), dir: state.dir().to_owned(), record: state.record().cloned() }
    }
}

// ---- The SDK: the plugin side. ----

/// The host of the call in progress, for [`host_log`].
struct Call<'a> {
    host: &'a BerthHost,
}

impl Call<'_> {
    fn output(&self, bytes: &[u8]) {
        (self.host.set_output)(self.host.ctx, BerthBytes::new(bytes));
    }

    fn fail(&self, failure: &Failure) -> i32 {
        let message = failure.to_string();
        (self.host.set_message)(self.host.ctx, BerthBytes::new(message.as_bytes()));
        match failure {
            Failure::Script { code } => {
                (self.host.set_exit_code)(self.host.ctx, *code);
                Status::ScriptExited as i32
            }
            Failure::Refused { .. } => Status::Refused as i32,
            Failure::Cancelled => Status::Cancelled as i32,
            _ => Status::SystemFailure as i32,
        }
    }

    fn cancel(&self) -> Result<Cancel, Failure> {
        if self.host.cancel_fd < 0 {
            return Cancel::never().map_err(|e| Failure::system_with("cancel pipe", e));
        }
        // SAFETY: the host keeps cancel_fd open for the whole call; we duplicate
        // it so that the Cancel owns (and closes) its own descriptor.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.host.cancel_fd) };
        let owned =
            fd.try_clone_to_owned().map_err(|e| Failure::system_with("failed to duplicate the cancel fd", e))?;
        Ok(Cancel::from_fd(owned))
    }
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: BerthBytes, what: &str) -> Result<T, Failure> {
    // SAFETY: the host passes bytes valid for the duration of the call.
    let slice = unsafe { bytes.as_slice() };
    serde_json::from_slice(slice).map_err(|e| Failure::system(format!("plugin: the host sent an invalid {what}: {e}")))
}

/// The settings table, or the refusal of the setting it holds wrong in the
/// convention of berth's built-in backends, `settings.KEY: why`
/// (`settings: why` about the table itself), which berth reports with the
/// configuration file, the key and its line.
fn settings_of<T: for<'de> Deserialize<'de>>(bytes: BerthBytes) -> Result<T, Failure> {
    // SAFETY: the host passes bytes valid for the duration of the call.
    let slice = unsafe { bytes.as_slice() };
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(slice)).map_err(|e| {
        let path = e.path().to_string();
        // The position is in berth's JSON, not in the admin's file: berth gives the file's.
        let why = e.into_inner().to_string();
        let why = why.rsplit_once(" at line ").map_or(why.as_str(), |(why, _)| why);
        match path.as_str() {
            "." => Failure::system(format!("settings: {why}")),
            key => Failure::system(format!("settings.{key}: {why}")),
        }
    })
}

fn job_of(doc: JobDoc) -> Result<JobContext, Failure> {
    JobContext::from_vars(&doc.runner, doc.vars).map_err(|e| Failure::system_with("job context", e))
}

fn state_of(doc: StateDoc) -> JobState {
    JobState::held_elsewhere(doc.key, doc.dir, doc.record)
}

/// Runs `body` for the SDK entry points: checks the host, catches panics,
/// turns the result into a status.
///
/// # Safety
/// `host` must be null or point to a valid [`BerthHost`] for the duration of the call.
pub unsafe fn sdk_call(host: *const BerthHost, body: impl FnOnce(&BerthHostRef<'_>) -> Result<(), Failure>) -> i32 {
    if host.is_null() {
        return Status::SystemFailure as i32;
    }
    // SAFETY: non-null, valid per the caller's contract.
    let host = unsafe { &*host };
    if host.abi_major != ABI_MAJOR || (host.size as usize) < std::mem::size_of::<BerthHost>() {
        return Status::Unsupported as i32;
    }
    let call = Call { host };
    let wrapped = BerthHostRef { call: &call };
    // The plugin's `tracing` events (on this thread) go to the host's log.
    let caught = tracing::subscriber::with_default(
        HostLog { max: max_level(std::env::var("BERTH_LOG").ok().as_deref()) },
        || {
            let _current = CurrentHost::set(host);
            catch_unwind(AssertUnwindSafe(|| body(&wrapped)))
        },
    );
    match caught {
        Ok(Ok(())) => Status::Ok as i32,
        Ok(Err(failure)) => call.fail(&failure),
        Err(panic) => {
            let what =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            call.fail(&Failure::system(format!(
                "the plugin panicked: {}",
                what.unwrap_or_else(|| "unknown panic".into())
            )))
        }
    }
}

/// A `tracing` subscriber for the duration of one SDK call: every event
/// becomes a [`BerthHost::log`] line, `[target] message key=value ...`, and
/// the host's own filter (`BERTH_LOG`, target `plugin`) decides what is shown.
/// It reaches the host only through [`CURRENT_HOST`], set by [`sdk_call`] on
/// the calling thread for the call's duration: spans are not forwarded, and
/// events of other threads, or after the call, are dropped (even if plugin
/// code kept a clone of the dispatcher).
struct HostLog {
    max: tracing::Level,
}

/// The host's log callback and context, on the thread of the SDK call in progress.
type HostLogFn = (extern "C" fn(ctx: *mut c_void, level: i32, message: BerthBytes), *mut c_void);

thread_local! {
    static CURRENT_HOST: std::cell::Cell<Option<HostLogFn>> = const { std::cell::Cell::new(None) };
}

/// Makes `host` this thread's [`CURRENT_HOST`] until dropped (also on unwind).
struct CurrentHost(Option<HostLogFn>);

impl CurrentHost {
    fn set(host: &BerthHost) -> CurrentHost {
        CurrentHost(CURRENT_HOST.with(|current| current.replace(Some((host.log, host.ctx)))))
    }
}

impl Drop for CurrentHost {
    fn drop(&mut self) {
        CURRENT_HOST.with(|current| current.set(self.0.take()));
    }
}

/// The most verbose level `BERTH_LOG` (an env-filter) may show: events above
/// it are not even formatted. Without it, `info` (what cleanup shows). A
/// directive without a level (a bare target) or with one not known here counts
/// as `trace`: forwarding too much only costs formatting, the host filters.
fn max_level(filter: Option<&str>) -> tracing::Level {
    use tracing::Level;
    let Some(filter) = filter else { return Level::INFO };
    let level_of = |directive: &str| -> Option<Level> {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level).trim().to_ascii_lowercase();
        match level.as_str() {
            "off" | "0" => None,
            "error" | "1" => Some(Level::ERROR),
            "warn" | "2" => Some(Level::WARN),
            "info" | "3" => Some(Level::INFO),
            "debug" | "4" => Some(Level::DEBUG),
            _ => Some(Level::TRACE),
        }
    };
    filter.split(',').filter(|d| !d.trim().is_empty()).filter_map(level_of).max().unwrap_or(Level::ERROR)
}

/// Formats an event's fields: the message first, then `key=value` pairs.
struct Fields<'a> {
    message: &'a mut String,
    pairs: &'a mut String,
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = std::fmt::Write::write_fmt(self.pairs, format_args!(" {}={value}", field.name()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = std::fmt::Write::write_fmt(self.message, format_args!("{value:?}"));
        } else {
            let _ = std::fmt::Write::write_fmt(self.pairs, format_args!(" {}={value:?}", field.name()));
        }
    }
}

impl tracing::Subscriber for HostLog {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(self.max.into())
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let Some((log, ctx)) = CURRENT_HOST.with(std::cell::Cell::get) else { return };
        let metadata = event.metadata();
        let (mut message, mut pairs) = (String::new(), String::new());
        event.record(&mut Fields { message: &mut message, pairs: &mut pairs });
        let line = format!("[{}] {message}{pairs}", metadata.target());
        let level = match *metadata.level() {
            tracing::Level::ERROR => level::ERROR,
            tracing::Level::WARN => level::WARN,
            tracing::Level::INFO => level::INFO,
            _ => level::DEBUG,
        };
        log(ctx, level, BerthBytes::new(line.as_bytes()));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// The host of an SDK call, as the generated entry points see it.
pub struct BerthHostRef<'a> {
    call: &'a Call<'a>,
}

impl std::fmt::Debug for BerthHostRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BerthHostRef")
    }
}

impl BerthHostRef<'_> {
    /// A runner-side log line.
    pub fn log(&self, level: i32, message: &str) {
        (self.call.host.log)(self.call.host.ctx, level, BerthBytes::new(message.as_bytes()));
    }
}

/// The entry points `export_backend!` generates, generic over the backend.
/// Not for direct use.
#[doc(hidden)]
pub mod entry {
    use super::*;

    /// `create`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn create<B: NewBackend + 'static>(
        host: *const BerthHost,
        settings: BerthBytes,
        runner: BerthBytes,
        instance: *mut *mut c_void,
    ) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |_| {
                if instance.is_null() {
                    return Err(Failure::system("plugin: null instance pointer"));
                }
                let settings: B::Settings = settings_of(settings)?;
                let runner: RunnerInfo = parse(runner, "runner")?;
                let backend: Box<dyn Backend> = Box::new(B::new(settings, &runner)?);
                *instance = Box::into_raw(Box::new(backend)).cast();
                Ok(())
            })
        }
    }

    /// # Safety
    /// `instance` must come from [`create`] of the same library.
    unsafe fn backend<'a>(instance: *mut c_void) -> Result<&'a dyn Backend, Failure> {
        if instance.is_null() {
            return Err(Failure::system("plugin: null instance"));
        }
        // SAFETY: created by `create` as a Box<Box<dyn Backend>>.
        Ok(unsafe { &**(instance as *const Box<dyn Backend>) })
    }

    /// `destroy`.
    ///
    /// # Safety
    /// `instance` must come from [`create`] and not be used afterwards.
    pub unsafe extern "C" fn destroy(instance: *mut c_void) {
        if !instance.is_null() {
            let _ = catch_unwind(|| {
                // SAFETY: created by `create` as a Box<Box<dyn Backend>>; destroyed once.
                drop(unsafe { Box::from_raw(instance as *mut Box<dyn Backend>) });
            });
        }
    }

    /// `describe`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn describe(instance: *mut c_void, host: *const BerthHost) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |h| {
                let description = backend(instance)?.describe();
                let json = serde_json::to_vec(&description).map_err(|e| Failure::system_with("describe", e))?;
                h.call.output(&json);
                Ok(())
            })
        }
    }

    /// `config`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn config(instance: *mut c_void, host: *const BerthHost, job: BerthBytes) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |h| {
                let job = job_of(parse(job, "job")?)?;
                let output = backend(instance)?.config(&job)?;
                let doc = ConfigDoc { warnings: output.warnings.clone(), output };
                let json = serde_json::to_vec(&doc).map_err(|e| Failure::system_with("config", e))?;
                h.call.output(&json);
                Ok(())
            })
        }
    }

    /// `prepare`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn prepare(
        instance: *mut c_void,
        host: *const BerthHost,
        job: BerthBytes,
        state: BerthBytes,
    ) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |h| {
                let job = job_of(parse(job, "job")?)?;
                let state = state_of(parse(state, "state")?);
                let cancel = h.call.cancel()?;
                backend(instance)?.prepare(&job, &state, &cancel)
            })
        }
    }

    /// `run`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn run(
        instance: *mut c_void,
        host: *const BerthHost,
        job: BerthBytes,
        state: BerthBytes,
        script: BerthBytes,
        stage: BerthBytes,
    ) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |h| {
                let job = job_of(parse(job, "job")?)?;
                let state = state_of(parse(state, "state")?);
                let script = String::from_utf8(script.as_slice().to_vec())
                    .map_err(|_| Failure::system("plugin: script path is not UTF-8"))?;
                let stage = String::from_utf8(stage.as_slice().to_vec())
                    .map_err(|_| Failure::system("plugin: stage is not UTF-8"))?;
                let cancel = h.call.cancel()?;
                backend(instance)?.run(&job, &state, Path::new(&script), &stage, &cancel)
            })
        }
    }

    /// `cleanup`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn cleanup(instance: *mut c_void, host: *const BerthHost, state: BerthBytes) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |_| {
                let state = state_of(parse(state, "state")?);
                backend(instance)?.cleanup(&state)
            })
        }
    }

    /// `reap_orphans`.
    ///
    /// # Safety
    /// Called by the host per the ABI.
    pub unsafe extern "C" fn reap_orphans(instance: *mut c_void, host: *const BerthHost, known: BerthBytes) -> i32 {
        // SAFETY: forwarded from the host per the ABI.
        unsafe {
            sdk_call(host, |h| {
                let known: Vec<JobKey> = parse(known, "list of jobs")?;
                let lines = backend(instance)?.reap_orphans(&known)?;
                let json = serde_json::to_vec(&lines).map_err(|e| Failure::system_with("reap", e))?;
                h.call.output(&json);
                Ok(())
            })
        }
    }

    /// The table for backend `B`.
    pub const fn table<B: NewBackend + 'static>() -> BerthPlugin {
        BerthPlugin {
            size: std::mem::size_of::<BerthPlugin>() as u32,
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            create: create::<B>,
            destroy,
            describe,
            config,
            prepare,
            run,
            cleanup,
            reap_orphans,
        }
    }
}

/// Exports a [`NewBackend`] as a berth plugin: generates the
/// `berth_backend_v1` entry symbol. Build the crate as a `cdylib`.
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        /// The berth plugin entry point (ABI major 1).
        #[no_mangle]
        pub extern "C" fn berth_backend_v1() -> *const $crate::plugin::BerthPlugin {
            static TABLE: $crate::plugin::BerthPlugin = $crate::plugin::entry::table::<$backend>();
            &TABLE
        }
    };
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod schema_tests;
