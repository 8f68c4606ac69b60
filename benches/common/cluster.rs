//! A Redis Cluster for the benches (`cluster`, and `storm` with `STORMWALL_BENCH_CLUSTER=1`):
//! the test harness's own [`Cluster`] (`tests/common/cluster.rs`, compiled in here rather than
//! copied: `redis-server --cluster-enabled yes` processes on free loopback ports joined by
//! `redis-cli --cluster create`, waited for until every node agrees, stopped by pid when
//! dropped), plus what a bench needs around it: where each slot's master listens, the masters'
//! pids (for their CPU time), and stormwall's `[upstream]` for the cluster.

#[path = "../../tests/common/mod.rs"]
mod harness;

pub use harness::cluster::Cluster;

use stormwall::cluster::slot::{SLOTS, key_slot};

/// Masters of a bench cluster. No replicas: on a 2-core machine they would only add the
/// replication of every write to both paths alike, and nothing reads from them.
pub const MASTERS: usize = 3;

/// A cluster of [`MASTERS`] masters, every slot assigned and agreed on.
pub fn start() -> Cluster {
    let cluster = Cluster::start(MASTERS, 0);
    println!(
        "cluster of {MASTERS} masters ({}) up in {:.1} s",
        cluster.seeds().join(", "),
        cluster.started_in.as_secs_f64()
    );
    cluster
}

/// Where a key goes, as a cluster-aware client routes it: the masters' ports, and for each
/// of the 16,384 slots the index of its master among them.
#[derive(Clone, Debug)]
pub struct SlotMap {
    pub ports: Vec<u16>,
    owner: Vec<u8>,
}

impl SlotMap {
    /// The cluster's map as `CLUSTER SLOTS` gives it now.
    pub fn of(cluster: &Cluster) -> SlotMap {
        let ports: Vec<u16> = cluster.masters().iter().map(|m| m.port).collect();
        let mut owner = vec![u8::MAX; SLOTS];
        for range in cluster.slots() {
            let i = ports.iter().position(|&p| p == range.master_port).unwrap();
            owner[usize::from(range.start)..=usize::from(range.end)].fill(i as u8);
        }
        assert!(!owner.contains(&u8::MAX), "a slot without a master");
        SlotMap { ports, owner }
    }

    /// The index (into [`SlotMap::ports`]) of the master serving `key`.
    pub fn master_of(&self, key: &[u8]) -> usize {
        usize::from(self.owner[usize::from(key_slot(key))])
    }
}

/// The pids of the cluster's masters.
pub fn master_pids(cluster: &Cluster) -> Vec<u32> {
    cluster.masters().iter().map(|m| m.pid()).collect()
}

/// stormwall's config in front of `cluster` (every node a seed), everything else at its
/// defaults.
pub fn stormwall_config(cluster: &Cluster) -> String {
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[upstream]\nkind = \"cluster\"\nseeds = [{}]\nmode = \"shared\"\n",
        seeds.join(", ")
    )
}
