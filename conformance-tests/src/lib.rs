//! The conformance suite of berth backends, and the GitLab Runner imitation it
//! (and `berth exec`) drives backends with.
#![deny(missing_docs)]

pub mod job;
pub mod runner;
pub mod suite;
