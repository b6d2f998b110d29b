use super::*;

struct Db {
    _dir: tempfile::TempDir,
    store: Store,
    counters: Counters,
}

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let counters = Counters::load(&store).unwrap();
        Db {
            _dir: dir,
            store,
            counters,
        }
    }

    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut WriteTxn<'_>) -> std::result::Result<T, ReadError>,
    ) -> std::result::Result<T, ReadError> {
        let mut staging = Staging::default();
        let mut txn = WriteTxn::new(&self.store, self.counters, &Plaintext, &mut staging);
        let out = f(&mut txn)?;
        let (counters, _, _) = txn.finish();
        let mut batch = std::mem::take(&mut staging.batch);
        stage_counters(&self.store, &mut batch, self.counters, counters).unwrap();
        self.store.db().write(batch).unwrap();
        self.counters = counters;
        Ok(out)
    }

    fn put(&mut self, k: &str, v: &str) -> PutResult {
        self.write(|t| {
            t.put(&PutRequest {
                key: k.into(),
                value: v.into(),
                prev_kv: true,
                ..Default::default()
            })
        })
        .unwrap()
    }

    fn range(&self, req: RangeRequest) -> std::result::Result<RangeResult, ReadError> {
        self.store
            .read_view()
            .unwrap()
            .range(&req, &Plaintext, &mut Budget::unlimited())
    }

    fn keys(&self, req: RangeRequest) -> Vec<String> {
        self.range(req)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    }
}

fn get(k: &str) -> RangeRequest {
    RangeRequest {
        key: k.into(),
        ..Default::default()
    }
}

#[test]
fn revisions_and_versions_follow_etcd() {
    let mut db = Db::new();
    assert_eq!(db.store.read_view().unwrap().revision, INITIAL_REVISION);
    assert!(db.put("a", "1").prev_kv.is_none());
    let prev = db.put("a", "2").prev_kv.unwrap();
    assert_eq!(
        (prev.mod_revision, prev.version, prev.value.as_slice()),
        (2, 1, &b"1"[..])
    );
    let kv = db.range(get("a")).unwrap().kvs.remove(0);
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(db.counters.revision, 3);
}

#[test]
fn delete_writes_tombstone_and_past_revisions_stay_readable() {
    let mut db = Db::new();
    db.put("a", "1");
    db.put("b", "1");
    let res = db
        .write(|t| {
            t.delete(&DeleteRequest {
                key: b"a".to_vec(),
                prev_kv: true,
                ..Default::default()
            })
        })
        .unwrap();
    assert_eq!(res.deleted, 1);
    assert_eq!(res.prev_kvs[0].value, b"1");
    assert_eq!(db.counters.revision, 4);
    assert!(db.range(get("a")).unwrap().kvs.is_empty());
    let mut at3 = get("a");
    at3.revision = 3;
    assert_eq!(db.range(at3).unwrap().kvs[0].value, b"1");
    // Recreated keys start a new life: version 1, new create revision.
    db.put("a", "again");
    let kv = db.range(get("a")).unwrap().kvs.remove(0);
    assert_eq!((kv.create_revision, kv.version), (5, 1));
    // Deleting nothing does not bump the revision.
    db.write(|t| {
        t.delete(&DeleteRequest {
            key: b"zzz".to_vec(),
            ..Default::default()
        })
    })
    .unwrap();
    assert_eq!(db.counters.revision, 5);
}

#[test]
fn range_forms_limit_count_sort_and_filters() {
    let mut db = Db::new();
    for k in ["a", "b", "b1", "b2", "c", "\u{0}x"] {
        db.put(k, k);
    }
    let prefix = RangeRequest {
        key: b"b".to_vec(),
        range_end: b"c".to_vec(),
        ..Default::default()
    };
    assert_eq!(db.keys(prefix.clone()), ["b", "b1", "b2"]);
    let from_key = RangeRequest {
        key: b"b1".to_vec(),
        range_end: vec![0],
        ..Default::default()
    };
    assert_eq!(db.keys(from_key), ["b1", "b2", "c"]);
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    assert_eq!(db.keys(all).len(), 6);
    let mut limited = prefix.clone();
    limited.limit = 2;
    let r = db.range(limited).unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 3));
    let mut desc = prefix.clone();
    desc.sort_order = SortOrder::Descend;
    desc.sort_target = SortTarget::Mod;
    assert_eq!(db.keys(desc), ["b2", "b1", "b"]);
    let mut filtered = prefix.clone();
    filtered.min_mod_revision = 4;
    let r = db.range(filtered).unwrap();
    assert_eq!(r.kvs.len(), 2);
    assert_eq!(r.count, 3, "count ignores filters");
    let mut count_only = prefix.clone();
    count_only.count_only = true;
    let r = db.range(count_only).unwrap();
    assert!(r.kvs.is_empty());
    assert_eq!(r.count, 3);
    let mut keys_only = prefix;
    keys_only.keys_only = true;
    assert!(
        db.range(keys_only)
            .unwrap()
            .kvs
            .iter()
            .all(|kv| kv.value.is_empty())
    );
    let backwards = RangeRequest {
        key: b"c".to_vec(),
        range_end: b"a".to_vec(),
        ..Default::default()
    };
    assert!(db.keys(backwards).is_empty());
}

#[test]
fn future_and_compacted_revisions_are_refused() {
    let mut db = Db::new();
    db.put("a", "1");
    db.put("a", "2");
    db.put("a", "3");
    let mut future = get("a");
    future.revision = 99;
    assert!(matches!(
        db.range(future),
        Err(ReadError::Refused(ApplyError::FutureRevision))
    ));
    db.write(|t| t.compact(3)).unwrap();
    let mut old = get("a");
    old.revision = 2;
    assert!(matches!(
        db.range(old),
        Err(ReadError::Refused(ApplyError::Compacted))
    ));
    let mut at = get("a");
    at.revision = 3;
    assert_eq!(db.range(at).unwrap().kvs[0].value, b"2");
    assert!(matches!(
        db.write(|t| t.compact(3)),
        Err(ReadError::Refused(ApplyError::Compacted))
    ));
    // The superseded revision is physically gone from history.
    let hist = db.store.cf(crate::storage::CF_HISTORY).unwrap();
    assert!(
        db.store
            .db()
            .get_cf(hist, history_key(b"a", 2))
            .unwrap()
            .is_none()
    );
    assert!(
        db.store
            .db()
            .get_cf(hist, history_key(b"a", 3))
            .unwrap()
            .is_some()
    );
}

#[test]
fn txn_compares_branches_and_reads_own_writes() {
    let mut db = Db::new();
    db.put("a", "1");
    let txn = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal,
            target: CompareTarget::Value(b"1".to_vec()),
            key: b"a".to_vec(),
            range_end: vec![],
        }],
        success: vec![
            RequestOp::Put(PutRequest {
                key: b"b".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            }),
            RequestOp::Range(RangeRequest {
                key: b"a".to_vec(),
                range_end: b"c".to_vec(),
                ..Default::default()
            }),
            RequestOp::Txn(TxnRequest {
                // Compares against the state before the outer txn: "b" did not exist.
                compare: vec![Compare {
                    result: CompareResult::Equal,
                    target: CompareTarget::Version(0),
                    key: b"b".to_vec(),
                    range_end: vec![],
                }],
                success: vec![RequestOp::Put(PutRequest {
                    key: b"c".to_vec(),
                    value: b"nested".to_vec(),
                    ..Default::default()
                })],
                failure: vec![],
            }),
        ],
        failure: vec![],
    };
    let res = db.write(|t| t.txn(&txn)).unwrap();
    assert!(res.succeeded);
    let ResponseOp::Range(r) = &res.responses[1] else {
        panic!("expected range")
    };
    assert_eq!(r.kvs.len(), 2, "range sees the txn's own put");
    let ResponseOp::Txn(inner) = &res.responses[2] else {
        panic!("expected txn")
    };
    assert!(inner.succeeded);
    assert_eq!(db.counters.revision, 3, "one revision for the whole txn");
    let c = db.range(get("c")).unwrap().kvs.remove(0);
    assert_eq!(c.mod_revision, 3);

    // Value compare on a missing key fails; the failure branch runs.
    let txn = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::NotEqual,
            target: CompareTarget::Value(b"x".to_vec()),
            key: b"missing".to_vec(),
            range_end: vec![],
        }],
        success: vec![],
        failure: vec![RequestOp::Range(get("a"))],
    };
    let res = db.write(|t| t.txn(&txn)).unwrap();
    assert!(!res.succeeded);
    assert_eq!(
        db.counters.revision, 3,
        "read-only branch keeps the revision"
    );
}

#[test]
fn refused_txn_stages_nothing() {
    let mut db = Db::new();
    let txn = TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Put(PutRequest {
                key: b"new".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            }),
            RequestOp::Put(PutRequest {
                key: b"absent".to_vec(),
                ignore_value: true,
                ..Default::default()
            }),
        ],
        failure: vec![],
    };
    assert!(matches!(
        db.write(|t| t.txn(&txn)),
        Err(ReadError::Refused(ApplyError::KeyNotFound))
    ));
    assert!(db.range(get("new")).unwrap().kvs.is_empty());
    assert_eq!(db.counters.revision, INITIAL_REVISION);
}

#[test]
fn leases_attach_and_revoke_deletes_keys() {
    let mut db = Db::new();
    db.write(|t| Ok(t.lease_grant(7, 30)?)).unwrap();
    let with_lease = PutRequest {
        key: b"l".to_vec(),
        value: b"v".to_vec(),
        lease: 7,
        ..Default::default()
    };
    db.write(|t| t.put(&with_lease)).unwrap();
    let missing = PutRequest {
        key: b"m".to_vec(),
        lease: 8,
        ..Default::default()
    };
    assert!(matches!(
        db.write(|t| t.put(&missing)),
        Err(ReadError::Refused(ApplyError::LeaseNotFound))
    ));
    assert_eq!(
        db.store.read_view().unwrap().lease_keys(7).unwrap(),
        vec![b"l".to_vec()]
    );
    assert!(db.write(|t| Ok(t.lease_revoke(7)?)).unwrap());
    assert!(db.range(get("l")).unwrap().kvs.is_empty());
    assert!(db.store.read_view().unwrap().leases().unwrap().is_empty());
}

#[test]
fn events_replay_in_revision_order_with_prev() {
    let mut db = Db::new();
    db.put("a", "1");
    db.put("a", "2");
    db.write(|t| {
        t.delete(&DeleteRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
    })
    .unwrap();
    let (ev, more) = db
        .store
        .read_view()
        .unwrap()
        .events_page(2, 4, usize::MAX, &|_| true)
        .unwrap();
    assert!(more.is_none());
    assert_eq!(ev.len(), 3);
    assert!(!ev[0].1.deleted && ev[0].1.prev_kv.is_none());
    assert_eq!(ev[1].1.prev_kv.as_ref().unwrap().value, b"1");
    assert!(ev[2].1.deleted);
    assert_eq!(ev[2].1.kv.mod_revision, 4);
}

#[test]
fn entries_staged_in_one_batch_see_each_other() {
    let mut db = Db::new();
    db.put("seed", "0");
    let mut staging = Staging::default();
    let put = |k: &str, v: &str| PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    };
    let mut counters = db.counters;
    for (k, v) in [("a", "1"), ("a", "2"), ("b", "x")] {
        let mut txn = WriteTxn::new(&db.store, counters, &Plaintext, &mut staging);
        txn.put(&put(k, v)).unwrap();
        let (c, _, overlay) = txn.finish();
        staging.overlay.extend(overlay);
        counters = c;
    }
    // A delete-range in the same batch sees the staged keys.
    let mut txn = WriteTxn::new(&db.store, counters, &Plaintext, &mut staging);
    let del = txn
        .delete(&DeleteRequest {
            key: b"b".to_vec(),
            range_end: b"c".to_vec(),
            prev_kv: true,
        })
        .unwrap();
    assert_eq!(del.deleted, 1);
    let (c, _, overlay) = txn.finish();
    staging.overlay.extend(overlay);
    let mut batch = std::mem::take(&mut staging.batch);
    stage_counters(&db.store, &mut batch, db.counters, c).unwrap();
    db.store.db().write(batch).unwrap();
    db.counters = c;
    let a = db.range(get("a")).unwrap().kvs.remove(0);
    assert_eq!(
        (a.value.as_slice(), a.version, a.mod_revision),
        (&b"2"[..], 2, 4)
    );
    assert!(db.range(get("b")).unwrap().kvs.is_empty());
    assert_eq!(db.store.read_view().unwrap().revision, 6);
}

fn range_op(prefix: &str) -> RequestOp {
    RequestOp::Range(RangeRequest {
        key: prefix.into(),
        range_end: prefix_end(prefix.as_bytes()),
        ..Default::default()
    })
}

#[test]
fn a_write_txn_whose_ranges_exceed_the_budget_is_refused_before_staging_anything() {
    let mut db = Db::new();
    let big = "v".repeat(1 << 20);
    for i in 0..4 {
        db.put(&format!("p/{i}"), &big);
    }
    let before = db.store.read_view().unwrap().revision;
    // 4 MiB per range: 5 ranges are more than the 16 MiB an entry may return.
    let mut ops = vec![RequestOp::Put(PutRequest {
        key: b"w".to_vec(),
        value: b"x".to_vec(),
        ..Default::default()
    })];
    ops.extend((0..5).map(|_| range_op("p/")));
    let txn = TxnRequest {
        success: ops.clone(),
        ..Default::default()
    };
    let err = db.write(|t| t.txn(&txn)).unwrap_err();
    assert!(
        matches!(err, ReadError::Refused(ApplyError::ResponseTooLarge(_))),
        "{err:?}"
    );
    assert_eq!(db.store.read_view().unwrap().revision, before);
    assert!(db.range(get("w")).unwrap().kvs.is_empty(), "nothing staged");
    // The same ranges nested in sub-transactions draw from the same budget.
    let nested = TxnRequest {
        success: (0..5)
            .map(|_| {
                RequestOp::Txn(TxnRequest {
                    success: vec![range_op("p/")],
                    ..Default::default()
                })
            })
            .chain(std::iter::once(ops[0].clone()))
            .collect(),
        ..Default::default()
    };
    assert!(matches!(
        db.write(|t| t.txn(&nested)),
        Err(ReadError::Refused(ApplyError::ResponseTooLarge(_)))
    ));
    // Keys only, or a count, cost almost nothing.
    let keys_only = TxnRequest {
        success: (0..5)
            .map(|_| {
                RequestOp::Range(RangeRequest {
                    key: b"p/".to_vec(),
                    range_end: prefix_end(b"p/"),
                    keys_only: true,
                    ..Default::default()
                })
            })
            .chain(std::iter::once(ops[0].clone()))
            .collect(),
        ..Default::default()
    };
    db.write(|t| t.txn(&keys_only)).unwrap();
    // A read view refuses the same way, without reading past the budget.
    let view = db.store.read_view().unwrap();
    let mut small = Budget::new(1 << 20);
    let r = view.range(
        &RangeRequest {
            key: b"p/".to_vec(),
            range_end: prefix_end(b"p/"),
            ..Default::default()
        },
        &Plaintext,
        &mut small,
    );
    assert!(matches!(
        r,
        Err(ReadError::Refused(ApplyError::ResponseTooLarge(_)))
    ));
}

#[test]
fn transactions_with_too_many_operations_over_all_levels_are_refused() {
    let mut db = Db::new();
    let mut t = TxnRequest::default();
    for _ in 0..40 {
        t = TxnRequest {
            success: (0..500)
                .map(|_| range_op("a"))
                .chain([RequestOp::Txn(t)])
                .collect(),
            ..Default::default()
        };
    }
    assert!(txn_total_ops(&t) > apply_limits::MAX_TXN_TOTAL_OPS);
    assert!(matches!(
        db.write(|w| w.txn(&t)),
        Err(ReadError::Refused(ApplyError::TooManyOps))
    ));
}

#[test]
fn history_pages_are_bounded_and_filtered() {
    let mut db = Db::new();
    for i in 0..50 {
        db.put(&format!("k{}", i % 5), &"x".repeat(1000));
    }
    let view = db.store.read_view().unwrap();
    let mut from = 2;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (events, next) = view
            .events_page(from, view.revision, 4096, &|k| k == b"k3")
            .unwrap();
        assert!(events.len() <= 5, "a page holds about 4 KiB");
        seen.extend(events.into_iter().map(|(r, e)| (r, e.kv.key)));
        pages += 1;
        match next {
            Some(n) => from = n,
            None => break,
        }
    }
    assert_eq!(seen.len(), 10);
    assert!(seen.iter().all(|(_, k)| k == b"k3"));
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(pages >= 2);
}

#[test]
fn events_at_the_compacted_revision_stay_readable() {
    let mut db = Db::new();
    db.put("a", "1");
    db.put("b", "1");
    db.put("a", "2");
    let at = db.store.read_view().unwrap().revision;
    db.write(|t| t.compact(at)).unwrap();
    let view = db.store.read_view().unwrap();
    let (events, more) = view.events_page(at, at, usize::MAX, &|_| true).unwrap();
    assert!(more.is_none());
    assert_eq!(events.len(), 1, "the write at the compaction revision");
    assert_eq!(events[0].1.kv.value, b"2");
    // Earlier revisions are gone from the index.
    let (before, _) = view.events_page(2, at - 1, usize::MAX, &|_| true).unwrap();
    assert!(before.is_empty());
    // Compacting later still works and drops what is now behind.
    drop(view);
    db.put("c", "1");
    let next = db.store.read_view().unwrap().revision;
    db.write(|t| t.compact(next)).unwrap();
    let view = db.store.read_view().unwrap();
    let (left, _) = view.events_page(1, next, usize::MAX, &|_| true).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].1.kv.key, b"c");
}
