//! The admin side's HTTP/1.1 client, on hyper: `warren check-queues` asking a warren's `/queues`,
//! and `/queues` asking each cluster's RabbitMQ management API. One request per connection
//! (these are rare), the answer's size bounded.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Sends `request` on a fresh HTTP/1.1 connection over `io` and reads the whole answer.
pub async fn send<I>(
    io: I,
    request: Request<Empty<Bytes>>,
    limit: usize,
) -> Result<(StatusCode, Bytes), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    format!("answer larger than {limit} bytes")
                } else {
                    format!("cannot read the answer: {e}")
                }
            })?
            .to_bytes();
        Ok((status, body))
    };
    tokio::pin!(exchange);
    tokio::pin!(conn);
    // The connection is driven here, beside the exchange; once it ends (the server closed it, or
    // an error), the exchange ends too, with the answer or with the error.
    let mut conn_done = false;
    loop {
        tokio::select! {
            r = &mut exchange => return r,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    }
}
