//! Credit balances of keys, in a table of fixed size (the extension keeps one in shared memory,
//! under a lock, and a background worker writes changed balances to `keyhippo.api_key_credits`).
//!
//! A balance belongs to one grant (`set_credits`, told apart by its `generation`) and, when the
//! grant refills, to one refill window: when a later window begins, the balance becomes the
//! refill amount again (unused credits do not accumulate). Spending is two steps: a request
//! *reserves* credits (they are no longer available to anyone), and its transaction either
//! *settles* them (commit: spent) or *releases* them (abort: given back). So credits are never
//! spent twice and a balance never goes below zero, whatever the concurrency; only settled
//! spending is ever written to the table.

/// Slots looked at from a balance's hash before the table counts as full for it.
pub const MAX_PROBES: usize = 64;

/// One balance. All zeroes is an unused slot: zeroed memory is an empty table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Balance {
    /// The grant (its time, in microseconds); 0: an unused slot.
    pub generation: i64,
    /// The start of the refill window the balance belongs to (microseconds since the Unix
    /// epoch; 0 when the grant does not refill).
    pub window: i64,
    /// Credits left, spending settled.
    pub committed: i64,
    /// Credits reserved by transactions still running.
    pub reserved: i64,
    pub db: u32,
    /// 1: `committed` or `window` changed since the balance was last written.
    pub dirty: u8,
    pub id: [u8; 16],
}

/// A grant of credits, as `set_credits` made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub generation: i64,
    /// Credits a refill restores, and how often (microseconds), when the grant refills.
    pub refill: Option<(i64, i64)>,
}

impl Grant {
    /// The start (microseconds since the Unix epoch) of the refill window that holds `now_us`
    /// (0 without refills).
    pub fn window(&self, now_us: i64) -> i64 {
        self.refill
            .map_or(0, |(_, per)| now_us.div_euclid(per).saturating_mul(per))
    }

    /// Microseconds from `now_us` until the next refill, if the grant refills.
    pub fn until_refill(&self, now_us: i64) -> Option<i64> {
        self.refill
            .map(|(_, per)| (now_us.div_euclid(per) + 1).saturating_mul(per) - now_us)
    }
}

/// What a reservation found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    /// Reserved; the credits left after it.
    Reserved(i64),
    /// Not enough left (nothing reserved); what is left.
    Short(i64),
    /// The balance is not in the table: load it from the database first.
    NotLoaded,
    /// No slot could be found for it: refuse (nothing reserved).
    Full,
}

/// The balances of one server: a table of any size (at least one slot).
pub struct Balances<'a> {
    slots: &'a mut [Balance],
}

fn hash(db: u32, id: &[u8; 16], len: usize) -> usize {
    crate::slot::home(&[&db.to_le_bytes(), id], len)
}

impl<'a> Balances<'a> {
    pub fn new(slots: &'a mut [Balance]) -> Self {
        assert!(!slots.is_empty(), "a balance table needs at least one slot");
        Balances { slots }
    }

    fn find(&self, db: u32, id: &[u8; 16]) -> Option<usize> {
        let len = self.slots.len();
        let start = hash(db, id, len);
        for probe in 0..MAX_PROBES.min(len) {
            let i = (start + probe) % len;
            let b = &self.slots[i];
            if b.generation == 0 {
                return None;
            }
            if b.db == db && b.id == *id {
                return Some(i);
            }
        }
        None
    }

    /// The slot for (`db`, `id`): its own, else an unused one or one whose balance is written
    /// and reserved by nobody (it can be read from the database again).
    fn claim(&mut self, db: u32, id: &[u8; 16]) -> Option<usize> {
        if let Some(i) = self.find(db, id) {
            return Some(i);
        }
        let len = self.slots.len();
        let start = hash(db, id, len);
        let reach = || (0..MAX_PROBES.min(len)).map(move |probe| (start + probe) % len);
        // An unused slot first; else one whose balance can be read again.
        reach()
            .find(|&i| self.slots[i].generation == 0)
            .or_else(|| {
                reach().find(|&i| {
                    let b = &self.slots[i];
                    b.dirty == 0 && b.reserved == 0
                })
            })
    }

    /// Brings slot `i` to the window of `now_us`.
    fn refill(&mut self, i: usize, grant: &Grant, now_us: i64) {
        if let Some((amount, _)) = grant.refill {
            let window = grant.window(now_us);
            let b = &mut self.slots[i];
            if window > b.window {
                b.window = window;
                b.committed = amount;
                b.dirty = 1;
            }
        }
    }

    /// Puts the balance of (`db`, `id`) under `grant` in the table, as the database holds it:
    /// `remaining` credits in refill window `window`. A balance of the same grant already there
    /// (another backend loaded it meanwhile) is kept. False when the table is full.
    pub fn load(
        &mut self,
        db: u32,
        id: &[u8; 16],
        grant: &Grant,
        remaining: i64,
        window: i64,
    ) -> bool {
        let Some(i) = self.claim(db, id) else {
            return false;
        };
        let b = &mut self.slots[i];
        if b.generation == grant.generation && b.db == db && b.id == *id {
            return true;
        }
        *b = Balance {
            generation: grant.generation,
            window,
            committed: remaining.max(0),
            reserved: 0,
            db,
            dirty: 0,
            id: *id,
        };
        true
    }

    /// Reserves `amount` credits of (`db`, `id`) under `grant` at `now_us`.
    pub fn reserve(
        &mut self,
        db: u32,
        id: &[u8; 16],
        grant: &Grant,
        amount: i64,
        now_us: i64,
    ) -> Reserve {
        let Some(i) = self.find(db, id) else {
            return if self.claim(db, id).is_some() {
                Reserve::NotLoaded
            } else {
                Reserve::Full
            };
        };
        if self.slots[i].generation != grant.generation {
            return Reserve::NotLoaded;
        }
        self.refill(i, grant, now_us);
        let b = &mut self.slots[i];
        let left = b.committed - b.reserved;
        if left >= amount {
            b.reserved += amount;
            Reserve::Reserved(left - amount)
        } else {
            Reserve::Short(left.max(0))
        }
    }

    /// Gives back `amount` reserved credits (the transaction or savepoint rolled back).
    pub fn release(&mut self, db: u32, id: &[u8; 16], generation: i64, amount: i64) {
        if let Some(i) = self.find(db, id) {
            let b = &mut self.slots[i];
            if b.generation == generation {
                b.reserved = (b.reserved - amount).max(0);
            }
        }
    }

    /// Spends `amount` credits reserved in refill window `window` (the transaction committed).
    /// Reserved in a window that has ended since: the refill replaced that window's balance,
    /// so nothing more is taken.
    pub fn settle(&mut self, db: u32, id: &[u8; 16], generation: i64, window: i64, amount: i64) {
        if let Some(i) = self.find(db, id) {
            let b = &mut self.slots[i];
            if b.generation == generation {
                b.reserved = (b.reserved - amount).max(0);
                if b.window == window {
                    b.committed = (b.committed - amount).max(0);
                    b.dirty = 1;
                }
            }
        }
    }

    /// Credits available to (`db`, `id`) under `grant` at `now_us`, if its balance is here.
    pub fn available(&mut self, db: u32, id: &[u8; 16], grant: &Grant, now_us: i64) -> Option<i64> {
        let i = self.find(db, id)?;
        if self.slots[i].generation != grant.generation {
            return None;
        }
        self.refill(i, grant, now_us);
        let b = &self.slots[i];
        Some((b.committed - b.reserved).max(0))
    }

    /// The balances of database `db` changed since they were last written.
    pub fn dirty(&self, db: u32) -> Vec<Balance> {
        self.slots
            .iter()
            .filter(|b| b.generation != 0 && b.db == db && b.dirty == 1)
            .copied()
            .collect()
    }

    /// Marks `written` clean, where the balance has not changed again since.
    pub fn written(&mut self, written: &[Balance]) {
        for w in written {
            if let Some(i) = self.find(w.db, &w.id) {
                let b = &mut self.slots[i];
                if b.generation == w.generation
                    && b.committed == w.committed
                    && b.window == w.window
                {
                    b.dirty = 0;
                }
            }
        }
    }

    /// How many changed balances each database has waiting.
    pub fn pending(&self) -> Vec<(u32, usize)> {
        let mut per_db: Vec<(u32, usize)> = Vec::new();
        for b in self
            .slots
            .iter()
            .filter(|b| b.generation != 0 && b.dirty == 1)
        {
            match per_db.iter_mut().find(|(d, _)| *d == b.db) {
                Some((_, n)) => *n += 1,
                None => per_db.push((b.db, 1)),
            }
        }
        per_db
    }

    /// Every changed balance (to save at shutdown).
    pub fn all_dirty(&self) -> Vec<Balance> {
        self.slots
            .iter()
            .filter(|b| b.generation != 0 && b.dirty == 1)
            .copied()
            .collect()
    }

    /// Puts back a balance saved at shutdown (changed, not yet written).
    pub fn restore(&mut self, saved: &Balance) -> bool {
        let Some(i) = self.claim(saved.db, &saved.id) else {
            return false;
        };
        self.slots[i] = Balance {
            reserved: 0,
            dirty: 1,
            ..*saved
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000;
    const ID: [u8; 16] = [7; 16];

    fn grant(refill: Option<(i64, i64)>) -> Grant {
        Grant {
            generation: 42,
            refill,
        }
    }

    #[test]
    fn a_balance_must_be_loaded_then_is_spent_by_settling() {
        let mut slots = vec![Balance::default(); 64];
        let mut t = Balances::new(&mut slots);
        let g = grant(None);
        assert_eq!(t.reserve(1, &ID, &g, 1, 0), Reserve::NotLoaded);
        assert!(t.load(1, &ID, &g, 3, 0));
        assert_eq!(t.reserve(1, &ID, &g, 1, 0), Reserve::Reserved(2));
        assert_eq!(t.reserve(1, &ID, &g, 2, 0), Reserve::Reserved(0));
        assert_eq!(t.reserve(1, &ID, &g, 1, 0), Reserve::Short(0));
        t.settle(1, &ID, 42, 0, 1);
        t.release(1, &ID, 42, 2);
        assert_eq!(t.available(1, &ID, &g, 0), Some(2));
        assert_eq!(t.dirty(1).len(), 1);
        let written = t.dirty(1);
        t.written(&written);
        assert!(t.dirty(1).is_empty());
    }

    #[test]
    fn never_below_zero_and_never_spent_twice() {
        let mut slots = vec![Balance::default(); 64];
        let mut t = Balances::new(&mut slots);
        let g = grant(None);
        t.load(1, &ID, &g, 10, 0);
        let mut reserved = 0;
        for _ in 0..100 {
            if let Reserve::Reserved(_) = t.reserve(1, &ID, &g, 3, 0) {
                reserved += 3;
            }
        }
        assert_eq!(reserved, 9);
        for _ in 0..3 {
            t.settle(1, &ID, 42, 0, 3);
        }
        assert_eq!(t.available(1, &ID, &g, 0), Some(1));
        t.settle(1, &ID, 42, 0, 3); // a settle with nothing reserved cannot go below zero
        assert_eq!(t.available(1, &ID, &g, 0), Some(0));
    }

    #[test]
    fn a_refill_restores_the_amount_and_a_new_grant_replaces_the_balance() {
        let mut slots = vec![Balance::default(); 64];
        let mut t = Balances::new(&mut slots);
        let g = grant(Some((5, HOUR)));
        t.load(1, &ID, &g, 1, 0);
        assert_eq!(t.reserve(1, &ID, &g, 1, 10), Reserve::Reserved(0));
        assert_eq!(t.reserve(1, &ID, &g, 1, 10), Reserve::Short(0));
        // The next hour: 5 again, less what is still reserved.
        assert_eq!(t.reserve(1, &ID, &g, 1, HOUR + 1), Reserve::Reserved(3));
        // The reservation of the ended window settles without taking from the new one.
        t.settle(1, &ID, 42, 0, 1);
        assert_eq!(t.available(1, &ID, &g, HOUR + 2), Some(4));
        assert_eq!(g.until_refill(HOUR + 2), Some(HOUR - 2));
        let g2 = Grant {
            generation: 43,
            refill: None,
        };
        assert_eq!(t.reserve(1, &ID, &g2, 1, HOUR + 3), Reserve::NotLoaded);
        assert!(t.load(1, &ID, &g2, 100, 0));
        assert_eq!(t.available(1, &ID, &g2, HOUR + 3), Some(100));
    }

    #[test]
    fn a_full_table_refuses_and_clean_balances_make_room() {
        let mut slots = vec![Balance::default(); 2];
        let mut t = Balances::new(&mut slots);
        let g = grant(None);
        assert!(t.load(1, &[1; 16], &g, 5, 0));
        assert!(t.load(1, &[2; 16], &g, 5, 0));
        assert_eq!(t.reserve(1, &[1; 16], &g, 1, 0), Reserve::Reserved(4));
        assert_eq!(t.reserve(1, &[2; 16], &g, 1, 0), Reserve::Reserved(4));
        assert_eq!(t.reserve(1, &[3; 16], &g, 1, 0), Reserve::Full);
        t.release(1, &[2; 16], 42, 1);
        assert_eq!(t.reserve(1, &[3; 16], &g, 1, 0), Reserve::NotLoaded);
        assert!(t.load(1, &[3; 16], &g, 5, 0));
    }
}
