//! Case-insensitive key comparison, the way lenient upstream readers compare keys.

/// Whether `a` and `b` are equal when case is ignored (Unicode: `K` (Kelvin) matches `k`).
pub(super) fn same_ignoring_case(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    let fold = |s: &str| {
        s.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect::<Vec<char>>()
    };
    fold(a) == fold(b)
}
