//! The cluster tests' engines harness, proven: Redis and PostgreSQL start, die and come back
//! as the other cluster tests need; `serve` in cluster mode refuses to start without its
//! engines; two replicas share one PostgreSQL and its migrations.

mod common;

use common::engines::{Postgres, Redis};

#[test]
fn redis_starts_is_killed_and_restarts_empty_with_a_new_run_id() {
    let mut redis = Redis::start();
    redis.cmd(&["SET", "k", "v"]);
    let before = redis.run_id();
    redis.kill();
    assert!(!redis.is_running());
    assert!(
        std::net::TcpStream::connect(redis.addr()).is_err(),
        "killed, yet it answers"
    );
    redis.restart_empty();
    assert_ne!(redis.run_id(), before);
    assert_eq!(redis.cmd(&["EXISTS", "k"]), redis::Value::Int(0), "restarted with data");
}

#[test]
fn postgres_starts_stops_and_starts_again_with_its_data() {
    let pg = Postgres::start();
    pg.query("CREATE TABLE t (id int primary key, note text)");
    pg.query("INSERT INTO t VALUES (1, 'one'), (2, NULL)");
    pg.stop();
    assert!(pg.pid().is_none());
    pg.start_again();
    assert_eq!(
        pg.query("SELECT id, note FROM t ORDER BY id"),
        vec![
            vec!["1".to_string(), "one".to_string()],
            vec!["2".to_string(), String::new()]
        ]
    );
    pg.kill();
    assert!(pg.pid().is_none());
    pg.start_again();
    assert_eq!(pg.query("SELECT count(*) FROM t"), vec![vec!["2".to_string()]]);
}
