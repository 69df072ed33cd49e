//! Tests of `plugin`.

use super::*;

#[test]
fn plugin_events_are_formatted_up_to_the_most_verbose_level_of_berth_log() {
    use tracing::Level;
    assert_eq!(max_level(None), Level::INFO);
    assert_eq!(max_level(Some("debug")), Level::DEBUG);
    assert_eq!(max_level(Some("berth=info,plugin=trace")), Level::TRACE);
    assert_eq!(max_level(Some("WARN")), Level::WARN);
    assert_eq!(max_level(Some("off")), Level::ERROR);
    // A bare target shows everything of it; numbers are levels too.
    assert_eq!(max_level(Some("plugin")), Level::TRACE);
    assert_eq!(max_level(Some("berth=info,plugin=4")), Level::DEBUG);
    assert_eq!(max_level(Some("x[span{a=1}]=warn")), Level::WARN);
}

static LINES: std::sync::Mutex<Vec<(i32, String)>> = std::sync::Mutex::new(Vec::new());

extern "C" fn record_log(_: *mut c_void, level: i32, message: BerthBytes) {
    // SAFETY: valid for the call, per the ABI.
    let text = String::from_utf8_lossy(unsafe { message.as_slice() }).into_owned();
    LINES.lock().unwrap().push((level, text));
}
extern "C" fn ignore_bytes(_: *mut c_void, _: BerthBytes) {}
extern "C" fn ignore_code(_: *mut c_void, _: i32) {}
extern "C" fn not_cancelled(_: *mut c_void) -> i32 {
    0
}

#[test]
fn events_reach_the_host_only_on_the_calls_thread_and_during_the_call() {
    let host = BerthHost {
        size: std::mem::size_of::<BerthHost>() as u32,
        abi_major: ABI_MAJOR,
        abi_minor: ABI_MINOR,
        ctx: std::ptr::null_mut(),
        cancel_fd: -1,
        log: record_log,
        set_output: ignore_bytes,
        set_message: ignore_bytes,
        set_exit_code: ignore_code,
        is_cancelled: not_cancelled,
    };
    let mut kept = None;
    // SAFETY: `host` is valid for the whole call.
    let status = unsafe {
        sdk_call(&host, |_| {
            tracing::info!(job = "p-1", "in the call");
            tracing::trace!("above the level BERTH_LOG allows");
            std::thread::scope(|scope| {
                scope.spawn(|| tracing::warn!("on another thread"));
            });
            // Plugin code may keep the dispatcher, as `with_current_subscriber` does.
            kept = Some(tracing::dispatcher::get_default(Clone::clone));
            Ok(())
        })
    };
    assert_eq!(status, Status::Ok as i32);
    tracing::dispatcher::with_default(&kept.unwrap(), || tracing::error!("after the call"));
    let lines = LINES.lock().unwrap().clone();
    let expected = format!("[{}] in the call job=p-1", module_path!());
    assert!(lines.contains(&(level::INFO, expected)), "{lines:?}");
    assert!(!lines.iter().any(|(_, l)| l.contains("another thread") || l.contains("after the call")), "{lines:?}");
    if std::env::var_os("BERTH_LOG").is_none() {
        assert_eq!(lines.len(), 1, "trace is not formatted at the default level: {lines:?}");
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "only parsed, to make serde's errors")]
struct Settings {
    name: String,
    pool: Option<bool>,
    limits: Option<Limits>,
    #[serde(default)]
    mounts: Vec<Mount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "only parsed, to make serde's errors")]
struct Limits {
    pids: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "only parsed, to make serde's errors")]
struct Mount {
    from: String,
}

/// A setting the SDK cannot parse is refused as `settings.KEY: why`, the
/// built-in backends' convention, which berth reports with the file, the key
/// and its line; the position in berth's JSON is left out.
#[test]
fn a_plugins_parse_error_names_the_setting_it_is_about() {
    for (json, key, why) in [
        (r#"{"name":"x","colour":"red"}"#, "settings.colour", "unknown field `colour`"),
        (r#"{"colour":"red","name":"x"}"#, "settings.colour", "unknown field `colour`"),
        (r#"{"name":"x","pool":"yes"}"#, "settings.pool", "invalid type: string \"yes\", expected a boolean"),
        (r#"{"name":5}"#, "settings.name", "invalid type: integer `5`, expected a string"),
        (r#"{"name":"x","limits":{"pids":-1}}"#, "settings.limits.pids", "invalid value: integer `-1`"),
        (r#"{"name":"x","limits":{"pids":1,"memory":2}}"#, "settings.limits.memory", "unknown field `memory`"),
        (r#"{"name":"x","limits":{}}"#, "settings.limits", "missing field `pids`"),
        (r#"{"name":"x","mounts":[{"from":"/a"},{"from":5}]}"#, "settings.mounts[1].from", "invalid type: integer"),
        (r#"{"name":"x","mounts":[{"from":"/a"},7]}"#, "settings.mounts[1]", "invalid type: integer `7`"),
        (r#"{"pool":true}"#, "settings", "missing field `name`"),
    ] {
        let failure = settings_of::<Settings>(BerthBytes::new(json.as_bytes())).unwrap_err().to_string();
        let (found, message) = failure.split_once(": ").unwrap();
        assert_eq!(found, key, "{json}: {failure}");
        assert!(message.starts_with(why) && !message.contains("column"), "{json}: {failure}");
    }
}
