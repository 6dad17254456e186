//! Runnel's errors as Kafka error codes, with the message Kafka responses
//! that have a message field carry.

use kafka_protocol::ResponseError;
use runnel_actors::controller::{GroupFailure, ServiceError};
use runnel_actors::groups::core::GroupError;
use runnel_actors::metadata::MetadataError;
use runnel_actors::BrokerError;

/// A Kafka error: its code and a message that names the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaError {
    pub code: ResponseError,
    pub message: String,
}

impl KafkaError {
    pub fn new(code: ResponseError, message: impl Into<String>) -> KafkaError {
        KafkaError {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> i16 {
        self.code.code()
    }
}

impl From<ServiceError> for KafkaError {
    fn from(error: ServiceError) -> KafkaError {
        let message = error.to_string();
        let code = match &error {
            ServiceError::UnknownTopic(_) | ServiceError::PartitionOutOfRange { .. } => {
                ResponseError::UnknownTopicOrPartition
            }
            ServiceError::NotHere { .. } => ResponseError::NotLeaderOrFollower,
            ServiceError::Refused(e) => metadata_code(e),
            ServiceError::Failed(e) => broker_code(e),
        };
        KafkaError { code, message }
    }
}

impl From<GroupFailure> for KafkaError {
    fn from(failure: GroupFailure) -> KafkaError {
        let message = failure.to_string();
        let code = match failure {
            GroupFailure::NotCoordinator(_) => ResponseError::NotCoordinator,
            GroupFailure::Group(e) => group_code(e),
            GroupFailure::Service(e) => return KafkaError::from(e),
        };
        KafkaError { code, message }
    }
}

fn group_code(error: GroupError) -> ResponseError {
    match error {
        GroupError::UnknownMemberId => ResponseError::UnknownMemberId,
        GroupError::IllegalGeneration => ResponseError::IllegalGeneration,
        GroupError::RebalanceInProgress => ResponseError::RebalanceInProgress,
        GroupError::InconsistentGroupProtocol => ResponseError::InconsistentGroupProtocol,
        GroupError::InvalidSessionTimeout => ResponseError::InvalidSessionTimeout,
        GroupError::GroupMaxSizeReached => ResponseError::GroupMaxSizeReached,
        GroupError::NonEmptyGroup => ResponseError::NonEmptyGroup,
        GroupError::FencedInstanceId => ResponseError::FencedInstanceId,
        GroupError::GroupIdNotFound => ResponseError::GroupIdNotFound,
        GroupError::TooManyGroups | GroupError::Invalid(_) => ResponseError::InvalidRequest,
    }
}

/// The code of a group request's outcome (0 for success).
pub fn group_result_code<T>(result: &Result<T, GroupFailure>) -> i16 {
    match result {
        Ok(_) => 0,
        Err(GroupFailure::NotCoordinator(_)) => ResponseError::NotCoordinator.code(),
        Err(GroupFailure::Group(e)) => group_code(*e).code(),
        Err(GroupFailure::Service(e)) => KafkaError::from(e.clone()).code(),
    }
}

fn broker_code(error: &BrokerError) -> ResponseError {
    match error {
        BrokerError::NotLeader { .. } | BrokerError::UnknownGroup(_) | BrokerError::LeadershipLost => {
            ResponseError::NotLeaderOrFollower
        }
        BrokerError::BatchTooLarge { .. } => ResponseError::MessageTooLarge,
        BrokerError::Busy(_) | BrokerError::Timeout(_) => ResponseError::RequestTimedOut,
        BrokerError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        BrokerError::ReplicaFailed { .. } => ResponseError::KafkaStorageError,
        BrokerError::InvalidRequest(_) => ResponseError::InvalidRequest,
        BrokerError::OutOfOrderSequence { .. } | BrokerError::SequenceMismatch { .. } => {
            ResponseError::OutOfOrderSequenceNumber
        }
        BrokerError::StaleSequence { .. } => ResponseError::DuplicateSequenceNumber,
        // Not a duplicate: a Java producer takes DUPLICATE_SEQUENCE_NUMBER
        // as written.
        BrokerError::ProducerFenced { .. } => ResponseError::InvalidProducerEpoch,
        BrokerError::NotYetCommitted(_) | BrokerError::NotEnoughReplicas { .. } => ResponseError::NotEnoughReplicas,
        BrokerError::NotEnoughReplicasAfterAppend { .. } => ResponseError::NotEnoughReplicasAfterAppend,
        // Retriable for Kafka clients, which ask for metadata again.
        BrokerError::MetadataBehind(_) => ResponseError::UnknownTopicOrPartition,
    }
}

fn metadata_code(error: &MetadataError) -> ResponseError {
    match error {
        MetadataError::InvalidName { .. } => ResponseError::InvalidTopicException,
        MetadataError::TopicExists(_) => ResponseError::TopicAlreadyExists,
        MetadataError::UnknownTopic(_) => ResponseError::UnknownTopicOrPartition,
        MetadataError::InvalidConfig(_) => ResponseError::InvalidConfig,
        MetadataError::NoLiveNodes | MetadataError::NotEnoughNodes { .. } => ResponseError::InvalidReplicationFactor,
        MetadataError::DataflowRunning(_)
        | MetadataError::UnknownDataflow(_)
        | MetadataError::UnregisteredDataflow(_)
        | MetadataError::ObjectExists(_)
        | MetadataError::UnknownObject(_)
        | MetadataError::ObjectInUse { .. }
        | MetadataError::TopicInUse { .. } => ResponseError::PolicyViolation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_actors::metadata::{GroupId, NodeId};

    #[test]
    fn a_request_for_a_partition_led_elsewhere_is_not_leader_or_follower() {
        let errors = [
            ServiceError::NotHere {
                replicas: vec![NodeId(2)],
            },
            ServiceError::Failed(BrokerError::NotLeader {
                group: GroupId(7),
                leader: Some(NodeId(3)),
            }),
        ];
        for error in errors {
            assert_eq!(KafkaError::from(error).code, ResponseError::NotLeaderOrFollower);
        }
        let unknown = KafkaError::from(ServiceError::UnknownTopic("t".into()));
        assert_eq!(unknown.code(), 3);
        assert!(unknown.message.contains("\"t\""), "{}", unknown.message);
    }

    /// A fenced producer's batch is not written: it must not be answered
    /// as a duplicate, which a Java producer takes as written.
    #[test]
    fn a_fenced_producer_is_told_its_epoch_is_invalid_not_that_it_duplicated() {
        let fenced = BrokerError::ProducerFenced {
            producer_id: 7,
            epoch: 0,
            newest_epoch: 1,
        };
        assert_eq!(broker_code(&fenced), ResponseError::InvalidProducerEpoch);
        let stale = BrokerError::StaleSequence {
            producer_id: 7,
            last_sequence: 9,
            got: 2,
        };
        assert_eq!(broker_code(&stale), ResponseError::DuplicateSequenceNumber);
    }
}
