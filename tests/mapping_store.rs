//! The mapping store against a real sled database on disk.

use smaregi_relay::config::MappingFallback;
use smaregi_relay::mapping::check::Format;
use smaregi_relay::mapping::pairs::PairTable;
use smaregi_relay::mapping::store::{ImportRequest, VersionSource, MAPPING_ENTRIES, VERSIONS_KEPT};
use smaregi_relay::mapping::{MappingError, MappingStore};
use smaregi_relay::store::Store;

mod common;

fn request(format: Format, pairs: &[(u64, &str)], name: &str) -> ImportRequest {
    ImportRequest {
        format,
        pairs: PairTable::index(pairs.iter().copied().collect(), 0).expect("unique pairs"),
        source: VersionSource::File {
            file_name: name.into(),
            sha256: "00".repeat(32),
            owner_uid: Some(1000),
            owner_name: Some("staff".into()),
            format: format.name().into(),
            data_rows: pairs.len() as u64,
            applied_rows: 0,
            skipped_rows: 0,
            warnings: 0,
        },
    }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(&common::store_options(dir)).unwrap()
}

#[tokio::test]
async fn an_empty_store_has_version_0_and_only_the_fallback() {
    let temp = tempfile::tempdir().unwrap();
    let store = open(temp.path());
    let identity = MappingStore::open(&store, MappingFallback::Identity).unwrap();
    let current = identity.current();
    assert_eq!(current.version(), 0);
    assert_eq!(current.smaregi_id_for("123"), Some("123".into()));
    assert_eq!(current.smaregi_id_for("ABC"), None);
    assert_eq!(current.smaregi_id_for("1234567890123456"), None);
    assert_eq!(current.external_code_for("123"), Some("123".into()));
    assert_eq!(current.external_code_for("12x"), None);
    let none = MappingStore::open(&store, MappingFallback::None).unwrap();
    assert_eq!(none.current().smaregi_id_for("123"), None);
    assert_eq!(none.current().external_code_for("123"), None);
}

#[tokio::test]
async fn imports_upserts_rollback_and_history_survive_a_reopen() {
    let temp = tempfile::tempdir().unwrap();
    let store = open(temp.path());
    let mapping = MappingStore::open(&store, MappingFallback::Identity).unwrap();
    let mut changes = mapping.subscribe();
    assert_eq!(*changes.borrow_and_update(), 0);

    let first = mapping
        .import(request(
            Format::FullReplacement,
            &[(1, "A"), (2, "B"), (3, "C")],
            "first.csv",
        ))
        .await
        .unwrap();
    assert_eq!((first.version, first.entries, first.based_on), (1, 3, 0));
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 1);
    let v1 = mapping.current();
    assert_eq!(v1.smaregi_id_for("A"), Some("1".into()));
    assert_eq!(v1.external_code_for("2"), Some("B".into()));
    // Identity: an unlisted code that is an id maps to itself, unless that
    // id is mapped to another code.
    assert_eq!(v1.smaregi_id_for("9"), Some("9".into()));
    assert_eq!(v1.smaregi_id_for("1"), None);
    assert_eq!(v1.external_code_for("9"), Some("9".into()));

    // Upsert: code B moves to id 4 (id 2 loses it); id 3 gets code D (C is gone).
    let second = mapping
        .import(request(
            Format::Upsert,
            &[(4, "B"), (3, "D")],
            "logikura.csv",
        ))
        .await
        .unwrap();
    assert_eq!((second.version, second.entries, second.based_on), (2, 3, 1));
    let v2 = mapping.current();
    assert_eq!(v2.smaregi_id_for("B"), Some("4".into()));
    assert_eq!(
        v2.external_code_for("2"),
        Some("2".into()),
        "id 2 is unlisted now"
    );
    assert_eq!(v2.external_code_for("3"), Some("D".into()));
    assert_eq!(v2.smaregi_id_for("C"), None);
    assert_eq!(v2.smaregi_id_for("A"), Some("1".into()));
    // The snapshot taken before is unaffected.
    assert_eq!(v1.smaregi_id_for("B"), Some("2".into()));

    drop((v1, v2, mapping));
    store.close().await.unwrap();
    drop(store);

    let store = open(temp.path());
    let mapping = MappingStore::open(&store, MappingFallback::Identity).unwrap();
    assert_eq!(mapping.current().version(), 2);
    assert_eq!(mapping.current().smaregi_id_for("B"), Some("4".into()));
    let history = mapping.history().unwrap();
    assert_eq!(
        history.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(history[1].entries, 3);

    let mut changes = mapping.subscribe();
    let rolled = mapping.rollback(1).await.unwrap();
    assert_eq!(rolled.version, 1);
    assert_eq!(*changes.borrow_and_update(), 1);
    assert_eq!(mapping.current().smaregi_id_for("B"), Some("2".into()));
    assert!(matches!(
        mapping.rollback(7).await,
        Err(MappingError::NoSuchVersion(7))
    ));

    // After a rollback, a new import gets a new number.
    let third = mapping
        .import(request(Format::FullReplacement, &[], "empty.csv"))
        .await
        .unwrap();
    assert_eq!((third.version, third.based_on), (3, 1));
    assert!(mapping.current().is_empty());
    drop(mapping);
    store.close().await.unwrap();
    drop(store);
    let store = open(temp.path());
    let mapping = MappingStore::open(&store, MappingFallback::Identity).unwrap();
    assert_eq!(mapping.current().version(), 3);
    assert_eq!(mapping.current().smaregi_id_for("A"), None);
}

#[tokio::test]
async fn entries_of_an_unfinished_import_are_removed_on_open() {
    let temp = tempfile::tempdir().unwrap();
    let store = open(temp.path());
    let mapping = MappingStore::open(&store, MappingFallback::None).unwrap();
    mapping
        .import(request(Format::FullReplacement, &[(1, "A")], "a.csv"))
        .await
        .unwrap();
    drop(mapping);
    // What a crash between writing entries and the pointer flip leaves:
    // entries of version 2, no metadata.
    let entries = store.tree(MAPPING_ENTRIES).unwrap();
    for (code, id) in [("A", 5u64), ("Z", 6)] {
        let mut key = 2u64.to_be_bytes().to_vec();
        key.extend_from_slice(code.as_bytes());
        entries.insert(key, &id.to_be_bytes()).unwrap();
    }
    store.commit().await.unwrap();

    let mapping = MappingStore::open(&store, MappingFallback::None).unwrap();
    assert_eq!(mapping.current().version(), 1);
    assert_eq!(mapping.current().smaregi_id_for("A"), Some("1".into()));
    assert_eq!(mapping.current().smaregi_id_for("Z"), None);
    assert_eq!(entries.scan_prefix(2u64.to_be_bytes()).count(), 0);
    let next = mapping
        .import(request(Format::FullReplacement, &[(7, "Q")], "b.csv"))
        .await
        .unwrap();
    assert_eq!(next.version, 2);
    assert_eq!(mapping.current().len(), 1);
}

#[tokio::test]
async fn old_versions_are_pruned_but_never_the_current_one() {
    let temp = tempfile::tempdir().unwrap();
    let store = open(temp.path());
    let mapping = MappingStore::open(&store, MappingFallback::None).unwrap();
    let total = VERSIONS_KEPT as u64 + 3;
    for n in 1..=total {
        let code = format!("C{n}");
        mapping
            .import(request(Format::FullReplacement, &[(n, &code)], "f.csv"))
            .await
            .unwrap();
    }
    mapping.prune().unwrap();
    let kept: Vec<u64> = mapping
        .history()
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(kept, (4..=total).collect::<Vec<_>>());
    let entries = store.tree(MAPPING_ENTRIES).unwrap();
    assert_eq!(entries.scan_prefix(1u64.to_be_bytes()).count(), 0);
    // A pruned version cannot be rolled back to; a kept one can.
    assert!(matches!(
        mapping.rollback(3).await,
        Err(MappingError::NoSuchVersion(3))
    ));
    mapping.rollback(4).await.unwrap();
    assert_eq!(mapping.current().smaregi_id_for("C4"), Some("4".into()));
}

/// Chunks stay small enough that sled never writes a mapping leaf to a
/// blob file (each would cost the commit a file and a directory sync).
#[tokio::test]
async fn a_large_import_writes_no_blob_files() {
    let temp = tempfile::tempdir().unwrap();
    let store = open(temp.path());
    let mapping = MappingStore::open(&store, MappingFallback::Identity).unwrap();
    let codes: Vec<String> = (0..100_000u64)
        .map(|n| format!("EC-{:012x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let pairs: Vec<(u64, &str)> = codes
        .iter()
        .enumerate()
        .map(|(n, code)| (4_900_000_000_000 + n as u64, code.as_str()))
        .collect();
    mapping
        .import(request(Format::FullReplacement, &pairs, "large.csv"))
        .await
        .unwrap();
    assert_eq!(mapping.current().len(), 100_000);
    assert_eq!(store.blob_files_synced(), 0);
}
