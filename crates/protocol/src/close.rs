//! Close codes and their exact reasons (Part B §1).

/// A WebSocket close: code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

const fn close(code: u16, reason: &'static str) -> Close {
    Close { code, reason }
}

pub const SERVER_SHUTDOWN: Close = close(1001, "server shutdown");
pub const SLOW_CONSUMER: Close = close(1013, "slow consumer");
/// The token could not be checked (identity unreachable): a muster
/// addition, so that clients reconnect later instead of taking the final
/// 4001 for a token that may be good.
pub const TRY_AGAIN_LATER: Close = close(1013, "try again later");
/// A frame above the edge's size limit. `ws` 8.x, which Tyrum's gateway
/// runs on, closes with the code alone.
pub const MESSAGE_TOO_BIG: Close = close(1009, "");
/// A text frame that is not UTF-8, closed as `ws` 8.x closes it.
pub const INVALID_PAYLOAD: Close = close(1007, "");
/// The edge lost events its peers may have been owed (it was cut off from
/// the backplane longer than the outbox kept them): a muster addition, so
/// that clients reconnect, and those that resume learn of the gap.
pub const EVENTS_MISSED: Close = close(1013, "events missed");
pub const UNAUTHORIZED: Close = close(4001, "unauthorized");
pub const TOKEN_REVOKED: Close = close(4001, "token revoked");
/// A token edited while connected: the connection's claims are stale.
pub const TOKEN_UPDATED: Close = close(4001, "token updated");
/// Part B's fallback reason for a token that stopped being valid while
/// connected; muster's tokens do when they expire.
pub const TOKEN_INVALIDATED: Close = close(4001, "token invalidated");
pub const HANDSHAKE_TIMEOUT: Close = close(4002, "handshake timeout");
pub const HANDSHAKE_OVERFLOW: Close = close(4003, "handshake overflow");
pub const INVALID_JSON: Close = close(4003, "invalid json");
pub const LEGACY_CONNECT: Close = close(
    4003,
    "legacy connect is deprecated; use connect.init/connect.proof",
);
pub const EXPECTED_CONNECT: Close = close(4003, "expected connect.init/connect.proof");
pub const EXPECTED_INIT_FIRST: Close = close(4003, "expected connect.init first");
pub const CONNECTION_ID_MISMATCH: Close = close(4003, "connection_id mismatch");
pub const CONVERSATION_EXPIRED: Close = close(4004, "conversation expired");
pub const PROTOCOL_REV_MISMATCH: Close = close(4005, "protocol_rev mismatch");
pub const DEVICE_ID_MISMATCH: Close = close(4006, "device_id mismatch");
pub const INVALID_PROOF: Close = close(4007, "invalid proof");
pub const SCOPED_TOKEN_MISMATCH: Close = close(4008, "scoped token mismatch");
