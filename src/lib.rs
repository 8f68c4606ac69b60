//! stormwall: a Redis-protocol sidecar proxy that passes ordinary traffic through untouched
//! and shields Redis from invalidation storms. What it promises every client is the contract
//! in `docs/contract.md` (G1–G7); `README.md` says how each point is kept and tested.
//!
//! Public modules are the ones used outside the library: the binary (`src/main.rs`: config,
//! logging, net, reload, server, telemetry), the benchmarks (`config`, `policy`, `resp`), the
//! fuzz targets (`resp`, `config`), the engine's API tests (`invalidation`, `upstream`) and
//! the cluster tests (`cluster`). Everything else is
//! crate-private, so the compiler reports code nothing uses.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub(crate) mod buffers;
pub mod cluster;
pub mod config;
pub mod invalidation;
pub mod logging;
pub mod net;
pub mod policy;
pub mod reload;
pub mod resp;
pub mod server;
pub(crate) mod session;
pub mod telemetry;
pub mod tls;
pub mod upstream;
