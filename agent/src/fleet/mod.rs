//! The fleet: agents pushing to a central collector over `CollectorService`.
//!
//! [`push`] is the agent's side and [`addr`] the address it pushes to; [`endpoints`] collects what the collector needs to merge graphs
//! across hosts; [`host`] reads this host's name and addresses; [`convert`] maps the fleet types
//! to and from the collector's messages. The collector itself lives in [`crate::collector`].

pub mod addr;
pub mod convert;
pub mod endpoints;
pub mod host;
pub mod push;
