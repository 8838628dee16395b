//! Unit tests of this module.

use super::access::constant_time_eq;
use super::*;

fn state_with_token(dir: &std::path::Path, token: Option<&str>) -> ApiState {
    ApiState {
        projections: Arc::default(),
        store: Arc::new(Store::open(dir, false).unwrap()),
        admin_token: token.map(str::to_owned),
        read_tokens: Arc::default(),
        protect_probes: false,
        scans: Arc::new(tokio::sync::Semaphore::new(1)),
        kafka: None,
        cluster: None,
    }
}

#[test]
fn read_tokens_admit_any_of_them_or_the_admin_token_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = state_with_token(dir.path(), Some("admin"));
    assert!(
        state.may_read(&authorization(None)),
        "no read token: reads are open"
    );
    state.read_tokens = Arc::new(vec!["one".into(), "two".into()]);
    for admitted in ["Bearer one", "bearer two", "Bearer admin"] {
        assert!(state.may_read(&authorization(Some(admitted))), "{admitted}");
    }
    for refused in [
        None,
        Some("Bearer"),
        Some("Bearer "),
        Some("Bearer on"),
        Some("Bearer one2"),
        Some("Basic one"),
    ] {
        assert!(!state.may_read(&authorization(refused)), "{refused:?}");
    }
}

fn authorization(value: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(value) = value {
        headers.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
    }
    headers
}

#[test]
fn an_empty_admin_token_admits_nobody() {
    for token in ["", "  "] {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with_token(dir.path(), Some(token));
        for offered in [None, Some("Bearer "), Some("Bearer"), Some("Bearer   ")] {
            let refused = state.authorize(&authorization(offered)).unwrap_err();
            assert_eq!(
                refused.0,
                StatusCode::FORBIDDEN,
                "token {token:?}, offered {offered:?}"
            );
        }
    }
}

#[test]
fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_with_token(dir.path(), Some("tok"));
    for offered in ["Bearer tok", "bearer tok", "BEARER tok"] {
        assert!(
            state.authorize(&authorization(Some(offered))).is_ok(),
            "{offered}"
        );
    }
    for offered in [
        None,
        Some("Bearer"),
        Some("Bearer "),
        Some("Bearer to"),
        Some("Bearer tokx"),
        Some("Basic tok"),
        Some("tok"),
    ] {
        let refused = state.authorize(&authorization(offered)).unwrap_err();
        assert_eq!(refused.0, StatusCode::UNAUTHORIZED, "{offered:?}");
    }
}

#[test]
fn token_comparison_needs_every_byte_and_the_length() {
    assert!(constant_time_eq(b"secret", b"secret"));
    assert!(!constant_time_eq(b"secreT", b"secret"));
    assert!(!constant_time_eq(b"secret-and-more", b"secret"));
    assert!(!constant_time_eq(b"", b"secret"));
}

#[test]
fn positions_name_topics_with_dots_and_dashes_and_min_as_of_needs_offsets() {
    let parsed = parse_positions("shop.orders-v2/3:1234, orders/0:0", true).unwrap();
    let named: Vec<(String, i64)> = parsed.iter().map(|(p, o)| (p.to_string(), *o)).collect();
    assert_eq!(
        named,
        [("orders/0".to_owned(), 0), ("shop.orders-v2/3".to_owned(), 1234)]
    );
    assert_eq!(parse_positions("", true).unwrap().len(), 0);
    for bad in [
        "orders/3",
        "orders:3",
        "/3:1",
        "orders/-1:1",
        "orders/1:-5",
        "orders/x:1",
        "orders/1:1.5",
    ] {
        let refused = parse_positions(bad, true).unwrap_err();
        assert_eq!(refused.0, StatusCode::BAD_REQUEST, "{bad}");
        assert!(refused.1.contains(bad), "the error names `{bad}`: {}", refused.1);
    }
    let partitions = parse_positions("orders/0,orders/7", false).unwrap();
    assert_eq!(partitions.len(), 2);
    assert!(
        parse_positions("orders/0:5", false).is_err(),
        "partitions carry no offsets"
    );
}
