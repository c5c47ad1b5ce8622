//! Kernel telemetry: loading and attaching the eBPF programs, reading the ring buffer and decoding
//! records into [`event::Event`]s. Only this module knows aya.

pub mod event;
