//! stormwall: a Redis-protocol sidecar proxy that passes ordinary traffic through untouched
//! and shields Redis from invalidation storms. See `README.md` and `../shared/DESIGN.md`.

pub mod admin;
pub mod config;
pub mod invalidation;
pub mod logging;
pub mod net;
pub mod policy;
pub mod reload;
pub mod resp;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod upstream;
