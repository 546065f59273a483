//! "Did you mean …?": the closest known name to a misspelt one.

/// Edit distance (insertions, deletions, substitutions) between `a` and `b`, in characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = (diag + usize::from(ca != *cb)).min(up + 1).min(row[j] + 1);
            diag = up;
        }
    }
    row[b.len()]
}

/// The candidate nearest to `name`, when it is near enough to be a typo (at most a third of
/// the name's characters, rounded up, differ) and no other candidate is as near.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = name.chars().count().div_ceil(3).max(1);
    let mut best: Option<(usize, &str)> = None;
    let mut tie = false;
    for c in candidates {
        if c == name {
            continue;
        }
        let d = distance(&name.to_lowercase(), &c.to_lowercase());
        if d > limit {
            continue;
        }
        match best {
            Some((bd, bc)) if d == bd && bc != c => tie = true,
            Some((bd, _)) if d >= bd => {}
            _ => {
                best = Some((d, c));
                tie = false;
            }
        }
    }
    best.filter(|_| !tie).map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_names_are_suggested_far_ones_not() {
        let names = ["verwaltung", "gaeste", "voip", "gebaeude"];
        assert_eq!(closest("verwaltun", names.into_iter()), Some("verwaltung"));
        assert_eq!(closest("gäste", names.into_iter()), Some("gaeste"));
        assert_eq!(closest("Gebaeude", names.into_iter()), Some("gebaeude"));
        assert_eq!(closest("printer", names.into_iter()), None);
        // Two equally near candidates: no guess.
        assert_eq!(closest("ab", ["aa", "bb"].into_iter()), None);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
