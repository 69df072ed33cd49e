//! The C header `include/berth_backend.h` matches the Rust ABI definitions:
//! a C program compiled against it prints every size, offset and constant,
//! which must equal Rust's.

use std::mem::{offset_of, size_of};
use std::process::Command;

use berth_backend_api::plugin::{BerthBytes, BerthHost, BerthPlugin, Status, ABI_MAJOR, ABI_MINOR, ENTRY_SYMBOL};

const PROGRAM: &str = r#"
#include <stdio.h>
#include "berth_backend.h"
#define F(T, f) printf(#T "." #f "=%zu\n", offsetof(T, f))
int main(void) {
    printf("BerthBytes=%zu\nBerthHost=%zu\nBerthPlugin=%zu\n", sizeof(BerthBytes), sizeof(BerthHost), sizeof(BerthPlugin));
    F(BerthBytes, ptr); F(BerthBytes, len);
    F(BerthHost, size); F(BerthHost, abi_major); F(BerthHost, abi_minor); F(BerthHost, ctx); F(BerthHost, cancel_fd);
    F(BerthHost, log); F(BerthHost, set_output); F(BerthHost, set_message); F(BerthHost, set_exit_code); F(BerthHost, is_cancelled);
    F(BerthPlugin, size); F(BerthPlugin, abi_major); F(BerthPlugin, abi_minor); F(BerthPlugin, create); F(BerthPlugin, destroy);
    F(BerthPlugin, describe); F(BerthPlugin, config); F(BerthPlugin, prepare); F(BerthPlugin, run); F(BerthPlugin, cleanup);
    F(BerthPlugin, reap_orphans);
    printf("major=%d\nminor=%d\nsymbol=%s\n", BERTH_ABI_MAJOR, BERTH_ABI_MINOR, BERTH_ENTRY_SYMBOL);
    printf("status=%d,%d,%d,%d,%d,%d\n", BERTH_OK, BERTH_SCRIPT_EXITED, BERTH_REFUSED, BERTH_SYSTEM_FAILURE, BERTH_CANCELLED, BERTH_UNSUPPORTED);
    return 0;
}
"#;

fn rust_view() -> String {
    macro_rules! f {
        ($out:ident, $t:ident, $f:ident) => {
            $out.push_str(&format!("{}.{}={}\n", stringify!($t), stringify!($f), offset_of!($t, $f)));
        };
    }
    let mut out = format!(
        "BerthBytes={}\nBerthHost={}\nBerthPlugin={}\n",
        size_of::<BerthBytes>(),
        size_of::<BerthHost>(),
        size_of::<BerthPlugin>()
    );
    f!(out, BerthBytes, ptr);
    f!(out, BerthBytes, len);
    for (name, off) in [
        ("size", offset_of!(BerthHost, size)),
        ("abi_major", offset_of!(BerthHost, abi_major)),
        ("abi_minor", offset_of!(BerthHost, abi_minor)),
        ("ctx", offset_of!(BerthHost, ctx)),
        ("cancel_fd", offset_of!(BerthHost, cancel_fd)),
        ("log", offset_of!(BerthHost, log)),
        ("set_output", offset_of!(BerthHost, set_output)),
        ("set_message", offset_of!(BerthHost, set_message)),
        ("set_exit_code", offset_of!(BerthHost, set_exit_code)),
        ("is_cancelled", offset_of!(BerthHost, is_cancelled)),
    ] {
        out.push_str(&format!("BerthHost.{name}={off}\n"));
    }
    for (name, off) in [
        ("size", offset_of!(BerthPlugin, size)),
        ("abi_major", offset_of!(BerthPlugin, abi_major)),
        ("abi_minor", offset_of!(BerthPlugin, abi_minor)),
        ("create", offset_of!(BerthPlugin, create)),
        ("destroy", offset_of!(BerthPlugin, destroy)),
        ("describe", offset_of!(BerthPlugin, describe)),
        ("config", offset_of!(BerthPlugin, config)),
        ("prepare", offset_of!(BerthPlugin, prepare)),
        ("run", offset_of!(BerthPlugin, run)),
        ("cleanup", offset_of!(BerthPlugin, cleanup)),
        ("reap_orphans", offset_of!(BerthPlugin, reap_orphans)),
    ] {
        out.push_str(&format!("BerthPlugin.{name}={off}\n"));
    }
    out.push_str(&format!("major={ABI_MAJOR}\nminor={ABI_MINOR}\n"));
    out.push_str(&format!("symbol={}\n", std::str::from_utf8(&ENTRY_SYMBOL[..ENTRY_SYMBOL.len() - 1]).unwrap()));
    let statuses = [
        Status::Ok,
        Status::ScriptExited,
        Status::Refused,
        Status::SystemFailure,
        Status::Cancelled,
        Status::Unsupported,
    ];
    out.push_str(&format!("status={}\n", statuses.map(|s| (s as i32).to_string()).join(",")));
    out
}

#[test]
fn the_c_header_matches_the_rust_abi() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("check.c");
    std::fs::write(&source, PROGRAM).unwrap();
    let binary = dir.path().join("check");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let compiled = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&binary)
        .arg(&source)
        .output();
    let compiled = match compiled {
        Ok(out) => out,
        Err(e) => {
            assert!(!berth_backend_api::testing::prerequisite(Some(format!("no C compiler ({e})"))));
            return;
        }
    };
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let c_view = Command::new(&binary).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&c_view.stdout), rust_view());
}
