//! A Redis Cluster upstream (`upstream.kind = "cluster"`).
//!
//! A cluster splits the keyspace into 16384 hash slots, each served by one master (and
//! copied to its replicas). A client that is not cluster-aware — the apps stormwall sits in
//! front of — sends every command to one address, so stormwall has to do what a cluster
//! client does: find which keys a command names, which slot they hash to, and which node
//! serves that slot now. Each of those is one module here:
//!
//! * [`slot`]: the hash slot of a key, exactly as Redis computes it (CRC16, hash tags);
//! * [`keys`]: which arguments of a command are keys, read from Redis's own command table
//!   (`COMMAND`: key specifications) rather than a hand-written list;
//! * [`topology`]: which master serves each slot (`CLUSTER SHARDS`, or `CLUSTER SLOTS`),
//!   asked of the seed nodes in turn;
//! * [`router`]: the slot map sessions route by, kept current, and a pool of shared
//!   connections per master;
//! * [`route`]: where one command goes (a slot's master, any master, every master, or
//!   split by slot) — a pure function, unit-tested without sockets;
//! * [`redirect`]: the replies (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`) that say a
//!   command did not run and where to send it instead;
//! * [`merge`]: how the replies of a command sent to several masters become the one reply
//!   a client of a single Redis expects.
//!
//! The session (`crate::session::cluster`) puts them together per client.

pub mod keys;
pub mod merge;
pub mod redirect;
pub mod route;
pub mod router;
pub mod slot;
pub mod topology;
