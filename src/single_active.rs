//! Single-active-consumer queues: which queues are, and whose turn it is to subscribe to one.
//!
//! RabbitMQ makes the first consumer registered on a single-active-consumer queue the active
//! one, and when it goes, the next one registered. Each cluster decides for itself: two
//! connections subscribing at the same moment could each come first on a different cluster, and
//! both be active at once, each for its cluster's messages. So a connection subscribes to such
//! a queue only while it holds the queue's turn, and gives the turn back once every cluster has
//! answered its basic.consume. Every cluster then holds the queue's consumers in the same
//! order, makes the same one active, and the same one next.
//!
//! The turns are this process's: two warren instances in front of the same clusters do not
//! share them.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

/// Queues (vhost, name) remembered at most; past it, new ones are not (and subscribe as any).
const MAX_QUEUES: usize = 100_000;

/// The single-active-consumer queues declared through this process, and the turns taken.
#[derive(Debug, Default)]
pub struct SingleActive {
    /// (vhost, queue) whose last declare a cluster accepted made it single-active-consumer.
    queues: Mutex<HashSet<(String, String)>>,
    /// (vhost, queue) a connection is subscribing to now.
    taken: Arc<Mutex<HashSet<(String, String)>>>,
}

/// A queue's turn to subscribe, held until dropped.
#[derive(Debug)]
#[must_use = "the turn is given back when dropped"]
pub struct Turn {
    taken: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl SingleActive {
    /// Notes what a declare every cluster accepted made of `queue`; a delete is a declare of
    /// something else (`single_active` false).
    pub fn note(&self, vhost: &str, queue: &str, single_active: bool) {
        let mut q = self.queues.lock();
        let key = (vhost.to_owned(), queue.to_owned());
        if !single_active {
            q.remove(&key);
        } else if q.len() < MAX_QUEUES {
            q.insert(key);
        }
    }

    /// Whether the last declare of `queue` accepted through this process made it a
    /// single-active-consumer queue (and no delete came after it).
    pub fn is(&self, vhost: &str, queue: &str) -> bool {
        self.queues
            .lock()
            .contains(&(vhost.to_owned(), queue.to_owned()))
    }

    /// Takes `queue`'s turn to subscribe, unless a connection (this one included) holds it.
    pub fn try_take(&self, vhost: &str, queue: &str) -> Option<Turn> {
        let key = (vhost.to_owned(), queue.to_owned());
        if !self.taken.lock().insert(key.clone()) {
            return None;
        }
        Some(Turn {
            taken: self.taken.clone(),
            key,
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.taken.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_turn_per_queue_given_back_when_dropped() {
        let s = SingleActive::default();
        let turn = s.try_take("/", "jobs").expect("free");
        assert!(s.try_take("/", "jobs").is_none(), "taken");
        assert!(
            s.try_take("/", "other").is_some(),
            "another queue's is its own"
        );
        assert!(
            s.try_take("other", "jobs").is_some(),
            "so is another vhost's"
        );
        drop(turn);
        assert!(s.try_take("/", "jobs").is_some(), "given back");
    }

    #[test]
    fn the_last_declare_decides_and_a_delete_forgets() {
        let s = SingleActive::default();
        assert!(!s.is("/", "jobs"));
        s.note("/", "jobs", true);
        assert!(s.is("/", "jobs"));
        assert!(!s.is("other", "jobs"));
        s.note("/", "jobs", false);
        assert!(!s.is("/", "jobs"));
    }
}
