//! The Kafka APIs this listener serves, one module each, and the dispatch
//! from a request frame to its handler.
//!
//! A frame is `api_key: i16, api_version: i16, correlation_id: i32, …`; the
//! header's layout depends on the API and version (flexible versions add
//! tagged fields), which `kafka-protocol` knows. An API or version outside
//! [`SUPPORTED`] is refused by name: `ApiVersions` then answers with
//! `UNSUPPORTED_VERSION` and the supported table (clients retry with a
//! version they share), any other API with its own response carrying
//! `UNSUPPORTED_VERSION` ([`unsupported`]). Only a frame with no honest
//! answer (an API key Kafka does not define, a version `kafka-protocol`
//! cannot encode, a header that does not decode) closes the connection, with
//! a log line naming the problem.

use std::future::Future;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};

use crate::BrokerService;

pub mod alter_configs;
pub mod api_versions;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_groups;
pub mod delete_records;
pub mod delete_topics;
pub mod describe_configs;
pub mod describe_groups;
pub mod fetch;
pub mod find_coordinator;
pub mod heartbeat;
pub mod incremental_alter_configs;
pub mod init_producer_id;
pub mod join_group;
pub mod leave_group;
pub mod list_groups;
pub mod list_offsets;
pub mod metadata;
pub mod offset_commit;
pub mod offset_delete;
pub mod offset_fetch;
pub mod produce;
pub mod sync_group;
pub mod unsupported;

/// The APIs served and their version ranges. Versions that need topic ids
/// (Fetch 13, Produce 13, DeleteTopics 6, Metadata 13) are left out, so
/// clients address topics by name.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
];

/// What every handler needs: the node's broker service, and who asks.
#[derive(Clone)]
pub struct Context {
    pub service: BrokerService,
    /// The connection's peer, shown as a group member's host.
    pub peer: Option<std::net::SocketAddr>,
    /// The request header's client id.
    pub client_id: String,
}

impl Context {
    pub fn new(service: BrokerService) -> Context {
        Context {
            service,
            peer: None,
            client_id: String::new(),
        }
    }
}

/// Why a frame got no answer; the connection is closed with this logged.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("a request frame of {0} bytes is too short for a request header")]
    Short(usize),
    #[error("API key {0} is not a Kafka API this listener knows")]
    UnknownApi(i16),
    #[error("{api:?} version {version} is not served (this listener serves {served}); the client should have asked ApiVersions")]
    Unsupported { api: ApiKey, version: i16, served: String },
    #[error("{api:?} v{version} request does not decode: {reason}")]
    Malformed { api: ApiKey, version: i16, reason: String },
    #[error("encoding the {api:?} response: {reason}")]
    Encode { api: ApiKey, reason: String },
}

/// The version range served for `api`, if any.
pub fn served(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(key, ..)| *key == api)
        .map(|&(_, min, max)| (min, max))
}

/// Answers one request frame: the response frame's body, or none when the
/// request wants no answer (a produce with `acks=0`).
pub async fn respond(context: &Context, frame: Bytes) -> Result<Option<BytesMut>, RequestError> {
    match accept(context, frame).await? {
        Accepted::Answered(response) => Ok(response),
        Accepted::Pending(answer) => answer.await,
    }
}

/// A request taken in the order it came.
pub enum Accepted {
    /// Answered (or, for `acks=0`, nothing to answer).
    Answered(Option<BytesMut>),
    /// A produce whose batches are with their partitions' replicas: its
    /// answer once they are acknowledged.
    Pending(Pin<Box<dyn Future<Output = Result<Option<BytesMut>, RequestError>> + Send>>),
}

/// Whether a frame is a produce request (which [`accept`] answers later).
pub fn is_produce(frame: &[u8]) -> bool {
    frame.len() >= 2 && i16::from_be_bytes([frame[0], frame[1]]) == ApiKey::Produce as i16
}

/// Takes one request frame: a produce's batches go to their replicas now
/// and its answer comes later; any other request is answered now.
pub async fn accept(context: &Context, frame: Bytes) -> Result<Accepted, RequestError> {
    match route(frame)? {
        Route::Answer(response) => Ok(Accepted::Answered(Some(response))),
        Route::Serve {
            api,
            version,
            correlation_id,
            client_id,
            mut body,
        } => {
            let context = Context {
                client_id,
                ..context.clone()
            };
            if api != ApiKey::Produce {
                return Ok(Accepted::Answered(
                    dispatch(&context, api, version, correlation_id, body).await?,
                ));
            }
            let request: kafka_protocol::messages::ProduceRequest = decode(api, version, &mut body)?;
            let wants_answer = request.acks != 0;
            let answer = produce::submit(&context, request).await;
            Ok(Accepted::Pending(Box::pin(async move {
                let response = answer.await;
                match wants_answer {
                    true => encode(api, version, correlation_id, &response).map(Some),
                    false => Ok(None),
                }
            })))
        }
    }
}

/// Where a request frame goes, decided from its header alone.
#[derive(Debug)]
pub enum Route {
    /// Answered without the cluster (an ApiVersions newer than served).
    Answer(BytesMut),
    /// To the API's handler, with the request body after the header.
    Serve {
        api: ApiKey,
        version: i16,
        correlation_id: i32,
        client_id: String,
        body: Bytes,
    },
}

/// Reads a request frame's header and checks the API and version are served.
pub fn route(mut frame: Bytes) -> Result<Route, RequestError> {
    if frame.len() < 8 {
        return Err(RequestError::Short(frame.len()));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let api = ApiKey::try_from(key).map_err(|_| RequestError::UnknownApi(key))?;
    let header = RequestHeader::decode(&mut frame, api.request_header_version(version)).map_err(|e| {
        RequestError::Malformed {
            api,
            version,
            reason: format!("header: {e:#}"),
        }
    })?;
    let correlation_id = header.correlation_id;
    match served(api) {
        Some((min, max)) if (min..=max).contains(&version) => Ok(Route::Serve {
            api,
            version,
            correlation_id,
            client_id: header.client_id.map(|c| c.to_string()).unwrap_or_default(),
            body: frame,
        }),
        _ if api == ApiKey::ApiVersions => {
            encode(api, 0, correlation_id, &api_versions::unsupported()).map(Route::Answer)
        }
        _ => {
            let refused = RequestError::Unsupported {
                api,
                version,
                served: served(api).map_or("no version".to_string(), |(a, b)| format!("versions {a} to {b}")),
            };
            match unsupported::answer(api, version, correlation_id, frame) {
                Some(answer) => {
                    tracing::info!("answered UNSUPPORTED_VERSION: {refused}");
                    answer.map(Route::Answer)
                }
                None => Err(refused),
            }
        }
    }
}

async fn dispatch(
    context: &Context,
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    mut body: Bytes,
) -> Result<Option<BytesMut>, RequestError> {
    macro_rules! serve {
        ($module:ident) => {{
            let request = decode(api, version, &mut body)?;
            let response = $module::handle(context, request, version).await;
            encode(api, version, correlation_id, &response).map(Some)
        }};
    }
    match api {
        ApiKey::ApiVersions => serve!(api_versions),
        ApiKey::Metadata => serve!(metadata),
        ApiKey::Fetch => serve!(fetch),
        ApiKey::ListOffsets => serve!(list_offsets),
        ApiKey::CreateTopics => serve!(create_topics),
        ApiKey::DeleteTopics => serve!(delete_topics),
        ApiKey::InitProducerId => serve!(init_producer_id),
        ApiKey::FindCoordinator => serve!(find_coordinator),
        ApiKey::JoinGroup => serve!(join_group),
        ApiKey::SyncGroup => serve!(sync_group),
        ApiKey::Heartbeat => serve!(heartbeat),
        ApiKey::LeaveGroup => serve!(leave_group),
        ApiKey::OffsetCommit => serve!(offset_commit),
        ApiKey::OffsetFetch => serve!(offset_fetch),
        ApiKey::ListGroups => serve!(list_groups),
        ApiKey::DescribeGroups => serve!(describe_groups),
        ApiKey::DescribeConfigs => serve!(describe_configs),
        ApiKey::DeleteGroups => serve!(delete_groups),
        ApiKey::AlterConfigs => serve!(alter_configs),
        ApiKey::CreatePartitions => serve!(create_partitions),
        ApiKey::IncrementalAlterConfigs => serve!(incremental_alter_configs),
        ApiKey::DeleteRecords => serve!(delete_records),
        ApiKey::OffsetDelete => serve!(offset_delete),
        // Produce goes through `accept`, which answers it later.
        _ => unreachable!("{api:?} is in SUPPORTED without a handler"),
    }
}

fn decode<T: Decodable>(api: ApiKey, version: i16, body: &mut Bytes) -> Result<T, RequestError> {
    T::decode(body, version).map_err(|e| RequestError::Malformed {
        api,
        version,
        reason: format!("{e:#}"),
    })
}

/// A response frame's body: the response header, then the response.
pub fn encode<T: Encodable>(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &T,
) -> Result<BytesMut, RequestError> {
    let failed = |e: anyhow::Error| RequestError::Encode {
        api,
        reason: format!("{e:#}"),
    };
    let mut out = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, api.response_header_version(version))
        .map_err(failed)?;
    body.encode(&mut out, version).map_err(failed)?;
    Ok(out)
}

/// A name for the wire.
pub(crate) fn str_bytes(text: &str) -> kafka_protocol::protocol::StrBytes {
    kafka_protocol::protocol::StrBytes::from_string(text.to_string())
}

pub(crate) fn topic_name(text: &str) -> kafka_protocol::messages::TopicName {
    kafka_protocol::messages::TopicName(str_bytes(text))
}

#[cfg(test)]
mod tests;
