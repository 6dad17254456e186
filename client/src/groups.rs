//! Consumer groups from Runnel's client: requests routed to the group's
//! coordinator, the members' side of the group protocol ([`GroupMember`]),
//! and Kafka's "consumer" protocol encoding of subscriptions and
//! assignments, so Runnel consumers and Kafka consumers can share a group.
//!
//! A member offers the `range` protocol: the leader gives each member a
//! contiguous range of each subscribed topic's partitions (members sorted
//! by id, the first ones one more when the count does not divide), as
//! Kafka's RangeAssignor does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::error::{ClientError, ClientResult};
use crate::protocol::{
    ClientRequest, ClientResponse, GroupErrorKind, GroupInfo, GroupListing, GroupRequest, GroupResponse, NodeId,
};
use crate::Client;

/// Attempts to reach a group's coordinator before giving up.
const COORDINATOR_ATTEMPTS: u32 = 30;
const COORDINATOR_RETRY: Duration = Duration::from_millis(200);
/// A member's session timeout, and how often it heartbeats.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Rejoins one `ensure_member` call tries at most.
const REJOINS_MAX: u32 = 20;
/// Topics a subscription or assignment names at most, and partitions per
/// topic, when decoding one.
const TOPICS_MAX: usize = 10_000;
const PARTITIONS_MAX: usize = 100_000;
pub const PROTOCOL_TYPE: &str = "consumer";
pub const RANGE: &str = "range";

impl Client {
    /// A group request, sent to the group's coordinator (found again when
    /// it moved); a refusal comes back as `ClientError::Group`.
    pub async fn group_request(&self, group: &str, request: GroupRequest) -> ClientResult<GroupResponse> {
        let mut last = String::new();
        for _ in 0..COORDINATOR_ATTEMPTS {
            let coordinator = match self.find_coordinator(group).await {
                Ok(Some(node)) => node,
                Ok(None) => {
                    last = format!("group {group:?} has no coordinator yet");
                    tokio::time::sleep(COORDINATOR_RETRY).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let addr = match self.node_addr(coordinator) {
                Some(addr) => addr,
                None => {
                    self.topics().await?;
                    self.known_node(coordinator)?
                }
            };
            match self.call(Some(addr), &ClientRequest::Group(request.clone())).await {
                Ok(ClientResponse::Group(GroupResponse::Error {
                    kind: GroupErrorKind::NotCoordinator | GroupErrorKind::Unavailable,
                    message,
                })) => {
                    last = message;
                }
                Ok(ClientResponse::Group(GroupResponse::Error { kind, message })) => {
                    return Err(ClientError::Group { kind, message })
                }
                Ok(ClientResponse::Group(response)) => return Ok(response),
                Ok(other) => return Err(ClientError::Protocol(format!("{other:?}"))),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(COORDINATOR_RETRY).await;
        }
        Err(ClientError::Group {
            kind: GroupErrorKind::Unavailable,
            message: format!("group {group:?}: no coordinator answered ({last})"),
        })
    }

    /// The node coordinating `group`, as any node knows it.
    pub async fn find_coordinator(&self, group: &str) -> ClientResult<Option<NodeId>> {
        let request = ClientRequest::Group(GroupRequest::FindCoordinator {
            group: group.to_string(),
        });
        match self.call(None, &request).await? {
            ClientResponse::Group(GroupResponse::Coordinator(node)) => Ok(node),
            ClientResponse::Group(GroupResponse::Error { .. }) => Ok(None),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Every group, from every live node's coordinator.
    pub async fn list_groups(&self) -> ClientResult<Vec<GroupListing>> {
        self.topics().await?;
        let mut groups = Vec::new();
        for node in self.alive_nodes() {
            let addr = self.known_node(node)?;
            match self.call(Some(addr), &ClientRequest::Group(GroupRequest::List)).await? {
                ClientResponse::Group(GroupResponse::Groups(listed)) => groups.extend(listed),
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            }
        }
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(groups)
    }

    pub async fn describe_group(&self, group: &str) -> ClientResult<GroupInfo> {
        let request = GroupRequest::Describe {
            group: group.to_string(),
        };
        match self.group_request(group, request).await? {
            GroupResponse::Description(info) => Ok(info),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// `group`'s committed offsets by (topic, partition): of `topic`, or of
    /// every topic.
    pub async fn group_offsets(&self, group: &str, topic: Option<&str>) -> ClientResult<BTreeMap<(String, u32), u64>> {
        let request = GroupRequest::Offsets {
            group: group.to_string(),
            topic: topic.map(String::from),
        };
        match self.group_request(group, request).await? {
            GroupResponse::Offsets(offsets) => {
                Ok(offsets.into_iter().filter_map(|(t, p, o)| Some(((t, p), o?))).collect())
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Commits next offsets for `group`: as a member of `generation`, or
    /// (generation -1) from outside group management, which the
    /// coordinator allows while the group has no members.
    pub async fn commit_group_offsets(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        offsets: Vec<(String, u32, u64)>,
    ) -> ClientResult<()> {
        let request = GroupRequest::Commit {
            group: group.to_string(),
            generation,
            member_id: member_id.to_string(),
            offsets,
        };
        self.group_request(group, request).await.map(drop)
    }

    /// Forgets a group without members and its committed offsets.
    pub async fn delete_group(&self, group: &str) -> ClientResult<()> {
        let request = GroupRequest::Delete {
            group: group.to_string(),
        };
        self.group_request(group, request).await.map(drop)
    }
}

/// One member of a consumer group, subscribed to one topic.
pub struct GroupMember {
    group: String,
    topic: String,
    member_id: String,
    generation: i32,
    /// The partitions of `topic` assigned to this member.
    pub assigned: Vec<u32>,
    last_heartbeat: Instant,
}

impl GroupMember {
    /// Joins `group` subscribed to `topic` and waits for an assignment.
    pub async fn join(client: &Client, group: &str, topic: &str) -> ClientResult<GroupMember> {
        let mut member = GroupMember {
            group: group.to_string(),
            topic: topic.to_string(),
            member_id: String::new(),
            generation: -1,
            assigned: Vec::new(),
            last_heartbeat: Instant::now(),
        };
        member.rejoin(client).await?;
        Ok(member)
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Heartbeats when one is due; rejoins when the group rebalances.
    /// Returns whether the assignment may have changed.
    pub async fn keep_alive(&mut self, client: &Client) -> ClientResult<bool> {
        if self.last_heartbeat.elapsed() < HEARTBEAT_INTERVAL {
            return Ok(false);
        }
        let request = GroupRequest::Heartbeat {
            group: self.group.clone(),
            generation: self.generation,
            member_id: self.member_id.clone(),
        };
        match client.group_request(&self.group, request).await {
            Ok(_) => {
                self.last_heartbeat = Instant::now();
                Ok(false)
            }
            Err(ClientError::Group { kind, .. }) if rejoin_on(kind) => {
                self.rejoin(client).await?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Commits next offsets of assigned partitions; `Ok(false)` when the
    /// group rebalanced first (the caller rejoins with `keep_alive`, and
    /// the records since the last commit will be read again by whoever
    /// owns their partitions).
    pub async fn commit(&mut self, client: &Client, positions: &BTreeMap<u32, u64>) -> ClientResult<bool> {
        let offsets = positions.iter().map(|(p, o)| (self.topic.clone(), *p, *o)).collect();
        match client
            .commit_group_offsets(&self.group, self.generation, &self.member_id, offsets)
            .await
        {
            Ok(()) => Ok(true),
            Err(ClientError::Group { kind, .. }) if rejoin_on(kind) => {
                self.last_heartbeat = Instant::now() - HEARTBEAT_INTERVAL;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Leaves the group, so the rest rebalance at once.
    pub async fn leave(self, client: &Client) -> ClientResult<()> {
        let request = GroupRequest::Leave {
            group: self.group.clone(),
            member_id: self.member_id,
        };
        client.group_request(&self.group, request).await.map(drop)
    }

    async fn rejoin(&mut self, client: &Client) -> ClientResult<()> {
        let mut last = None;
        for _ in 0..REJOINS_MAX {
            match self.join_once(client).await {
                Ok(()) => return Ok(()),
                Err(ClientError::Group { kind, message }) if rejoin_on(kind) => {
                    if kind != GroupErrorKind::RebalanceInProgress {
                        self.member_id.clear();
                    }
                    last = Some(ClientError::Group { kind, message });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Protocol("no join".into())))
    }

    async fn join_once(&mut self, client: &Client) -> ClientResult<()> {
        let join = GroupRequest::Join {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            client_id: "runnel".to_string(),
            protocol_type: PROTOCOL_TYPE.to_string(),
            protocols: vec![(RANGE.to_string(), encode_subscription(&[self.topic.as_str()]).into())],
            session_timeout_ms: SESSION_TIMEOUT.as_millis() as u64,
            rebalance_timeout_ms: SESSION_TIMEOUT.as_millis() as u64,
        };
        let GroupResponse::Joined {
            generation,
            leader,
            member_id,
            members,
            ..
        } = client.group_request(&self.group, join).await?
        else {
            return Err(ClientError::Protocol("a join answered without Joined".into()));
        };
        self.member_id = member_id;
        self.generation = generation;
        let assignments = match leader == self.member_id {
            true => self.assign(client, &members).await?,
            false => Vec::new(),
        };
        let sync = GroupRequest::Sync {
            group: self.group.clone(),
            generation,
            member_id: self.member_id.clone(),
            assignments,
        };
        let GroupResponse::Synced { assignment } = client.group_request(&self.group, sync).await? else {
            return Err(ClientError::Protocol("a sync answered without Synced".into()));
        };
        let assignment = decode_assignment(&assignment).map_err(ClientError::Protocol)?;
        self.assigned = assignment.get(&self.topic).cloned().unwrap_or_default();
        self.last_heartbeat = Instant::now();
        Ok(())
    }

    /// As the leader: every member's share, by the range protocol.
    async fn assign(
        &self,
        client: &Client,
        members: &[(String, serde_bytes::ByteBuf)],
    ) -> ClientResult<Vec<(String, serde_bytes::ByteBuf)>> {
        let topics = client.cached_topics(true).await?;
        let mut subscriptions = Vec::new();
        for (member, metadata) in members {
            let topics = decode_subscription(metadata).map_err(ClientError::Protocol)?;
            subscriptions.push((member.clone(), topics));
        }
        let partitions = |topic: &str| {
            topics
                .iter()
                .find(|t| t.name == topic)
                .map_or(0, |t| t.config.partitions)
        };
        let assigned = range_assign(&subscriptions, partitions);
        Ok(assigned
            .into_iter()
            .map(|(member, shares)| (member, encode_assignment(&shares).into()))
            .collect())
    }
}

/// Whether a refusal means "rejoin the group".
fn rejoin_on(kind: GroupErrorKind) -> bool {
    matches!(
        kind,
        GroupErrorKind::UnknownMember | GroupErrorKind::IllegalGeneration | GroupErrorKind::RebalanceInProgress
    )
}

/// Kafka's RangeAssignor: per topic, members subscribed to it (sorted by
/// id) get contiguous ranges, the first `partitions % members` one more.
pub fn range_assign(
    subscriptions: &[(String, Vec<String>)],
    partitions_of: impl Fn(&str) -> u32,
) -> BTreeMap<String, BTreeMap<String, Vec<u32>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
    let mut topics: Vec<&String> = subscriptions.iter().flat_map(|(_, t)| t).collect();
    topics.sort();
    topics.dedup();
    for (member, _) in subscriptions {
        out.entry(member.clone()).or_default();
    }
    for topic in topics {
        let mut members: Vec<&String> = subscriptions
            .iter()
            .filter(|(_, t)| t.contains(topic))
            .map(|(m, _)| m)
            .collect();
        members.sort();
        let (count, n) = (partitions_of(topic), members.len() as u32);
        let (each, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, member) in members.into_iter().enumerate() {
            let take = each + u32::from((i as u32) < extra);
            let share: Vec<u32> = (next..next + take).collect();
            next += take;
            out.entry(member.clone()).or_default().insert(topic.clone(), share);
        }
    }
    out
}

/// A subscription in Kafka's consumer protocol, version 0: the topics.
pub fn encode_subscription(topics: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&(topics.len() as i32).to_be_bytes());
    for topic in topics {
        put_string(&mut out, topic);
    }
    out.extend_from_slice(&(-1i32).to_be_bytes());
    out
}

/// The topics of a subscription in Kafka's consumer protocol (any version:
/// later versions only add fields after the topics).
pub fn decode_subscription(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut reader = Reader(bytes);
    reader.i16()?;
    let count = reader.count(TOPICS_MAX)?;
    (0..count).map(|_| reader.string()).collect()
}

/// An assignment in Kafka's consumer protocol, version 0.
pub fn encode_assignment(shares: &BTreeMap<String, Vec<u32>>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&(shares.len() as i32).to_be_bytes());
    for (topic, partitions) in shares {
        put_string(&mut out, topic);
        out.extend_from_slice(&(partitions.len() as i32).to_be_bytes());
        for p in partitions {
            out.extend_from_slice(&(*p as i32).to_be_bytes());
        }
    }
    out.extend_from_slice(&(-1i32).to_be_bytes());
    out
}

/// The partitions by topic of an assignment in Kafka's consumer protocol.
pub fn decode_assignment(bytes: &[u8]) -> Result<BTreeMap<String, Vec<u32>>, String> {
    if bytes.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut reader = Reader(bytes);
    reader.i16()?;
    let topics = reader.count(TOPICS_MAX)?;
    let mut out = BTreeMap::new();
    for _ in 0..topics {
        let topic = reader.string()?;
        let count = reader.count(PARTITIONS_MAX)?;
        let partitions = (0..count)
            .map(|_| {
                reader
                    .i32()
                    .and_then(|p| u32::try_from(p).map_err(|_| format!("partition {p}")))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        out.insert(topic, partitions);
    }
    Ok(out)
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as i16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Big-endian reads with bounds, naming what is missing.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "consumer protocol data cut short: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn count(&mut self, max: usize) -> Result<usize, String> {
        let n = self.i32()?;
        match usize::try_from(n) {
            Ok(n) if n <= max && n <= self.0.len() => Ok(n),
            _ => Err(format!("consumer protocol count {n} is out of range")),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let len = usize::try_from(self.i16()?).map_err(|_| "a null string".to_string())?;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "a string that is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_assignment_gives_contiguous_ranges_the_first_members_one_more() {
        let subs = vec![
            ("b".to_string(), vec!["t".to_string()]),
            ("a".to_string(), vec!["t".to_string(), "u".to_string()]),
            ("c".to_string(), vec!["t".to_string()]),
        ];
        let assigned = range_assign(&subs, |t| if t == "t" { 7 } else { 2 });
        assert_eq!(assigned["a"]["t"], vec![0, 1, 2]);
        assert_eq!(assigned["b"]["t"], vec![3, 4]);
        assert_eq!(assigned["c"]["t"], vec![5, 6]);
        assert_eq!(assigned["a"]["u"], vec![0, 1]);
        assert!(!assigned["b"].contains_key("u"));
    }

    #[test]
    fn subscriptions_and_assignments_round_trip_in_kafkas_format_and_garbage_is_refused() {
        let encoded = encode_subscription(&["orders", "payments"]);
        assert_eq!(
            decode_subscription(&encoded).expect("decodes"),
            vec!["orders", "payments"]
        );
        let shares = BTreeMap::from([("orders".to_string(), vec![0, 2])]);
        assert_eq!(decode_assignment(&encode_assignment(&shares)).expect("decodes"), shares);
        // Kafka's own bytes for a v0 assignment of orders [1].
        let kafka = b"\x00\x00\x00\x00\x00\x01\x00\x06orders\x00\x00\x00\x01\x00\x00\x00\x01\xff\xff\xff\xff";
        assert_eq!(decode_assignment(kafka).expect("decodes")["orders"], vec![1]);
        assert!(decode_assignment(b"\x00\x00\x7f\xff\xff\xff").is_err());
        assert!(decode_subscription(b"\x00").is_err());
    }
}
