//! Who may use the API: the admin token for the admin endpoints, read tokens
//! (when configured) for the read routes. Tokens are bearer tokens compared in
//! constant time.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};

/// The bearer token a request offers, or "".
fn offered(headers: &HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The auth scheme is case-insensitive (RFC 9110 §11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token)
}

impl ApiState {
    /// Admits a request carrying `Authorization: Bearer <admin token>`.
    pub(super) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        // An empty token would admit requests that carry none: it disables them.
        let Some(expected) = self.admin_token.as_ref().filter(|t| !t.trim().is_empty()) else {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "admin endpoints are disabled: set http.admin_token (or PROJECTOR__HTTP__ADMIN_TOKEN)".into(),
            ));
        };
        let offered = offered(headers);
        if !offered.is_empty() && constant_time_eq(offered.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token".into(),
            ))
        }
    }

    /// Whether a read may proceed: reads are open without read tokens; with them,
    /// any read token or the admin token admits.
    pub(super) fn may_read(&self, headers: &HeaderMap) -> bool {
        if self.read_tokens.is_empty() {
            return true;
        }
        let offered = offered(headers).as_bytes();
        if offered.is_empty() {
            return false;
        }
        let admin = self.admin_token.iter().filter(|t| !t.trim().is_empty());
        // Every token is compared, so timing does not tell which one matched.
        self.read_tokens
            .iter()
            .chain(admin)
            .fold(false, |admitted, token| {
                constant_time_eq(offered, token.as_bytes()) | admitted
            })
    }
}

/// Middleware of the read routes: 401 without a valid read token.
pub(super) async fn require_read_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    if state.may_read(request.headers()) {
        return next.run(request).await;
    }
    let mut response = ApiError(
        StatusCode::UNAUTHORIZED,
        "missing or wrong read token (Authorization: Bearer <http.read_token>)".into(),
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Compares without an early exit, so timing does not reveal how much matched.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for (i, byte) in b.iter().enumerate() {
        difference |= usize::from(a.get(i).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}
