//! The file-descriptor budget: HTTP connections, RocksDB's files and the Kafka
//! clients all draw on the process's `RLIMIT_NOFILE`, so the worker checks at
//! start that the three fit, rather than finding out mid-flood as a store or
//! broker error.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors the worker needs besides HTTP connections and RocksDB's files: its
/// listener, logs, the registry client, stdio and what libraries open.
pub const BASE: u64 = 128;

/// Descriptors reserved per projection for its Kafka clients (the fold consumer,
/// a replay's consumer, the lag monitor's share, a dead-letter producer): each
/// holds a socket per broker it talks to and a few wake-up descriptors.
pub const PER_PROJECTION: u64 = 64;

/// What the worker will hold at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `http.max_connections`, plus one for a connection being accepted.
    pub http: u64,
    /// `store.max_open_files`.
    pub store: u64,
    /// Kafka clients: [`PER_PROJECTION`] per projection.
    pub kafka: u64,
}

impl Budget {
    /// The budget of a worker with these settings.
    pub fn new(max_connections: usize, store_max_open_files: u32, projections: usize) -> Budget {
        Budget {
            http: (max_connections as u64).saturating_add(1),
            store: u64::from(store_max_open_files),
            kafka: (projections as u64).saturating_mul(PER_PROJECTION),
        }
    }

    /// Every descriptor the budget needs.
    pub fn total(&self) -> u64 {
        BASE.saturating_add(self.http)
            .saturating_add(self.store)
            .saturating_add(self.kafka)
    }
}

/// The budget does not fit the process's limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the worker needs {needed} file descriptors ({base} base + {http} for http.max_connections + \
     {store} for store.max_open_files + {kafka} for the Kafka clients of its projections), but \
     RLIMIT_NOFILE allows {limit} (hard limit {hard}): raise it (ulimit -n, LimitNOFILE= in systemd) \
     or lower http.max_connections or store.max_open_files"
)]
pub struct DescriptorError {
    /// Descriptors needed.
    pub needed: u64,
    /// The limit the process runs with.
    pub limit: u64,
    /// The hard limit it could be raised to.
    pub hard: String,
    /// The parts of `needed`.
    pub base: u64,
    /// HTTP connections.
    pub http: u64,
    /// RocksDB.
    pub store: u64,
    /// Kafka.
    pub kafka: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and checks that `budget`
/// fits; returns the limit the process now runs with.
pub fn ensure(budget: &Budget) -> Result<u64, DescriptorError> {
    let limits = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limits.maximum,
        maximum: limits.maximum,
    };
    let current = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limits.maximum,
        Err(_) => limits.current,
    };
    check(budget, current, limits.maximum)
}

fn check(budget: &Budget, current: Option<u64>, hard: Option<u64>) -> Result<u64, DescriptorError> {
    // `None` is RLIM_INFINITY.
    let limit = current.unwrap_or(u64::MAX);
    if budget.total() <= limit {
        return Ok(limit);
    }
    Err(DescriptorError {
        needed: budget.total(),
        limit,
        hard: hard.map_or_else(|| "unlimited".to_owned(), |h| h.to_string()),
        base: BASE,
        http: budget.http,
        store: budget.store,
        kafka: budget.kafka,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_fit_the_common_limit_of_1024_with_one_projection() {
        let budget = Budget::new(512, 256, 1);
        assert_eq!(budget.total(), 128 + 513 + 256 + 64);
        assert_eq!(check(&budget, Some(1024), Some(1024)), Ok(1024));
    }

    #[test]
    fn a_budget_over_the_limit_names_both_numbers_and_its_parts() {
        let budget = Budget::new(2_000, 256, 2);
        let error = check(&budget, Some(1024), Some(1024)).unwrap_err().to_string();
        for part in [
            "2513",
            "1024",
            "2001 for http.max_connections",
            "256 for store.max_open_files",
            "128 for the Kafka",
        ] {
            assert!(error.contains(part), "{part} in {error}");
        }
        assert!(check(&budget, None, None).is_ok(), "no limit");
    }
}
