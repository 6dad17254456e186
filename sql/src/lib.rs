//! Runnel's SQL front end: KSQL statements typed at a running cluster.
//!
//! - [`parse`]: statements from text (sqlparser, plus KSQL's clauses and
//!   ksqlDB's commands read from sqlparser's tokens).
//! - [`from`]: the FROM clause: a stream and the tables it joins with.
//! - [`planner`]: SELECTs into dataflow plans (`runnel_client::plan`),
//!   names resolved against the catalog and types checked.
//! - [`session`]: statements executed against a cluster through a
//!   `runnel_client::Client`: the catalog and persistent queries live in
//!   the controller's metadata, so every node runs them and they outlive
//!   the session.
//! - [`push`]: push queries, run in the client over live records.
//! - [`pull`]: pull queries, answered from the state of the task that owns
//!   the key, on the node that runs it.
//! - [`error`]: errors that name the line and column they are about.

pub mod error;
pub mod from;
pub mod parse;
pub mod planner;
pub mod pull;
pub mod push;
pub mod session;
#[cfg(test)]
mod tests;

pub use error::{SqlError, SqlResult};
pub use session::{Outcome, Session};
