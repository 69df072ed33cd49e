//! What berth's built-in backends share, so that they behave alike: the image
//! store (how a job's `image:` becomes a root filesystem, and what is refused),
//! mounting a job's root (and unmounting everything under it again) and
//! lookups of host processes. Third-party backends may use it too.
#![deny(missing_docs)]

pub mod cache;
pub mod cgroup;
pub mod check;
pub mod claims;
pub mod container;
pub mod diskfs;
pub mod generations;
pub mod host;
pub mod image;
pub mod limits;
pub mod mounts;
pub mod proc;
pub mod rootfs;
pub mod sandbox;
pub mod settings;
pub mod userns;
