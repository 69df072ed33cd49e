//! Loading a backend plugin (`plugin = "/path/lib.so"`): the host side of the
//! ABI in `berth_backend_api::plugin`. All of berth's own `unsafe` FFI code
//! is in this module.

use std::ffi::{c_void, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};

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
    /// The runner served, for the job documents.
    runner: RunnerInfo,
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

/// The text of a failed `dlopen` (libloading keeps it as the error's
/// source), naming the library as the admin did rather than the descriptor
/// it was loaded through.
fn dlopen_error(error: &libloading::Error, by_fd: &str) -> String {
    let text = std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string);
    let text = text.strip_prefix(by_fd).and_then(|t| t.strip_prefix(": ")).unwrap_or(&text);
    text.replace(by_fd, "the library")
}

/// Who may own a plugin or a directory above it: root or the user berth runs as.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Symbolic links followed at most while opening a plugin (as the kernel's limit).
const MAX_LINKS: usize = 40;

/// Opens the plugin at `path` for loading, refusing it unless the file and
/// every directory it is reached through are owned by root (or the user
/// berth runs as) and writable by no one else.
///
/// The path is walked one component at a time from `/`, each directory
/// opened with `O_NOFOLLOW` and checked on the open descriptor, symbolic
/// links resolved by hand (so the directory holding a link is checked too),
/// and the file opened `O_NOFOLLOW` and checked on the descriptor that
/// [`PluginBackend::load`] then loads: no check is made on a path that could
/// change before it is used.
pub fn open_checked(path: &Path) -> Result<OwnedFd, Failure> {
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_err(|e| refuse(path, format!("cannot resolve a relative path: {e}")))?.join(path)
    };
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let root =
        nix::fcntl::open("/", dir_flags, Mode::empty()).map_err(|e| refuse(path, format!("cannot open /: {e}")))?;
    let sticky = check_dir(path, &root, Path::new("/"))?;
    let mut dirs: Vec<(OwnedFd, PathBuf, bool)> = vec![(root, PathBuf::from("/"), sticky)];
    let mut pending: Vec<OsString> = components(&absolute);
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == "." {
            continue;
        }
        if name == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let (dir, dir_path, sticky) = dirs.last().expect("the root stays");
        let here = dir_path.join(&name);
        let stat = fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| refuse(path, format!("cannot read {}: {e}", here.display())))?;
        // In a sticky directory others can write (like /tmp), only an entry's
        // owner can replace it: the entry must be trusted's.
        if *sticky && !trusted_owner(stat.st_uid) {
            return Err(refuse(
                path,
                format!(
                    "{} lies in {}, which everyone can write, and belongs to uid {}: its owner could replace it",
                    here.display(),
                    dir_path.display(),
                    stat.st_uid
                ),
            ));
        }
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        let last = pending.is_empty();
        if kind == SFlag::S_IFLNK {
            links += 1;
            if links > MAX_LINKS {
                return Err(refuse(path, "too many symbolic links on its path"));
            }
            let target = readlinkat(dir, name.as_os_str())
                .map_err(|e| refuse(path, format!("cannot read the link {}: {e}", here.display())))?;
            if Path::new(&target).is_absolute() {
                dirs.truncate(1);
            }
            pending.extend(components(Path::new(&target)));
        } else if kind == SFlag::S_IFDIR && !last {
            let fd = openat(dir, name.as_os_str(), dir_flags, Mode::empty())
                .map_err(|e| refuse(path, format!("cannot open {}: {e}", here.display())))?;
            let sticky = check_dir(path, &fd, &here)?;
            dirs.push((fd, here, sticky));
        } else if last {
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
            let fd = openat(dir, name.as_os_str(), flags, Mode::empty())
                .map_err(|e| refuse(path, format!("cannot open it: {e}")))?;
            check_file(path, &fd)?;
            return Ok(fd);
        } else {
            return Err(refuse(path, format!("{} is not a directory", here.display())));
        }
    }
    Err(refuse(path, "it is a directory, not a library"))
}

/// The names of `path`, last first (a stack to pop from).
fn components(path: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::CurDir => Some(".".into()),
            Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    names.reverse();
    names
}

/// Refuses a directory on a plugin's path that someone else could change;
/// true for a sticky directory others can write (`/tmp`): usable only
/// through entries that root or berth's user owns, which only they can
/// rename or remove there.
fn check_dir(path: &Path, dir: &OwnedFd, shown: &Path) -> Result<bool, Failure> {
    let stat = fstat(dir).map_err(|e| refuse(path, format!("cannot read {}: {e}", shown.display())))?;
    let mode = stat.st_mode & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && sticky && trusted_owner(stat.st_uid) {
        return Ok(true);
    }
    if mode & 0o022 != 0 {
        return Err(refuse(
            path,
            format!(
                "its directory {} is writable by its group or by everyone (mode {mode:o}): anyone who can write it could replace the plugin; keep plugins in a directory only root can write (chmod go-w {0})",
                shown.display()
            ),
        ));
    }
    if !trusted_owner(stat.st_uid) {
        return Err(refuse(
            path,
            format!(
                "its directory {} belongs to uid {}, neither root nor the user berth runs as: its owner could replace the plugin",
                shown.display(),
                stat.st_uid
            ),
        ));
    }
    Ok(false)
}

/// Refuses a plugin file that is not a regular file or that someone else could change.
fn check_file(path: &Path, file: &OwnedFd) -> Result<(), Failure> {
    let stat = fstat(file).map_err(|e| refuse(path, format!("cannot read it: {e}")))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(refuse(path, "it is not a regular file"));
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(
            path,
            format!(
                "it is writable by its group or by everyone (mode {mode:o}): anyone who can write it could run code as berth; chmod go-w it"
            ),
        ));
    }
    if !trusted_owner(stat.st_uid) {
        return Err(refuse(
            path,
            format!("it belongs to uid {}, neither root nor the user berth runs as", stat.st_uid),
        ));
    }
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(value).map_err(|e| Failure::system_with("failed to encode a plugin call", e))
}

impl PluginBackend {
    /// Loads the plugin at `path` and creates its instance for `runner` with `settings`.
    ///
    /// The library is opened once ([`open_checked`]: every directory on the
    /// way and the file itself checked on what was opened), and that very
    /// file is loaded through its descriptor: replacing the path after the
    /// check cannot change what runs.
    pub fn load(path: &Path, runner: &RunnerInfo, settings: &toml::Table) -> Result<PluginBackend, Failure> {
        let file = open_checked(path)?;
        Self::load_opened(&file, path, runner, settings)
    }

    /// Loads the library open as `file` (checked by [`open_checked`]), which
    /// was found at `path`.
    fn load_opened(
        file: &OwnedFd,
        path: &Path,
        runner: &RunnerInfo,
        settings: &toml::Table,
    ) -> Result<PluginBackend, Failure> {
        let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
        // SAFETY: loading a library runs its initialisers; the admin chose it
        // in berth's configuration, and the file opened (the one loaded,
        // through its descriptor) and every directory above it were checked.
        let library = unsafe { libloading::Library::new(&by_fd) }
            .map_err(|e| refuse(path, format!("it cannot be loaded: {}", dlopen_error(&e, &by_fd))))?;
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
            runner: runner.clone(),
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
        let doc = json(&JobDoc::of(job, &self.runner))?;
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
        let (job, state) = (json(&JobDoc::of(job, &self.runner))?, json(&StateDoc::of(state))?);
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
        let (job, state) = (json(&JobDoc::of(job, &self.runner))?, json(&StateDoc::of(state))?);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The host-test fixture plugin, built by `cargo build --workspace`.
    fn fixture() -> Option<PathBuf> {
        // target/debug/deps/berth-HASH → target/debug
        let dir = std::env::current_exe().ok()?.parent()?.parent()?.to_owned();
        let lib = dir.join("libberth_backend_host_test.so");
        if lib.exists() {
            return Some(lib);
        }
        berth_backend_api::testing::prerequisite(Some(format!(
            "{} is not built (cargo build --workspace)",
            lib.display()
        )));
        None
    }

    #[test]
    fn the_file_checked_is_the_file_loaded_even_if_the_path_is_swapped() {
        let Some(lib) = fixture() else { return };
        let dir = tempfile::Builder::new().prefix("plugin-swap").tempdir_in(lib.parent().unwrap()).unwrap();
        let path = dir.path().join("backend.so");
        std::fs::copy(&lib, &path).unwrap();
        let opened = open_checked(&path).unwrap();
        // Between the check and the load, the path is made to name another
        // library (here one that is no berth plugin at all).
        let other = dir.path().join("other.so");
        std::fs::write(&other, b"not a library").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let state = tempfile::tempdir().unwrap();
        let runner = RunnerInfo::new("swap", state.path());
        let plugin = PluginBackend::load_opened(&opened, &path, &runner, &toml::Table::new()).unwrap();
        assert_eq!(plugin.describe().name, "host-test", "the library checked is the one that runs");
        let Err(err) = PluginBackend::load(&path, &runner, &toml::Table::new()) else {
            panic!("a file that is no library loads")
        };
        // dlopen's own words, about the path given rather than the descriptor.
        let err = err.to_string();
        assert!(err.contains("it cannot be loaded: file too short") && !err.contains("/proc/self/fd"), "{err}");
    }

    #[test]
    fn links_on_the_way_are_followed_from_checked_directories_only() {
        let Some(lib) = fixture() else { return };
        let dir = tempfile::Builder::new().prefix("plugin-link").tempdir_in(lib.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(lib.parent().unwrap(), dir.path().join("to-debug")).unwrap();
        let via = dir.path().join("to-debug/../debug/libberth_backend_host_test.so");
        assert!(open_checked(&via).is_ok(), "a link in a trusted directory is fine");
        // A sticky directory everyone can write (/tmp): through root's entries
        // only, which no one else can rename or remove there.
        let open = tempfile::tempdir_in("/tmp").unwrap();
        std::os::unix::fs::symlink(&lib, open.path().join("lib.so")).unwrap();
        if nix::unistd::Uid::effective().is_root() {
            assert!(open_checked(&open.path().join("lib.so")).is_ok(), "root's directory in /tmp");
            std::os::unix::fs::chown(open.path(), Some(65534), Some(65534)).unwrap();
            let err = open_checked(&open.path().join("lib.so")).unwrap_err().to_string();
            assert!(err.contains("which everyone can write, and belongs to uid 65534"), "{err}");
        }
        // Writable by everyone without the sticky bit: refused outright.
        let shared = open.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&lib, shared.join("lib.so")).unwrap();
        if nix::unistd::Uid::effective().is_root() {
            std::os::unix::fs::chown(open.path(), Some(0), Some(0)).unwrap();
        }
        let err = open_checked(&shared.join("lib.so")).unwrap_err().to_string();
        assert!(err.contains("is writable by its group or by everyone"), "{err}");
    }
}
