//! Verification counts per (database, key, hour, outcome) between two writes, in a table of
//! fixed size (the extension keeps one in shared memory, under a lock; a background worker
//! drains a database's counts and adds them to `keyhippo.api_key_usage`).

/// Slots looked at from a count's hash before the table counts as full for it.
pub const MAX_PROBES: usize = 64;

/// The outcomes counted, by their number in [`Cell::outcome`].
pub const OUTCOMES: [&str; 5] = [
    "VALID",
    "RATE_LIMITED",
    "USAGE_EXCEEDED",
    "EXPIRED",
    "DISABLED",
];

/// The number of `name` in [`OUTCOMES`].
pub fn outcome_number(name: &str) -> Option<u8> {
    OUTCOMES.iter().position(|o| *o == name).map(|i| i as u8)
}

/// One count. All zeroes is an unused one ([`Cell::UNUSED`]): zeroed memory is an empty table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Cell {
    /// 0: unused.
    pub count: u64,
    /// The hour (hours since the Unix epoch).
    pub hour: i64,
    pub db: u32,
    pub outcome: u8,
    pub id: [u8; 16],
}

impl Cell {
    pub const UNUSED: Cell = Cell {
        count: 0,
        hour: 0,
        db: 0,
        outcome: 0,
        id: [0; 16],
    };

    fn is(&self, db: u32, id: &[u8; 16], hour: i64, outcome: u8) -> bool {
        self.count != 0
            && self.db == db
            && self.hour == hour
            && self.outcome == outcome
            && self.id == *id
    }
}

/// The hour (since the Unix epoch) of `unix_us` microseconds since the Unix epoch.
pub fn hour_of(unix_us: i64) -> i64 {
    unix_us.div_euclid(3_600_000_000)
}

/// The counts of one server: a table of any size (at least one slot).
pub struct Counts<'a> {
    cells: &'a mut [Cell],
}

fn hash(db: u32, id: &[u8; 16], hour: i64, outcome: u8, len: usize) -> usize {
    crate::slot::home(
        &[&db.to_le_bytes(), id, &hour.to_le_bytes(), &[outcome]],
        len,
    )
}

impl<'a> Counts<'a> {
    /// The table held in `cells`.
    pub fn new(cells: &'a mut [Cell]) -> Self {
        assert!(!cells.is_empty(), "a count table needs at least one slot");
        Counts { cells }
    }

    /// Adds `n` to the count of (`db`, `id`, `hour`, `outcome`); false when the table is full
    /// for it (nothing counted).
    pub fn add(&mut self, db: u32, id: &[u8; 16], hour: i64, outcome: u8, n: u64) -> bool {
        let len = self.cells.len();
        let start = hash(db, id, hour, outcome, len);
        for probe in 0..MAX_PROBES.min(len) {
            let c = &mut self.cells[(start + probe) % len];
            if c.is(db, id, hour, outcome) {
                c.count += n;
                return true;
            }
            if c.count == 0 {
                *c = Cell {
                    count: n,
                    hour,
                    db,
                    outcome,
                    id: *id,
                };
                return true;
            }
        }
        false
    }

    /// Takes every count of database `db` out of the table (the others stay, placed again).
    pub fn drain(&mut self, db: u32) -> Vec<Cell> {
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for c in self.cells.iter_mut() {
            if c.count != 0 {
                if c.db == db {
                    taken.push(*c);
                } else {
                    kept.push(*c);
                }
            }
            *c = Cell::UNUSED;
        }
        for c in kept {
            // Fits: it held before, in a table no fuller than now.
            self.add(c.db, &c.id, c.hour, c.outcome, c.count);
        }
        taken
    }

    /// How many counts each database has waiting.
    pub fn pending(&self) -> Vec<(u32, usize)> {
        let mut per_db: Vec<(u32, usize)> = Vec::new();
        for c in self.cells.iter().filter(|c| c.count != 0) {
            match per_db.iter_mut().find(|(d, _)| *d == c.db) {
                Some((_, n)) => *n += 1,
                None => per_db.push((c.db, 1)),
            }
        }
        per_db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_key_hour_and_outcome() {
        let mut cells = vec![Cell::UNUSED; 64];
        let mut t = Counts::new(&mut cells);
        let (a, b) = ([1u8; 16], [2u8; 16]);
        for _ in 0..3 {
            assert!(t.add(1, &a, 10, 0, 1));
        }
        assert!(t.add(1, &a, 10, 3, 1));
        assert!(t.add(1, &a, 11, 0, 1));
        assert!(t.add(1, &b, 10, 0, 1));
        assert!(t.add(2, &a, 10, 0, 1));
        let mut taken = t.drain(1);
        taken.sort_by_key(|c| (c.id, c.hour, c.outcome));
        let got: Vec<_> = taken
            .iter()
            .map(|c| (c.id[0], c.hour, c.outcome, c.count))
            .collect();
        assert_eq!(
            got,
            vec![(1, 10, 0, 3), (1, 10, 3, 1), (1, 11, 0, 1), (2, 10, 0, 1)]
        );
        assert_eq!(t.pending(), vec![(2, 1)]);
        assert!(t.drain(1).is_empty());
        assert_eq!(t.drain(2)[0].count, 1);
    }

    #[test]
    fn a_full_table_refuses_and_a_drain_makes_room() {
        let mut cells = vec![Cell::UNUSED; 4];
        let mut t = Counts::new(&mut cells);
        for n in 0..4u8 {
            assert!(t.add(1, &[n; 16], 0, 0, 1));
        }
        assert!(!t.add(1, &[9; 16], 0, 0, 1));
        assert!(t.add(1, &[0; 16], 0, 0, 5), "an existing count still grows");
        assert_eq!(t.drain(1).len(), 4);
        assert!(t.add(1, &[9; 16], 0, 0, 1));
    }

    #[test]
    fn outcomes_and_hours() {
        assert_eq!(outcome_number("VALID"), Some(0));
        assert_eq!(outcome_number("DISABLED"), Some(4));
        assert_eq!(outcome_number("NOT_FOUND"), None);
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(3_599_999_999), 0);
        assert_eq!(hour_of(3_600_000_000), 1);
        assert_eq!(hour_of(-1), -1);
    }
}
