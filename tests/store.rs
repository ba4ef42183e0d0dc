//! The store against a real sled database on disk.

use std::sync::Arc;

use smaregi_relay::store::keys::u64_key;
use smaregi_relay::store::{Store, StoreError, TreeName, SCHEMA_VERSION};
use tokio::sync::Barrier;

mod common;

const RECORDS: TreeName = TreeName::new("records");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_committers_share_syncs_and_all_become_durable() {
    const COMMITTERS: u64 = 64;
    // On disk: on a tmpfs /tmp a sync costs nothing and rounds need not be shared.
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(&common::store_options(temp.path())).unwrap();
    let syncs_before = store.sync_count();
    let all_written = Arc::new(Barrier::new(COMMITTERS as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..COMMITTERS {
        let (store, all_written) = (store.clone(), Arc::clone(&all_written));
        tasks.spawn(async move {
            store
                .tree(RECORDS)
                .unwrap()
                .insert(u64_key(id), &b"v"[..])
                .unwrap();
            all_written.wait().await;
            store.commit().await
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    let syncs = store.sync_count() - syncs_before;
    assert!(syncs >= 1, "a commit must sync");
    // Some rounds must serve several callers. How many depends on the
    // disk's and the CPU's speed (the bench measures it), so only a sync
    // per commit fails here.
    assert!(
        syncs < COMMITTERS,
        "{COMMITTERS} concurrent commits cost {syncs} syncs; group commit should share them"
    );
    store.close().await.unwrap();
    drop(store);

    let reopened = Store::open(&common::store_options(temp.path())).unwrap();
    let records = reopened.tree(RECORDS).unwrap();
    assert_eq!(records.len() as u64, COMMITTERS);
}

#[tokio::test]
async fn a_second_open_is_refused_while_the_store_is_locked() {
    let temp = tempfile::tempdir().unwrap();
    let _first = Store::open(&common::store_options(temp.path())).unwrap();
    let error = Store::open(&common::store_options(temp.path())).unwrap_err();
    assert!(matches!(error, StoreError::Locked { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&temp.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("locked by another process"), "{message}");
    assert_eq!(error.exit_code(), smaregi_relay::exit::TEMP_FAIL);
}

#[tokio::test]
async fn the_lock_is_released_when_the_store_is_dropped() {
    let temp = tempfile::tempdir().unwrap();
    drop(Store::open(&common::store_options(temp.path())).unwrap());
    Store::open(&common::store_options(temp.path())).unwrap();
}

#[tokio::test]
async fn another_schema_version_is_refused_naming_both_versions() {
    let temp = tempfile::tempdir().unwrap();
    {
        let db = common::open_raw_sled(temp.path());
        let meta = db.open_tree("meta").unwrap();
        meta.insert("schema-version", &99u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let error = Store::open(&common::store_options(temp.path())).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(
            &error,
            StoreError::SchemaMismatch { found, expected: SCHEMA_VERSION, .. } if found == "99"
        ),
        "{message}"
    );
    assert!(
        message.contains(&temp.path().display().to_string()),
        "{message}"
    );
    assert_eq!(error.exit_code(), smaregi_relay::exit::DATA_ERR);
}

#[tokio::test]
async fn a_database_of_someone_else_is_not_taken_over() {
    let temp = tempfile::tempdir().unwrap();
    {
        let db = common::open_raw_sled(temp.path());
        db.open_tree("orders").unwrap().insert("k", "v").unwrap();
        db.flush().unwrap();
    }
    let error = Store::open(&common::store_options(temp.path())).unwrap_err();
    assert!(matches!(error, StoreError::NotAStore { .. }), "{error:?}");
}

#[tokio::test]
async fn an_unwritable_directory_is_named_in_the_error() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let directory = file.join("db");
    let error = Store::open(&common::store_options(&directory)).unwrap_err();
    assert!(matches!(error, StoreError::NotWritable { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&directory.display().to_string()),
        "{error}"
    );
    assert_eq!(error.exit_code(), smaregi_relay::exit::CANT_CREATE);
}

#[tokio::test]
async fn commits_after_close_fail_instead_of_claiming_durability() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(&common::store_options(temp.path())).unwrap();
    let other_handle = store.clone();
    store.close().await.unwrap();
    let error = other_handle.commit().await.unwrap_err();
    assert!(matches!(error, StoreError::Closed { .. }), "{error:?}");
}

#[tokio::test]
async fn generated_ids_increase_across_reopen() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(&common::store_options(temp.path())).unwrap();
    let first = store.generate_id().unwrap();
    let second = store.generate_id().unwrap();
    assert!(second > first);
    store.close().await.unwrap();
    drop(store);
    let store = Store::open(&common::store_options(temp.path())).unwrap();
    assert!(store.generate_id().unwrap() > second);
}

/// sled writes a tree node larger than a quarter of a segment to a blob
/// file and never syncs it; a commit must, or a power cut could take
/// committed records with it. Thirty values of 20 KiB make leaves far over
/// the 128 KiB at which sled starts doing that.
#[tokio::test]
async fn a_commit_syncs_the_blob_files_sled_wrote() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(&common::store_options(temp.path())).unwrap();
    let tree = store.tree(RECORDS).unwrap();
    // Incompressible: were sled's compression ever enabled, the leaves stay large.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    for id in 0..30 {
        let value: Vec<u8> = (0..20 * 1024)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        tree.insert(u64_key(id), value).unwrap();
    }
    store.commit().await.unwrap();

    let blob_files = std::fs::read_dir(temp.path().join("blobs"))
        .unwrap()
        .count();
    assert!(blob_files > 0, "the test no longer makes sled write blobs");
    assert!(
        store.blob_files_synced() >= blob_files as u64,
        "{blob_files} blob files on disk, {} synced",
        store.blob_files_synced()
    );
    store.close().await.unwrap();
    drop((tree, store));

    let reopened = Store::open(&common::store_options(temp.path())).unwrap();
    assert_eq!(reopened.tree(RECORDS).unwrap().len(), 30);
}
