//! The seam between the controller and a node's dataflow runtime. It lives
//! in `runnel_client::tasks`, where the dataflow crate reaches it without
//! depending on the broker; re-exported here for the controller and for
//! code that names `runnel_actors::tasks`.

pub use runnel_client::tasks::*;
