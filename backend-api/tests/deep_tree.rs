//! A job's state holding a directory chain thousands of levels deep is removed
//! under a low descriptor limit.
//!
//! A binary of its own: it lowers the process's `RLIMIT_NOFILE`, which would
//! disturb tests running beside it.

use std::os::fd::AsFd;

use berth_backend_api::{JobKey, JobRecord, StateDir};
use nix::fcntl::{openat, OFlag};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::stat::{mkdirat, Mode};

/// What a job does with `for i in $(seq 3000); do mkdir d; cd d; done`.
fn deep_chain(top: &std::path::Path, depth: usize) {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut dir = nix::fcntl::open(top, flags, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(dir.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
        dir = openat(dir.as_fd(), "d", flags, Mode::empty()).unwrap();
    }
    std::fs::write(format!("/proc/self/fd/{}/leaf", std::os::fd::AsRawFd::as_raw_fd(&dir)), "x").unwrap();
}

#[test]
fn a_deep_tree_in_a_jobs_state_is_removed_under_a_low_descriptor_limit() {
    let root = tempfile::tempdir().unwrap();
    let states = StateDir::new(root.path());
    let key = JobKey::new("demo", 7).unwrap();
    let state = states.create(JobRecord::new(key.clone(), "fake")).unwrap();
    let upper = state.dir().join("upper");
    std::fs::create_dir(&upper).unwrap();
    deep_chain(&upper, 3000);
    drop(state);

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 64, hard).unwrap();
    let started = std::time::Instant::now();
    let removed = states.open_for_cleanup(&key).unwrap().remove();
    eprintln!("removed a 3000-level chain in {:.2?} with RLIMIT_NOFILE 64", started.elapsed());
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();

    removed.expect("the job's state is removed");
    assert!(states.list().unwrap().is_empty(), "nothing of the job is left");
    assert_eq!(std::fs::read_dir(root.path().join("jobs")).unwrap().count(), 0);
}
