//! Mapping pairs in memory, compact: [`Entries`] is a list of pairs (a
//! checked file's, or a version's), [`PairTable`] indexes one for O(1)
//! look-ups both ways.
//!
//! A version may hold a million pairs and lives for the daemon's
//! lifetime, and an import holds the file's pairs besides, so neither
//! costs an allocation per pair: every code is in one string, the ids in
//! one vector, and the two hash tables hold only indices into them. A
//! million pairs take about 45 MiB indexed, rather than the ~140 MiB of
//! two maps of owned strings.
//!
//! A table only grows, and only by pairs whose code and id are both new:
//! that is all building a version needs (a full replacement's pairs are
//! unique, and an upsert's win over the current version's when they are
//! added first).
//!
//! Indexing a large list builds the two tables at once, one thread each:
//! they share nothing but the (read-only) list, and hashing a million
//! pairs into tables that miss the cache is most of an import's work.

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

/// One pair of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Smaregi's 商品ID; leading zeros are not significant.
    pub smaregi_id: u64,
    pub external_code: &'a str,
}

/// Pairs (Smaregi id, external code) in order, repeats allowed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// Every code, one after the other.
    codes: String,
    /// Where each pair's code ends in `codes`; it starts where the
    /// previous one ends.
    ends: Vec<u32>,
    ids: Vec<u64>,
}

/// The code of pair `index`: from the end of the previous one to its own.
fn code_in<'a>(codes: &'a str, ends: &[u32], index: usize) -> &'a str {
    let start = index.checked_sub(1).map_or(0, |before| ends[before]) as usize;
    &codes[start..ends[index] as usize]
}

impl Entries {
    /// Room for `pairs` pairs whose codes take `code_bytes` bytes together.
    pub fn with_capacity(pairs: usize, code_bytes: usize) -> Self {
        Self {
            codes: String::with_capacity(code_bytes),
            ends: Vec::with_capacity(pairs),
            ids: Vec::with_capacity(pairs),
        }
    }

    /// # Panics
    /// When the codes outgrow 4 GiB, or the pairs `u32::MAX`: far beyond
    /// any file the import limits allow.
    pub fn push(&mut self, smaregi_id: u64, external_code: &str) {
        assert!(self.ids.len() < u32::MAX as usize, "fewer than 2³² pairs");
        self.codes.push_str(external_code);
        let end = u32::try_from(self.codes.len()).expect("codes under 4 GiB");
        self.ends.push(end);
        self.ids.push(smaregi_id);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The bytes of all codes together.
    pub fn code_bytes(&self) -> usize {
        self.codes.len()
    }

    /// # Panics
    /// When `index` is out of bounds.
    pub fn get(&self, index: usize) -> Entry<'_> {
        Entry {
            smaregi_id: self.ids[index],
            external_code: code_in(&self.codes, &self.ends, index),
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Entry<'_>> {
        (0..self.len()).map(|index| self.get(index))
    }

    /// Gives back what was reserved and not used: for lists that stay.
    pub fn shrink_to_fit(&mut self) {
        self.codes.shrink_to_fit();
        self.ends.shrink_to_fit();
        self.ids.shrink_to_fit();
    }

    /// Keeps the pairs whose index `keep` accepts, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let mut kept = Self::with_capacity(self.len(), self.code_bytes());
        for (index, entry) in self.iter().enumerate() {
            if keep(index) {
                kept.push(entry.smaregi_id, entry.external_code);
            }
        }
        *self = kept;
    }
}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 20;
        let mut list = f.debug_list();
        list.entries(
            self.iter()
                .take(SHOWN)
                .map(|e| (e.smaregi_id, e.external_code)),
        );
        if self.len() > SHOWN {
            list.entry(&format_args!("… {} pairs", self.len()));
        }
        list.finish()
    }
}

impl<'a> FromIterator<(u64, &'a str)> for Entries {
    fn from_iter<I: IntoIterator<Item = (u64, &'a str)>>(pairs: I) -> Self {
        let mut entries = Self::default();
        for (id, code) in pairs {
            entries.push(id, code);
        }
        entries
    }
}

/// Pairs, each code and each id at most once, indexed both ways.
#[derive(Clone, Default)]
pub struct PairTable {
    entries: Entries,
    /// Indices of pairs, by the hash of their code.
    by_code: HashTable<u32>,
    /// Indices of pairs, by the hash of their id.
    by_id: HashTable<u32>,
}

/// Why a pair could not be added: which side was taken already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Clash {
    Code,
    Id,
}

/// A pair of a list that repeats an earlier pair's id or code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeat {
    /// The pair that repeats.
    pub index: usize,
    /// The first pair of the list with that id or code.
    pub first: usize,
    pub side: Clash,
}

/// From this many pairs on, the two sides are indexed by two threads.
const PARALLEL_FROM: usize = 20_000;

/// One side's table of `pairs` pairs, each indexed unless it repeats an
/// earlier pair's key; the repeats, in order, with the pair they repeat.
fn index_side(
    pairs: usize,
    capacity: usize,
    hash: impl Fn(usize) -> u64,
    same_key: impl Fn(usize, usize) -> bool,
) -> (HashTable<u32>, Vec<(usize, usize)>) {
    let mut table = HashTable::with_capacity(capacity);
    let mut repeats = Vec::new();
    for index in 0..pairs {
        let slot = u32::try_from(index).expect("fewer than 2³² pairs");
        match table.entry(
            hash(index),
            |&i| same_key(i as usize, index),
            |&i| hash(i as usize),
        ) {
            Slot::Occupied(first) => repeats.push((index, *first.get() as usize)),
            Slot::Vacant(vacant) => {
                vacant.insert(slot);
            }
        }
    }
    (table, repeats)
}

impl std::fmt::Display for Clash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Code => "code",
            Self::Id => "id",
        })
    }
}

fn hash_code(code: &str) -> u64 {
    FxBuildHasher.hash_one(code)
}

fn hash_id(id: u64) -> u64 {
    FxBuildHasher.hash_one(id)
}

impl PairTable {
    /// Indexes `entries` in place, with room for `more` pairs besides;
    /// fails with the index of the first pair that repeats a code or an id.
    pub fn index(entries: Entries, more: usize) -> Result<Self, (usize, Clash)> {
        Self::index_or_repeats(entries, more).map_err(|(_, repeats)| {
            repeats
                .iter()
                .map(|repeat| (repeat.index, repeat.side))
                .min()
                .expect("a list that does not index has a repeat")
        })
    }

    /// Indexes `entries` in place, with room for `more` pairs besides; or
    /// gives them back with every pair that repeats an earlier pair's id or
    /// code, in list order (the id's repeat before the code's of one pair).
    pub fn index_or_repeats(entries: Entries, more: usize) -> Result<Self, (Entries, Vec<Repeat>)> {
        let pairs = entries.len();
        let capacity = pairs + more;
        let codes = || {
            index_side(
                pairs,
                capacity,
                |i| hash_code(entries.get(i).external_code),
                |a, b| entries.get(a).external_code == entries.get(b).external_code,
            )
        };
        let ids = || {
            index_side(
                pairs,
                capacity,
                |i| hash_id(entries.ids[i]),
                |a, b| entries.ids[a] == entries.ids[b],
            )
        };
        let ((by_code, code_repeats), (by_id, id_repeats)) = if pairs >= PARALLEL_FROM {
            std::thread::scope(|scope| {
                let codes = scope.spawn(codes);
                let ids = ids();
                let codes = codes
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (codes, ids)
            })
        } else {
            (codes(), ids())
        };
        if code_repeats.is_empty() && id_repeats.is_empty() {
            return Ok(Self {
                entries,
                by_code,
                by_id,
            });
        }
        let side = |side| move |(index, first)| Repeat { index, first, side };
        let mut repeats: Vec<Repeat> = id_repeats
            .into_iter()
            .map(side(Clash::Id))
            .chain(code_repeats.into_iter().map(side(Clash::Code)))
            .collect();
        // Stable: for one pair, the id's repeat stays first.
        repeats.sort_by_key(|repeat| repeat.index);
        Err((entries, repeats))
    }

    /// Makes room for `more` pairs.
    pub fn reserve(&mut self, more: usize) {
        let Self {
            entries,
            by_code,
            by_id,
        } = self;
        by_code.reserve(more, |&i| hash_code(entries.get(i as usize).external_code));
        by_id.reserve(more, |&i| hash_id(entries.ids[i as usize]));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds the pair unless its code or its id is already present.
    pub fn insert_new(&mut self, code: &str, id: u64) -> Result<(), Clash> {
        let hashes = (hash_code(code), hash_id(id));
        self.check_new(code, id, hashes)?;
        self.entries.push(id, code);
        self.index_unchecked(self.entries.len() - 1, hashes);
        Ok(())
    }

    fn check_new(
        &self,
        code: &str,
        id: u64,
        (code_hash, id_hash): (u64, u64),
    ) -> Result<(), Clash> {
        if self.index_of_code(code, code_hash).is_some() {
            return Err(Clash::Code);
        }
        if self.index_of_id(id, id_hash).is_some() {
            return Err(Clash::Id);
        }
        Ok(())
    }

    /// Indexes pair `index` of the entries, checked to be new.
    fn index_unchecked(&mut self, index: usize, (code_hash, id_hash): (u64, u64)) {
        let Self {
            entries,
            by_code,
            by_id,
        } = self;
        let slot = u32::try_from(index).expect("fewer than 2³² pairs");
        by_code.insert_unique(code_hash, slot, |&i| {
            hash_code(entries.get(i as usize).external_code)
        });
        by_id.insert_unique(id_hash, slot, |&i| {
            hash_id(entries.get(i as usize).smaregi_id)
        });
    }

    fn index_of_code(&self, code: &str, hash: u64) -> Option<usize> {
        self.by_code
            .find(hash, |&i| {
                self.entries.get(i as usize).external_code == code
            })
            .map(|&i| i as usize)
    }

    fn index_of_id(&self, id: u64, hash: u64) -> Option<usize> {
        self.by_id
            .find(hash, |&i| self.entries.get(i as usize).smaregi_id == id)
            .map(|&i| i as usize)
    }

    /// The id paired with `code`.
    pub fn id_for(&self, code: &str) -> Option<u64> {
        self.index_of_code(code, hash_code(code))
            .map(|index| self.entries.get(index).smaregi_id)
    }

    /// The code paired with `id`.
    pub fn code_for(&self, id: u64) -> Option<&str> {
        self.index_of_id(id, hash_id(id))
            .map(|index| self.entries.get(index).external_code)
    }

    pub fn contains_id(&self, id: u64) -> bool {
        self.index_of_id(id, hash_id(id)).is_some()
    }

    /// Every pair, in the order they were added.
    pub fn entries(&self) -> &Entries {
        &self.entries
    }
}

impl std::fmt::Debug for PairTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairTable")
            .field("pairs", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn looks_up_both_ways_and_refuses_a_second_pair_of_either_side() {
        let mut table = PairTable::default();
        assert_eq!(table.insert_new("EC-1", 101), Ok(()));
        assert_eq!(table.insert_new("", 102), Ok(()));
        assert_eq!(table.insert_new("EC-3", 103), Ok(()));
        assert_eq!(table.insert_new("EC-1", 999), Err(Clash::Code));
        assert_eq!(table.insert_new("EC-9", 103), Err(Clash::Id));
        assert_eq!(table.len(), 3);
        assert_eq!(table.id_for("EC-1"), Some(101));
        assert_eq!(table.id_for(""), Some(102));
        assert_eq!(table.id_for("EC-9"), None);
        assert_eq!(table.code_for(103), Some("EC-3"));
        assert_eq!(table.code_for(999), None);
        assert!(table.contains_id(102));
        let pairs: Vec<_> = table
            .entries()
            .iter()
            .map(|e| (e.external_code, e.smaregi_id))
            .collect();
        assert_eq!(pairs, [("EC-1", 101), ("", 102), ("EC-3", 103)]);
    }

    #[test]
    fn indexing_a_list_names_the_first_pair_that_repeats_a_side() {
        let unique: Entries = [(1, "A"), (2, "B")].into_iter().collect();
        let table = PairTable::index(unique.clone(), 0).unwrap();
        assert_eq!((table.id_for("B"), table.code_for(1)), (Some(2), Some("A")));
        assert_eq!(table.entries(), &unique);
        let repeated: Entries = [(1, "A"), (2, "B"), (3, "A"), (2, "C")]
            .into_iter()
            .collect();
        assert_eq!(PairTable::index(repeated, 0).err(), Some((2, Clash::Code)));
        let repeated: Entries = [(1, "A"), (1, "B")].into_iter().collect();
        assert_eq!(PairTable::index(repeated, 0).err(), Some((1, Clash::Id)));
    }

    #[test]
    fn a_list_keeps_what_retain_accepts_in_order() {
        let mut entries: Entries = [(1, "A"), (2, "BB"), (3, ""), (4, "DDDD")]
            .into_iter()
            .collect();
        assert_eq!(entries.code_bytes(), 7);
        entries.retain(|index| index % 2 == 1);
        let kept: Vec<_> = entries
            .iter()
            .map(|e| (e.smaregi_id, e.external_code))
            .collect();
        assert_eq!(kept, [(2, "BB"), (4, "DDDD")]);
        assert_eq!(format!("{entries:?}"), r#"[(2, "BB"), (4, "DDDD")]"#);
    }

    /// Every pair that repeats an earlier pair's id or code, the slow way.
    fn repeats_by_scanning(pairs: &[(u64, String)]) -> Vec<Repeat> {
        let mut repeats = Vec::new();
        for (index, (id, code)) in pairs.iter().enumerate() {
            if let Some(first) = pairs[..index].iter().position(|(i, _)| i == id) {
                repeats.push(Repeat {
                    index,
                    first,
                    side: Clash::Id,
                });
            }
            if let Some(first) = pairs[..index].iter().position(|(_, c)| c == code) {
                repeats.push(Repeat {
                    index,
                    first,
                    side: Clash::Code,
                });
            }
        }
        repeats
    }

    fn entries_of(pairs: &[(u64, String)]) -> Entries {
        pairs
            .iter()
            .map(|(id, code)| (*id, code.as_str()))
            .collect()
    }

    #[test]
    fn a_large_list_is_indexed_by_two_threads_and_names_every_repeat() {
        let mut pairs: Vec<(u64, String)> = (0..PARALLEL_FROM as u64 + 1_000)
            .map(|n| (1_000_000 + n, format!("EC-{n}")))
            .collect();
        let table = PairTable::index_or_repeats(entries_of(&pairs), 10).unwrap();
        assert_eq!(table.len(), pairs.len());
        assert_eq!(table.id_for("EC-20999"), Some(1_020_999));
        assert_eq!(table.code_for(1_000_007), Some("EC-7"));

        pairs[15_000].0 = pairs[3].0;
        pairs[20_500].1 = pairs[9].1.clone();
        pairs[20_600] = pairs[10].clone();
        let (entries, repeats) = PairTable::index_or_repeats(entries_of(&pairs), 0).unwrap_err();
        assert_eq!(entries, entries_of(&pairs), "the list comes back as it was");
        assert_eq!(
            repeats,
            [
                Repeat {
                    index: 15_000,
                    first: 3,
                    side: Clash::Id
                },
                Repeat {
                    index: 20_500,
                    first: 9,
                    side: Clash::Code
                },
                Repeat {
                    index: 20_600,
                    first: 10,
                    side: Clash::Id
                },
                Repeat {
                    index: 20_600,
                    first: 10,
                    side: Clash::Code
                },
            ]
        );
    }

    proptest! {
        /// Indexing a list names the same repeats as looking back over it.
        #[test]
        fn indexing_names_every_repeat(pairs in proptest::collection::vec((0u64..30, "[a-c]{0,2}"), 0..100)) {
            match PairTable::index_or_repeats(entries_of(&pairs), 0) {
                Ok(table) => {
                    prop_assert!(repeats_by_scanning(&pairs).is_empty());
                    prop_assert_eq!(table.entries(), &entries_of(&pairs));
                    for (id, code) in &pairs {
                        prop_assert_eq!(table.id_for(code), Some(*id));
                    }
                }
                Err((_, repeats)) => prop_assert_eq!(repeats, repeats_by_scanning(&pairs)),
            }
        }

        /// The table agrees with two ordinary maps fed the same pairs under
        /// the same rule, whatever the collisions.
        #[test]
        fn agrees_with_two_maps(pairs in proptest::collection::vec(("[a-c]{0,3}", 0u64..40), 0..200)) {
            let mut table = PairTable::default();
            let (mut by_code, mut by_id) = (HashMap::new(), HashMap::new());
            for (code, id) in &pairs {
                let expected = if by_code.contains_key(code) {
                    Err(Clash::Code)
                } else if by_id.contains_key(id) {
                    Err(Clash::Id)
                } else {
                    by_code.insert(code.clone(), *id);
                    by_id.insert(*id, code.clone());
                    Ok(())
                };
                prop_assert_eq!(table.insert_new(code, *id), expected);
            }
            prop_assert_eq!(table.len(), by_code.len());
            for (code, id) in &by_code {
                prop_assert_eq!(table.id_for(code), Some(*id));
                prop_assert_eq!(table.code_for(*id), Some(code.as_str()));
            }
            for (code, id) in &pairs {
                prop_assert_eq!(table.id_for(code), by_code.get(code).copied());
                prop_assert_eq!(table.code_for(*id), by_id.get(id).map(String::as_str));
            }
            let listed: HashMap<String, u64> = table
                .entries()
                .iter()
                .map(|e| (e.external_code.to_owned(), e.smaregi_id))
                .collect();
            prop_assert_eq!(listed, by_code);
        }
    }
}
