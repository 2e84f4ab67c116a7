//! The Rust SDK.

pub mod crypto;
