//! The answer to a request of an API or version this listener does not
//! serve: the API's own response, with `UNSUPPORTED_VERSION` wherever it
//! carries an error code, so the client reports the refusal instead of
//! seeing its connection dropped.
//!
//! Responses with a top-level error code get it there. Responses that carry
//! errors per item (topic, partition, resource, group) answer every item of
//! the request with the error, so they must decode the request first. An API
//! with neither kind of answer here (share groups, inter-broker and KRaft
//! APIs, a version `kafka-protocol` does not know) has no honest answer: the
//! caller closes the connection and logs the API by name, as Kafka does.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError;

use super::{decode, encode, RequestError};

const CODE: i16 = ResponseError::UnsupportedVersion.code();

/// The refusal of `api` at `version`, or `None` when there is none to give.
pub fn answer(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    mut body: Bytes,
) -> Option<Result<BytesMut, RequestError>> {
    let known = api.valid_versions();
    if !(known.min..=known.max).contains(&version) {
        return None;
    }
    if let Some(answer) = top_level(api, version, correlation_id) {
        return Some(answer);
    }
    per_item(api, version, correlation_id, &mut body)
}

/// Responses whose error code is a top-level field.
fn top_level(api: ApiKey, version: i16, correlation_id: i32) -> Option<Result<BytesMut, RequestError>> {
    macro_rules! refuse {
        ($($key:ident => $response:ident),* $(,)?) => {
            match api {
                $(ApiKey::$key => Some(encode(api, version, correlation_id, &$response::default().with_error_code(CODE))),)*
                _ => None,
            }
        };
    }
    if api == ApiKey::SaslHandshake {
        let refusal = SaslHandshakeResponse::default().with_error_code(ResponseError::UnsupportedSaslMechanism.code());
        return Some(encode(api, version, correlation_id, &refusal));
    }
    refuse! {
        Fetch => FetchResponse, Metadata => MetadataResponse, OffsetFetch => OffsetFetchResponse,
        FindCoordinator => FindCoordinatorResponse, JoinGroup => JoinGroupResponse,
        Heartbeat => HeartbeatResponse, LeaveGroup => LeaveGroupResponse, SyncGroup => SyncGroupResponse,
        ListGroups => ListGroupsResponse, ApiVersions => ApiVersionsResponse,
        InitProducerId => InitProducerIdResponse, AddPartitionsToTxn => AddPartitionsToTxnResponse,
        AddOffsetsToTxn => AddOffsetsToTxnResponse, EndTxn => EndTxnResponse, DescribeAcls => DescribeAclsResponse,
        DescribeLogDirs => DescribeLogDirsResponse, SaslAuthenticate => SaslAuthenticateResponse,
        CreateDelegationToken => CreateDelegationTokenResponse, RenewDelegationToken => RenewDelegationTokenResponse,
        ExpireDelegationToken => ExpireDelegationTokenResponse,
        DescribeDelegationToken => DescribeDelegationTokenResponse, ElectLeaders => ElectLeadersResponse,
        AlterPartitionReassignments => AlterPartitionReassignmentsResponse,
        ListPartitionReassignments => ListPartitionReassignmentsResponse,
        DescribeClientQuotas => DescribeClientQuotasResponse,
        DescribeUserScramCredentials => DescribeUserScramCredentialsResponse, UpdateFeatures => UpdateFeaturesResponse,
        DescribeCluster => DescribeClusterResponse, ListTransactions => ListTransactionsResponse,
        ConsumerGroupHeartbeat => ConsumerGroupHeartbeatResponse,
        GetTelemetrySubscriptions => GetTelemetrySubscriptionsResponse, PushTelemetry => PushTelemetryResponse,
        ListConfigResources => ListConfigResourcesResponse, ShareGroupHeartbeat => ShareGroupHeartbeatResponse,
        AlterShareGroupOffsets => AlterShareGroupOffsetsResponse,
        DeleteShareGroupOffsets => DeleteShareGroupOffsetsResponse,
    }
}

/// Responses with an error per item of the request.
fn per_item(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &mut Bytes,
) -> Option<Result<BytesMut, RequestError>> {
    macro_rules! mirror {
        ($request:ident, $build:ident) => {
            Some(decode::<$request>(api, version, body).and_then(|r| encode(api, version, correlation_id, &$build(r))))
        };
    }
    match api {
        ApiKey::DeleteRecords => mirror!(DeleteRecordsRequest, delete_records),
        ApiKey::OffsetForLeaderEpoch => mirror!(OffsetForLeaderEpochRequest, offset_for_leader_epoch),
        ApiKey::TxnOffsetCommit => mirror!(TxnOffsetCommitRequest, txn_offset_commit),
        ApiKey::CreateAcls => mirror!(CreateAclsRequest, create_acls),
        ApiKey::DeleteAcls => mirror!(DeleteAclsRequest, delete_acls),
        ApiKey::DescribeProducers => mirror!(DescribeProducersRequest, describe_producers),
        ApiKey::DescribeTransactions => mirror!(DescribeTransactionsRequest, describe_transactions),
        ApiKey::ConsumerGroupDescribe => mirror!(ConsumerGroupDescribeRequest, consumer_group_describe),
        _ => None,
    }
}

fn message() -> Option<kafka_protocol::protocol::StrBytes> {
    Some(super::str_bytes("not served by this Runnel listener"))
}

fn delete_records(request: DeleteRecordsRequest) -> DeleteRecordsResponse {
    use delete_records_response::{DeleteRecordsPartitionResult as Partition, DeleteRecordsTopicResult as Topic};
    let topics = request.topics.into_iter().map(|t| {
        let partitions = t.partitions.iter().map(|p| {
            Partition::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1)
                .with_error_code(CODE)
        });
        Topic::default().with_name(t.name).with_partitions(partitions.collect())
    });
    DeleteRecordsResponse::default().with_topics(topics.collect())
}

fn offset_for_leader_epoch(request: OffsetForLeaderEpochRequest) -> OffsetForLeaderEpochResponse {
    use offset_for_leader_epoch_response::{EpochEndOffset, OffsetForLeaderTopicResult as Topic};
    let topics = request.topics.into_iter().map(|t| {
        let partitions = t.partitions.iter().map(|p| {
            EpochEndOffset::default()
                .with_partition(p.partition)
                .with_leader_epoch(-1)
                .with_end_offset(-1)
                .with_error_code(CODE)
        });
        Topic::default()
            .with_topic(t.topic)
            .with_partitions(partitions.collect())
    });
    OffsetForLeaderEpochResponse::default().with_topics(topics.collect())
}

fn txn_offset_commit(request: TxnOffsetCommitRequest) -> TxnOffsetCommitResponse {
    use txn_offset_commit_response::{
        TxnOffsetCommitResponsePartition as Partition, TxnOffsetCommitResponseTopic as Topic,
    };
    let topics = request.topics.into_iter().map(|t| {
        let partitions = t.partitions.iter().map(|p| {
            Partition::default()
                .with_partition_index(p.partition_index)
                .with_error_code(CODE)
        });
        Topic::default().with_name(t.name).with_partitions(partitions.collect())
    });
    TxnOffsetCommitResponse::default().with_topics(topics.collect())
}

fn create_acls(request: CreateAclsRequest) -> CreateAclsResponse {
    use create_acls_response::AclCreationResult as Result;
    let results = request.creations.iter();
    let results = results.map(|_| Result::default().with_error_code(CODE).with_error_message(message()));
    CreateAclsResponse::default().with_results(results.collect())
}

fn delete_acls(request: DeleteAclsRequest) -> DeleteAclsResponse {
    use delete_acls_response::DeleteAclsFilterResult as Result;
    let results = request.filters.iter();
    let results = results.map(|_| Result::default().with_error_code(CODE).with_error_message(message()));
    DeleteAclsResponse::default().with_filter_results(results.collect())
}

fn describe_producers(request: DescribeProducersRequest) -> DescribeProducersResponse {
    use describe_producers_response::{PartitionResponse as Partition, TopicResponse as Topic};
    let topics = request.topics.into_iter().map(|t| {
        let partitions = t.partition_indexes.iter().map(|&p| {
            Partition::default()
                .with_partition_index(p)
                .with_error_code(CODE)
                .with_error_message(message())
        });
        Topic::default().with_name(t.name).with_partitions(partitions.collect())
    });
    DescribeProducersResponse::default().with_topics(topics.collect())
}

fn describe_transactions(request: DescribeTransactionsRequest) -> DescribeTransactionsResponse {
    use describe_transactions_response::TransactionState;
    let states = request.transactional_ids.into_iter().map(|id| {
        TransactionState::default()
            .with_transactional_id(id)
            .with_error_code(CODE)
            .with_producer_id(ProducerId(-1))
    });
    DescribeTransactionsResponse::default().with_transaction_states(states.collect())
}

fn consumer_group_describe(request: ConsumerGroupDescribeRequest) -> ConsumerGroupDescribeResponse {
    use consumer_group_describe_response::DescribedGroup;
    let groups = request.group_ids.into_iter().map(|group| {
        DescribedGroup::default()
            .with_group_id(group)
            .with_error_code(CODE)
            .with_error_message(Some(super::str_bytes(
                "the consumer group protocol of KIP-848 is not served; use group.protocol=classic",
            )))
    });
    ConsumerGroupDescribeResponse::default().with_groups(groups.collect())
}
