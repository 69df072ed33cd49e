//! berth's integration tests: the binary driven the way gitlab-runner drives it.

mod util;

mod chroot;
mod conformance;
mod exec;
mod hooks;
mod images;
mod nspawn;
mod package;
mod plugin;
mod pool;
mod ps;
mod sandbox;
mod stages;
mod testhost;
