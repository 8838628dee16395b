//! Projector's built-in projections over the demo domain, registered by name.
//!
//! [`registry`] is the one list of built-ins; config names them with `kind = "..."`.

use engine::projection::{ProjectionFactory, ProjectionRegistry};

mod fields;
pub mod order_summary;
mod upcasters;

pub use upcasters::registry as upcasters;

/// Every built-in projection, by kind name.
pub fn registry() -> ProjectionRegistry {
    let builtins: [(&'static str, ProjectionFactory); 1] = [("order_summary", order_summary::build)];
    builtins.into_iter().collect()
}
