//! A queue or exchange the client declared that a failed-over link's cluster no longer has.
//!
//! After a failover the cluster kept what the old link declared, so the replay only checks, with
//! passive declares on channels of warren's own, that the client's queues and exchanges are
//! still there. One that is missing is missing for one of two reasons, and they need opposite
//! answers:
//!
//! * it is gone from **every** cluster: it went as it would from one broker (another client
//!   deleted it, its `x-expires` lease ran out, an auto-delete queue lost its last consumer or an
//!   auto-delete exchange its last binding). One broker's client carries on and learns of it when
//!   it next uses the name; so does warren's, which forgets it (the replay must not declare it
//!   again on any cluster);
//! * it is gone from **this** cluster only: the cluster lost it (a queue that lived on the node
//!   that died). Carrying on would route this cluster's share of its messages nowhere, so the
//!   client is closed with 320 saying why, as one broker's client loses its connection.
//!
//! So a refused check asks the other live links (passive declares on their own channels) and
//! the verdict waits for their answers. A link that dies before answering counts as having the
//! name: without proof that it is gone everywhere, warren keeps the old, safe answer.
//!
//! A link joining the connection (see `joining.rs`) uses the same bookkeeping: its cluster lacks
//! the names by definition, so only the others are asked, before anything is declared there.
//!
//! This file keeps only the bookkeeping (which check waits for how many answers); the session
//! sends the declares and acts on the verdict.

use std::collections::VecDeque;

use crate::client::channel::LinkRef;
use crate::codec::Method;

/// Checks on the wire at once: a client may have declared thousands of queues, and each check
/// takes a channel of its own on the new link (so that a refusal closes that one only); the
/// rest wait their turn.
const MAX_IN_FLIGHT: usize = 32;

/// What the other clusters said about a name the replaying link's cluster no longer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Some clusters have not answered yet.
    Waiting,
    /// No other cluster has it: it went as on one broker; forget it.
    GoneEverywhere,
    /// Another cluster still has it (or could not tell): lost on this cluster only.
    LostHere,
}

/// Who needs a check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asker {
    /// A failed-over link replaying (the check counts as one of its replayed requests): the
    /// check goes to its cluster first, and the others are asked only if it refuses.
    Replay(LinkRef),
    /// A link held back from joining (see `joining.rs`), by id: its cluster lacks the name by
    /// definition, so only the others are asked.
    Join(u64),
}

/// One passive check of a replay, refused or not yet answered.
#[derive(Debug)]
pub(super) struct Check {
    pub(super) asker: Asker,
    /// The passive declare.
    pub(super) method: Method,
    /// The cluster's refusal, once in: `(reply code, reply text)`.
    pub(super) refusal: Option<(u16, String)>,
    /// Other clusters still to answer.
    probes: u32,
    /// One of them has the name (or died before saying).
    found: bool,
    /// Sent (counted in flight), or still waiting its turn.
    sent: bool,
    /// The client channel it is sent for (see `LinkSlot::side_request`).
    pub(super) ch: u16,
}

impl Check {
    fn verdict(&self) -> Verdict {
        if self.found {
            Verdict::LostHere
        } else if self.probes > 0 {
            Verdict::Waiting
        } else {
            Verdict::GoneEverywhere
        }
    }
}

/// The replay checks of a session in flight, by id (a few per failover: one per queue and
/// exchange the client declared).
#[derive(Debug, Default)]
pub(super) struct ReplayChecks {
    next: u64,
    checks: Vec<(u64, Check)>,
    /// Checks waiting to be sent, oldest first.
    queued: VecDeque<u64>,
    in_flight: usize,
}

impl ReplayChecks {
    /// Tracks the check `method` for client channel `ch` of `link`, to be sent when
    /// [`next_to_send`](Self::next_to_send) hands it out; returns its id.
    pub(super) fn start(&mut self, asker: Asker, ch: u16, method: Method) -> u64 {
        self.next += 1;
        let check = Check {
            asker,
            method,
            refusal: None,
            probes: 0,
            found: false,
            sent: false,
            ch,
        };
        self.checks.push((self.next, check));
        self.queued.push_back(self.next);
        self.next
    }

    /// The next check to send now, if fewer than [`MAX_IN_FLIGHT`] are on the wire; counted
    /// in flight from here.
    pub(super) fn next_to_send(&mut self) -> Option<(u64, &Check)> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        while let Some(id) = self.queued.pop_front() {
            if let Some(at) = self.checks.iter().position(|(i, _)| *i == id) {
                self.in_flight += 1;
                let (id, check) = &mut self.checks[at];
                check.sent = true;
                return Some((*id, check));
            }
        }
        None
    }

    pub(super) fn get(&self, id: u64) -> Option<&Check> {
        self.checks.iter().find(|(i, _)| *i == id).map(|(_, c)| c)
    }

    /// The check passed (the cluster has the name): forgets it.
    pub(super) fn passed(&mut self, id: u64) -> Option<Check> {
        self.take(id)
    }

    /// The cluster refused the check; `probes` other clusters are being asked. With none to
    /// ask, nothing shows the name is gone everywhere: lost here.
    pub(super) fn refused(&mut self, id: u64, code: u16, text: String, probes: u32) -> Verdict {
        let Some(check) = self.get_mut(id) else {
            return Verdict::Waiting;
        };
        check.refusal = Some((code, text));
        check.probes = probes;
        if probes == 0 {
            check.found = true;
        }
        check.verdict()
    }

    /// Another cluster answered check `id`'s probe: it has the name (`exists`), or not.
    pub(super) fn probe_answered(&mut self, id: u64, exists: bool) -> Verdict {
        let Some(check) = self.get_mut(id) else {
            return Verdict::Waiting;
        };
        check.probes = check.probes.saturating_sub(1);
        check.found |= exists;
        check.verdict()
    }

    /// Takes a check whose verdict is in (or whose link died: the next link checks again).
    pub(super) fn take(&mut self, id: u64) -> Option<Check> {
        let at = self.checks.iter().position(|(i, _)| *i == id)?;
        let check = self.checks.swap_remove(at).1;
        if check.sent {
            self.in_flight -= 1;
        }
        Some(check)
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Check> {
        self.checks
            .iter_mut()
            .find(|(i, _)| *i == id)
            .map(|(_, c)| c)
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks() -> (ReplayChecks, u64) {
        let mut c = ReplayChecks::default();
        let id = c.start(
            Asker::Replay(LinkRef::new(0, 1)),
            1,
            Method::QueueDeclare(Default::default()),
        );
        assert_eq!(c.next_to_send().map(|(i, _)| i), Some(id));
        (c, id)
    }

    #[test]
    fn at_most_32_are_on_the_wire_and_each_verdict_lets_the_next_go() {
        let mut c = ReplayChecks::default();
        let link = Asker::Replay(LinkRef::new(0, 1));
        let ids: Vec<u64> = (0..40)
            .map(|_| c.start(link, 1, Method::QueueDeclare(Default::default())))
            .collect();
        let mut sent = Vec::new();
        while let Some((id, _)) = c.next_to_send() {
            sent.push(id);
        }
        assert_eq!(sent, ids[..32]);
        c.passed(ids[0]);
        c.refused(ids[1], 404, "gone".into(), 1);
        assert_eq!(c.next_to_send().map(|(i, _)| i), Some(ids[32]));
        assert!(
            c.next_to_send().is_none(),
            "a refused check waits for its probes"
        );
        c.probe_answered(ids[1], false);
        c.take(ids[1]);
        assert_eq!(c.next_to_send().map(|(i, _)| i), Some(ids[33]));
        // A queued check whose link died is taken before it is sent: nothing in flight changes.
        c.take(ids[39]);
        let rest: Vec<u64> = std::iter::from_fn(|| c.next_to_send().map(|(i, _)| i)).collect();
        assert!(rest.is_empty(), "{rest:?}");
        for id in &ids[2..32] {
            c.take(*id);
        }
        let rest: Vec<u64> = std::iter::from_fn(|| c.next_to_send().map(|(i, _)| i)).collect();
        assert_eq!(rest, ids[34..39]);
    }

    #[test]
    fn gone_from_every_cluster_once_all_answered_without_it() {
        let (mut c, id) = checks();
        assert_eq!(c.refused(id, 404, "no queue".into(), 2), Verdict::Waiting);
        assert_eq!(c.probe_answered(id, false), Verdict::Waiting);
        assert_eq!(c.probe_answered(id, false), Verdict::GoneEverywhere);
        assert!(c.take(id).is_some() && c.is_empty());
    }

    #[test]
    fn one_cluster_that_has_it_makes_it_lost_here() {
        let (mut c, id) = checks();
        c.refused(id, 404, "no queue".into(), 2);
        assert_eq!(c.probe_answered(id, true), Verdict::LostHere);
        assert_eq!(c.probe_answered(id, false), Verdict::LostHere);
    }

    #[test]
    fn nobody_to_ask_is_lost_here() {
        let (mut c, id) = checks();
        assert_eq!(c.refused(id, 404, "no queue".into(), 0), Verdict::LostHere);
        assert_eq!(
            c.get(id).and_then(|c| c.refusal.clone()).map(|r| r.0),
            Some(404)
        );
    }

    #[test]
    fn a_passed_check_is_forgotten_and_late_answers_ignored() {
        let (mut c, id) = checks();
        assert!(c.passed(id).is_some());
        assert_eq!(c.probe_answered(id, false), Verdict::Waiting);
        assert!(c.is_empty() && c.in_flight == 0);
    }
}
