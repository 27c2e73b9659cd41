//! What a session's event loop waits for besides its sockets: rare events (an operator's close,
//! the proxy's shutdown, a configuration change, a link opened in the background) and its
//! deadlines (the once-a-second housekeeping, the links' heartbeats, the client's heartbeat or
//! close handshake).
//!
//! Why not one `select!` branch each, as the obvious loop has it: `select!` polls every branch
//! on every turn, and the loop turns once or more per message. Polling a cancellation or
//! watch future takes a lock to re-register its waker, and a fresh `sleep_until` inserts into
//! and removes from the timer wheel; together they were about a sixth of warren's
//! instructions per message at 2,000 msg/s. Here the rare events sit in one
//! [`SelectAll`](futures_util::stream::SelectAll), which polls only the streams that woke it,
//! and the deadlines share one timer that is moved only when the earliest deadline moves
//! earlier: a later one (every read moves the client's heartbeat deadline) is found when the
//! timer fires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::Opened;
use crate::config::Config;

/// Housekeeping period: idle and removed links, the `/clients` entry, orphans, reconnects.
pub(super) const TICK: Duration = Duration::from_secs(1);

/// A rare event that ends a wait.
pub(super) enum Rare {
    /// An operator asked to close this connection (admin endpoint).
    OperatorClose,
    /// The proxy is shutting down.
    Shutdown,
    /// The configuration was reloaded.
    Config(Arc<Config>),
    /// A link the session asked for in the background is open (or failed). Boxed: it is large
    /// and rare.
    Opened(Box<Opened>),
}

/// The rare events of one session, as one stream.
pub(super) type RareEvents = SelectAll<BoxStream<'static, Rare>>;

pub(super) fn rare_events(
    operator_close: CancellationToken,
    shutdown: CancellationToken,
    config: watch::Receiver<Arc<Config>>,
    opened: mpsc::Receiver<Opened>,
) -> RareEvents {
    let configs = stream::unfold(config, |mut rx| async move {
        // An error means the sender is gone (the proxy is stopping): no more changes.
        rx.changed().await.ok()?;
        let config = rx.borrow_and_update().clone();
        Some((Rare::Config(config), rx))
    });
    let opened = stream::unfold(opened, |mut rx| async move {
        let o = rx.recv().await?;
        Some((Rare::Opened(Box::new(o)), rx))
    });
    stream::select_all([
        stream::once(operator_close.cancelled_owned())
            .map(|()| Rare::OperatorClose)
            .boxed(),
        stream::once(shutdown.cancelled_owned())
            .map(|()| Rare::Shutdown)
            .boxed(),
        configs.boxed(),
        opened.boxed(),
    ])
}

/// The session's deadlines behind one timer.
pub(super) struct Deadlines {
    timer: Pin<Box<Sleep>>,
    /// Where the timer is set; `None` once it fired and until it is set again.
    armed: Option<Instant>,
    /// Whether the timer holds this task's waker since it was last set (polled, pending).
    registered: bool,
    /// The next housekeeping turn.
    pub(super) tick: Instant,
    /// The earliest time a link may have missed its heartbeats (checked when it comes).
    pub(super) links: Instant,
    /// When a lazy link's confirms must be read if no turn of the client's has read them (see
    /// `read_pace`).
    pub(super) pace: Instant,
}

/// Which deadlines had come when the timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Due {
    pub(super) tick: bool,
    pub(super) links: bool,
    pub(super) client: bool,
}

impl Deadlines {
    /// Deadlines whose first housekeeping turn is due at once, at the session's first wait (as
    /// the first tick of a tokio `interval`).
    pub(super) fn new(now: Instant) -> Self {
        let far = now + Duration::from_secs(3600);
        Deadlines {
            timer: Box::pin(tokio::time::sleep_until(far)),
            armed: None,
            registered: false,
            tick: now,
            links: far,
            pace: far,
        }
    }

    /// The earliest deadline, the client's (`client`, recomputed every turn) included.
    fn next(&self, client: Option<Instant>) -> Instant {
        let next = self.tick.min(self.links).min(self.pace);
        client.map_or(next, |c| c.min(next))
    }

    /// Makes sure the timer fires no later than the earliest deadline. Touches the timer wheel
    /// only when that moved earlier than where the timer is set.
    pub(super) fn arm(&mut self, client: Option<Instant>) {
        let next = self.next(client);
        if self.armed.is_none_or(|armed| next < armed) {
            self.timer.as_mut().reset(next);
            self.armed = Some(next);
            self.registered = false;
        }
    }

    /// Waits for the timer.
    pub(super) async fn fired(&mut self) {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await
    }

    /// Polls the timer. Polls tokio's `Sleep` only when it has fired or was moved since it last
    /// registered this task: in between, its waker is registered and polling it again would
    /// only cost the timer's lock on every turn of the loop.
    pub(super) fn poll_fired(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.registered && !self.timer.is_elapsed() {
            return Poll::Pending;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.armed = None;
                self.registered = false;
                Poll::Ready(())
            }
            Poll::Pending => {
                self.registered = true;
                Poll::Pending
            }
        }
    }

    /// What is due at `now`, for the client deadline `client` of this turn.
    pub(super) fn due(&self, now: Instant, client: Option<Instant>) -> Due {
        Due {
            tick: now >= self.tick,
            links: now >= self.links,
            client: client.is_some_and(|c| now >= c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deadlines after their first housekeeping turn, which is due at once; the next is a
    /// `TICK` later, as the session sets it.
    async fn after_first_tick() -> (Instant, Deadlines) {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        d.arm(None);
        d.fired().await;
        assert_eq!(
            Instant::now(),
            t0,
            "the first housekeeping turn waits for nothing"
        );
        assert!(d.due(t0, None).tick);
        d.tick = t0 + TICK;
        (t0, d)
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_client_deadline_does_not_move_the_timer_an_earlier_one_does() {
        let (t0, mut d) = after_first_tick().await;
        d.arm(Some(t0 + Duration::from_millis(500)));
        assert_eq!(d.armed, Some(t0 + Duration::from_millis(500)));
        // A read moved the heartbeat deadline later: the timer stays where it is.
        d.arm(Some(t0 + Duration::from_millis(900)));
        assert_eq!(d.armed, Some(t0 + Duration::from_millis(500)));
        // A close began with an earlier deadline: the timer moves.
        d.arm(Some(t0 + Duration::from_millis(100)));
        assert_eq!(d.armed, Some(t0 + Duration::from_millis(100)));
        d.fired().await;
        assert_eq!(Instant::now(), t0 + Duration::from_millis(100));
        let due = d.due(Instant::now(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(
            due,
            Due {
                tick: false,
                links: false,
                client: true
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_fired_early_for_a_deadline_that_moved_finds_nothing_due_and_rearms() {
        let (t0, mut d) = after_first_tick().await;
        d.arm(Some(t0 + Duration::from_millis(200)));
        d.fired().await;
        // The heartbeat deadline moved on meanwhile: nothing is due, and arming again sets the
        // timer at the new deadline.
        let later = Some(t0 + Duration::from_millis(700));
        assert_eq!(
            d.due(Instant::now(), later),
            Due {
                tick: false,
                links: false,
                client: false
            }
        );
        d.arm(later);
        assert_eq!(d.armed, later);
        // Without a client deadline the housekeeping tick is the next.
        d.fired().await;
        d.arm(None);
        assert_eq!(d.armed, Some(t0 + TICK));
    }

    fn config() -> Arc<Config> {
        let text = "listen = \"127.0.0.1:5673\"\n[[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5701\"]\n";
        Arc::new(Config::parse(text, "t.toml").expect("a valid configuration"))
    }

    #[tokio::test]
    async fn rare_events_arrive_once_each_and_the_stream_outlives_a_closed_config() {
        let close = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let (config_tx, config_rx) = watch::channel(config());
        let (_opened_tx, opened_rx) = mpsc::channel(1);
        let mut rare = rare_events(close.clone(), shutdown.clone(), config_rx, opened_rx);
        close.cancel();
        assert!(matches!(rare.next().await, Some(Rare::OperatorClose)));
        config_tx.send(config()).unwrap();
        assert!(matches!(rare.next().await, Some(Rare::Config(_))));
        drop(config_tx);
        shutdown.cancel();
        assert!(matches!(rare.next().await, Some(Rare::Shutdown)));
        // The close fired once: polling again waits (the opened channel is still open).
        let again = tokio::time::timeout(Duration::from_millis(20), rare.next()).await;
        assert!(again.is_err(), "nothing more is pending");
    }
}
