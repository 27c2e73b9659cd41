//! The part of RabbitMQ's management HTTP API that tools read queue depths from, answered with
//! the sums over the shard clusters.
//!
//! Flower's broker tab (`--broker_api`), KEDA's RabbitMQ scaler in HTTP mode and scripts written
//! against `GET /api/queues` ask one RabbitMQ for its queues. Pointed at one shard cluster they
//! see that cluster's share of each queue; pointed at warren's admin endpoint they get the
//! numbers of `GET /queues`, in the management API's shape:
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /api/queues` | every queue `GET /queues?queue=*` lists, as a JSON array |
//! | `GET /api/queues/VHOST` | those of one vhost (`%2F` for `/`) |
//! | `GET /api/queues/VHOST/NAME` | one queue (asked of every shard cluster by name when the listing does not have it); 404 when none has it |
//!
//! Each queue has `name`, `vhost` and `consumers`, and, when every shard cluster answered,
//! `messages_ready`; `messages_unacknowledged` and `messages` (ready plus unacknowledged) only
//! when every cluster told its unacknowledged count (clusters with `management` do, passive
//! declares do not). A count warren does not know is left out, as RabbitMQ leaves out
//! statistics it has not collected, rather than given too low: Flower shows it as "N/A".

use serde_json::{Value, json};

/// Which of the routes above a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ApiPath {
    Queues,
    Vhost(String),
    Queue { vhost: String, name: String },
}

impl ApiPath {
    /// The route of `path` (trailing `/` removed), its segments percent-decoded by `decode`;
    /// `None` when it is not one of them.
    pub(super) fn parse(path: &str, decode: impl Fn(&str) -> Option<String>) -> Option<ApiPath> {
        let rest = path.strip_prefix("/api/queues")?;
        if rest.is_empty() {
            return Some(ApiPath::Queues);
        }
        let mut segments = rest.strip_prefix('/')?.split('/');
        let vhost = decode(segments.next()?)?;
        let name = segments.next().map(&decode);
        if segments.next().is_some() || vhost.is_empty() {
            return None;
        }
        Some(match name {
            None => ApiPath::Vhost(vhost),
            Some(Some(name)) if !name.is_empty() => ApiPath::Queue { vhost, name },
            Some(_) => return None,
        })
    }
}

/// The management API's object for one `/queues` entry (see `queues::entries`).
pub(super) fn queue(entry: &Value) -> Value {
    let mut q = json!({
        "name": entry["name"],
        "vhost": entry["vhost"],
        "consumers": entry["consumers"],
    });
    if entry["complete"] == Value::Bool(true)
        && let Some(ready) = entry["messages"].as_u64()
    {
        q["messages_ready"] = ready.into();
        if let Some(unacked) = entry["unacked"].as_u64() {
            q["messages_unacknowledged"] = unacked.into();
            q["messages"] = ready.saturating_add(unacked).into();
        }
    }
    q
}

/// The object for the one queue of a `/queues` entry, or `None` when every shard cluster said
/// it has no such queue (RabbitMQ's 404).
pub(super) fn found(entry: &Value) -> Option<Value> {
    let clusters = entry["clusters"].as_array()?;
    let missing = |c: &Value| c["status"] == "missing";
    (!clusters.iter().all(missing)).then(|| queue(entry))
}

/// The array `GET /api/queues[/VHOST]` answers with, from a `GET /queues` answer.
pub(super) fn listing(answer: &Value, vhost: Option<&str>) -> Value {
    let queues = answer["queues"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    Value::Array(
        queues
            .iter()
            .filter(|q| vhost.is_none_or(|v| q["vhost"] == v))
            .map(queue)
            .collect(),
    )
}

/// The entry of queue `name` of `vhost` in a `GET /queues` answer.
pub(super) fn find<'a>(answer: &'a Value, vhost: &str, name: &str) -> Option<&'a Value> {
    answer["queues"]
        .as_array()?
        .iter()
        .find(|q| q["vhost"] == vhost && q["name"] == name)
}

/// RabbitMQ's answer for an object it does not have.
pub(super) fn not_found() -> Value {
    json!({"error": "Object Not Found", "reason": "Not Found"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Option<String> {
        Some(s.replace("%2F", "/").replace("%2f", "/"))
    }

    #[test]
    fn paths() {
        let parse = |p: &str| ApiPath::parse(p, decode);
        assert_eq!(parse("/api/queues"), Some(ApiPath::Queues));
        assert_eq!(parse("/api/queues/%2F"), Some(ApiPath::Vhost("/".into())));
        assert_eq!(
            parse("/api/queues/%2F/celery"),
            Some(ApiPath::Queue {
                vhost: "/".into(),
                name: "celery".into()
            })
        );
        for bad in [
            "/api/queuesx",
            "/api/queues/",
            "/api/queues//celery",
            "/api/queues/%2F/",
            "/api/queues/%2F/a/b",
            "/api/exchanges",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(ApiPath::parse("/api/queues/%zz", |_| None), None);
    }

    fn entry(complete: bool, unacked: Value, statuses: &[&str]) -> Value {
        let clusters: Vec<Value> = statuses.iter().map(|s| json!({"status": s})).collect();
        json!({"vhost": "/", "name": "celery", "messages": 12, "consumers": 3,
            "unacked": unacked, "complete": complete, "clusters": clusters})
    }

    #[test]
    fn counts_are_given_only_when_every_cluster_told_them() {
        let q = queue(&entry(true, json!(5), &["ok", "ok"]));
        assert_eq!(
            q,
            json!({"name": "celery", "vhost": "/", "consumers": 3, "messages_ready": 12,
                "messages_unacknowledged": 5, "messages": 17})
        );
        let q = queue(&entry(true, Value::Null, &["ok", "ok"]));
        assert_eq!(q["messages_ready"], 12);
        assert!(q.get("messages").is_none() && q.get("messages_unacknowledged").is_none());
        let q = queue(&entry(false, json!(5), &["ok", "error"]));
        assert!(
            q.get("messages_ready").is_none() && q.get("messages").is_none(),
            "a cluster that did not answer makes every count unknown: {q}"
        );
    }

    #[test]
    fn a_queue_no_cluster_has_is_not_found_and_vhosts_filter_the_listing() {
        assert!(found(&entry(true, json!(0), &["missing", "missing"])).is_none());
        assert!(found(&entry(true, json!(0), &["missing", "ok"])).is_some());
        let answer = json!({"queues": [
            {"vhost": "/", "name": "a", "messages": 1, "consumers": 0, "complete": true},
            {"vhost": "jobs", "name": "b", "messages": 2, "consumers": 0, "complete": true},
        ]});
        assert_eq!(listing(&answer, None).as_array().map(Vec::len), Some(2));
        let jobs = listing(&answer, Some("jobs"));
        assert_eq!(jobs[0]["name"], "b");
        assert_eq!(jobs.as_array().map(Vec::len), Some(1));
        assert_eq!(
            find(&answer, "jobs", "b").map(|q| &q["messages"]),
            Some(&json!(2))
        );
        assert!(find(&answer, "/", "b").is_none());
    }
}
