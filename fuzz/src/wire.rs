//! What nodes and clients read off the network: the cluster's envelopes
//! (cluster/src/protocol.rs), the versioned payloads inside them — client,
//! controller, consumer-group and Raft-batch messages (client/src/protocol.rs,
//! actors/src/protocol.rs) — the protobuf Raft messages inside those, and
//! Kafka's consumer-protocol subscription and assignment bytes
//! (client/src/groups.rs).
//!
//! The first byte picks the decoder. Whatever decodes must encode and decode
//! again to the same value.

use std::fmt::Debug;

use protobuf::Message as _;
use runnel_actors::protocol::{ControllerRequest, ControllerResponse, RaftBatch};
use runnel_client::groups::{decode_assignment, decode_subscription, encode_assignment};
use runnel_client::protocol::{
    decode_payload, encode_payload, ClientRequest, ClientResponse, GroupRequest, GroupResponse,
};
use runnel_cluster::protocol::{decode_body, decode_envelope, encode_frame, ClientEnvelope, NodeRequest, NodeResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub fn run(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => envelope(body),
        1 => framed::<ClientEnvelope<NodeRequest>>(body),
        2 => framed::<ClientEnvelope<NodeResponse>>(body),
        3 => payload::<ClientRequest>(body),
        4 => payload::<ClientResponse>(body),
        5 => payload::<ControllerRequest>(body),
        6 => payload::<ControllerResponse>(body),
        7 => raft_batch(body),
        8 => {
            payload::<GroupRequest>(body);
            payload::<GroupResponse>(body);
        }
        _ => consumer_protocol(body),
    }
}

fn envelope(body: &[u8]) {
    let Ok(envelope) = decode_envelope(body) else { return };
    let frame = encode_frame(&envelope).expect("a decoded envelope encodes");
    assert_eq!(decode_envelope(&frame[4..]).expect("re-decodes"), envelope);
}

fn framed<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) {
    let Ok(value) = decode_body::<T>(body) else { return };
    let frame = encode_frame(&value).expect("a decoded frame encodes");
    assert_eq!(decode_body::<T>(&frame[4..]).expect("re-decodes"), value);
}

/// A versioned payload, with the format header put right half the time so
/// that the body's decoder is reached.
fn payload<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) {
    round_trip::<T>(body);
    let mut headed = encode_payload(&()).expect("a header encodes");
    headed.extend_from_slice(body);
    round_trip::<T>(&headed);
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) -> Option<T> {
    let value = decode_payload::<T>(bytes).ok()?;
    let again = encode_payload(&value).expect("a decoded payload encodes");
    assert_eq!(decode_payload::<T>(&again).expect("re-decodes"), value);
    Some(value)
}

fn raft_batch(body: &[u8]) {
    let mut headed = encode_payload(&()).expect("a header encodes");
    headed.extend_from_slice(body);
    let Some(batch) = round_trip::<RaftBatch>(&headed) else {
        // The bytes as one Raft message, as the broker reads each one.
        let _ = raft::eraftpb::Message::parse_from_bytes(body);
        return;
    };
    for message in batch.messages {
        let _ = raft::eraftpb::Message::parse_from_bytes(&message.message);
    }
}

fn consumer_protocol(body: &[u8]) {
    let _ = decode_subscription(body);
    if let Ok(assignment) = decode_assignment(body) {
        let again = encode_assignment(&assignment);
        assert_eq!(decode_assignment(&again).expect("re-decodes"), assignment);
    }
}
