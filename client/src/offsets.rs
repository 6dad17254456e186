//! Consumers' committed offsets, kept by the group coordinator (see
//! [`crate::groups`]) as records of the internal [`OFFSETS_TOPIC`] (one
//! partition per group, by key hash), and the [`Consumer`] calls that use
//! them. The coordinator holds its partitions' offsets in memory, so a read
//! does not replay the partition.

use std::collections::BTreeMap;

use crate::error::ClientResult;
use crate::{Client, Consumer};

/// The internal topic holding consumers' committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Partitions of the offsets topic (a group's commits all go to one).
pub const OFFSETS_PARTITIONS: u32 = 8;

impl Client {
    /// Stores `group`'s next offsets for `topic` partitions, from outside
    /// group management (refused while the group has members: they own its
    /// offsets).
    pub async fn commit_offsets(&self, group: &str, topic: &str, offsets: &BTreeMap<u32, u64>) -> ClientResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let offsets = offsets.iter().map(|(p, o)| (topic.to_string(), *p, *o)).collect();
        self.commit_group_offsets(group, -1, "", offsets).await
    }

    /// `group`'s committed offsets for `topic`, by partition.
    pub async fn committed_offsets(&self, group: &str, topic: &str) -> ClientResult<BTreeMap<u32, u64>> {
        let offsets = self.group_offsets(group, Some(topic)).await?;
        Ok(offsets.into_iter().map(|((_, p), o)| (p, o)).collect())
    }
}

impl Consumer {
    /// Stores this consumer's positions in the cluster under `name`.
    pub async fn commit(&self, name: &str) -> ClientResult<()> {
        self.client.commit_offsets(name, &self.topic, &self.positions).await
    }

    /// Moves assigned partitions to the positions committed under `name`;
    /// returns how many partitions had a committed position.
    pub async fn resume(&mut self, name: &str) -> ClientResult<usize> {
        let committed = self.client.committed_offsets(name, &self.topic).await?;
        let mut resumed = 0;
        for (partition, position) in self.positions.iter_mut() {
            if let Some(&offset) = committed.get(partition) {
                *position = offset;
                resumed += 1;
            }
        }
        Ok(resumed)
    }

    /// The assigned partitions and their positions.
    pub fn positions(&self) -> &BTreeMap<u32, u64> {
        &self.positions
    }

    /// Stops reading `partition`.
    pub fn unassign(&mut self, partition: u32) {
        self.positions.remove(&partition);
    }
}
