//! Release versions (`MAJOR.MINOR.PATCH`, as in Cargo.toml and `keyhippo.control`) and their
//! order: an upgrade script names the library version it needs, and the loaded library compares
//! its own version with it.

use std::cmp::Ordering;

/// A version's numbers. A pre-release or build suffix (`2.1.0-rc.1`, `2.1.0+local`) is ignored:
/// scripts and libraries are only ever released under plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH`; `None` for anything else (missing or extra parts, signs,
    /// leading `+`, numbers too large).
    pub fn parse(text: &str) -> Option<Version> {
        let numbers = text.split(['-', '+']).next().unwrap_or_default();
        let mut parts = numbers.split('.');
        let mut next = || -> Option<u32> {
            let part = parts.next()?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let version = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(version)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether a library of version `loaded` can run what needs version `required`: it is the same
/// or newer.
pub fn satisfies(loaded: Version, required: Version) -> bool {
    loaded.cmp(&required) != Ordering::Less
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    #[test]
    fn parses_plain_versions() {
        assert_eq!(
            v("2.0.0"),
            Version {
                major: 2,
                minor: 0,
                patch: 0
            }
        );
        assert_eq!(v("10.20.30").to_string(), "10.20.30");
        assert_eq!(v("2.1.0-rc.1"), v("2.1.0"));
        assert_eq!(v("2.1.0+build"), v("2.1.0"));
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "",
            "2",
            "2.0",
            "2.0.0.0",
            "2..0",
            "v2.0.0",
            "2.0.x",
            " 2.0.0",
            "-1.0.0",
            "+2.0.0",
            "99999999999.0.0",
        ] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn orders_by_number_not_text() {
        assert!(satisfies(v("2.0.0"), v("2.0.0")));
        assert!(satisfies(v("2.1.0"), v("2.0.9")));
        assert!(satisfies(v("10.0.0"), v("9.9.9")));
        assert!(!satisfies(v("2.0.0"), v("2.0.1")));
        assert!(!satisfies(v("2.9.0"), v("2.10.0")));
        assert!(!satisfies(v("9.9.9"), v("10.0.0")));
    }
}
