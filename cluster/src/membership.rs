//! Membership and failure detection as a pure state machine: no sockets, no
//! clocks. The caller passes the time (`now_ms`, any monotonic millisecond
//! clock) and carries out what it returns, so the QUIC node and the simulated
//! network drive the same code.
//!
//! Every node heartbeats every member it knows (and every seed address not yet
//! matched to a member) each `heartbeat_interval_ms`; heartbeats gossip the
//! members the sender knows, so a node that joins through one seed learns the
//! rest. A member not heard from for `suspect_after_ms` is suspect, for
//! `dead_after_ms` dead. Dead members still get heartbeats, so a healed
//! partition or a restarted node is seen again. A restart is told apart from
//! stale traffic by a higher incarnation.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::error::{ClusterError, Result};
use crate::protocol::{MemberDigest, MemberStatus, PeerFrame};
use crate::NodeId;

/// The most members a node tracks; gossip about more is ignored.
pub const MEMBERS_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    pub heartbeat_interval_ms: u64,
    pub suspect_after_ms: u64,
    pub dead_after_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            heartbeat_interval_ms: 200,
            suspect_after_ms: 600,
            dead_after_ms: 1500,
        }
    }
}

impl MembershipConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.heartbeat_interval_ms > 0
            && self.suspect_after_ms > self.heartbeat_interval_ms
            && self.dead_after_ms >= self.suspect_after_ms;
        if ok {
            Ok(())
        } else {
            Err(ClusterError::InvalidConfig(format!(
                "need 0 < heartbeat ({}) < suspect ({}) <= dead ({}) milliseconds",
                self.heartbeat_interval_ms, self.suspect_after_ms, self.dead_after_ms
            )))
        }
    }
}

/// What layers above hear about other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    NodeUp {
        node: NodeId,
        incarnation: u64,
        addr: SocketAddr,
    },
    NodeDown {
        node: NodeId,
        incarnation: u64,
    },
}

#[derive(Clone, Debug)]
struct Member {
    addr: SocketAddr,
    incarnation: u64,
    state: MemberState,
    last_heard_ms: u64,
    /// When the current state began (caller's clock).
    since_ms: u64,
    /// Whether NodeUp was announced for this incarnation (gossip-only members
    /// are not announced until heard from directly).
    announced: bool,
}

/// What a tick asks the caller to do.
#[derive(Debug, Default)]
pub struct TickOutput {
    pub events: Vec<MembershipEvent>,
    /// Addresses to send a heartbeat to now.
    pub heartbeat_to: Vec<SocketAddr>,
}

pub struct Membership {
    me: NodeId,
    incarnation: u64,
    addr: SocketAddr,
    config: MembershipConfig,
    members: BTreeMap<NodeId, Member>,
    seeds: Vec<SocketAddr>,
    next_heartbeat_ms: u64,
}

impl Membership {
    pub fn new(
        me: NodeId,
        incarnation: u64,
        addr: SocketAddr,
        seeds: Vec<SocketAddr>,
        config: MembershipConfig,
    ) -> Membership {
        Membership {
            me,
            incarnation,
            addr,
            config,
            members: BTreeMap::new(),
            seeds,
            next_heartbeat_ms: 0,
        }
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    pub fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        if node == self.me {
            return Some(self.addr);
        }
        self.members.get(&node).map(|m| m.addr)
    }

    pub fn state_of(&self, node: NodeId) -> Option<MemberState> {
        if node == self.me {
            return Some(MemberState::Alive);
        }
        self.members.get(&node).map(|m| m.state)
    }

    /// The heartbeat this node sends, gossiping every member it knows.
    pub fn heartbeat(&self) -> PeerFrame {
        let members = self
            .members
            .iter()
            .map(|(&node, m)| MemberDigest {
                node,
                addr: m.addr,
                incarnation: m.incarnation,
            })
            .collect();
        PeerFrame::Heartbeat {
            incarnation: self.incarnation,
            addr: self.addr,
            members,
        }
    }

    /// A heartbeat arrived from `from` (whose identity the transport vouches for).
    pub fn on_heartbeat(
        &mut self,
        now_ms: u64,
        from: NodeId,
        incarnation: u64,
        addr: SocketAddr,
        gossip: &[MemberDigest],
    ) -> Vec<MembershipEvent> {
        let mut events = Vec::new();
        if from != self.me {
            self.heard_from(now_ms, from, incarnation, addr, &mut events);
        }
        for digest in gossip {
            self.learn(now_ms, digest);
        }
        events
    }

    fn heard_from(
        &mut self,
        now_ms: u64,
        from: NodeId,
        incarnation: u64,
        addr: SocketAddr,
        events: &mut Vec<MembershipEvent>,
    ) {
        if !self.members.contains_key(&from) && self.members.len() >= MEMBERS_MAX {
            return;
        }
        let member = self.members.entry(from).or_insert(Member {
            addr,
            incarnation,
            state: MemberState::Suspect,
            last_heard_ms: now_ms,
            since_ms: now_ms,
            announced: false,
        });
        if incarnation < member.incarnation {
            return; // stale traffic from before a restart
        }
        if incarnation > member.incarnation {
            if member.announced {
                events.push(MembershipEvent::NodeDown {
                    node: from,
                    incarnation: member.incarnation,
                });
            }
            member.incarnation = incarnation;
            member.announced = false;
        }
        member.addr = addr;
        member.last_heard_ms = now_ms;
        if member.state != MemberState::Alive {
            member.state = MemberState::Alive;
            member.since_ms = now_ms;
        }
        if !member.announced {
            member.announced = true;
            events.push(MembershipEvent::NodeUp {
                node: from,
                incarnation,
                addr,
            });
        }
    }

    /// Gossip only introduces nodes; their liveness comes from direct contact.
    fn learn(&mut self, now_ms: u64, digest: &MemberDigest) {
        if digest.node == self.me || self.members.len() >= MEMBERS_MAX {
            return;
        }
        self.members.entry(digest.node).or_insert(Member {
            addr: digest.addr,
            incarnation: digest.incarnation,
            state: MemberState::Suspect,
            last_heard_ms: now_ms,
            since_ms: now_ms,
            announced: false,
        });
    }

    /// Advances timers: marks silent members suspect or dead and says whom to
    /// heartbeat.
    pub fn tick(&mut self, now_ms: u64) -> TickOutput {
        let mut out = TickOutput::default();
        for (&node, member) in self.members.iter_mut() {
            let silent_ms = now_ms.saturating_sub(member.last_heard_ms);
            if member.state != MemberState::Dead && silent_ms >= self.config.dead_after_ms {
                member.state = MemberState::Dead;
                member.since_ms = now_ms;
                if member.announced {
                    out.events.push(MembershipEvent::NodeDown {
                        node,
                        incarnation: member.incarnation,
                    });
                }
                // Heard from again, it is announced up again.
                member.announced = false;
            } else if member.state == MemberState::Alive && silent_ms >= self.config.suspect_after_ms {
                member.state = MemberState::Suspect;
                member.since_ms = now_ms;
            }
        }
        if now_ms >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now_ms + self.config.heartbeat_interval_ms;
            out.heartbeat_to = self.members.values().map(|m| m.addr).collect();
            for seed in &self.seeds {
                if *seed != self.addr && !out.heartbeat_to.contains(seed) {
                    out.heartbeat_to.push(*seed);
                }
            }
        }
        out
    }

    /// Every member including this node, for `runnel status`.
    pub fn status(&self, now_ms: u64, to_unix_ms: impl Fn(u64) -> u64) -> Vec<MemberStatus> {
        let mut out = vec![MemberStatus {
            node: self.me,
            addr: self.addr,
            state: MemberState::Alive,
            incarnation: self.incarnation,
            since_unix_ms: to_unix_ms(0),
        }];
        out.extend(self.members.iter().map(|(&node, m)| MemberStatus {
            node,
            addr: m.addr,
            state: m.state,
            incarnation: m.incarnation,
            since_unix_ms: to_unix_ms(m.since_ms.min(now_ms)),
        }));
        out.sort_by_key(|m| m.node);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 7100))
    }

    fn heartbeat_from(m: &mut Membership, now: u64, node: u32, incarnation: u64) -> Vec<MembershipEvent> {
        m.on_heartbeat(now, NodeId(node), incarnation, addr(node as u8), &[])
    }

    #[test]
    fn alive_suspect_dead_and_back() {
        let mut m = Membership::new(NodeId(1), 1, addr(1), vec![addr(2)], MembershipConfig::default());
        assert_eq!(
            m.tick(0).heartbeat_to,
            vec![addr(2)],
            "seeds get heartbeats before they are known"
        );
        let events = heartbeat_from(&mut m, 10, 2, 5);
        assert_eq!(
            events,
            vec![MembershipEvent::NodeUp {
                node: NodeId(2),
                incarnation: 5,
                addr: addr(2)
            }]
        );
        assert!(m.tick(500).events.is_empty());
        assert_eq!(m.state_of(NodeId(2)), Some(MemberState::Alive));
        m.tick(700);
        assert_eq!(m.state_of(NodeId(2)), Some(MemberState::Suspect));
        let out = m.tick(1600);
        assert_eq!(
            out.events,
            vec![MembershipEvent::NodeDown {
                node: NodeId(2),
                incarnation: 5
            }]
        );
        assert_eq!(m.state_of(NodeId(2)), Some(MemberState::Dead));
        assert_eq!(
            m.tick(1800).heartbeat_to,
            vec![addr(2)],
            "dead members still get heartbeats"
        );
        let events = heartbeat_from(&mut m, 1900, 2, 5);
        assert_eq!(events.len(), 1, "a dead member heard again is up again");
    }

    #[test]
    fn restart_with_new_incarnation_and_stale_traffic() {
        let mut m = Membership::new(NodeId(1), 1, addr(1), vec![], MembershipConfig::default());
        heartbeat_from(&mut m, 0, 2, 5);
        let events = heartbeat_from(&mut m, 100, 2, 6);
        assert_eq!(
            events,
            vec![
                MembershipEvent::NodeDown {
                    node: NodeId(2),
                    incarnation: 5
                },
                MembershipEvent::NodeUp {
                    node: NodeId(2),
                    incarnation: 6,
                    addr: addr(2)
                },
            ]
        );
        assert!(
            heartbeat_from(&mut m, 200, 2, 5).is_empty(),
            "older incarnation ignored"
        );
        m.tick(200 + 1500);
        assert_eq!(
            m.state_of(NodeId(2)),
            Some(MemberState::Dead),
            "stale traffic did not refresh it"
        );
    }

    #[test]
    fn gossip_introduces_nodes_without_declaring_them_up() {
        let mut m = Membership::new(NodeId(1), 1, addr(1), vec![], MembershipConfig::default());
        let gossip = [MemberDigest {
            node: NodeId(3),
            addr: addr(3),
            incarnation: 1,
        }];
        let events = m.on_heartbeat(0, NodeId(2), 1, addr(2), &gossip);
        assert_eq!(events.len(), 1);
        assert_eq!(m.state_of(NodeId(3)), Some(MemberState::Suspect));
        assert!(m.tick(0).heartbeat_to.contains(&addr(3)));
        assert!(m
            .tick(2000)
            .events
            .iter()
            .all(|e| !matches!(e, MembershipEvent::NodeDown { node: NodeId(3), .. })));
    }
}
