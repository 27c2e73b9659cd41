//! The evacuation journal: which messages were published to another cluster and not yet
//! acknowledged on the evacuating one, so that a restart (or a lost link) neither loses a
//! message nor duplicates one silently.
//!
//! A message is moved in three steps: published to the target, confirmed by the target, then
//! acknowledged on the source. A crash between the first and the last leaves the message on
//! the source, and RabbitMQ delivers it again (`redelivered`). What the journal says decides
//! what happens then:
//!
//! | journal entry | meaning | on redelivery |
//! |---|---|---|
//! | `C` confirmed | the target has it | acknowledge on the source, do not publish: no duplicate |
//! | `I` intended | published, no confirm seen: the target may have it | publish again, count a possible duplicate |
//! | `R` requeued | nacked or returned by the target, or never sent | publish again, no duplicate |
//! | none | not ours (another consumer had it) | publish, marked `x-warren-redelivered` |
//!
//! Entries are keyed by a 128-bit hash of the vhost, the queue, the properties and the body
//! (an `x-delivery-count` header, which quorum queues add on redelivery, left out), so two
//! identical messages in one queue share an entry: the second of them could be acknowledged
//! as the first's duplicate when both are redelivered after a crash. Celery's messages carry a
//! unique id in their properties, so this does not happen to them.
//!
//! The file is rewritten whole (write to a temporary file, fsync, rename) at each step of a
//! batch, so it is always one consistent state. It is bounded: the batch in flight (at most
//! one prefetch window) plus [`MAX_RESUME`] entries left from earlier failures; entries met
//! again are dropped, and all are dropped when a pass finds the cluster empty (whatever was
//! left can no longer come back).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::codec::ContentHeader;

/// Entries kept from earlier failures at most (oldest dropped first).
pub const MAX_RESUME: usize = 100_000;

/// What is known of a message published to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Intended,
    Confirmed,
    Requeued,
}

impl State {
    fn letter(self) -> char {
        match self {
            State::Intended => 'I',
            State::Confirmed => 'C',
            State::Requeued => 'R',
        }
    }

    fn from_letter(s: &str) -> Option<State> {
        Some(match s {
            "I" => State::Intended,
            "C" => State::Confirmed,
            "R" => State::Requeued,
            _ => return None,
        })
    }
}

/// One entry: the state, and whether the source had delivered the message before the
/// evacuator first got it (so its `x-warren-redelivered` mark outlives our own requeues).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub state: State,
    pub redelivered: bool,
}

/// What to do with a delivery from the evacuating cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Publish to the target; `mark_redelivered`: add the `x-warren-redelivered` header;
    /// `possible_duplicate`: the target may have it already (count it).
    Publish {
        mark_redelivered: bool,
        possible_duplicate: bool,
    },
    /// The target confirmed it before: acknowledge it on the source only.
    AckOnly,
}

/// The decision for a delivery, from its journal entry (if any) and its `redelivered` flag.
/// Only a redelivered message can have been ours before: a first delivery is never matched
/// against the journal, so an identical message sent later is moved normally.
pub fn decide(entry: Option<Entry>, redelivered: bool) -> Decision {
    match entry {
        Some(e) if redelivered => match e.state {
            State::Confirmed => Decision::AckOnly,
            State::Intended => Decision::Publish {
                mark_redelivered: e.redelivered,
                possible_duplicate: true,
            },
            State::Requeued => Decision::Publish {
                mark_redelivered: e.redelivered,
                possible_duplicate: false,
            },
        },
        _ => Decision::Publish {
            mark_redelivered: redelivered,
            possible_duplicate: false,
        },
    }
}

/// The journal of one evacuating cluster.
#[derive(Debug)]
pub struct Journal {
    /// `None`: no state directory; the journal lives in memory only.
    path: Option<PathBuf>,
    /// The batch in flight, in publish order.
    batch: Vec<(u128, Entry)>,
    /// Entries from earlier batches that may still come back, with their insertion order.
    resume: HashMap<u128, (u64, Entry)>,
    next: u64,
}

impl Journal {
    /// Opens the journal at `path` (reading what a previous process left), or an in-memory one.
    pub fn open(path: Option<PathBuf>) -> Result<Journal, String> {
        let mut j = Journal {
            path,
            ..Journal::in_memory()
        };
        if let Some(p) = &j.path {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    for (hash, entry) in parse(&text) {
                        j.remember(hash, entry);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
            }
        }
        Ok(j)
    }

    /// A journal kept in memory only (no state directory, or the file could not be read).
    pub fn in_memory() -> Journal {
        Journal {
            path: None,
            batch: Vec::new(),
            resume: HashMap::new(),
            next: 0,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Entries that may still come back (for the tests and the logs).
    pub fn pending(&self) -> usize {
        self.resume.len() + self.batch.len()
    }

    fn remember(&mut self, hash: u128, entry: Entry) {
        if self.resume.len() >= MAX_RESUME
            && let Some(oldest) = self
                .resume
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(h, _)| *h)
        {
            self.resume.remove(&oldest);
        }
        self.resume.insert(hash, (self.next, entry));
        self.next += 1;
    }

    /// The decision for a delivery ([`decide`]); an entry it matched is used up.
    pub fn decide(&mut self, hash: u128, redelivered: bool) -> Decision {
        let entry = if redelivered {
            self.resume.remove(&hash).map(|(_, e)| e)
        } else {
            None
        };
        decide(entry, redelivered)
    }

    /// Step 1: the batch about to be published (hash, redelivered before us), written down
    /// before the first publish.
    pub fn intend(&mut self, batch: &[(u128, bool)]) -> Result<(), String> {
        self.batch = batch
            .iter()
            .map(|&(h, redelivered)| {
                (
                    h,
                    Entry {
                        state: State::Intended,
                        redelivered,
                    },
                )
            })
            .collect();
        self.write()
    }

    /// Step 2: the outcome of each publish of the batch, in the order given to `intend`:
    /// `Some(true)` confirmed, `Some(false)` nacked or returned (not on the target), `None`
    /// no answer (may be on the target). Written before the source is acknowledged.
    pub fn outcome(&mut self, outcomes: &[Option<bool>]) -> Result<(), String> {
        for ((_, e), o) in self.batch.iter_mut().zip(outcomes) {
            e.state = match o {
                Some(true) => State::Confirmed,
                Some(false) => State::Requeued,
                None => State::Intended,
            };
        }
        self.write()
    }

    /// Step 3: the source has processed the acks and requeues of the batch (a round trip on
    /// its channel came back). Confirmed entries are done; the others stay for when their
    /// messages come back. Written with the next batch's step 1, or by [`Journal::flush`].
    pub fn settled(&mut self) {
        for (h, e) in std::mem::take(&mut self.batch) {
            if e.state != State::Confirmed {
                self.remember(h, e);
            }
        }
    }

    /// The source's link was lost before step 3: the acks may not have reached it, so every
    /// entry of the batch may come back, confirmed ones included.
    pub fn abandoned(&mut self) {
        for (h, e) in std::mem::take(&mut self.batch) {
            self.remember(h, e);
        }
    }

    /// A whole pass found the cluster empty: nothing the journal holds can come back.
    pub fn clear(&mut self) -> Result<(), String> {
        self.batch.clear();
        self.resume.clear();
        self.write()
    }

    /// Writes the current state (after [`Journal::settled`], when no batch follows at once).
    pub fn flush(&mut self) -> Result<(), String> {
        self.write()
    }

    fn write(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = String::with_capacity(64 + 36 * self.pending());
        text.push_str(
            "# warren evacuation journal: STATE REDELIVERED HASH (I intended, C confirmed, R requeued)\n",
        );
        let mut older: Vec<(&u128, &(u64, Entry))> = self.resume.iter().collect();
        older.sort_by_key(|(_, (n, _))| *n);
        let lines = older
            .into_iter()
            .map(|(h, (_, e))| (*h, *e))
            .chain(self.batch.iter().copied());
        for (h, e) in lines {
            text.push_str(&format!(
                "{} {} {h:032x}\n",
                e.state.letter(),
                u8::from(e.redelivered)
            ));
        }
        write_atomically(path, text.as_bytes())
            .map_err(|e| format!("cannot write the journal {}: {e}", path.display()))
    }
}

/// The entries of a journal file; lines it does not understand are skipped (a torn write
/// cannot happen with the rename, but a hand-edited file may hold anything).
pub fn parse(text: &str) -> Vec<(u128, Entry)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_ascii_whitespace();
            let state = State::from_letter(parts.next()?)?;
            let redelivered = match parts.next()? {
                "0" => false,
                "1" => true,
                _ => return None,
            };
            let hash = u128::from_str_radix(parts.next()?, 16).ok()?;
            Some((hash, Entry { state, redelivered }))
        })
        .collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("journal.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

/// The journal key of a message: vhost, queue, properties (without `x-delivery-count`) and
/// body, hashed with two FNV-1a lanes into 128 bits (stable across processes and releases).
pub fn message_hash(vhost: &str, queue: &str, header: &Bytes, body: &[Bytes]) -> u128 {
    let mut h = Fnv128::default();
    h.write(vhost.as_bytes());
    h.write(&[0]);
    h.write(queue.as_bytes());
    h.write(&[0]);
    match stable_header(header) {
        Some(stable) => h.write(&stable),
        None => h.write(header),
    }
    h.write(&[0]);
    for chunk in body {
        h.write(chunk);
    }
    h.finish()
}

/// The header as it would be without the `x-delivery-count` a quorum queue adds on
/// redelivery; `None` when it has none (the raw bytes are hashed then) or cannot be decoded.
fn stable_header(header: &Bytes) -> Option<Vec<u8>> {
    let mut decoded = ContentHeader::decode(header.clone()).ok()?;
    let headers = decoded.properties.headers.as_mut()?;
    headers.get("x-delivery-count")?;
    headers
        .0
        .retain(|(k, _)| k.as_bytes() != b"x-delivery-count");
    let mut out = bytes::BytesMut::new();
    decoded.encode(&mut out);
    Some(out.to_vec())
}

#[derive(Debug)]
struct Fnv128 {
    a: u64,
    b: u64,
}

impl Default for Fnv128 {
    fn default() -> Self {
        Fnv128 {
            a: 0xcbf2_9ce4_8422_2325,
            b: 0x6c62_272e_07bb_0142,
        }
    }
}

impl Fnv128 {
    fn write(&mut self, bytes: &[u8]) {
        for &x in bytes {
            self.a = (self.a ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
            self.b = (self.b ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x9e37);
        }
    }

    fn finish(&self) -> u128 {
        let mix = |mut s: u64| {
            s ^= s >> 29;
            s = s.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            s ^ (s >> 32)
        };
        (u128::from(mix(self.a)) << 64) | u128::from(mix(self.b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{BasicProperties, FieldTable, FieldValue, ShortStr};

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("warren-journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("evacuate-a.journal")
    }

    #[test]
    fn the_decision_table() {
        let e = |state| {
            Some(Entry {
                state,
                redelivered: false,
            })
        };
        assert_eq!(decide(e(State::Confirmed), true), Decision::AckOnly);
        assert_eq!(
            decide(e(State::Intended), true),
            Decision::Publish {
                mark_redelivered: false,
                possible_duplicate: true
            }
        );
        assert_eq!(
            decide(e(State::Requeued), true),
            Decision::Publish {
                mark_redelivered: false,
                possible_duplicate: false
            }
        );
        // Not redelivered: never ours before, whatever the journal holds.
        assert_eq!(
            decide(e(State::Confirmed), false),
            Decision::Publish {
                mark_redelivered: false,
                possible_duplicate: false
            }
        );
        // Redelivered and not in the journal: another consumer had it.
        assert_eq!(
            decide(None, true),
            Decision::Publish {
                mark_redelivered: true,
                possible_duplicate: false
            }
        );
        let was = Some(Entry {
            state: State::Intended,
            redelivered: true,
        });
        assert_eq!(
            decide(was, true),
            Decision::Publish {
                mark_redelivered: true,
                possible_duplicate: true
            },
            "the mark outlives our own requeue"
        );
    }

    #[test]
    fn a_crash_at_each_step_resumes_without_loss_and_counts_duplicates() {
        let path = temp("steps");
        let (m1, m2, m3) = (1u128, 2u128, 3u128);
        // Step 1 written, then the process dies: all three may be on the target.
        let mut j = Journal::open(Some(path.clone())).expect("open");
        j.intend(&[(m1, false), (m2, false), (m3, true)])
            .expect("intend");
        drop(j);
        let mut j = Journal::open(Some(path.clone())).expect("reopen");
        assert_eq!(j.pending(), 3);
        assert_eq!(
            j.decide(m1, true),
            Decision::Publish {
                mark_redelivered: false,
                possible_duplicate: true
            }
        );
        assert_eq!(
            j.decide(m3, true),
            Decision::Publish {
                mark_redelivered: true,
                possible_duplicate: true
            }
        );
        assert_eq!(
            j.decide(m1, true),
            Decision::Publish {
                mark_redelivered: true,
                possible_duplicate: false
            },
            "an entry is used once"
        );
        // Step 2 written (m1 confirmed, m2 returned, m3 no answer), then the process dies.
        let path = temp("outcome");
        let mut j = Journal::open(Some(path.clone())).expect("open");
        j.intend(&[(m1, false), (m2, false), (m3, false)])
            .expect("intend");
        j.outcome(&[Some(true), Some(false), None])
            .expect("outcome");
        drop(j);
        let mut j = Journal::open(Some(path.clone())).expect("reopen");
        assert_eq!(
            j.decide(m1, true),
            Decision::AckOnly,
            "confirmed: no duplicate"
        );
        assert_eq!(
            j.decide(m2, true),
            Decision::Publish {
                mark_redelivered: false,
                possible_duplicate: false
            }
        );
        assert_eq!(
            j.decide(m3, true),
            Decision::Publish {
                mark_redelivered: false,
                possible_duplicate: true
            }
        );
        // Step 3: settled; the confirmed entry is gone once the next state is written.
        let path = temp("settled");
        let mut j = Journal::open(Some(path.clone())).expect("open");
        j.intend(&[(m1, false), (m2, false)]).expect("intend");
        j.outcome(&[Some(true), Some(false)]).expect("outcome");
        j.settled();
        j.flush().expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(parse(&text).len(), 1, "only the requeued one: {text}");
        // The source's link lost before the round trip: confirmed ones may come back too.
        j.intend(&[(m3, false)]).expect("intend");
        j.outcome(&[Some(true)]).expect("outcome");
        j.abandoned();
        assert_eq!(j.decide(m3, true), Decision::AckOnly);
        // An empty pass clears it all.
        j.clear().expect("clear");
        assert_eq!(j.pending(), 0);
        assert!(parse(&std::fs::read_to_string(&path).expect("read")).is_empty());
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn the_journal_is_bounded_and_survives_garbage() {
        let mut j = Journal::open(None).expect("in memory");
        for i in 0..(MAX_RESUME as u128 + 10) {
            j.remember(
                i,
                Entry {
                    state: State::Requeued,
                    redelivered: false,
                },
            );
        }
        assert_eq!(j.pending(), MAX_RESUME);
        assert!(!j.resume.contains_key(&0), "the oldest went first");
        let parsed = parse("# x\nC 1 00ff\nbad line\nX 0 1\nI 2 1\nR 0 zz\nI 0 10\n");
        assert_eq!(
            parsed,
            vec![
                (
                    0xff,
                    Entry {
                        state: State::Confirmed,
                        redelivered: true
                    }
                ),
                (
                    0x10,
                    Entry {
                        state: State::Intended,
                        redelivered: false
                    }
                )
            ]
        );
    }

    #[test]
    fn the_hash_ignores_the_delivery_count_and_nothing_else() {
        let header = |count: Option<i64>, id: &str| {
            let mut headers = FieldTable::default();
            headers.insert(ShortStr::from_static("task"), FieldValue::Bool(true));
            if let Some(n) = count {
                headers.insert(
                    ShortStr::from_static("x-delivery-count"),
                    FieldValue::I64(n),
                );
            }
            let h = ContentHeader {
                class_id: 60,
                body_size: 3,
                properties: BasicProperties {
                    headers: Some(headers),
                    message_id: ShortStr::try_from(id).ok(),
                    ..Default::default()
                },
            };
            let mut out = bytes::BytesMut::new();
            h.encode(&mut out);
            out.freeze()
        };
        let body = [Bytes::from_static(b"abc")];
        let first = message_hash("/", "q", &header(None, "1"), &body);
        assert_eq!(first, message_hash("/", "q", &header(Some(1), "1"), &body));
        assert_ne!(first, message_hash("/", "q", &header(None, "2"), &body));
        assert_ne!(first, message_hash("/", "q2", &header(None, "1"), &body));
        assert_ne!(first, message_hash("/v", "q", &header(None, "1"), &body));
        assert_ne!(
            first,
            message_hash("/", "q", &header(None, "1"), &[Bytes::from_static(b"abd")])
        );
    }
}
