//! List pagination. A token names the last entry already returned, so a
//! page boundary survives entries being added or deleted between calls;
//! anything not made here is refused (`Aborted`, as the spec asks).

use tonic::Status;

const PREFIX: &str = "after:";

/// One page of `names` (sorted) after `token`, at most `max` entries (0:
/// all); the token for the next page when more remain.
pub fn page<T>(
    mut items: Vec<(String, T)>,
    token: &str,
    max: i32,
) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument(format!(
            "max_entries must not be negative (got {max})"
        )));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    if !token.is_empty() {
        let after = token
            .strip_prefix(PREFIX)
            .ok_or_else(|| Status::aborted(format!("invalid starting_token {token:?}")))?;
        items.retain(|(name, _)| name.as_str() > after);
    }
    let max = if max == 0 { usize::MAX } else { max as usize };
    let next = if items.len() > max {
        items.truncate(max);
        items
            .last()
            .map(|(name, _)| format!("{PREFIX}{name}"))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((items.into_iter().map(|(_, item)| item).collect(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<(String, String)> {
        list.iter()
            .map(|n| (n.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn pages_follow_each_other_across_deletions() {
        let (first, next) = page(names(&["c", "a", "b", "d"]), "", 2).unwrap();
        assert_eq!(first, ["a", "b"]);
        // "b" is deleted meanwhile, "ab" added before the boundary.
        let (rest, end) = page(names(&["a", "ab", "c", "d"]), &next, 0).unwrap();
        assert_eq!(rest, ["c", "d"]);
        assert!(end.is_empty());
    }

    #[test]
    fn foreign_tokens_and_negative_sizes_are_refused() {
        assert_eq!(
            page(names(&["a"]), "invalid-token", 0).unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(names(&["a"]), "", -1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
