//! The one retry schedule for waits on something outside the worker (the
//! schema registry, the dead-letter topic's broker, a store that refuses writes):
//! exponential, doubling from a first delay up to a ceiling.

use std::time::Duration;

/// Delays of one wait: `first`, then doubling, never above `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// A schedule starting at `first`, capped at `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first.min(max),
            max,
        }
    }

    /// The delay before the next attempt; the one after is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        let mut capped = Backoff::new(Duration::from_secs(9), Duration::from_secs(1));
        assert_eq!(capped.next_delay(), Duration::from_secs(1));
    }
}
