//! Checking the `Authorization` header listeners require (`bearer_token`).

/// Whether `given` (the header as sent) is `Bearer <expected>`; any value passes when no token
/// is expected. Compared in constant time, so the answer's timing tells nothing about how much
/// of a guess was right.
pub fn bearer_matches(expected: Option<&str>, given: Option<&str>) -> bool {
    let Some(token) = expected else {
        return true;
    };
    // The scheme is case-insensitive (RFC 9110 §11.1): clients send `bearer` too.
    let Some(given) = given
        .and_then(|g| g.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    let (a, b) = (token.as_bytes(), given.as_bytes());
    // The length is not secret; every byte of the same-length guess is looked at.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        assert!(bearer_matches(None, None));
        assert!(bearer_matches(Some("t0k"), Some("Bearer t0k")));
        assert!(!bearer_matches(Some("t0k"), Some("Bearer t0x")));
        assert!(!bearer_matches(Some("t0k"), Some("Bearer t0k2")));
        assert!(!bearer_matches(Some("t0k"), Some("t0k")));
        assert!(bearer_matches(Some("t0k"), Some("bearer t0k")));
        assert!(bearer_matches(Some("t0k"), Some("BEARER t0k")));
        assert!(!bearer_matches(Some("t0k"), Some("Basic t0k")));
        assert!(!bearer_matches(Some("t0k"), None));
    }
}
