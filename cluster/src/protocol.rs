//! Every message the cluster layer puts on the wire.
//!
//! Frames are postcard-encoded and travel on QUIC streams as
//! `length: u32 little-endian | body`, the body at most [`FRAME_BYTES_MAX`].
//! Enum variants are tagged by position: **append new variants at the end and
//! never reorder or remove one**, so a tag is never reused. Byte payloads are
//! marked `serde_bytes` (one copy to decode, not one call per byte); on the
//! wire that is the same as a sequence of `u8`. The envelope
//! carries [`PROTOCOL_VERSION`]; a frame of another version is refused.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::error::{ClusterError, Result};
use crate::NodeId;

pub const PROTOCOL_VERSION: u8 = 1;
/// The largest frame body accepted or sent; it bounds what a reader allocates.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// ALPN for node-to-node traffic.
pub const ALPN_PEER: &[u8] = b"runnel-peer/1";
/// ALPN for clients (CLI, client library).
pub const ALPN_CLIENT: &[u8] = b"runnel-client/1";

/// What one node tells another about a member it knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDigest {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub incarnation: u64,
}

/// Node-to-node messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// Liveness plus gossip of the members the sender knows.
    Heartbeat {
        incarnation: u64,
        addr: SocketAddr,
        members: Vec<MemberDigest>,
    },
    /// A one-way message to a named actor on the receiving node.
    Send {
        to: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A request to a named actor; answered by `Reply` with the same id.
    Call {
        call_id: u64,
        to: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    Reply {
        call_id: u64,
        result: std::result::Result<serde_bytes::ByteBuf, RemoteError>,
    },
}

/// Why a remote call failed on the far side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    #[error("no actor named {0:?}")]
    UnknownActor(String),
    #[error("actor {0:?} has a full queue")]
    Busy(String),
    #[error("actor {0:?} dropped the call without answering")]
    Dropped(String),
}

/// The versioned wrapper around every peer frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u8,
    pub from: NodeId,
    pub frame: PeerFrame,
}

/// What a member looks like to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub state: crate::membership::MemberState,
    pub incarnation: u64,
    /// Wall-clock milliseconds since the Unix epoch when the state began.
    pub since_unix_ms: u64,
}

/// Client-to-node requests: the cluster layer's envelope around any
/// client service (named `NodeRequest` so it is not confused with the
/// broker's `runnel_client::protocol::ClientRequest` it often carries).
/// Tagged by position: keep the variant order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    Status,
    /// A request for the actor registered as `name` on the node (a layer
    /// above defines `payload`); answered with `NodeResponse::Service`.
    Service {
        name: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}

/// Node-to-client responses. Tagged by position: keep the variant order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeResponse {
    Status { node: NodeId, members: Vec<MemberStatus> },
    Error(String),
    Service(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// The versioned wrapper around client traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEnvelope<T> {
    pub version: u8,
    pub body: T,
}

/// Encodes a value as a length-prefixed frame.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out =
        postcard::to_extend(value, vec![0u8; 4]).map_err(|e| ClusterError::BadFrame(format!("encoding: {e}")))?;
    let body_len = out.len() - 4;
    if body_len > FRAME_BYTES_MAX {
        return Err(ClusterError::BadFrame(format!(
            "frame of {body_len} bytes exceeds the limit of {FRAME_BYTES_MAX}"
        )));
    }
    out[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(out)
}

/// Reads a frame's declared body length, refusing oversized ones before any
/// allocation.
pub fn frame_body_len(prefix: [u8; 4]) -> Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(ClusterError::BadFrame(format!(
            "declared frame of {len} bytes exceeds the limit of {FRAME_BYTES_MAX}"
        )));
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    postcard::from_bytes(body).map_err(|e| ClusterError::BadFrame(format!("decoding: {e}")))
}

/// Decodes a peer envelope and checks its version.
pub fn decode_envelope(body: &[u8]) -> Result<Envelope> {
    let envelope: Envelope = decode_body(body)?;
    if envelope.version != PROTOCOL_VERSION {
        return Err(ClusterError::BadFrame(format!(
            "protocol version {} is not {PROTOCOL_VERSION}",
            envelope.version
        )));
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_garbage_is_an_error() {
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            from: NodeId(3),
            frame: PeerFrame::Call {
                call_id: 9,
                to: "replica-7".to_string(),
                payload: vec![1, 2, 3],
            },
        };
        let bytes = encode_frame(&envelope).expect("encode");
        let len = frame_body_len(bytes[..4].try_into().expect("prefix")).expect("len");
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode_envelope(&bytes[4..]).expect("decode"), envelope);
        for cut in 0..bytes.len() - 4 {
            assert!(decode_envelope(&bytes[4..4 + cut]).is_err(), "cut at {cut}");
        }
        let mut wrong_version = envelope.clone();
        wrong_version.version = 99;
        let bytes = encode_frame(&wrong_version).expect("encode");
        assert!(decode_envelope(&bytes[4..]).is_err());
        assert!(frame_body_len((FRAME_BYTES_MAX as u32 + 1).to_le_bytes()).is_err());
    }
}
