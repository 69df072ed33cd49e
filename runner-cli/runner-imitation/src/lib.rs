//! GitLab Runner's side of the custom-executor protocol, imitated: how
//! gitlab-runner calls one hook of a custom-executor driver ([`runner`]), and
//! how it runs a whole job through the four hooks ([`job`]). `berth exec`, the
//! conformance suite and the backends bench drive backends with it.
#![deny(missing_docs)]

pub mod job;
pub mod runner;
pub mod variables;
