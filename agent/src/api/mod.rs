//! The gRPC API (driftwatch.v1): the deviation hub that sequences and fans out deviations, the
//! tonic server that serves it with the graph and status, and the client connection.
//!
//! Only this module depends on tonic. The pipeline publishes into a [`DeviationHub`] and exposes the
//! rest through [`AgentView`].

pub mod addr;
pub mod client;
pub mod convert;
mod convert_container;
pub mod convert_events;
pub mod filter;
pub mod hub;
pub mod request;
pub mod server;
pub mod status;
pub mod tls;
pub mod tls_args;

pub use addr::{ListenAddr, ListenAddrError, DEFAULT_SOCKET_PATH};
pub use client::{connect, connect_with};
pub use filter::{DeviationFilter, FilterSet};
pub use tls_args::{ClientTlsArgs, ServerTlsArgs};
pub use hub::{
    DeviationHub, HubConfig, HubCounters, HubMessage, LossNotice, LossReason, Replay,
    Subscription,
};
pub use server::{serve, serve_on, AgentView, ApiListener, SocketAccess};
pub use status::{HookStatus, ModelInfo, NodeStatus, StatusSnapshot};
