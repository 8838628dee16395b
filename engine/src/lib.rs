//! Projector's engine: turns Avro event streams on Kafka into read models in RocksDB.
//!
//! The path of one event: [`fold`] consumes it, [`frame`] and [`decode`] turn the
//! Confluent-framed Avro into an event of the current schema ([`schemas`],
//! [`registry_client`]) on a thread of its own ([`decode_ahead`]), a
//! [`projection::Projection`] folds it, and [`store`] commits the batch's state with
//! its offsets. [`serve`] answers reads.
//!
//! Public: what the `projector` binary, the built-in projections and the tests
//! use; everything else is the engine's own.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod as_of;
mod avro_json;
mod backoff;
mod cluster;
pub mod config;
mod dead_letter;
pub mod declarative;
mod decode;
mod decode_ahead;
mod descriptors;
mod expr;
mod fold;
mod fold_state;
mod frame;
mod kafka_client;
pub mod lag;
mod listener;
mod logical;
pub mod metrics;
mod panics;
mod poison;
pub mod projection;
mod registry_client;
mod replay;
pub mod schemas;
mod serve;
pub mod state_codec;
pub mod store;
mod supervisor;
pub mod worker;
