//! Routing of request frames, decided from the header alone, and garbage
//! that must get a named error, never a panic.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::offset_for_leader_epoch_request::{OffsetForLeaderPartition, OffsetForLeaderTopic};
use kafka_protocol::messages::{
    AlterConfigsRequest, ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreatePartitionsRequest, CreateTopicsRequest,
    DeleteGroupsRequest, DeleteRecordsRequest, DeleteTopicsRequest, DescribeConfigsRequest, DescribeGroupsRequest,
    EndTxnRequest, EndTxnResponse, FetchRequest, FindCoordinatorRequest, HeartbeatRequest,
    IncrementalAlterConfigsRequest, InitProducerIdRequest, JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest,
    ListOffsetsRequest, MetadataRequest, MetadataResponse, OffsetCommitRequest, OffsetDeleteRequest,
    OffsetFetchRequest, OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, ProduceRequest, RequestHeader,
    ResponseHeader, SaslHandshakeRequest, SaslHandshakeResponse, SyncGroupRequest, TopicName,
    WriteShareGroupStateRequest,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use proptest::prelude::*;

use super::{decode, route, RequestError, Route, SUPPORTED};

fn frame(api: ApiKey, version: i16, body: impl Encodable) -> Bytes {
    let mut out = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("test")))
        .encode(&mut out, api.request_header_version(version))
        .expect("header");
    body.encode(&mut out, version).expect("body");
    out.freeze()
}

#[test]
fn a_served_request_goes_to_its_handler_with_its_correlation_id() {
    let routed = route(frame(ApiKey::ApiVersions, 3, ApiVersionsRequest::default())).expect("served");
    let Route::Serve {
        api,
        version,
        correlation_id,
        client_id,
        body,
    } = routed
    else {
        panic!("answered without the handler");
    };
    assert_eq!((api, version, correlation_id), (ApiKey::ApiVersions, 3, 7));
    assert_eq!(client_id, "test");
    ApiVersionsRequest::decode(&mut body.clone(), 3).expect("the body after the header");
}

#[test]
fn an_api_versions_request_newer_than_served_gets_unsupported_version_and_the_table_in_version_0() {
    let mut request = BytesMut::new();
    request.extend_from_slice(&(ApiKey::ApiVersions as i16).to_be_bytes());
    request.extend_from_slice(&9i16.to_be_bytes());
    request.extend_from_slice(&7i32.to_be_bytes());
    request.extend_from_slice(&[0, 4, b't', b'e', b's', b't', 0]);
    let Route::Answer(mut answer) = route(request.freeze()).expect("answered") else {
        panic!("version 9 was served");
    };
    let header = ResponseHeader::decode(&mut answer, 0).expect("header v0");
    assert_eq!(header.correlation_id, 7);
    let response = ApiVersionsResponse::decode(&mut answer, 0).expect("ApiVersions v0");
    assert_eq!(response.error_code, 35, "UNSUPPORTED_VERSION");
    let produce = response
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::Produce as i16)
        .expect("produce");
    assert_eq!((produce.min_version, produce.max_version), (3, 9));
    assert_eq!(response.api_keys.len(), SUPPORTED.len());
}

/// The error code of a refusal answered with `T` at `version`, after
/// checking the response header names the request.
fn refusal<T: Decodable>(api: ApiKey, version: i16, route: Result<Route, RequestError>) -> T {
    let Ok(Route::Answer(mut answer)) = route else {
        panic!("{api:?} v{version} got no answer: {route:?}");
    };
    let header = ResponseHeader::decode(&mut answer, api.response_header_version(version)).expect("header");
    assert_eq!(header.correlation_id, 7);
    let response = T::decode(&mut answer, version).expect("the API's own response");
    assert!(answer.is_empty(), "bytes after the response");
    response
}

#[test]
fn apis_and_versions_not_served_get_their_own_response_with_unsupported_version() {
    let metadata = route(frame(ApiKey::Metadata, 13, MetadataRequest::default()));
    assert_eq!(
        refusal::<MetadataResponse>(ApiKey::Metadata, 13, metadata).error_code,
        35
    );
    let end_txn = route(frame(ApiKey::EndTxn, 3, EndTxnRequest::default()));
    assert_eq!(refusal::<EndTxnResponse>(ApiKey::EndTxn, 3, end_txn).error_code, 35);
    let sasl = route(frame(ApiKey::SaslHandshake, 1, SaslHandshakeRequest::default()));
    let sasl = refusal::<SaslHandshakeResponse>(ApiKey::SaslHandshake, 1, sasl);
    assert_eq!(sasl.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    let topic = |name: &'static str| {
        OffsetForLeaderTopic::default()
            .with_topic(TopicName(StrBytes::from_static_str(name)))
            .with_partitions(vec![OffsetForLeaderPartition::default().with_partition(3)])
    };
    let request = OffsetForLeaderEpochRequest::default().with_topics(vec![topic("a"), topic("b")]);
    let answer = route(frame(ApiKey::OffsetForLeaderEpoch, 4, request));
    let answer = refusal::<OffsetForLeaderEpochResponse>(ApiKey::OffsetForLeaderEpoch, 4, answer);
    let results: Vec<_> = answer
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.topic.0.as_str(), p.partition, p.error_code))
        })
        .collect();
    assert_eq!(results, [("a", 3, 35), ("b", 3, 35)]);
}

#[test]
fn frames_with_no_honest_answer_and_garbage_are_refused_by_name() {
    let produce = route(frame(ApiKey::Produce, 13, ProduceRequest::default())).expect_err("13");
    let expected = "Produce version 13 is not served (this listener serves versions 3 to 9)";
    assert!(produce.to_string().contains(expected), "{produce}");
    let mut future = BytesMut::from(&(ApiKey::EndTxn as i16).to_be_bytes()[..]);
    future.extend_from_slice(&[0, 99, 0, 0, 0, 7, 0xff, 0xff, 0]);
    let future = route(future.freeze()).expect_err("a version kafka-protocol does not know");
    let expected = "EndTxn version 99 is not served (this listener serves no version)";
    assert!(future.to_string().contains(expected), "{future}");
    let share = route(frame(
        ApiKey::WriteShareGroupState,
        0,
        WriteShareGroupStateRequest::default(),
    ));
    assert!(matches!(share, Err(RequestError::Unsupported { .. })), "{share:?}");
    let cut = route(frame(ApiKey::CreatePartitions, 2, CreatePartitionsRequest::default()).slice(..14));
    assert!(matches!(cut, Err(RequestError::Malformed { .. })), "{cut:?}");
    assert!(matches!(
        route(Bytes::from_static(b"GET / HTTP/1.1")),
        Err(RequestError::UnknownApi(_))
    ));
    assert!(matches!(
        route(Bytes::from_static(b"\x00\x03")),
        Err(RequestError::Short(2))
    ));
    let cut = route(Bytes::from_static(b"\x00\x03\x00\x09\x00\x00\x00\x07\x00")).expect_err("cut short");
    assert!(
        cut.to_string().contains("Metadata v9 request does not decode: header"),
        "{cut}"
    );
}

#[test]
fn every_api_at_every_version_kafka_protocol_knows_is_answered_or_refused_without_panic() {
    let mut answered = 0;
    for api in ApiKey::iter() {
        let known = api.valid_versions();
        for version in known.min..=known.max {
            let mut header = BytesMut::new();
            RequestHeader::default()
                .with_request_api_key(api as i16)
                .with_request_api_version(version)
                .with_correlation_id(7)
                .encode(&mut header, api.request_header_version(version))
                .expect("header");
            if let Ok(Route::Answer(mut answer)) = route(header.freeze()) {
                let header = ResponseHeader::decode(&mut answer, api.response_header_version(version));
                assert_eq!(header.expect("response header").correlation_id, 7, "{api:?} v{version}");
                answered += 1;
            }
        }
    }
    assert!(
        answered >= 79,
        "only {answered} API versions answered from a header alone"
    );
}

#[test]
fn every_served_api_has_a_version_range_kafka_protocol_knows() {
    for &(api, min, max) in SUPPORTED {
        let known = api.valid_versions();
        assert!(
            known.min <= min && max <= known.max,
            "{api:?} {min}..={max} outside {known}"
        );
    }
}

/// Garbage after a valid header of each served API and version.
fn decode_any(api: ApiKey, version: i16, body: &[u8]) {
    let mut body = Bytes::copy_from_slice(body);
    let _ = match api {
        ApiKey::Produce => decode::<ProduceRequest>(api, version, &mut body).map(drop),
        ApiKey::Fetch => decode::<FetchRequest>(api, version, &mut body).map(drop),
        ApiKey::ListOffsets => decode::<ListOffsetsRequest>(api, version, &mut body).map(drop),
        ApiKey::Metadata => decode::<MetadataRequest>(api, version, &mut body).map(drop),
        ApiKey::ApiVersions => decode::<ApiVersionsRequest>(api, version, &mut body).map(drop),
        ApiKey::CreateTopics => decode::<CreateTopicsRequest>(api, version, &mut body).map(drop),
        ApiKey::DeleteTopics => decode::<DeleteTopicsRequest>(api, version, &mut body).map(drop),
        ApiKey::InitProducerId => decode::<InitProducerIdRequest>(api, version, &mut body).map(drop),
        ApiKey::FindCoordinator => decode::<FindCoordinatorRequest>(api, version, &mut body).map(drop),
        ApiKey::JoinGroup => decode::<JoinGroupRequest>(api, version, &mut body).map(drop),
        ApiKey::SyncGroup => decode::<SyncGroupRequest>(api, version, &mut body).map(drop),
        ApiKey::Heartbeat => decode::<HeartbeatRequest>(api, version, &mut body).map(drop),
        ApiKey::LeaveGroup => decode::<LeaveGroupRequest>(api, version, &mut body).map(drop),
        ApiKey::OffsetCommit => decode::<OffsetCommitRequest>(api, version, &mut body).map(drop),
        ApiKey::OffsetFetch => decode::<OffsetFetchRequest>(api, version, &mut body).map(drop),
        ApiKey::ListGroups => decode::<ListGroupsRequest>(api, version, &mut body).map(drop),
        ApiKey::DescribeGroups => decode::<DescribeGroupsRequest>(api, version, &mut body).map(drop),
        ApiKey::DescribeConfigs => decode::<DescribeConfigsRequest>(api, version, &mut body).map(drop),
        ApiKey::DeleteGroups => decode::<DeleteGroupsRequest>(api, version, &mut body).map(drop),
        ApiKey::AlterConfigs => decode::<AlterConfigsRequest>(api, version, &mut body).map(drop),
        ApiKey::CreatePartitions => decode::<CreatePartitionsRequest>(api, version, &mut body).map(drop),
        ApiKey::IncrementalAlterConfigs => decode::<IncrementalAlterConfigsRequest>(api, version, &mut body).map(drop),
        ApiKey::DeleteRecords => decode::<DeleteRecordsRequest>(api, version, &mut body).map(drop),
        ApiKey::OffsetDelete => decode::<OffsetDeleteRequest>(api, version, &mut body).map(drop),
        other => panic!("{other:?} has no decoder here"),
    };
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_frames_never_panic_the_router(frame in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = route(Bytes::from(frame));
    }

    #[test]
    fn random_bodies_never_panic_a_served_decoder(
        which in 0..SUPPORTED.len(),
        version_pick in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let (api, min, max) = SUPPORTED[which];
        let version = min + (version_pick as i16) % (max - min + 1);
        decode_any(api, version, &body);
    }
}
