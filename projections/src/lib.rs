//! Projector's built-in projections over the demo domain, registered by name.
//!
//! [`registry`] is the one list of built-ins; config names them with `kind = "..."`.

use engine::projection::{ProjectionFactory, ProjectionRegistry};

pub mod account_balance;
pub mod customer_orders;
mod fields;
pub mod order_summary;
pub mod revenue_by_day;
mod upcasters;

pub use upcasters::registry as upcasters;

/// Every built-in projection, by kind name.
pub fn registry() -> ProjectionRegistry {
    let builtins: [(&'static str, ProjectionFactory); 4] = [
        ("order_summary", order_summary::build),
        ("customer_orders", customer_orders::build),
        ("revenue_by_day", revenue_by_day::build),
        ("account_balance", account_balance::build),
    ];
    builtins.into_iter().collect()
}
