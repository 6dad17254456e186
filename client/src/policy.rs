//! The one place that says what a failed request means: whether it was
//! certainly not applied (safe to send again), may have been applied (the
//! outcome is unknown), or is a final answer. Plain functions, free of I/O
//! and of any runtime, so that the real [`Client`](crate::Client) and a
//! deterministic simulation of producers decide alike.
//!
//! Routing retries a request while it is [`Outcome::Retry`]; an
//! [`Outcome::Unknown`] attempt is retried only if the request is
//! [`retry_safe`] (not a produce, or a produce whose producer id lets the
//! leader recognise a batch it already wrote).

use runnel_cluster::ClusterError;

use crate::error::ClientError;
use crate::protocol::{BrokerError, ClientRequest, ClientResponse, NodeId};

/// What a failure says about the request that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request certainly was not applied: send it again (to another
    /// node, or later).
    Retry,
    /// The request may or may not have been applied (a batch may be
    /// written): only a [`retry_safe`] request may be sent again.
    Unknown,
    /// A final answer: report it.
    Final,
}

/// How a broker's refusal or failure classifies.
pub fn classify(error: &BrokerError) -> Outcome {
    match error {
        // Routing or load: the node did not take the request in.
        BrokerError::NotLeader { .. }
        | BrokerError::UnknownGroup(_)
        | BrokerError::Busy(_)
        | BrokerError::NotYetCommitted(_)
        | BrokerError::MetadataBehind(_) => Outcome::Retry,
        // The replica took the request in and then gave no answer. A batch
        // whose leader lost its term may still be committed by a later
        // leader that holds it (Raft commits an earlier term's entry along
        // with its own), so it is unknown too, not certainly lost.
        BrokerError::Timeout(_) | BrokerError::ReplicaFailed { .. } | BrokerError::LeadershipLost => Outcome::Unknown,
        // Written and committed, on fewer replicas than asked: a caller
        // must not take it for not written.
        BrokerError::NotEnoughReplicasAfterAppend { .. } => Outcome::Unknown,
        BrokerError::BatchTooLarge { .. }
        | BrokerError::OffsetOutOfRange { .. }
        | BrokerError::InvalidRequest(_)
        | BrokerError::OutOfOrderSequence { .. }
        | BrokerError::StaleSequence { .. }
        | BrokerError::SequenceMismatch { .. }
        | BrokerError::ProducerFenced { .. }
        // Nothing was written; replicas may return, but not within one
        // request: say so now.
        | BrokerError::NotEnoughReplicas { .. } => Outcome::Final,
    }
}

/// How a client error classifies, whether one attempt's or a call's result.
///
/// A transport error other than `NoAnswer` (no connection, a refusal by the
/// node's gateway) or an undecodable answer counts as not applied: routing
/// has always tried the next node on those.
pub fn classify_client(error: &ClientError) -> Outcome {
    match error {
        ClientError::Cluster(ClusterError::NoAnswer { .. }) => Outcome::Unknown,
        ClientError::Cluster(_) | ClientError::Protocol(_) => Outcome::Retry,
        ClientError::Broker(e) => classify(e),
        // Routing gave up; one of its attempts may have been applied (its
        // text says), so a caller must not assume otherwise.
        ClientError::Unavailable { .. } => Outcome::Unknown,
        // A read: asking again changes nothing.
        ClientError::State(e) if e.is_retryable() => Outcome::Retry,
        ClientError::State(_)
        | ClientError::Storage(_)
        | ClientError::Refused(_)
        | ClientError::UnknownTopic(_)
        | ClientError::PartitionOutOfRange { .. }
        | ClientError::RecordTooLarge { .. }
        | ClientError::Group { .. } => Outcome::Final,
    }
}

/// How a node's answer to a routed request classifies: `None` when it is
/// the answer the request wanted.
pub fn classify_response(response: &ClientResponse) -> Option<Outcome> {
    match response {
        ClientResponse::Failed(e) => Some(classify(e)),
        // The node has no replica, or its metadata lags the client's.
        ClientResponse::NotHere { .. } | ClientResponse::UnknownTopic(_) => Some(Outcome::Retry),
        ClientResponse::PartitionOutOfRange { .. } => Some(Outcome::Final),
        _ => None,
    }
}

/// Whether connecting (the first metadata request), or a read any node
/// may answer (the SQL catalog, the dataflows), tries the seeds again
/// after `error`: a node still starting, or too busy to finish a handshake
/// in time, is waited for, as a Kafka client keeps trying its bootstrap
/// servers. A handshake either side refuses (a certificate of another
/// cluster), a certificate directory that cannot be read, or a bad
/// configuration is final.
pub fn retry_bootstrap(error: &ClientError) -> bool {
    match error {
        ClientError::Cluster(ClusterError::Unreachable { last_error, .. }) => {
            !runnel_cluster::quic::is_handshake_refusal(last_error)
        }
        ClientError::Cluster(ClusterError::NoAnswer { .. }) => true,
        _ => false,
    }
}

/// Whether a failed request with this outcome may be sent again.
pub fn may_retry(outcome: Outcome, retry_safe: bool) -> bool {
    match outcome {
        Outcome::Retry => true,
        Outcome::Unknown => retry_safe,
        Outcome::Final => false,
    }
}

/// Whether a client error leaves it open if the request was applied.
pub fn is_unknown_outcome(error: &ClientError) -> bool {
    classify_client(error) == Outcome::Unknown
}

/// Whether a request may be sent again after an unknown outcome: anything
/// but a produce, and a produce whose batch carries a producer id (the
/// leader then writes a batch it already has only once).
pub fn retry_safe(request: &ClientRequest) -> bool {
    match request {
        ClientRequest::Produce { batch, .. } => has_producer_id(batch),
        _ => true,
    }
}

/// Whether an encoded batch carries a producer id.
pub fn has_producer_id(batch: &[u8]) -> bool {
    runnel_storage::BatchHeader::parse(batch).is_ok_and(|h| h.producer.producer_id >= 0)
}

/// The node a `NotLeader` refusal names as the leader, if any.
pub fn leader_hint(error: &BrokerError) -> Option<NodeId> {
    match error {
        BrokerError::NotLeader { leader, .. } => *leader,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use runnel_storage::{BatchBuilder, ProducerInfo, Record};

    use super::*;
    use crate::protocol::{Acks, GroupId, MetadataError};

    #[test]
    fn broker_errors_classify() {
        let retry = [
            BrokerError::NotLeader {
                group: GroupId(1),
                leader: Some(NodeId(2)),
            },
            BrokerError::UnknownGroup(GroupId(1)),
            BrokerError::Busy(GroupId(1)),
            BrokerError::NotYetCommitted(GroupId(1)),
        ];
        let unknown = [
            BrokerError::Timeout(GroupId(1)),
            BrokerError::LeadershipLost,
            BrokerError::ReplicaFailed {
                group: GroupId(1),
                reason: "panic".into(),
            },
        ];
        let last = [
            BrokerError::BatchTooLarge {
                size_bytes: 2,
                limit_bytes: 1,
            },
            BrokerError::OffsetOutOfRange {
                offset: 9,
                start: 0,
                end: 3,
            },
            BrokerError::InvalidRequest("bad".into()),
            BrokerError::OutOfOrderSequence {
                producer_id: 1,
                expected: 0,
                got: 5,
            },
            BrokerError::StaleSequence {
                producer_id: 1,
                last_sequence: 5,
                got: 0,
            },
            BrokerError::SequenceMismatch {
                producer_id: 1,
                base_sequence: 0,
                stored_last_sequence: 3,
            },
        ];
        for (errors, outcome) in [
            (&retry[..], Outcome::Retry),
            (&unknown[..], Outcome::Unknown),
            (&last[..], Outcome::Final),
        ] {
            for error in errors {
                assert_eq!(classify(error), outcome, "{error:?}");
                assert_eq!(
                    classify_client(&ClientError::Broker(error.clone())),
                    outcome,
                    "{error:?}"
                );
            }
        }
    }

    fn no_answer() -> ClientError {
        ClientError::Cluster(ClusterError::NoAnswer {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            reason: "timed out".into(),
        })
    }

    #[test]
    fn unknown_outcomes_are_exactly_no_answer_unavailable_timeout_and_replica_failure() {
        let unavailable = ClientError::Unavailable {
            topic: "t".into(),
            partition: 0,
            timeout_ms: 1,
            last_error: "none".into(),
        };
        assert!(is_unknown_outcome(&no_answer()));
        assert!(is_unknown_outcome(&unavailable));
        assert!(is_unknown_outcome(&ClientError::Broker(BrokerError::Timeout(GroupId(
            1
        )))));
        assert!(is_unknown_outcome(&ClientError::Broker(BrokerError::LeadershipLost)));
        let unreachable = ClientError::Cluster(ClusterError::Unreachable {
            addrs: Vec::new(),
            last_error: "refused".into(),
        });
        for known in [
            unreachable,
            ClientError::Protocol("garbage".into()),
            ClientError::Broker(BrokerError::Busy(GroupId(1))),
            ClientError::Refused(MetadataError::NoLiveNodes),
            ClientError::UnknownTopic("t".into()),
        ] {
            assert!(!is_unknown_outcome(&known), "{known:?}");
        }
    }

    #[test]
    fn connecting_waits_for_slow_nodes_but_not_for_a_refused_certificate() {
        let unreachable = |last_error: &str| {
            ClientError::Cluster(ClusterError::Unreachable {
                addrs: Vec::new(),
                last_error: last_error.into(),
            })
        };
        assert!(retry_bootstrap(&unreachable("127.0.0.1:9: timed out")));
        assert!(retry_bootstrap(&no_answer()));
        let foreign = "127.0.0.1:9: invalid peer certificate: UnknownIssuer";
        assert!(!retry_bootstrap(&unreachable(foreign)));
        assert!(!retry_bootstrap(&unreachable("the peer sent alert UnknownCA")));
        let expired = "closed by peer: the cryptographic handshake failed: error 45";
        assert!(!retry_bootstrap(&unreachable(expired)));
        let tls = ClientError::Cluster(ClusterError::Tls("no client.pem".into()));
        assert!(!retry_bootstrap(&tls));
        assert!(!retry_bootstrap(&ClientError::UnknownTopic("t".into())));
    }

    #[test]
    fn responses_classify() {
        assert_eq!(classify_response(&ClientResponse::Produced { base_offset: 3 }), None);
        assert_eq!(classify_response(&ClientResponse::Done), None);
        let not_here = ClientResponse::NotHere {
            replicas: vec![NodeId(1)],
        };
        assert_eq!(classify_response(&not_here), Some(Outcome::Retry));
        assert_eq!(
            classify_response(&ClientResponse::UnknownTopic("t".into())),
            Some(Outcome::Retry)
        );
        let out_of_range = ClientResponse::PartitionOutOfRange {
            topic: "t".into(),
            partition: 4,
            partitions: 2,
        };
        assert_eq!(classify_response(&out_of_range), Some(Outcome::Final));
        let timeout = ClientResponse::Failed(BrokerError::Timeout(GroupId(1)));
        assert_eq!(classify_response(&timeout), Some(Outcome::Unknown));
    }

    #[test]
    fn unknown_outcomes_are_retried_only_when_safe() {
        assert!(may_retry(Outcome::Retry, false));
        assert!(may_retry(Outcome::Unknown, true));
        assert!(!may_retry(Outcome::Unknown, false));
        assert!(!may_retry(Outcome::Final, true));
    }

    fn produce(producer_id: Option<i64>) -> ClientRequest {
        let mut builder = BatchBuilder::new();
        builder
            .push(&Record {
                timestamp_ms: 1,
                key: None,
                value: Some(bytes::Bytes::from_static(b"v")),
                headers: Vec::new(),
            })
            .expect("push");
        if let Some(producer_id) = producer_id {
            builder.set_producer(ProducerInfo {
                producer_id,
                producer_epoch: 0,
                base_sequence: 0,
            });
        }
        ClientRequest::Produce {
            topic: "t".into(),
            partition: 0,
            acks: Acks::All,
            batch: builder.build().expect("build").into_bytes(),
        }
    }

    #[test]
    fn only_produces_without_a_producer_id_are_unsafe_to_retry() {
        assert!(retry_safe(&ClientRequest::Metadata));
        assert!(retry_safe(&produce(Some(7))));
        assert!(!retry_safe(&produce(None)));
        let garbage = ClientRequest::Produce {
            topic: "t".into(),
            partition: 0,
            acks: Acks::All,
            batch: vec![1, 2, 3],
        };
        assert!(!retry_safe(&garbage));
    }

    #[test]
    fn not_leader_names_the_leader() {
        assert_eq!(
            leader_hint(&BrokerError::NotLeader {
                group: GroupId(1),
                leader: Some(NodeId(3))
            }),
            Some(NodeId(3))
        );
        assert_eq!(
            leader_hint(&BrokerError::NotLeader {
                group: GroupId(1),
                leader: None
            }),
            None
        );
        assert_eq!(leader_hint(&BrokerError::Busy(GroupId(1))), None);
    }
}
