//! Containing panics in projection and upcaster code (DESIGN.md invariant 6).
//!
//! A panic in code the engine calls per event is turned into an error, so it goes
//! through the poison policy like any other bad event instead of ending a thread
//! and leaving a projection that looks alive.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`; a panic in it becomes `Err` with the panic's message.
///
/// Callers must not rely on state that `f` may have left half-changed: the fold
/// loop discards its open batch after a panic in a fold (see `crate::source`).
pub fn contained<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| message(payload.as_ref()))
}

/// The message of a panic payload (`panic!("...")` carries a `&str` or a `String`).
pub fn message(payload: &(dyn Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        assert_eq!(contained(|| 7), Ok(7));
        assert_eq!(
            contained(|| -> u8 { panic!("boom {}", 3) }),
            Err("panicked: boom 3".to_owned())
        );
        assert_eq!(
            contained(|| -> u8 { std::panic::panic_any(5u32) }),
            Err("panicked: a panic without a message".to_owned())
        );
    }
}
