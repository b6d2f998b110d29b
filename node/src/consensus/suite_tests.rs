//! openraft's own storage test suite, run against our RocksDB log store and state machine.

use super::log_store::LogStore;
use super::state_machine::{ApplyHooks, StateMachine};
use super::types::TypeConfig;
use crate::apply::Executor;
use crate::storage::Store;
use crate::storage::mvcc::Plaintext;
use openraft::StorageError;
use openraft::errors::ErrorSource;
use openraft::impls::BoxedErrorSource;
use openraft::testing::log::{StoreBuilder, Suite};
use std::sync::Arc;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let err = |e: String| StorageError::read(BoxedErrorSource::from_string(e));
        let dir = tempfile::tempdir().map_err(|e| err(e.to_string()))?;
        let store = Store::open(dir.path()).map_err(|e| err(e.to_string()))?;
        let (sm, _) = StateMachine::open(
            store.clone(),
            Executor::new(&store, Arc::new(Plaintext)).map_err(|e| err(e.to_string()))?,
            ApplyHooks::default(),
        )
        .map_err(|e| err(e.to_string()))?;
        Ok((dir, LogStore::new(store), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_rocksdb_store() {
    Suite::test_all(RocksBuilder)
        .await
        .expect("openraft storage suite");
}
