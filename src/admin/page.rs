//! `GET /`: a self-contained status page (inline CSS and JS, no external assets).
//!
//! The page fetches `/clusters`, `/queues` and `/clients` every 2 s and puts every server value
//! in the DOM as text. Its header shows warren's version, uptime and configuration file; per
//! node, the last health check and since when a down node is down. It computes publish and
//! delivery rates from two consecutive `/clusters` samples and keeps the last 5 minutes of them
//! in a ring buffer, drawn as inline SVG sparklines per cluster and in total. Its buttons drain,
//! undrain and set the weight of shard clusters, and close client connections, through the POST
//! routes, asking for the admin token when one answers 401 (kept in `sessionStorage` for the
//! tab). Rows are rebuilt from each answer, so removed clusters and deleted queues disappear.
//! See docs/operations.md ("The status page").

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::header::{self, HeaderValue};

/// The page itself.
pub const PAGE: &str = include_str!("page.html");

pub(super) fn response() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Inline script and style only; fetches only to this origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    r
}
