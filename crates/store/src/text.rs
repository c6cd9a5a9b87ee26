//! Checks on text a service is about to store, the same for every service
//! and both databases: Postgres refuses NUL in text where SQLite keeps it,
//! and refuses an index entry past about 2.7 KB where SQLite takes any, so
//! what either would refuse is refused before the write, as the caller's
//! mistake.

/// The most a name (a tenant, edge or device id, a key) may take, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// A name: not blank, at most `max` bytes, without NUL.
pub fn check_name(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.trim().is_empty() || value.len() > max {
        return Err(format!("{field} must be 1 to {max} bytes, not blank"));
    }
    check_text(field, value, max)
}

/// Free text (a reason, a note): at most `max` bytes, without NUL; may be
/// empty.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field} longer than {max} bytes"));
    }
    if value.contains('\0') {
        return Err(format!("{field} contains a NUL character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_text_are_bounded_and_free_of_nul() {
        assert!(check_name("tenant_id", "t1", MAX_NAME_BYTES).is_ok());
        for bad in ["", "  ", "a\0b"] {
            assert!(
                check_name("tenant_id", bad, MAX_NAME_BYTES).is_err(),
                "{bad:?}"
            );
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            check_name("tenant_id", &long, MAX_NAME_BYTES),
            Err("tenant_id must be 1 to 256 bytes, not blank".into())
        );
        assert!(check_text("reason", "", 10).is_ok());
        assert_eq!(
            check_text("reason", "a\0", 10),
            Err("reason contains a NUL character".into())
        );
        assert!(check_text("reason", &"x".repeat(11), 10).is_err());
    }
}
