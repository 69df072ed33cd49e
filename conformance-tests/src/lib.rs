//! The conformance suite of berth backends, driven through the GitLab Runner
//! imitation of `berth-runner-imitation`.
#![deny(missing_docs)]

pub mod suite;
