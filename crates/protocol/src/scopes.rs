//! Which scopes each request type needs (Part B §8, scopes from Tyrum's
//! manifest), and muster's own request types (Part A).

/// `None`: the type has null scopes (node-only or handshake types).
type Entry = (&'static str, Option<&'static [&'static str]>);

const NONE: Option<&[&str]> = None;
const OPEN: Option<&[&str]> = Some(&[]);
const READ: Option<&[&str]> = Some(&["operator.read"]);
const WRITE: Option<&[&str]> = Some(&["operator.write"]);
const ADMIN: Option<&[&str]> = Some(&["operator.admin"]);
const PAIRING: Option<&[&str]> = Some(&["operator.pairing"]);
const APPROVALS: Option<&[&str]> = Some(&["operator.approvals"]);

/// Every request type of Tyrum's `protocol/unions.ts`, in union order.
pub const TYRUM_TYPES: [Entry; 57] = [
    ("connect.init", NONE),
    ("connect.proof", NONE),
    ("connect", NONE),
    ("location.beacon", OPEN),
    ("presence.beacon", OPEN),
    ("ping", OPEN),
    ("conversation.list", READ),
    ("conversation.get", READ),
    ("conversation.create", WRITE),
    ("conversation.delete", WRITE),
    ("conversation.archive", WRITE),
    ("conversation.queue_mode.set", WRITE),
    ("conversation.reconnect", READ),
    ("conversation.send", WRITE),
    ("command.execute", ADMIN),
    ("workflow.start", WRITE),
    ("workflow.resume", WRITE),
    ("workflow.cancel", WRITE),
    ("pairing.revoke", PAIRING),
    ("pairing.approve", PAIRING),
    ("pairing.deny", PAIRING),
    ("capability.ready", NONE),
    ("task.execute", NONE),
    ("attempt.evidence", NONE),
    ("turn.list", READ),
    ("approval.list", READ),
    ("approval.resolve", APPROVALS),
    ("subagent.spawn", WRITE),
    ("transcript.list", READ),
    ("transcript.get", READ),
    ("subagent.list", READ),
    ("subagent.get", READ),
    ("subagent.send", WRITE),
    ("subagent.close", WRITE),
    ("work.list", READ),
    ("work.get", READ),
    ("work.create", WRITE),
    ("work.update", WRITE),
    ("work.delete", WRITE),
    ("work.transition", WRITE),
    ("work.pause", WRITE),
    ("work.resume", WRITE),
    ("work.link.create", WRITE),
    ("work.link.list", READ),
    ("work.artifact.list", READ),
    ("work.artifact.get", READ),
    ("work.artifact.create", WRITE),
    ("work.decision.list", READ),
    ("work.decision.get", READ),
    ("work.decision.create", WRITE),
    ("work.signal.list", READ),
    ("work.signal.get", READ),
    ("work.signal.create", WRITE),
    ("work.signal.update", WRITE),
    ("work.state_kv.get", READ),
    ("work.state_kv.list", READ),
    ("work.state_kv.set", WRITE),
];

/// muster's own request types (docs/protocol-extensions.md). The `muster.`
/// prefix keeps them clear of every Tyrum type.
pub const MUSTER_TYPES: [Entry; 10] = [
    ("muster.presence.list", READ),
    ("muster.stream.resume", OPEN),
    ("muster.status", READ),
    ("muster.topic.track", OPEN),
    ("muster.topic.untrack", OPEN),
    ("muster.topic.status", OPEN),
    ("muster.topic.list", OPEN),
    ("muster.topic.count", OPEN),
    ("muster.topic.subscribe", OPEN),
    ("muster.topic.unsubscribe", OPEN),
];

/// The scopes `kind` needs: `Some(&[])` for none, `None` for null-scoped
/// and unknown types (which only an admin token gets past, to be told the
/// type is unsupported).
pub fn required_scopes(kind: &str) -> Option<&'static [&'static str]> {
    TYRUM_TYPES
        .iter()
        .chain(MUSTER_TYPES.iter())
        .find(|(name, _)| *name == kind)
        .and_then(|(_, scopes)| *scopes)
}

/// Types a node-role scoped token may send although their scopes are null.
pub const NODE_TYPES: [&str; 3] = ["attempt.evidence", "capability.ready", "location.beacon"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_answers_as_part_b_says() {
        assert_eq!(required_scopes("ping"), Some(&[][..]));
        assert_eq!(
            required_scopes("approval.resolve"),
            Some(&["operator.approvals"][..])
        );
        assert_eq!(
            required_scopes("command.execute"),
            Some(&["operator.admin"][..])
        );
        assert_eq!(required_scopes("task.execute"), None);
        assert_eq!(required_scopes("no.such.type"), None);
        assert_eq!(
            required_scopes("muster.presence.list"),
            Some(&["operator.read"][..])
        );
        let mut names: Vec<_> = TYRUM_TYPES.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 57);
        assert!(MUSTER_TYPES.iter().all(|(n, _)| !names.contains(n)));
    }
}
