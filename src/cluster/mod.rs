//! The pieces a Redis Cluster upstream (`upstream.kind = "cluster"`) is built from.
//!
//! A cluster splits the keyspace into 16384 hash slots, each served by one master (and
//! copied to its replicas). A client that is not cluster-aware — the apps stormwall sits in
//! front of — sends every command to one address, so stormwall has to do what a cluster
//! client does: find which keys a command names, which slot they hash to, and which node
//! serves that slot now. Each of those is one module here, with no I/O beyond asking Redis:
//!
//! * [`slot`]: the hash slot of a key, exactly as Redis computes it (CRC16, hash tags);
//! * [`keys`]: which arguments of a command are keys, read from Redis's own command table
//!   (`COMMAND`: key specifications) rather than a hand-written list;
//! * [`topology`]: which master serves each slot (`CLUSTER SHARDS`, or `CLUSTER SLOTS`),
//!   asked of the seed nodes in turn.
//!
//! The session does not route by them yet: the configuration refuses `kind = "cluster"`
//! until it does.

pub mod keys;
pub mod slot;
pub mod topology;
