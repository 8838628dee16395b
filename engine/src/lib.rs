//! Projector's engine: turns Avro event streams on Kafka into read models in RocksDB.
//!
//! The path of one event: [`source`] consumes it, [`frame`] and [`decode`] turn the
//! Confluent-framed Avro into an event of the current schema ([`schemas`],
//! [`registry_client`]) on a thread of its own ([`decode_ahead`]), a
//! [`projection::Projection`] folds it, and [`store`] commits the batch's state with
//! its offsets. [`serve`] answers reads; [`registry`] is a development schema
//! registry.

pub mod avro_json;
pub mod config;
pub mod dead_letter;
pub mod declarative;
pub mod decode;
pub mod decode_ahead;
pub mod expr;
pub mod frame;
pub mod lag;
pub mod metrics;
pub mod poison;
pub mod projection;
pub mod registry;
pub mod registry_client;
pub mod replay;
pub mod runtime;
pub mod schemas;
pub mod serve;
pub mod source;
pub mod store;
pub mod worker;
