//! InitProducerId: an idempotent producer's id. Runnel's brokers
//! de-duplicate by producer id, epoch and sequence, as Kafka's do, so a
//! Kafka producer id is a Runnel producer id: a fresh random one each time
//! (no state to keep; a restarted producer starts over with a new id).
//! Transactional producers are refused: Runnel has no Kafka transactions.

use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::Context;

pub async fn handle(_context: &Context, request: InitProducerIdRequest, _version: i16) -> InitProducerIdResponse {
    if request.transactional_id.is_some() {
        return InitProducerIdResponse::default()
            .with_error_code(ResponseError::TransactionalIdAuthorizationFailed.code())
            .with_producer_id(ProducerId(-1));
    }
    InitProducerIdResponse::default()
        .with_producer_id(ProducerId(runnel_client::new_producer_id()))
        .with_producer_epoch(0)
}
