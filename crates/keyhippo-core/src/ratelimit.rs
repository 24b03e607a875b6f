//! Rate-limit counters: fixed windows aligned to the Unix epoch, in a table of fixed size (the
//! extension keeps one in shared memory, under a lock, sized by a setting).
//!
//! A limit of `max` requests per `per` admits at most `max` requests in every window
//! `[k * per, (k + 1) * per)` of time since 1970-01-01 00:00 UTC; the count starts again at
//! zero when the next window begins. That is the bound, exactly, whatever the concurrency: an
//! arbitrary interval of length `per` that straddles two windows can see up to `2 * max`.
//!
//! The table is open-addressed: a subject's counter is found within [`MAX_PROBES`] slots from
//! its hash. A counter whose window has ended counts nothing any more and its slot is taken
//! over by the next subject that needs one. When no slot is free within reach, the request is
//! refused ([`Outcome::Full`]): a limited key is never admitted uncounted.

/// Slots looked at from a subject's hash before the table counts as full for it.
pub const MAX_PROBES: usize = 64;

/// Whose requests a limit counts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Kind {
    /// One key's.
    Key = 1,
    /// All keys of one user.
    Owner = 2,
}

/// One limit that applies to a request.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub kind: Kind,
    /// The key's or the user's id.
    pub id: [u8; 16],
    pub max: u32,
    /// The window, in microseconds (positive).
    pub per_us: i64,
}

/// What [`Table::admit`] decided.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// Counted against every limit.
    Admitted,
    /// `limits[which]` has no room left in its window, which ends in `retry_after_us`
    /// microseconds; nothing was counted.
    Limited { which: usize, retry_after_us: i64 },
    /// No counter could be found or made for one of the limits; nothing was counted.
    Full,
}

/// One counter. All zeroes is an unused one ([`Counter::UNUSED`]), so zeroed memory is an empty
/// table.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Counter {
    /// The end of the counted window (microseconds since the Unix epoch); 0: never used.
    window_end: i64,
    db: u32,
    count: u32,
    kind: u8,
    id: [u8; 16],
}

impl Counter {
    pub const UNUSED: Counter = Counter {
        window_end: 0,
        db: 0,
        count: 0,
        kind: 0,
        id: [0; 16],
    };
}

/// The counters of one server: a table of any size (at least one slot).
pub struct Table<'a> {
    slots: &'a mut [Counter],
}

fn hash(db: u32, kind: Kind, id: &[u8; 16], len: usize) -> usize {
    crate::slot::home(&[&db.to_le_bytes(), &[kind as u8], id], len)
}

/// The end of the window of length `per_us` that holds `now_us` (both in microseconds).
pub fn window_end(now_us: i64, per_us: i64) -> i64 {
    (now_us.div_euclid(per_us) + 1).saturating_mul(per_us)
}

impl<'a> Table<'a> {
    /// The table held in `slots`.
    pub fn new(slots: &'a mut [Counter]) -> Self {
        assert!(
            !slots.is_empty(),
            "a rate-limit table needs at least one slot"
        );
        Table { slots }
    }

    /// The slot counting `limit` in database `db`, made when there is none: its count is reset
    /// when the window it counted has ended. None when the table is full within reach.
    fn slot(&mut self, db: u32, limit: &Limit, now_us: i64) -> Option<usize> {
        let len = self.slots.len();
        let start = hash(db, limit.kind, &limit.id, len);
        let mut free = None;
        for probe in 0..MAX_PROBES.min(len) {
            let i = (start + probe) % len;
            let c = &self.slots[i];
            if c.window_end != 0 && c.db == db && c.kind == limit.kind as u8 && c.id == limit.id {
                free = Some(i);
                break;
            }
            if c.window_end <= now_us && free.is_none() {
                free = Some(i);
            }
            if c.window_end == 0 {
                // Never used: nothing further along belongs to this subject.
                break;
            }
        }
        let i = free?;
        let end = window_end(now_us, limit.per_us);
        let c = &mut self.slots[i];
        let same =
            c.window_end != 0 && c.db == db && c.kind == limit.kind as u8 && c.id == limit.id;
        if !same || c.window_end != end {
            *c = Counter {
                window_end: end,
                db,
                count: 0,
                kind: limit.kind as u8,
                id: limit.id,
            };
        }
        Some(i)
    }

    /// Admits a request of database `db` at `now_us` (microseconds since the Unix epoch) if
    /// every limit has room, counting it against all of them; otherwise counts nothing.
    pub fn admit(&mut self, db: u32, limits: &[Limit], now_us: i64) -> Outcome {
        let mut slots = [0usize; 2];
        assert!(
            limits.len() <= slots.len(),
            "at most a key's and an owner's limit"
        );
        for (n, limit) in limits.iter().enumerate() {
            match self.slot(db, limit, now_us) {
                Some(i) => slots[n] = i,
                None => return Outcome::Full,
            }
        }
        for (n, limit) in limits.iter().enumerate() {
            let c = &self.slots[slots[n]];
            if c.count >= limit.max {
                return Outcome::Limited {
                    which: n,
                    retry_after_us: c.window_end - now_us,
                };
            }
        }
        for &i in &slots[..limits.len()] {
            self.slots[i].count += 1;
        }
        Outcome::Admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    const SLOTS: usize = 8192;

    fn slots() -> Vec<Counter> {
        vec![Counter::UNUSED; SLOTS]
    }

    fn limit(kind: Kind, n: u8, max: u32, per_us: i64) -> Limit {
        Limit {
            kind,
            id: [n; 16],
            max,
            per_us,
        }
    }

    #[test]
    fn admits_max_per_window_then_refuses_until_the_next() {
        let mut slots = slots();
        let mut t = Table::new(&mut slots);
        let l = [limit(Kind::Key, 1, 3, 60 * SECOND)];
        let start = 28_333_333 * 60 * SECOND;
        for i in 0..3 {
            assert_eq!(t.admit(1, &l, start + i), Outcome::Admitted);
        }
        assert_eq!(
            t.admit(1, &l, start + 10 * SECOND),
            Outcome::Limited {
                which: 0,
                retry_after_us: 50 * SECOND
            }
        );
        assert_eq!(t.admit(1, &l, start + 60 * SECOND), Outcome::Admitted);
    }

    #[test]
    fn every_aligned_window_holds_at_most_max() {
        let mut slots = slots();
        let mut t = Table::new(&mut slots);
        let l = [limit(Kind::Key, 7, 5, 10 * SECOND)];
        let mut admitted = std::collections::HashMap::new();
        // A request every 0.3 s for 100 s.
        for step in 0..334 {
            let now = 1_000 * SECOND + step * 300_000;
            if t.admit(1, &l, now) == Outcome::Admitted {
                *admitted.entry(now.div_euclid(10 * SECOND)).or_insert(0) += 1;
            }
        }
        assert!(admitted.values().all(|&n| n == 5), "{admitted:?}");
    }

    #[test]
    fn a_refusal_by_one_limit_counts_against_none() {
        let mut slots = slots();
        let mut t = Table::new(&mut slots);
        let key = limit(Kind::Key, 1, 10, 60 * SECOND);
        let owner = limit(Kind::Owner, 9, 1, 60 * SECOND);
        let now = 120 * SECOND;
        assert_eq!(t.admit(1, &[key, owner], now), Outcome::Admitted);
        assert!(matches!(
            t.admit(1, &[key, owner], now),
            Outcome::Limited { which: 1, .. }
        ));
        // The key alone still has 9 left: the refused request was not counted.
        for _ in 0..9 {
            assert_eq!(t.admit(1, &[key], now), Outcome::Admitted);
        }
        assert!(matches!(
            t.admit(1, &[key], now),
            Outcome::Limited { which: 0, .. }
        ));
    }

    #[test]
    fn subjects_are_told_apart_by_database_kind_and_id() {
        let mut slots = slots();
        let mut t = Table::new(&mut slots);
        let now = 60 * SECOND;
        let a = limit(Kind::Key, 1, 1, 60 * SECOND);
        assert_eq!(t.admit(1, &[a], now), Outcome::Admitted);
        assert_eq!(t.admit(2, &[a], now), Outcome::Admitted);
        assert_eq!(
            t.admit(1, &[limit(Kind::Owner, 1, 1, 60 * SECOND)], now),
            Outcome::Admitted
        );
        assert_eq!(
            t.admit(1, &[limit(Kind::Key, 2, 1, 60 * SECOND)], now),
            Outcome::Admitted
        );
        assert!(matches!(t.admit(1, &[a], now), Outcome::Limited { .. }));
    }

    #[test]
    fn a_changed_window_starts_a_new_count() {
        let mut slots = slots();
        let mut t = Table::new(&mut slots);
        let now = 3_600 * SECOND + 30 * SECOND;
        assert_eq!(
            t.admit(1, &[limit(Kind::Key, 1, 1, 60 * SECOND)], now),
            Outcome::Admitted
        );
        assert_eq!(
            t.admit(1, &[limit(Kind::Key, 1, 1, 3_600 * SECOND)], now),
            Outcome::Admitted
        );
    }

    #[test]
    fn a_full_table_refuses_and_ended_windows_free_their_slots() {
        let mut slots = slots();
        let mut t = Table::new(&mut slots);
        let now = 60 * SECOND;
        let mut full_at = None;
        for n in 0..(SLOTS as u32 + 1) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&n.to_le_bytes());
            let l = Limit {
                kind: Kind::Key,
                id,
                max: 1,
                per_us: 60 * SECOND,
            };
            if t.admit(1, &[l], now) == Outcome::Full {
                full_at = Some(n);
                break;
            }
        }
        assert!(full_at.is_some(), "SLOTS + 1 subjects cannot all fit");
        // A minute later every window has ended: the same subjects fit again.
        let l = limit(Kind::Key, 0xee, 1, 60 * SECOND);
        assert_eq!(t.admit(1, &[l], now + 60 * SECOND), Outcome::Admitted);
    }

    #[test]
    fn a_small_table_holds_as_many_subjects_as_slots() {
        let mut slots = vec![Counter::UNUSED; 4];
        let mut t = Table::new(&mut slots);
        let now = 60 * SECOND;
        for n in 0..4 {
            assert_eq!(
                t.admit(1, &[limit(Kind::Key, n, 1, 60 * SECOND)], now),
                Outcome::Admitted
            );
        }
        assert_eq!(
            t.admit(1, &[limit(Kind::Key, 9, 1, 60 * SECOND)], now),
            Outcome::Full
        );
    }

    #[test]
    fn windows_align_to_the_epoch() {
        assert_eq!(window_end(0, 10), 10);
        assert_eq!(window_end(9, 10), 10);
        assert_eq!(window_end(10, 10), 20);
        assert_eq!(window_end(-1, 10), 0);
    }
}
