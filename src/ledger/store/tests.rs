//! Tests of the store.

use super::*;
use crate::ledger::record::RecordIds;
use chrono::TimeZone;

fn rec(ids: &RecordIds, user: &str, kind: RecordKind, at: DateTime<Utc>) -> Record {
    Record {
        id: ids.next_in_order(at),
        user_id: Arc::from(user),
        tokens: 10,
        messages: u64::from(kind == RecordKind::MessageSent),
        bytes: 0,
        cost: rust_decimal::Decimal::new(5, 3),
        details: crate::ledger::Details::Untyped(kind, serde_json::Map::new()),
        created_at: at,
    }
}

fn ids_of(page: &[(u64, Record)]) -> Vec<u128> {
    page.iter().map(|(_, r)| r.id).collect()
}

#[test]
fn a_batch_appended_but_never_applied_is_applied_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let ids = RecordIds::new();
    let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
    let m = Month::of(at);
    {
        let s = SledStore::open(dir.path()).unwrap();
        s.write_records(&[rec(&ids, "ann", RecordKind::MessageSent, at)])
            .unwrap();
        // A crash between the log's fsync and sled's batch: only the log has these.
        let items: Vec<(Record, Vec<Alert>)> = (0..3)
            .map(|_| (rec(&ids, "ann", RecordKind::AiResponse, at), Vec::new()))
            .collect();
        s.append(&items).unwrap();
        s.flush_sync().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    let t = s.user_month("ann", m).unwrap();
    assert_eq!((t.records, t.messages, t.tokens), (4, 1, 40));
    let page = s
        .records(
            &RecordFilter {
                user_id: Some("ann".into()),
                ..Default::default()
            },
            10,
        )
        .unwrap();
    assert_eq!(page.len(), 4);
    // Opening again applies nothing twice.
    drop(s);
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.user_month("ann", m).unwrap().records, 4);
    assert_eq!(s.count_records().unwrap(), 4);
}

#[test]
fn pages_follow_each_users_chain_by_type_and_reject_other_users_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let ids = RecordIds::new();
    let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
    let mut all = Vec::new();
    for i in 0..30 {
        let user = if i % 3 == 0 { "bob" } else { "ann" };
        let kind = if i % 2 == 0 {
            RecordKind::MessageSent
        } else {
            RecordKind::AiResponse
        };
        all.push(rec(&ids, user, kind, at + chrono::Duration::seconds(i)));
    }
    // Two batches, so chains cross batch boundaries.
    s.write_records(&all[..13]).unwrap();
    s.write_records(&all[13..]).unwrap();
    let want = |user: &str, kind: Option<RecordKind>| -> Vec<u128> {
        let mut v: Vec<u128> = all
            .iter()
            .filter(|r| &*r.user_id == user && kind.is_none_or(|k| k == r.kind()))
            .map(|r| r.id)
            .collect();
        v.reverse();
        v
    };
    for kind in [None, Some(RecordKind::AiResponse), Some(RecordKind::MessageSent)] {
        let mut f = RecordFilter {
            user_id: Some("ann".into()),
            kind,
            ..Default::default()
        };
        let mut got = Vec::new();
        loop {
            let page = s.records(&f, 4).unwrap();
            got.extend(ids_of(&page[..page.len().min(3)]));
            match page.get(3) {
                Some((pos, _)) => f.cursor = Some(*pos),
                None => break,
            }
        }
        assert_eq!(got, want("ann", kind), "{kind:?}");
    }
    // Everyone's records, newest first, and a time window.
    let every = s.records(&RecordFilter::default(), 100).unwrap();
    let mut newest_first: Vec<u128> = all.iter().map(|r| r.id).collect();
    newest_first.reverse();
    assert_eq!(ids_of(&every), newest_first);
    let window = s
        .records(
            &RecordFilter {
                from: Some(at + chrono::Duration::seconds(10)),
                to: Some(at + chrono::Duration::seconds(20)),
                ..Default::default()
            },
            100,
        )
        .unwrap();
    assert_eq!(window.len(), 10);
    // A cursor at one of bob's records does not page through ann's history.
    let bobs = s
        .records(
            &RecordFilter {
                user_id: Some("bob".into()),
                ..Default::default()
            },
            1,
        )
        .unwrap();
    let forged = RecordFilter {
        user_id: Some("ann".into()),
        cursor: Some(bobs[0].0),
        ..Default::default()
    };
    assert!(matches!(s.records(&forged, 5), Err(StoreError::BadCursor)));
    let inside = RecordFilter {
        user_id: Some("ann".into()),
        cursor: Some(bobs[0].0 + 1),
        ..Default::default()
    };
    assert!(matches!(s.records(&inside, 5), Err(StoreError::BadCursor)));
}

/// The months of some records.
fn months_of(recs: &[Record]) -> std::collections::BTreeSet<Month> {
    recs.iter().map(Record::month).collect()
}

/// Every page, of every user and type, newest first.
fn all_pages(s: &SledStore) -> Vec<Vec<u128>> {
    let mut out = Vec::new();
    for user in ["ann", "bob"] {
        for kind in [None, Some(RecordKind::MessageSent), Some(RecordKind::AiResponse)] {
            let f = RecordFilter {
                user_id: Some(user.into()),
                kind,
                ..Default::default()
            };
            out.push(ids_of(&s.records(&f, 1000).unwrap()));
        }
    }
    out
}

#[test]
fn batches_applied_together_read_like_batches_applied_one_by_one() {
    let ids = RecordIds::new();
    // 30 hours from here: days and a month (so a new log segment) change between applies.
    let d0 = Utc.with_ymd_and_hms(2026, 11, 30, 20, 0, 0).unwrap();
    let all: Vec<Record> = (0..90i64)
        .map(|i| {
            let kind = if i % 3 == 0 {
                RecordKind::AiResponse
            } else {
                RecordKind::MessageSent
            };
            rec(
                &ids,
                if i % 4 == 0 { "bob" } else { "ann" },
                kind,
                d0 + chrono::Duration::minutes(i * 20),
            )
        })
        .collect();
    let one = tempfile::tempdir().unwrap();
    let a = SledStore::open(one.path()).unwrap();
    for chunk in all.chunks(4) {
        a.write_records(chunk).unwrap();
    }
    let grouped = tempfile::tempdir().unwrap();
    let b = SledStore::open(grouped.path()).unwrap();
    let items: Vec<(Record, Vec<Alert>)> = all.iter().map(|r| (r.clone(), Vec::new())).collect();
    // Applying the first of two unapplied batches alone would lose the second's heads.
    let first = b.append(&items[..1]).unwrap();
    let second = b.append(&items[1..2]).unwrap();
    assert!(matches!(
        b.apply_appended(&items[..1], &first),
        Err(StoreError::ApplyOrder)
    ));
    let mut both = first;
    both.merge(second);
    b.apply_appended(&items[..2], &both).unwrap();
    let mut applied = 2;
    let mut written = 2;
    for group in items[2..].chunks(20) {
        // Several appends, each linking to the unapplied ones before it, then one apply.
        let mut pending: Option<Appended> = None;
        for chunk in group.chunks(4) {
            let appended = b.append(chunk).unwrap();
            match &mut pending {
                Some(p) => p.merge(appended),
                None => pending = Some(appended),
            }
            written += chunk.len();
            // One user's records and days show every record written; everyone's records and
            // the aggregates only what is applied.
            for user in ["ann", "bob"] {
                let f = RecordFilter {
                    user_id: Some(user.into()),
                    ..Default::default()
                };
                let want: Vec<u128> = all[..written]
                    .iter()
                    .rev()
                    .filter(|r| &*r.user_id == user)
                    .map(|r| r.id)
                    .collect();
                assert_eq!(ids_of(&b.records(&f, 1000).unwrap()), want);
                let days: u64 = b
                    .daily(Some(user), d0.date_naive())
                    .unwrap()
                    .iter()
                    .map(|r| r.totals.records)
                    .sum();
                assert_eq!(days, want.len() as u64);
            }
            assert_eq!(b.records(&RecordFilter::default(), 1000).unwrap().len(), applied);
            assert_eq!(b.count_records().unwrap(), applied as u64);
            let users_months: u64 = months_of(&all)
                .into_iter()
                .map(|m| b.month_summary(m).unwrap().0.records)
                .sum();
            assert_eq!(users_months, applied as u64);
        }
        b.apply_appended(group, &pending.unwrap()).unwrap();
        applied += group.len();
        assert_eq!(b.count_records().unwrap(), applied as u64);
    }
    assert_eq!(all_pages(&b), all_pages(&a));
    let months = [Month::of(d0), Month::of(d0 + chrono::Duration::days(2))];
    assert_ne!(months[0], months[1]);
    assert!(b.log.segment_ranges().len() >= 2);
    for user in ["ann", "bob"] {
        assert_eq!(
            b.daily(Some(user), d0.date_naive()).unwrap(),
            a.daily(Some(user), d0.date_naive()).unwrap()
        );
        for m in months {
            assert_eq!(b.user_month(user, m).unwrap(), a.user_month(user, m).unwrap());
        }
    }
    for m in months {
        assert_eq!(b.month_summary(m).unwrap(), a.month_summary(m).unwrap());
        assert_eq!(b.month_models(m).unwrap(), a.month_models(m).unwrap());
    }
    drop(b);
    let b = SledStore::open(grouped.path()).unwrap();
    assert_eq!(all_pages(&b), all_pages(&a));
}

#[test]
fn daily_totals_come_from_day_runs_across_batches_days_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let ids = RecordIds::new();
    let d0 = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
    let mut all = Vec::new();
    // Three days, both types, two users interleaved; written in uneven batches.
    for i in 0..60i64 {
        let at = d0 + chrono::Duration::minutes(i * 50);
        let kind = if i % 3 == 0 {
            RecordKind::AiResponse
        } else {
            RecordKind::MessageSent
        };
        all.push(rec(&ids, if i % 4 == 0 { "bob" } else { "ann" }, kind, at));
    }
    {
        let s = SledStore::open(dir.path()).unwrap();
        for chunk in all[..40].chunks(7) {
            s.write_records(chunk).unwrap();
        }
    }
    let s = SledStore::open(dir.path()).unwrap();
    s.write_records(&all[40..]).unwrap();
    for user in ["ann", "bob"] {
        let mut want: std::collections::BTreeMap<(String, String), Totals> = Default::default();
        for r in all.iter().filter(|r| &*r.user_id == user) {
            let day = r.created_at.format("%Y-%m-%d").to_string();
            want.entry((day, r.kind().as_str().to_string()))
                .or_default()
                .add(&Totals::of(r));
        }
        let got: std::collections::BTreeMap<(String, String), Totals> = s
            .daily(Some(user), d0.date_naive())
            .unwrap()
            .into_iter()
            .map(|row| ((row.day, row.kind), row.totals))
            .collect();
        assert_eq!(got, want, "{user}");
        // A later start leaves the earlier days out.
        let later = s
            .daily(Some(user), d0.date_naive() + chrono::Duration::days(1))
            .unwrap();
        assert!(later.iter().all(|r| r.day.as_str() > "2026-11-20"));
        assert_eq!(
            later.len(),
            want.keys().filter(|(d, _)| d.as_str() > "2026-11-20").count()
        );
    }
}

#[test]
fn deleting_a_user_erases_their_records_and_retention_drops_old_months() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let ids = RecordIds::new();
    let sep = Utc.with_ymd_and_hms(2026, 9, 10, 0, 0, 0).unwrap();
    let nov = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
    s.write_records(&[
        rec(&ids, "ann", RecordKind::MessageSent, sep),
        rec(&ids, "bob", RecordKind::MessageSent, sep),
    ])
    .unwrap();
    s.write_records(&[
        rec(&ids, "ann", RecordKind::MessageSent, nov),
        rec(&ids, "bob", RecordKind::AiResponse, nov),
    ])
    .unwrap();
    assert_eq!(s.log.segment_ranges().len(), 2, "a segment per month");
    assert_eq!(s.delete_user_usage("bob").unwrap(), 2);
    let bob = RecordFilter {
        user_id: Some("bob".into()),
        ..Default::default()
    };
    assert!(s.records(&bob, 10).unwrap().is_empty());
    assert_eq!(s.count_records().unwrap(), 2);
    // Erased on disk: the record's JSON is gone from the files.
    for (start, _) in s.log.segment_ranges() {
        let bytes = std::fs::read(dir.path().join("records").join(format!("{start:020}.seg"))).unwrap();
        assert!(!bytes.windows(5).any(|w| w == b"\"bob\""));
    }
    // Retention: September's segment goes whole; month totals stay.
    let cutoff = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    assert_eq!(s.delete_records_before(cutoff).unwrap(), 1);
    assert_eq!(s.log.segment_ranges().len(), 1);
    assert_eq!(s.count_records().unwrap(), 1);
    assert_eq!(s.user_month("ann", Month::of(sep)).unwrap().records, 1);
    let mut n = 0;
    s.for_each_record_in(Month::of(nov), |_| {
        n += 1;
        true
    })
    .unwrap();
    assert_eq!(n, 1);
    // A user created again under the same id starts a history of their own.
    s.write_records(&[rec(&ids, "bob", RecordKind::MessageSent, nov)])
        .unwrap();
    assert_eq!(s.records(&bob, 10).unwrap().len(), 1);
}

/// A request's records: its `message_sent`, and its `ai_response` unless it never got one.
fn request(ids: &RecordIds, user: &str, model: &str, chat: &str, at: DateTime<Utc>, answered: bool) -> Vec<Record> {
    let kinds: &[RecordKind] = if answered {
        &[RecordKind::MessageSent, RecordKind::AiResponse]
    } else {
        &[RecordKind::MessageSent]
    };
    kinds
        .iter()
        .map(|&k| {
            let mut r = rec(ids, user, k, at);
            let md = serde_json::json!({"model": model, "tags": {"chat-id": chat}});
            r.details = crate::ledger::Details::Untyped(k, md.as_object().unwrap().clone());
            r
        })
        .collect()
}

/// (requests, tokens) per model of a month.
fn model_rows(s: &SledStore, m: Month) -> Vec<(String, u64, u64)> {
    s.month_models(m)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.records, t.tokens))
        .collect()
}

/// Puts the `M` and `T` rows back as version 1 kept them (every record counted) and takes
/// the version away: a store written before requests were counted.
fn as_version_1(s: &SledStore, all: &[Record]) {
    let mut old: HashMap<Vec<u8>, u64> = HashMap::default();
    for r in all {
        let m = r.month().to_string();
        *old.entry(join(b'M', &[m.as_bytes(), r.model().unwrap().as_bytes()]))
            .or_default() += 1;
        let md = r.metadata();
        let chat = md["tags"]["chat-id"].as_str().unwrap();
        *old.entry(join(b'T', &[m.as_bytes(), b"chat-id", chat.as_bytes()]))
            .or_default() += 1;
    }
    for (k, n) in old {
        let mut t = s.get_totals(&k).unwrap();
        t.records = n;
        s.ledger.insert(k, &t.encode()[..]).unwrap();
    }
    s.ledger.remove([b'V']).unwrap();
    s.flush_sync().unwrap();
}

#[test]
fn model_and_tag_rows_count_requests_and_version_1_rows_are_recounted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let ids = RecordIds::new();
    let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
    let m = Month::of(at);
    let mut all = Vec::new();
    for i in 0..5 {
        // Three answered requests of ann, one ann never got an answer for, one of bob.
        let (user, answered) = match i {
            3 => ("ann", false),
            4 => ("bob", true),
            _ => ("ann", true),
        };
        all.extend(request(
            &ids,
            user,
            "flash",
            if i < 2 { "c1" } else { "c2" },
            at,
            answered,
        ));
    }
    {
        let s = SledStore::open(dir.path()).unwrap();
        s.write_records(&all).unwrap();
        // 9 records, 5 requests; tokens are summed over every record.
        assert_eq!(model_rows(&s, m), [("flash".to_string(), 5, 90)]);
        let tags = s.month_tag(m, "chat-id").unwrap();
        let reqs: Vec<(String, u64)> = tags.into_iter().map(|(v, t)| (v, t.records)).collect();
        assert_eq!(reqs, [("c1".to_string(), 2), ("c2".to_string(), 3)]);
        // Opening again changes nothing (the version is current).
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(model_rows(&s, m), [("flash".to_string(), 5, 90)]);
        as_version_1(&s, &all);
        assert_eq!(model_rows(&s, m), [("flash".to_string(), 9, 90)]);
        // A tail the aggregates never reached: replayed (the new way) after the upgrade.
        let tail: Vec<(Record, Vec<Alert>)> = request(&ids, "ann", "flash", "c1", at, true)
            .into_iter()
            .map(|r| (r, Vec::new()))
            .collect();
        s.append(&tail).unwrap();
        s.flush_sync().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    // Every record counted is still in the log: exact.
    assert_eq!(model_rows(&s, m), [("flash".to_string(), 6, 110)]);
    let c1 = s.month_tag(m, "chat-id").unwrap()[0].clone();
    assert_eq!((c1.0.as_str(), c1.1.records), ("c1", 3));
    // A deleted user's records are erased, their rows stay: recounted from what is left, the
    // missing records estimated at two a request.
    all.extend(tail_records(&s, "ann"));
    assert_eq!(s.delete_user_usage("bob").unwrap(), 2);
    as_version_1(&s, &all);
    drop(s);
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(model_rows(&s, m), [("flash".to_string(), 6, 110)]);
}

/// The user's newest request's records (the tail appended above), oldest first.
fn tail_records(s: &SledStore, user: &str) -> Vec<Record> {
    let f = RecordFilter {
        user_id: Some(user.into()),
        ..Default::default()
    };
    let mut page: Vec<Record> = s.records(&f, 2).unwrap().into_iter().map(|(_, r)| r).collect();
    page.reverse();
    page
}

#[test]
fn cache_storage_records_have_their_own_chain_and_old_heads_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let ids = RecordIds::new();
    let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        // A user without cache storage keeps the 4-slot heads older builds read.
        s.write_records(&[rec(&ids, "ann", RecordKind::MessageSent, at)])
            .unwrap();
        let v = s.ledger.get(join(HEADS, &[b"ann"])).unwrap().unwrap();
        assert_eq!(v.len(), 32);
        s.write_records(&[
            rec(&ids, "ann", RecordKind::CacheStorage, at),
            rec(&ids, "ann", RecordKind::AiResponse, at),
        ])
        .unwrap();
        let v = s.ledger.get(join(HEADS, &[b"ann"])).unwrap().unwrap();
        assert_eq!(v.len(), 40);
    }
    let s = SledStore::open(dir.path()).unwrap();
    let page = s
        .records(
            &RecordFilter {
                user_id: Some("ann".into()),
                kind: Some(RecordKind::CacheStorage),
                ..Default::default()
            },
            10,
        )
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].1.kind(), RecordKind::CacheStorage);
    let kinds: Vec<String> = s
        .daily(Some("ann"), at.date_naive())
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, ["ai_response", "cache_storage", "message_sent"]);
    let all: Vec<String> = s
        .daily(None, at.date_naive())
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(all, ["ai_response", "cache_storage", "message_sent"]);
}
