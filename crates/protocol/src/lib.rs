//! The Tyrum client protocol (`tyrum-v1`, `protocol_rev` 2) as muster
//! speaks it: wire constants, envelopes, the device-key handshake and the
//! per-request scope table. Exact wire facts are in PROTOCOL.md Part B;
//! every literal here is taken from it.
#![forbid(unsafe_code)]

pub mod capability;
#[cfg(feature = "client")]
pub mod client;
pub mod close;
pub mod device;
pub mod envelope;
pub mod handshake;
pub mod presence;
pub mod scopes;
pub mod topics;

/// The WebSocket subprotocol every client offers and the server echoes.
pub const SUBPROTOCOL: &str = "tyrum-v1";
/// Prefix of the subprotocol that carries a token.
pub const AUTH_SUBPROTOCOL_PREFIX: &str = "tyrum-auth.";
/// The protocol revision the server requires.
pub const PROTOCOL_REV: i64 = 2;
/// The body of the 400 answer to an upgrade without `tyrum-v1`.
pub const MISSING_SUBPROTOCOL_BODY: &str = "Missing required WebSocket subprotocol: tyrum-v1\n";
/// The largest message a peer may send (Part B: `ws` 8.x's default,
/// 100 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 100 * 1024 * 1024;
/// The cookie an admin token may travel in.
pub const TOKEN_COOKIE: &str = "tyrum_admin_token";

/// A request's payload as `T`, which must come as a JSON object: serde
/// would also build a struct from an array of its fields' values (and
/// one whose fields all have defaults from `[]`).
pub(crate) fn from_object<T: serde::de::DeserializeOwned>(
    payload: &serde_json::Value,
) -> Result<T, String> {
    if !payload.is_object() {
        return Err("payload: expected an object".into());
    }
    serde_json::from_value(payload.clone()).map_err(|e| e.to_string())
}

/// An optional key that holds a value when present: Part B's `?` keys
/// are omitted, never `null` (`#[serde(default, deserialize_with =
/// "crate::present")]`).
pub(crate) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// An integer as Part B's `int` reads it: any JSON number with no
/// fraction, so `2.0` and `2e0` are 2 as they are to JavaScript. Values
/// past `i64` saturate, which keeps every range check meaningful.
pub(crate) fn whole<'de, D>(deserializer: D) -> Result<i64, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            Ok(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            if v.is_finite() && v.fract() == 0.0 {
                // `as` saturates at the ends of i64.
                Ok(v as i64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(Whole)
}

/// [`whole`] for an optional key, with [`present`]'s rule on `null`.
pub(crate) fn present_whole<'de, D>(deserializer: D) -> Result<Option<i64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    whole(deserializer).map(Some)
}

/// The last instant a `dt` can name (9999-12-31T23:59:59.999Z): a later
/// one has no four-digit year.
pub const MAX_DATETIME_MS: i64 = 253_402_300_799_999;

/// `dt` of Part B §2.3: ISO-8601 in UTC with milliseconds and `Z`.
pub fn format_datetime(unix_ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&format)
        .unwrap_or_default()
}

/// Parses a `dt` (RFC 3339, `Z` or offset) into Unix milliseconds.
pub fn parse_datetime(text: &str) -> Option<i64> {
    let parsed =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn datetimes_parse_back() {
        assert_eq!(
            super::parse_datetime("2026-07-24T21:00:00.123Z"),
            Some(1_784_926_800_123)
        );
        assert_eq!(super::parse_datetime("yesterday"), None);
    }

    #[test]
    fn datetimes_have_milliseconds_and_z() {
        assert_eq!(super::format_datetime(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::format_datetime(1_784_926_800_123),
            "2026-07-24T21:00:00.123Z"
        );
    }
}
