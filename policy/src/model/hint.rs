//! "Did you mean …?": the closest known name to a misspelt one.

/// Edit distance between `a` and `b` in characters: insertions, deletions, substitutions and
/// swaps of two neighbours (`dsm` for `dms` is one typo, not two).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows of the optimal-string-alignment table: i-2, i-1, i.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut row: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        row[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j - 1] + cost).min(prev[j] + 1).min(row[j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            row[j] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
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
        assert_eq!(distance("dsm", "dms"), 1);
        assert_eq!(closest("dsm", ["dms", "dns"].into_iter()), Some("dms"));
    }
}
