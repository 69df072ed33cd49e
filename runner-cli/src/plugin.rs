//! Loading a backend plugin (`plugin = "/path/lib.so"`): the host side of the
//! ABI in `berth_backend_api::plugin`. All of berth's own `unsafe` FFI code
//! is in this module.

use std::ffi::c_void;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use berth_backend_api::plugin::{
    level, BerthBytes, BerthHost, BerthPlugin, ConfigDoc, JobDoc, StateDoc, Status, ABI_MAJOR, ABI_MINOR, ENTRY_SYMBOL,
};
use berth_backend_api::{
    Backend, Cancel, ConfigOutput, Description, Failure, JobContext, JobKey, JobState, RunnerInfo,
};

/// A loaded plugin instance, usable as any backend.
pub struct PluginBackend {
    table: *const BerthPlugin,
    instance: *mut c_void,
    description: Description,
    path: PathBuf,
    // Last: the library stays loaded until the instance is destroyed.
    _library: libloading::Library,
}

impl std::fmt::Debug for PluginBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginBackend").field("path", &self.path).finish()
    }
}

/// What the plugin handed back during one call.
#[derive(Default)]
struct CallCtx {
    output: Vec<u8>,
    message: Option<String>,
    exit_code: Option<i32>,
    cancel: Option<i32>,
}

extern "C" fn host_log(_ctx: *mut c_void, level: i32, message: BerthBytes) {
    // SAFETY: the plugin passes bytes valid for the duration of this call.
    let text = String::from_utf8_lossy(unsafe { message.as_slice() });
    match level {
        level::ERROR => tracing::error!(target: "plugin", "{text}"),
        level::WARN => tracing::warn!(target: "plugin", "{text}"),
        level::INFO => tracing::info!(target: "plugin", "{text}"),
        _ => tracing::debug!(target: "plugin", "{text}"),
    }
}

/// # Safety
/// `ctx` is the `CallCtx` of the call in progress (set by `call`).
unsafe fn ctx<'a>(ctx: *mut c_void) -> &'a mut CallCtx {
    // SAFETY: per this function's contract.
    unsafe { &mut *(ctx as *mut CallCtx) }
}

extern "C" fn host_set_output(c: *mut c_void, bytes: BerthBytes) {
    // SAFETY: `c` is our CallCtx; the bytes are valid during this call.
    unsafe { ctx(c).output = bytes.as_slice().to_vec() };
}

extern "C" fn host_set_message(c: *mut c_void, bytes: BerthBytes) {
    // SAFETY: `c` is our CallCtx; the bytes are valid during this call.
    unsafe { ctx(c).message = Some(String::from_utf8_lossy(bytes.as_slice()).into_owned()) };
}

extern "C" fn host_set_exit_code(c: *mut c_void, code: i32) {
    // SAFETY: `c` is our CallCtx.
    unsafe { ctx(c).exit_code = Some(code) };
}

extern "C" fn host_is_cancelled(c: *mut c_void) -> i32 {
    // SAFETY: `c` is our CallCtx.
    let fd = unsafe { ctx(c).cancel };
    let Some(fd) = fd else { return 0 };
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no timeout.
    i32::from(unsafe { libc::poll(&mut pfd, 1, 0) } > 0)
}

/// A plugin refused before use; the caller names the path.
fn refuse(_path: &Path, reason: impl Into<String>) -> Failure {
    Failure::system(format!("refusing to load it: {}", reason.into()))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(value).map_err(|e| Failure::system_with("failed to encode a plugin call", e))
}

impl PluginBackend {
    /// Loads the plugin at `path` and creates its instance for `runner` with `settings`.
    pub fn load(path: &Path, runner: &RunnerInfo, settings: &toml::Table) -> Result<PluginBackend, Failure> {
        let meta = std::fs::metadata(path).map_err(|e| refuse(path, format!("cannot read it: {e}")))?;
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(
                path,
                format!(
                    "it is writable by its group or by everyone (mode {:o}): anyone who can write it could run code as berth; chmod go-w it",
                    meta.mode() & 0o7777
                ),
            ));
        }
        let owner = meta.uid();
        let me = nix::unistd::geteuid().as_raw();
        if owner != 0 && owner != me {
            return Err(refuse(path, format!("it belongs to uid {owner}, neither root nor the user berth runs as")));
        }
        // SAFETY: loading a library runs its initialisers; the admin chose it
        // in berth's configuration and its permissions were checked above.
        let library =
            unsafe { libloading::Library::new(path) }.map_err(|e| refuse(path, format!("it cannot be loaded: {e}")))?;
        // SAFETY: the symbol's type is fixed by the ABI.
        let entry = unsafe { library.get::<unsafe extern "C" fn() -> *const BerthPlugin>(ENTRY_SYMBOL) }.map_err(|_| {
            refuse(path, "it is not a berth backend: it exports no berth_backend_v1 (build it with berth_backend_api::export_backend!)")
        })?;
        // SAFETY: calling the entry point per the ABI.
        let table = unsafe { entry() };
        if table.is_null() {
            return Err(refuse(path, "its berth_backend_v1 returned no table"));
        }
        // SAFETY: every ABI version starts the table with size, major and minor
        // (8 bytes); nothing else is read before they are checked.
        let (size, major, minor) = unsafe { ((*table).size, (*table).abi_major, (*table).abi_minor) };
        if major != ABI_MAJOR {
            return Err(refuse(
                path,
                format!("it was built for backend ABI {major}.{minor}; this berth speaks {ABI_MAJOR}.{ABI_MINOR}"),
            ));
        }
        if (size as usize) < std::mem::size_of::<BerthPlugin>() {
            return Err(refuse(
                path,
                format!(
                    "its table is truncated ({size} bytes; ABI {major}.{minor} needs at least {})",
                    std::mem::size_of::<BerthPlugin>()
                ),
            ));
        }
        if minor > ABI_MINOR {
            tracing::debug!(
                "plugin {} was built for ABI {major}.{minor}, newer than ours ({ABI_MAJOR}.{ABI_MINOR})",
                path.display()
            );
        }
        let mut plugin = PluginBackend {
            table,
            instance: std::ptr::null_mut(),
            description: Description::new("plugin", "0", ""),
            path: path.to_owned(),
            _library: library,
        };
        let settings =
            serde_json::to_vec(settings).map_err(|e| Failure::system_with("failed to encode the settings", e))?;
        let runner = json(runner)?;
        let mut instance: *mut c_void = std::ptr::null_mut();
        let create = plugin.table().create;
        plugin.call(None, |host| {
            // SAFETY: per the ABI; the inputs outlive the call.
            unsafe { create(host, BerthBytes::new(&settings), BerthBytes::new(&runner), &mut instance) }
        })?;
        if instance.is_null() {
            return Err(refuse(path, "its create returned no instance"));
        }
        plugin.instance = instance;
        let describe = plugin.table().describe;
        let out = plugin.call(None, |host| {
            // SAFETY: per the ABI, with the instance it created.
            unsafe { describe(instance, host) }
        })?;
        plugin.description =
            serde_json::from_slice(&out).map_err(|e| refuse(path, format!("its description is not valid: {e}")))?;
        Ok(plugin)
    }

    fn table(&self) -> &BerthPlugin {
        // SAFETY: checked non-null and large enough in `load`; static in the
        // library, which stays loaded as long as `self`.
        unsafe { &*self.table }
    }

    /// Calls the plugin with a fresh host context; returns its output.
    fn call(&self, cancel: Option<&Cancel>, f: impl FnOnce(*const BerthHost) -> i32) -> Result<Vec<u8>, Failure> {
        let mut call = CallCtx { cancel: cancel.map(|c| c.as_raw_fd()), ..Default::default() };
        let host = BerthHost {
            size: std::mem::size_of::<BerthHost>() as u32,
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            ctx: (&mut call as *mut CallCtx).cast(),
            cancel_fd: call.cancel.unwrap_or(-1),
            log: host_log,
            set_output: host_set_output,
            set_message: host_set_message,
            set_exit_code: host_set_exit_code,
            is_cancelled: host_is_cancelled,
        };
        let status = f(&host);
        let message = call.message.take().unwrap_or_else(|| "the plugin gave no reason".into());
        match status {
            s if s == Status::Ok as i32 => Ok(call.output),
            s if s == Status::ScriptExited as i32 => match call.exit_code {
                Some(code) => Err(Failure::script(code)),
                None => Err(Failure::system(format!(
                    "plugin {}: a script failed without an exit code",
                    self.path.display()
                ))),
            },
            s if s == Status::Refused as i32 => Err(Failure::refused(message)),
            s if s == Status::Cancelled as i32 => Err(Failure::Cancelled),
            s if s == Status::Unsupported as i32 => {
                Err(Failure::system(format!("plugin {}: operation not supported: {message}", self.path.display())))
            }
            _ => Err(Failure::system(message)),
        }
    }
}

impl Drop for PluginBackend {
    fn drop(&mut self) {
        if !self.instance.is_null() {
            // SAFETY: the instance came from this library's create and is destroyed once.
            unsafe { (self.table().destroy)(self.instance) };
        }
    }
}

impl Backend for PluginBackend {
    fn describe(&self) -> Description {
        self.description.clone()
    }

    fn config(&self, job: &JobContext) -> Result<ConfigOutput, Failure> {
        let doc = json(&JobDoc::from_env(job.key().runner()))?;
        let f = self.table().config;
        let instance = self.instance;
        // SAFETY: per the ABI; inputs outlive the call.
        let out = self.call(None, |host| unsafe { f(instance, host, BerthBytes::new(&doc)) })?;
        let doc: ConfigDoc = serde_json::from_slice(&out)
            .map_err(|e| Failure::system(format!("plugin {}: invalid config output: {e}", self.path.display())))?;
        let mut output = doc.output;
        output.warnings = doc.warnings;
        Ok(output)
    }

    fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
        let (job, state) = (json(&JobDoc::from_env(job.key().runner()))?, json(&StateDoc::of(state))?);
        let f = self.table().prepare;
        let instance = self.instance;
        // SAFETY: per the ABI; inputs outlive the call.
        self.call(Some(cancel), |host| unsafe { f(instance, host, BerthBytes::new(&job), BerthBytes::new(&state)) })?;
        Ok(())
    }

    fn run(
        &self,
        job: &JobContext,
        state: &JobState,
        script: &Path,
        stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        let (job, state) = (json(&JobDoc::from_env(job.key().runner()))?, json(&StateDoc::of(state))?);
        let script = script.to_str().ok_or_else(|| Failure::system("the script path is not UTF-8"))?;
        let f = self.table().run;
        let instance = self.instance;
        self.call(Some(cancel), |host| {
            // SAFETY: per the ABI; inputs outlive the call.
            unsafe {
                f(
                    instance,
                    host,
                    BerthBytes::new(&job),
                    BerthBytes::new(&state),
                    BerthBytes::new(script.as_bytes()),
                    BerthBytes::new(stage.as_bytes()),
                )
            }
        })?;
        Ok(())
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        let state = json(&StateDoc::of(state))?;
        let f = self.table().cleanup;
        let instance = self.instance;
        // SAFETY: per the ABI; inputs outlive the call.
        self.call(None, |host| unsafe { f(instance, host, BerthBytes::new(&state)) })?;
        Ok(())
    }

    fn reap_orphans(&self, known: &[JobKey]) -> Result<Vec<String>, Failure> {
        let known = json(&known)?;
        let f = self.table().reap_orphans;
        let instance = self.instance;
        // SAFETY: per the ABI; inputs outlive the call.
        let out = self.call(None, |host| unsafe { f(instance, host, BerthBytes::new(&known)) })?;
        serde_json::from_slice(&out)
            .map_err(|e| Failure::system(format!("plugin {}: invalid reap output: {e}", self.path.display())))
    }
}
