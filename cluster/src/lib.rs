//! tidepool-cluster: the meta group.
//!
//! Owns consensus and metadata: [`raft`] drives raft-rs over a durable log, hard state and
//! snapshots on local disk (raft-rs itself does no I/O), and [`meta`] is the metadata state
//! machine — a pure, deterministic `apply(command) -> result` over the namespace, the block
//! table and block-id ranges. It does not own block bytes (tidepool-spdk) or objects
//! (tidepool-tiering), and it has no idea what a front end is.

pub mod clock;
pub mod meta;
pub mod raft;
pub mod transport;

pub use clock::{Clock, ManualClock, SystemClock};
pub use meta::{Applied, Command, MetaError, MetaState};
pub use raft::{MetaGroup, RaftError, RaftInbox, RaftNet, RaftOptions, RaftStatus, StateMachine};
pub use transport::{Handler, Request, Response, Transport, TransportConfig, TransportError};
