//! The cluster tests' engines harness, proven: Redis and PostgreSQL start, die and come back
//! as the other cluster tests need; `serve` in cluster mode refuses to start without its
//! engines; two replicas share one PostgreSQL and its migrations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::engines::{DropProxy, Postgres, Redis, Replica, ReplicaOptions};
use gemini_meter_mock::{MockOptions, MockServer};

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

/// A connection through `addr` (its handshake done), with a read timeout.
fn connect_through(addr: std::net::SocketAddr) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let c = client.get_connection_with_timeout(std::time::Duration::from_secs(5))?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    Ok(c)
}

fn incr(c: &mut redis::Connection) -> redis::RedisResult<i64> {
    redis::cmd("INCR").arg("n").query(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_loses_a_reply_after_the_command_ran_and_can_go_dark() {
    let redis = Redis::start();
    let proxy = DropProxy::start(redis.addr()).await;
    let addr = proxy.addr();
    let blocking = |f: Box<dyn FnOnce() -> redis::RedisResult<i64> + Send>| tokio::task::spawn_blocking(f);
    let mut c = connect_through(addr).unwrap();
    assert_eq!(incr(&mut c).unwrap(), 1);
    proxy.drop_next_reply();
    let (lost, _c) = tokio::task::spawn_blocking(move || (incr(&mut c), c)).await.unwrap();
    assert!(lost.is_err(), "the reply came through: {lost:?}");
    assert_eq!(proxy.dropped(), 1);
    assert!(!proxy.armed());
    // The command ran: the counter moved although its reply was lost.
    assert_eq!(redis.cmd(&["GET", "n"]), redis::Value::BulkString(b"2".to_vec()));
    let again = blocking(Box::new(move || incr(&mut connect_through(addr)?)));
    assert_eq!(again.await.unwrap().unwrap(), 3);

    // Dark: open connections cut, new ones closed at once.
    let mut open = connect_through(addr).unwrap();
    proxy.go_dark().await;
    let (cut, _open) = tokio::task::spawn_blocking(move || (incr(&mut open), open))
        .await
        .unwrap();
    assert!(cut.is_err(), "a cut connection answered");
    let refused = blocking(Box::new(move || incr(&mut connect_through(addr)?)));
    assert!(refused.await.unwrap().is_err(), "a dark proxy forwarded");
    proxy.go_live();
    let live = blocking(Box::new(move || incr(&mut connect_through(addr)?)));
    assert_eq!(live.await.unwrap().unwrap(), 4);
}

/// A port nobody listens on (the engines' own port source; never bound here).
fn dead_port() -> u16 {
    common::spare_port()
}

fn mock_addr() -> std::net::SocketAddr {
    // The refusing starts never reach the upstream.
    std::net::SocketAddr::from(([127, 0, 0, 1], dead_port()))
}

/// `serve`'s stderr must be one line naming `engine` and `var`, never the password.
fn assert_refused(status: std::process::ExitStatus, out: &str, err: &str, engine: &str, var: &str) {
    assert!(!status.success(), "serve started without {engine}: {out}{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {err:?}");
    assert!(lines[0].contains(engine), "{engine} not named: {}", lines[0]);
    assert!(lines[0].contains(var), "{var} not named: {}", lines[0]);
    assert!(
        !err.contains("sekrit") && !out.contains("sekrit"),
        "the password leaked: {out}{err}"
    );
}

#[test]
fn serve_refuses_to_start_when_redis_is_unreachable() {
    let pg = Postgres::start();
    let redis_url = format!("redis://:sekrit-pass@127.0.0.1:{}/", dead_port());
    let opts = ReplicaOptions::new(mock_addr(), &redis_url, &pg.url());
    let (status, out, err) = Replica::serve_to_exit(opts);
    assert_refused(status, &out, &err, "Redis", "GEMINI_METER_REDIS_URL");
}

#[test]
fn serve_refuses_to_start_when_postgres_is_unreachable() {
    let redis = Redis::start();
    let pg_url = format!("postgres://postgres:sekrit-pass@127.0.0.1:{}/gm", dead_port());
    let opts = ReplicaOptions::new(mock_addr(), &redis.url(), &pg_url);
    let (status, out, err) = Replica::serve_to_exit(opts);
    assert_refused(status, &out, &err, "PostgreSQL", "GEMINI_METER_DATABASE_URL");
}

#[test]
fn serve_refuses_to_start_in_cluster_mode_without_the_postgres_variable() {
    let redis = Redis::start();
    let mut opts = ReplicaOptions::new(mock_addr(), &redis.url(), "");
    opts.postgres_url = None;
    let (status, out, err) = Replica::serve_to_exit(opts);
    assert_refused(status, &out, &err, "PostgreSQL", "GEMINI_METER_DATABASE_URL");
}

/// How many times a replica's output says it applied a migration.
fn applied(r: &Replica) -> usize {
    r.output().matches("schema migration applied").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_run_the_migrations_once() {
    let mock = MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockOptions {
            api_key: Some(common::UPSTREAM_KEY.into()),
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let redis = Redis::start();
    let pg = Postgres::start();
    let (a, b) = tokio::join!(
        Replica::start(mock.addr, &redis.url(), &pg.url()),
        Replica::start(mock.addr, &redis.url(), &pg.url()),
    );
    let mut a = a;
    let expected: Vec<Vec<String>> = gemini_meter::cluster::schema::MIGRATIONS
        .iter()
        .map(|m| vec![m.version.to_string()])
        .collect();
    let versions = "SELECT version FROM gm_schema_migrations ORDER BY version";
    assert_eq!(pg.query(versions), expected);
    assert_eq!(
        applied(&a) + applied(&b),
        expected.len(),
        "{}\n{}",
        a.output(),
        b.output()
    );

    // A restart finds them applied: nothing runs again.
    a.restart().await;
    assert_eq!(pg.query(versions), expected);
    assert_eq!(applied(&a) + applied(&b), expected.len());
    for r in [&a, &b] {
        let health = reqwest::get(r.url("/healthz")).await.unwrap();
        assert_eq!(health.status(), 200, "{}", r.output());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_concurrently_on_a_fresh_database_all_succeed_once() {
    use gemini_meter::cluster::{Pg, schema};
    let pg = Postgres::start();
    let url = pg.url();
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let handle = Pg::new("GEMINI_METER_DATABASE_URL", &url).unwrap();
                schema::migrate(&handle).await.map_err(|e| e.to_string())
            })
        })
        .collect();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let expected: Vec<Vec<String>> = schema::MIGRATIONS.iter().map(|m| vec![m.version.to_string()]).collect();
    assert_eq!(
        pg.query("SELECT version FROM gm_schema_migrations ORDER BY version"),
        expected
    );
}

/// The load tool's cluster target, tiny: it starts its own engines and one replica (two once
/// keys are shared between replicas), drives them, and meters every request. No figure is
/// judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_runs_replicas_on_engines_it_starts() {
    let opts = gemini_meter_loadtest::Options {
        mode: gemini_meter_loadtest::Mode::Both,
        concurrency: 4,
        duration: std::time::Duration::from_millis(500),
        rounds: 1,
        warmup: std::time::Duration::ZERO,
        chunks: 3,
        chunk_delay: std::time::Duration::ZERO,
        ttfb: std::time::Duration::ZERO,
        users: 2,
        no_nginx: true,
        no_hyper: true,
        gateway_workers: None,
        binary: env!("CARGO_BIN_EXE_gemini-meter").into(),
        callgrind: None,
        tls: false,
    };
    let report = gemini_meter_loadtest::run_with_replicas(&opts, 1).await.unwrap();
    let v = report.json();
    for k in v["kinds"].as_array().unwrap() {
        let names: Vec<&str> = k["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["target"].as_str())
            .collect();
        assert_eq!(names, ["direct", "gateway", "cluster"], "{k}");
        let cluster = &k["targets"][2];
        assert!(cluster["ok"].as_u64().unwrap() > 0, "{cluster}");
        assert_eq!(cluster["errors"]["total"], 0, "{cluster}");
        assert!(cluster["cpu_per_request_us"].as_f64().is_some(), "{cluster}");
    }
    let c = &v["cluster"];
    assert_eq!(c["replicas"], 1, "{c}");
    assert_eq!(c["metering"]["pass"], true, "{c}");
    assert_eq!(c["clean_exit"], true, "{c}");
    assert!(report.metering_pass(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_sigkill_restarts_on_its_port_and_data() {
    let mut fleet = common::engines::Fleet::start(1, "").await;
    let r = &mut fleet.replicas[0];
    let (addr, data) = (r.addr(), r.data_dir());
    let pid = r.pid().unwrap();
    r.kill9();
    assert!(r.pid().is_none());
    assert!(reqwest::get(r.url("/healthz")).await.is_err(), "killed, yet it answers");
    r.restart().await;
    assert_ne!(r.pid().unwrap(), pid);
    assert_eq!((r.addr(), r.data_dir()), (addr, data));
    assert_eq!(
        reqwest::get(r.url("/healthz")).await.unwrap().status(),
        200,
        "{}",
        r.output()
    );
    assert!(r.stop().await, "no clean exit on SIGTERM: {}", r.output());
}
