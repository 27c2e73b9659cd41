//! Where an evacuated queue's messages go: the shard clusters its routing rule names, never
//! the evacuating cluster, preferring clusters that take publishes.
//!
//! The choice follows `crate::route` so that a moved message lands where a new publish to the
//! same queue could have gone: a rule's group (`[[routing.rules]] clusters`), its `spread`
//! (`key`: the queue name hashed, as the routing key of a default-exchange publish is), and
//! the clusters' weights. When the group has no cluster left that takes publishes, it falls
//! back as routing does: any other shard cluster that takes publishes, then any shard cluster
//! that is not evacuating (a draining cluster still serves its consumers).

use crate::config::{ClusterConfig, Config};
use crate::route::{RoundRobin, Spread};

/// The clusters a message of `queue` may move to, in file order, with their weights; the
/// spread of the queue's rule.
pub fn candidates<'a>(config: &'a Config, queue: &str) -> (Vec<&'a ClusterConfig>, Spread) {
    let rule = config
        .routing
        .rule_for(b"", queue.as_bytes())
        .and_then(|i| config.routing.rules.get(i));
    let spread = rule.map_or(Spread::Message, |r| r.spread);
    let in_group = |c: &&ClusterConfig| rule.is_none_or(|r| r.allows(&c.name));
    let tiers: [&dyn Fn(&&ClusterConfig) -> bool; 3] =
        [&|c| in_group(c) && !c.drain, &|c| !c.drain, &|_| true];
    for tier in tiers {
        let found: Vec<&ClusterConfig> = config
            .shard_clusters()
            .filter(|c| !c.evacuate)
            .filter(|c| tier(c))
            .collect();
        if !found.is_empty() {
            return (found, spread);
        }
    }
    (Vec::new(), spread)
}

/// Picks one of `candidates` for the next batch of `queue`, skipping the names in `avoid`
/// (targets that just failed). `None` when none is left.
pub fn pick<'a>(
    candidates: &[&'a ClusterConfig],
    spread: Spread,
    queue: &str,
    avoid: &[String],
    rr: &mut RoundRobin,
) -> Option<&'a ClusterConfig> {
    let usable: Vec<(usize, &ClusterConfig)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| !avoid.contains(&c.name))
        .map(|(i, c)| (i, *c))
        .collect();
    let i = match spread {
        Spread::Key => crate::route::by_key(
            queue.as_bytes(),
            usable.iter().map(|(i, c)| (*i, c.name.as_str(), c.weight)),
        )?,
        // One queue's batches go round the group by weight; `channel` keeps them on one
        // cluster while it works, as a channel's publishes stay on one.
        Spread::Channel => usable.first()?.0,
        Spread::Message => rr.pick(usable.iter().map(|(i, c)| (*i, c.weight)))?,
    };
    candidates.get(i).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "listen = \"127.0.0.1:5673\"\n\
             [[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"h:1\"]\nevacuate = true\n\
             [[clusters]]\nname = \"b\"\nrole = \"shard\"\nnodes = [\"h:2\"]\n\
             [[clusters]]\nname = \"c\"\nrole = \"shard\"\nnodes = [\"h:3\"]\n\
             [[clusters]]\nname = \"ctl\"\nrole = \"control\"\nnodes = [\"h:4\"]\n{extra}"
        );
        Config::parse(&text, "t.toml").expect("valid test config")
    }

    fn names(c: &[&ClusterConfig]) -> Vec<String> {
        c.iter().map(|c| c.name.clone()).collect()
    }

    #[test]
    fn every_other_shard_cluster_by_default_never_the_evacuating_one_nor_control() {
        let cfg = config("");
        let (c, spread) = candidates(&cfg, "celery");
        assert_eq!(names(&c), ["b", "c"]);
        assert_eq!(spread, Spread::Message);
        let mut rr = RoundRobin::default();
        let picks: Vec<String> = (0..4)
            .filter_map(|_| pick(&c, spread, "celery", &[], &mut rr).map(|c| c.name.clone()))
            .collect();
        assert_eq!(picks, ["b", "c", "b", "c"], "round-robin by weight");
        let only_c = pick(&c, spread, "celery", &["b".into()], &mut rr).map(|c| c.name.clone());
        assert_eq!(only_c.as_deref(), Some("c"), "a failed target is skipped");
        assert!(pick(&c, spread, "celery", &["b".into(), "c".into()], &mut rr).is_none());
    }

    #[test]
    fn the_queue_rule_names_the_group_and_falls_back_when_it_is_empty() {
        let rules = "[[routing.rules]]\nmatch = [\"fast*\"]\nclusters = [\"a\", \"c\"]\n\
                     [[routing.rules]]\nmatch = [\"only-a\"]\nclusters = [\"a\"]\n\
                     [[routing.rules]]\nmatch = [\"keyed\"]\nspread = \"key\"\n";
        let cfg = config(rules);
        assert_eq!(
            names(&candidates(&cfg, "fast-1").0),
            ["c"],
            "the group minus a"
        );
        assert_eq!(names(&candidates(&cfg, "only-a").0), ["b", "c"], "fallback");
        let (c, spread) = candidates(&cfg, "keyed");
        assert_eq!(spread, Spread::Key);
        let mut rr = RoundRobin::default();
        let first = pick(&c, spread, "keyed", &[], &mut rr).map(|c| c.name.clone());
        for _ in 0..5 {
            let again = pick(&c, spread, "keyed", &[], &mut rr).map(|c| c.name.clone());
            assert_eq!(again, first, "one key, one cluster");
        }
    }

    #[test]
    fn draining_clusters_are_used_only_when_nothing_else_is_left() {
        let text = "listen = \"127.0.0.1:5673\"\n\
             [[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"h:1\"]\nevacuate = true\n\
             [[clusters]]\nname = \"b\"\nrole = \"shard\"\nnodes = [\"h:2\"]\ndrain = true\n\
             [[clusters]]\nname = \"c\"\nrole = \"shard\"\nnodes = [\"h:3\"]\n";
        let cfg = Config::parse(text, "t.toml").expect("valid");
        assert_eq!(names(&candidates(&cfg, "q").0), ["c"]);
        let mut both = cfg.clone();
        if let Some(c) = both.clusters.iter_mut().find(|c| c.name == "c") {
            c.drain = true;
        }
        assert_eq!(
            names(&candidates(&both, "q").0),
            ["b", "c"],
            "draining still consumes"
        );
    }
}
