//! Tests of the record log.

use super::*;

fn links(prev: u64, ms: i64) -> Links {
    Links {
        prev_user: prev,
        prev_kind: prev,
        created_ms: ms,
    }
}

const NOV: i64 = 1_795_000_000_000; // 2026-11
const DEC: i64 = 1_797_000_000_000; // 2026-12

#[test]
fn a_batch_that_is_not_written_leaves_the_log_as_it_was_and_a_retry_lands_in_the_same_place() {
    let dir = tempfile::tempdir().unwrap();
    let log = RecordLog::open(dir.path()).unwrap();
    log.recover(0, |_| Ok(())).unwrap();
    let mut a = log.append();
    let p0 = a.push(links(NONE, NOV), b"{\"n\":0}", b"", None).unwrap();
    a.commit().unwrap();
    drop(a);
    let push_batch = |a: &mut Appender<'_>| {
        let p1 = a.push(links(p0, NOV), b"{\"n\":1}", b"", None).unwrap();
        // A new month: the batch starts a segment.
        let p2 = a.push(links(p1, DEC), b"{\"n\":2}", b"", None).unwrap();
        (p1, p2)
    };
    let mut a = log.append();
    let first = push_batch(&mut a);
    assert_eq!(log.segment_ranges().len(), 2);
    drop(a); // failed before (or while) writing
    assert_eq!(log.segment_ranges().len(), 1);
    let mut a = log.append();
    let again = push_batch(&mut a);
    let end = a.commit().unwrap();
    drop(a);
    assert_eq!(again, first);
    log.set_visible(end);
    drop(log);
    let log = RecordLog::open(dir.path()).unwrap();
    let mut seen = Vec::new();
    let recovered = log.recover(0, |f| {
        seen.push(f.record().to_vec());
        Ok(())
    });
    assert_eq!(recovered.unwrap(), end);
    assert_eq!(seen, [&b"{\"n\":0}"[..], b"{\"n\":1}", b"{\"n\":2}"]);
    assert_eq!(log.segment_ranges().len(), 2);
}

#[test]
fn append_read_walk_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = RecordLog::open(dir.path()).unwrap();
    assert_eq!(log.recover(0, |_| Ok(())).unwrap(), 0);
    let mut a = log.append();
    let p0 = a.push(links(NONE, NOV), b"{\"n\":0}", b"", None).unwrap();
    let p1 = a.push(links(p0, NOV), b"{\"n\":1}", b"[1]", None).unwrap();
    // A new month starts a new segment.
    let p2 = a.push(links(p1, DEC), b"{\"n\":2}", b"", None).unwrap();
    let end = a.commit().unwrap();
    drop(a);
    // Nothing is visible until the aggregates are applied.
    assert!(log.read(p0).unwrap().is_none());
    log.set_visible(p2);
    assert_eq!(log.read(p0).unwrap().map(|f| f.end()), Some(p1));
    assert!(log.read(p2).unwrap().is_none());
    log.set_visible(end);
    let f2 = log.read(p2).unwrap().unwrap();
    assert_eq!(f2.record(), b"{\"n\":2}");
    assert_eq!(f2.links.prev_user, p1);
    assert_eq!(log.segment_ranges().len(), 2);
    let f1 = log.read(p1).unwrap().unwrap();
    assert_eq!((f1.record(), f1.alerts()), (&b"{\"n\":1}"[..], &b"[1]"[..]));
    // Backwards across the segment boundary.
    assert_eq!(log.read_before(end).unwrap().unwrap().pos, p2);
    assert_eq!(log.read_before(p2).unwrap().unwrap().pos, p1);
    assert_eq!(log.read_before(p1).unwrap().unwrap().pos, p0);
    assert!(log.read_before(p0).unwrap().is_none());
    // A position inside a frame is no frame.
    assert!(log.read(p0 + 3).unwrap().is_none());
    let mut seen = vec![];
    log.scan(0, u64::MAX, |f| {
        seen.push(f.pos);
        true
    })
    .unwrap();
    assert_eq!(seen, vec![p0, p1, p2]);
    assert!(log.erase(p1).unwrap());
    log.sync().unwrap();
    drop(log);

    let log = RecordLog::open(dir.path()).unwrap();
    let mut seen = vec![];
    let end2 = log
        .recover(p1, |f| {
            seen.push((f.pos, f.erased));
            Ok(())
        })
        .unwrap();
    assert_eq!(end2, end);
    assert_eq!(seen, vec![(p1, true), (p2, false)]);
    // Appending continues in December's segment.
    let mut a = log.append();
    let p3 = a.push(links(p2, DEC), b"{}", b"", None).unwrap();
    assert_eq!(p3, end);
    a.commit().unwrap();
    drop(a);
    assert_eq!(log.segment_ranges().len(), 2);
}

#[test]
fn torn_tail_is_cut_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let log = RecordLog::open(dir.path()).unwrap();
    log.recover(0, |_| Ok(())).unwrap();
    let mut a = log.append();
    let p0 = a.push(links(NONE, NOV), b"{\"a\":1}", b"", None).unwrap();
    let p1 = a.push(links(p0, NOV), b"{\"b\":2}", b"", None).unwrap();
    let end = a.commit().unwrap();
    drop(a);
    drop(log);
    let path = segment_path(dir.path(), 0);
    let full = std::fs::read(&path).unwrap();
    for cut in p1 as usize..full.len() {
        std::fs::write(&path, &full[..cut]).unwrap();
        let log = RecordLog::open(dir.path()).unwrap();
        let mut n = 0;
        let got = log
            .recover(0, |_| {
                n += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!((got, n), (p1, 1), "cut at {cut}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), p1);
    }
    // Garbage appended after good frames is cut too; good frames survive.
    let mut bad = full.clone();
    bad.extend_from_slice(&[1, 0, 0, 0, 9, 9, 9]);
    std::fs::write(&path, &bad).unwrap();
    let log = RecordLog::open(dir.path()).unwrap();
    assert_eq!(log.recover(0, |_| Ok(())).unwrap(), end);
}
