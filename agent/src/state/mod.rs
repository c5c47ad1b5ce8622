//! State the agent keeps between kernel events: processes and sockets.

pub mod process;
pub mod sockets;
pub mod seed;
pub mod container;
pub mod udp_reply;
pub mod udp_local;
pub mod folds;
