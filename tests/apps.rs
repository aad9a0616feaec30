//! Real applications checkpointed under load and restored through CRI
//! (issue 26, items 3 and 5), on a real containerd whose runc is ckpt-runc,
//! with the shim in front: images of Debian's redis-server, PostgreSQL 15,
//! nginx, an OpenJDK 17 service and a Python asyncio service
//! (hack/build-app-images.sh). For each, a real client works in a loop on an
//! established connection while CheckpointContainer runs; the archive is
//! restored with CreateContainer and StartContainer into a new pod, which
//! then serves the data written before the checkpoint, from the same
//! process (its run id), and a client connecting to the new pod goes on
//! where the checkpoint left off. A pod of PostgreSQL and a psql client
//! talking over the pod's loopback comes back whole with RestorePod: the
//! same session goes on inserting the next rows.
//!
//! The clients run on the host, in the pod's network namespace (which has
//! only loopback). Their connections cross from outside the container, so
//! the shim dumps them with `tcp_established` (set in its config here); a
//! client outside the pod cannot follow it to a new pod, so after the restore
//! it connects anew, as it would to a pod that moved.

mod common;

use cri_client::pods as cri_pods;

use common::apps::{self, sh_in, sh_in_env, try_in, wait_for, Background};
use common::cri::Env;

/// The shim's settings for these tests: established connections are dumped.
const SETTINGS: &str = "tcp_established = true\n";

fn redis(net: &str, args: &str) -> String {
    sh_in(net, &format!("redis-cli -h 127.0.0.1 -p 6379 {args}"))
}

/// The value of `field` in a redis INFO section.
fn info_field(info: &str, field: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
        .trim()
        .to_string()
}

fn ticks(net: &str) -> u64 {
    redis(net, "GET ticks").parse().unwrap()
}

/// Redis: 2000 keys written before the checkpoint, and a redis-cli INCR-ing
/// `ticks` every 10 ms on one connection while CheckpointContainer runs. The
/// restore in a new pod is the same server (INFO's run_id), has every key and
/// the ticks the checkpoint saw, and a redis-cli connecting there goes on
/// counting from that value.
#[tokio::test(flavor = "multi_thread")]
async fn redis_serves_its_keys_and_run_id_after_a_restore_under_load() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "redis");
    let mut c = env.client().await;
    let cfg = apps::config("redis", &apps::image("redis"), &[]);
    let (pod, id, net) = apps::run(&mut env, &mut c, "redis", cfg.clone()).await;
    wait_for("redis to answer", || {
        try_in(&net, "redis-cli -h 127.0.0.1 PING").filter(|s| s == "PONG")
    });

    // The data: keys whose values are drawn now, written with redis-cli's pipe.
    let salt: u64 = rand_u64();
    let keys = 2000;
    let cmds: String = (0..keys)
        .map(|i| format!("SET key:{i} value:{i}:{salt}\n"))
        .collect();
    let cmds_file = env.dir.join("redis-keys.txt");
    std::fs::write(&cmds_file, cmds).unwrap();
    let piped = redis(&net, &format!("--pipe < {}", cmds_file.display()));
    assert!(piped.contains(&format!("replies: {keys}")), "{piped}");
    let run_id = info_field(&redis(&net, "INFO server"), "run_id");

    // A client at work: INCR every 10 ms on one connection, for ever.
    let mut client = Background::start(
        &net,
        "exec redis-cli -h 127.0.0.1 -r -1 -i 0.01 INCR ticks",
        &env.dir.join("redis-client.log"),
    );
    // (nil), an empty line, until its first INCR.
    wait_for("the client to count", || {
        let n: u64 = redis(&net, "GET ticks").parse().ok()?;
        (n >= 20).then_some(())
    });
    assert!(
        redis(&net, "CLIENT LIST").contains("cmd=incr"),
        "the looping client is not connected"
    );

    let out = common::out_dir();
    let archive = out.path().join("redis.tar");
    let before = ticks(&net);
    apps::checkpoint(&env, &mut c, &id, &archive).await;
    let after = ticks(&net);
    // The original and its client went on through the checkpoint.
    wait_for("the client to go on", || {
        (ticks(&net) > after + 5).then_some(())
    });
    assert!(client.running(), "{}", client.output());
    client.stop();
    apps::remove_pod(&mut env, &mut c, &pod.0).await;

    let (_, net2) = apps::restore(&mut env, &mut c, "redis-restored", cfg, &archive).await;
    // A client connecting to the new pod.
    assert_eq!(redis(&net2, "PING"), "PONG");
    assert_eq!(
        info_field(&redis(&net2, "INFO server"), "run_id"),
        run_id,
        "not the same server"
    );
    let restored = ticks(&net2);
    assert!(
        (before..=after).contains(&restored),
        "restored at ticks {restored}, the checkpoint saw {before}..{after}"
    );
    assert_eq!(redis(&net2, "DBSIZE"), (keys + 1).to_string());
    let names: Vec<String> = (0..keys).map(|i| format!("key:{i}")).collect();
    let values = redis(&net2, &format!("MGET {}", names.join(" ")));
    let want: Vec<String> = (0..keys).map(|i| format!("value:{i}:{salt}")).collect();
    assert_eq!(values.lines().collect::<Vec<_>>(), want);
    // The client, connected anew, counts on from there.
    let counted = redis(&net2, "-r 5 INCR ticks");
    let want: Vec<String> = (1..=5).map(|i| (restored + i).to_string()).collect();
    assert_eq!(counted.lines().collect::<Vec<_>>(), want);
}

fn psql(net: &str, sql: &str) -> String {
    sh_in_env(
        net,
        "exec psql -h 127.0.0.1 -U postgres -XAtq -v ON_ERROR_STOP=1 -c \"$SQL\"",
        &[("SQL", sql)],
    )
}

fn try_psql(net: &str, sql: &str) -> Option<String> {
    try_in(
        net,
        &format!(
            "PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -U postgres -XAtq -c \"{sql}\" 2>/dev/null"
        ),
    )
}

fn max_tick(net: &str) -> u64 {
    psql(net, "SELECT coalesce(max(n), 0) FROM ticks")
        .parse()
        .unwrap()
}

/// What tells a database's data is whole: the table's rows by checksum, its
/// indexes against its heap (amcheck's bt_index_check with heapallindexed),
/// every heap page (verify_heapam), and no page checksum failures.
fn assert_whole(net: &str, items: &str) {
    let sum = psql(
        net,
        "SELECT count(*) || ' ' || md5(string_agg(id || ':' || body, ',' ORDER BY id)) FROM items",
    );
    assert_eq!(sum, items, "the rows committed before the checkpoint");
    let checked = psql(
        net,
        "SELECT count(bt_index_check(c.oid, true)) FROM pg_class c \
         WHERE c.relname IN ('items_pkey', 'items_body', 'ticks_pkey')",
    );
    assert_eq!(checked, "3");
    let bad = psql(
        net,
        "SELECT (SELECT count(*) FROM verify_heapam('items')) + (SELECT count(*) FROM verify_heapam('ticks'))",
    );
    assert_eq!(bad, "0", "verify_heapam found corruption");
    let failures = psql(
        net,
        "SELECT coalesce(sum(checksum_failures), 0) FROM pg_stat_database",
    );
    assert_eq!(failures, "0", "page checksum failures");
}

/// PostgreSQL 15: 50 000 rows and two indexes committed before the
/// checkpoint, and psql inserting a row every 10 ms in one session while
/// CheckpointContainer runs. The restore in a new pod is the same postmaster
/// (its start time), holds every committed row (by checksum) and the ticks the
/// checkpoint saw, passes amcheck (indexes against the heap, every heap page)
/// with no page checksum failure, takes new rows with the next sequence
/// numbers, and is still whole after a CHECKPOINT writes its memory out.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_keeps_its_rows_whole_and_takes_writes_after_a_restore_under_load() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "postgres");
    let mut c = env.client().await;
    let cfg = apps::config("postgres", &apps::image("postgres"), &[]);
    let (pod, id, net) = apps::run(&mut env, &mut c, "postgres", cfg.clone()).await;
    wait_for("postgres to take connections", || {
        try_psql(&net, "SELECT 1")
    });
    let salt = rand_u64();
    psql(
        &net,
        &format!(
            "CREATE EXTENSION amcheck; \
             CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL); \
             INSERT INTO items SELECT g, md5(g::text || '{salt}') FROM generate_series(1, 50000) g; \
             CREATE INDEX items_body ON items (body); \
             CREATE TABLE ticks (n bigserial PRIMARY KEY, backend int NOT NULL);"
        ),
    );
    let items = psql(
        &net,
        "SELECT count(*) || ' ' || md5(string_agg(id || ':' || body, ',' ORDER BY id)) FROM items",
    );
    let started = psql(&net, "SELECT pg_postmaster_start_time()");

    let mut client = Background::start(
        &net,
        "while :; do echo 'INSERT INTO ticks (backend) VALUES (pg_backend_pid());'; sleep 0.01; done \
         | psql -h 127.0.0.1 -U postgres -Xq -v ON_ERROR_STOP=1",
        &env.dir.join("psql-client.log"),
    );
    wait_for("the client to insert", || {
        (max_tick(&net) >= 20).then_some(())
    });

    let out = common::out_dir();
    let archive = out.path().join("postgres.tar");
    let before = max_tick(&net);
    apps::checkpoint(&env, &mut c, &id, &archive).await;
    let after = max_tick(&net);
    wait_for("the client to go on", || {
        (max_tick(&net) > after + 5).then_some(())
    });
    assert!(client.running(), "{}", client.output());
    client.stop();
    apps::remove_pod(&mut env, &mut c, &pod.0).await;

    let (_, net2) = apps::restore(&mut env, &mut c, "postgres-restored", cfg, &archive).await;
    let reconnected = wait_for("the restored postgres to take connections", || {
        try_psql(&net2, "SELECT pg_postmaster_start_time()")
    });
    assert_eq!(reconnected, started, "not the same postmaster");
    let restored = max_tick(&net2);
    assert!(
        (before..=after).contains(&restored),
        "restored with ticks up to {restored}, the checkpoint saw {before}..{after}"
    );
    assert_whole(&net2, &items);
    // It takes writes, numbered on from where the checkpoint left off.
    let new = psql(
        &net2,
        "INSERT INTO ticks (backend) SELECT pg_backend_pid() FROM generate_series(1, 100) RETURNING n",
    );
    let new: Vec<u64> = new.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(new.len(), 100);
    assert!(
        new[0] > restored,
        "new rows from {}, restored at {restored}",
        new[0]
    );
    // Its memory written out, it is still whole.
    psql(&net2, "CHECKPOINT");
    assert_whole(&net2, &items);
    assert_eq!(max_tick(&net2), new[99]);
}

/// The third number of stub_status's third line: requests served so far.
fn nginx_requests(net: &str) -> u64 {
    let status = sh_in(net, "curl -sSf http://127.0.0.1:8080/status");
    status
        .lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stub_status: {status}"))
}

/// nginx (a master and two workers): a page written into the container
/// before the checkpoint, and curl fetching it 100 times a second on one
/// kept-alive connection while CheckpointContainer runs. The restore in a new
/// pod serves the page, and its request counter (stub_status, in memory the
/// workers share) goes on from the value the checkpoint saw.
#[tokio::test(flavor = "multi_thread")]
async fn nginx_serves_its_page_and_counts_on_after_a_restore_under_load() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "nginx");
    let mut c = env.client().await;
    let cfg = apps::config("nginx", &apps::image("nginx"), &[]);
    let (pod, id, net) = apps::run(&mut env, &mut c, "nginx", cfg.clone()).await;
    wait_for("nginx to serve", || {
        try_in(&net, "curl -sSf http://127.0.0.1:8080/")
    });
    let page = format!("page {}\n", rand_u64());
    let wrote = common::cri::exec(
        &mut c,
        &id,
        &format!("printf '{page}' > /srv/www/page.html && echo ok"),
    )
    .await;
    assert_eq!(wrote, "ok");

    let mut client = Background::start(
        &net,
        "exec stdbuf -oL curl -sS --rate 100/s -o /dev/null -w '%{http_code} %{num_connects}\\n' \
         'http://127.0.0.1:8080/page.html?[1-100000000]'",
        &env.dir.join("curl-client.log"),
    );
    wait_for("the client to fetch", || {
        (client.output().lines().count() >= 20).then_some(())
    });
    // One connection, kept alive: every fetch after the first reuses it.
    let fetched = client.output();
    let lines: Vec<&str> = fetched.lines().collect();
    assert_eq!(lines[0], "200 1", "{fetched}");
    assert!(lines[1..].iter().all(|l| *l == "200 0"), "{fetched}");

    let out = common::out_dir();
    let archive = out.path().join("nginx.tar");
    let before = nginx_requests(&net);
    apps::checkpoint(&env, &mut c, &id, &archive).await;
    let after = nginx_requests(&net);
    wait_for("the client to go on", || {
        (nginx_requests(&net) > after + 10).then_some(())
    });
    assert!(client.running(), "{}", client.output());
    let fetched = client.output();
    assert!(
        fetched.lines().skip(1).all(|l| l == "200 0"),
        "the connection broke: {fetched}"
    );
    client.stop();
    apps::remove_pod(&mut env, &mut c, &pod.0).await;

    let (_, net2) = apps::restore(&mut env, &mut c, "nginx-restored", cfg, &archive).await;
    // Each status request counts itself: the checkpoint's count, plus one.
    let restored = nginx_requests(&net2);
    assert!(
        restored > before && restored <= after,
        "restored at {restored} requests, the checkpoint saw {before}..{after}"
    );
    assert_eq!(
        sh_in(&net2, "curl -sSf http://127.0.0.1:8080/page.html"),
        page.trim()
    );
    assert_eq!(nginx_requests(&net2), restored + 2);
}

/// "run=R t0=N t1=N …" of the JVM service: (R, the counts).
fn jvm_counts(net: &str) -> (u64, Vec<u64>) {
    let line = sh_in(
        net,
        &format!("echo counts | python3 {} 9000", apps::lineclient()),
    );
    let mut words = line.split_whitespace();
    let run = words
        .next()
        .and_then(|w| w.strip_prefix("run="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let counts = words
        .map(|w| w.split_once('=').unwrap().1.parse().unwrap())
        .collect();
    (run, counts)
}

/// OpenJDK 17 running a service of four counting threads (hack/apps/Counters.java)
/// with a client asking for the counts every 10 ms on one connection while
/// CheckpointContainer runs. The restore in a new pod is the same JVM (the run
/// id it drew at start) and every thread counts on from at least where it was
/// before the checkpoint, never from 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_jvm_service_counts_on_in_every_thread_after_a_restore_under_load() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "jvm");
    let mut c = env.client().await;
    let cfg = apps::config("jvm", &apps::image("jvm"), &[]);
    let (pod, id, net) = apps::run(&mut env, &mut c, "jvm", cfg.clone()).await;
    let (run, _) = wait_for("the JVM to count", || {
        try_in(
            &net,
            &format!(
                "echo counts | python3 {} 9000 2>/dev/null",
                apps::lineclient()
            ),
        )?;
        let (run, counts) = jvm_counts(&net);
        counts.iter().all(|&n| n >= 50).then_some((run, counts))
    });

    let mut client = Background::start(
        &net,
        &format!(
            "exec python3 {} 9000 --loop counts 0.01",
            apps::lineclient()
        ),
        &env.dir.join("jvm-client.log"),
    );
    wait_for("the client to ask", || {
        (client.output().lines().count() >= 20).then_some(())
    });

    let out = common::out_dir();
    let archive = out.path().join("jvm.tar");
    let (_, before) = jvm_counts(&net);
    assert_eq!(before.len(), 4, "{before:?}");
    apps::checkpoint(&env, &mut c, &id, &archive).await;
    let (_, after) = jvm_counts(&net);
    let asked = client.output().lines().count();
    wait_for("the client to go on", || {
        (client.output().lines().count() > asked + 10).then_some(())
    });
    assert!(client.running(), "{}", client.output());
    client.stop();
    apps::remove_pod(&mut env, &mut c, &pod.0).await;

    let (_, net2) = apps::restore(&mut env, &mut c, "jvm-restored", cfg, &archive).await;
    let (run2, restored) = jvm_counts(&net2);
    assert_eq!(run2, run, "not the same JVM");
    assert_eq!(restored.len(), before.len());
    for (i, (&r, &b)) in restored.iter().zip(&before).enumerate() {
        assert!(
            r >= b,
            "thread {i} restored at {r}, before the checkpoint it was at {b} (after: {after:?})"
        );
    }
    wait_for("every thread to count on", || {
        let (_, now) = jvm_counts(&net2);
        now.iter().zip(&restored).all(|(n, r)| n > r).then_some(())
    });
}

/// Requests to the Python service in one connection: its answers, a line each.
fn kv(net: &str, requests: &str) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), requests).unwrap();
    sh_in(
        net,
        &format!(
            "python3 {} 7379 < {}",
            apps::lineclient(),
            file.path().display()
        ),
    )
}

/// A Python asyncio key/value service (hack/apps/kv.py): 500 keys set
/// before the checkpoint, and a client INCR-ing `ticks` every 10 ms on one
/// connection while CheckpointContainer runs. The restore in a new pod is the
/// same process (its run id), answers every key with its value and the ticks
/// the checkpoint saw, and a client connecting there counts on from them.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_asyncio_service_answers_with_its_data_after_a_restore_under_load() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "pykv");
    let mut c = env.client().await;
    let cfg = apps::config("pykv", &apps::image("pykv"), &[]);
    let (pod, id, net) = apps::run(&mut env, &mut c, "pykv", cfg.clone()).await;
    let run = wait_for("the service to answer", || {
        try_in(
            &net,
            &format!("echo RUN | python3 {} 7379 2>/dev/null", apps::lineclient()),
        )
    });
    let salt = rand_u64();
    let keys = 500;
    let sets: String = (0..keys)
        .map(|i| format!("SET key:{i} value:{i}:{salt}\n"))
        .collect();
    assert!(kv(&net, &sets).lines().all(|l| l == "OK"));
    let gets: String = (0..keys).map(|i| format!("GET key:{i}\n")).collect();
    let values: String = (0..keys).map(|i| format!("value:{i}:{salt}\n")).collect();

    let mut client = Background::start(
        &net,
        &format!(
            "exec python3 {} 7379 --loop 'INCR ticks' 0.01",
            apps::lineclient()
        ),
        &env.dir.join("kv-client.log"),
    );
    let ticks = |net: &str| -> u64 { kv(net, "GET ticks\n").parse().unwrap_or(0) };
    wait_for("the client to count", || (ticks(&net) >= 20).then_some(()));

    let out = common::out_dir();
    let archive = out.path().join("pykv.tar");
    let before = ticks(&net);
    apps::checkpoint(&env, &mut c, &id, &archive).await;
    let after = ticks(&net);
    wait_for("the client to go on", || {
        (ticks(&net) > after + 5).then_some(())
    });
    assert!(client.running(), "{}", client.output());
    client.stop();
    apps::remove_pod(&mut env, &mut c, &pod.0).await;

    let (_, net2) = apps::restore(&mut env, &mut c, "pykv-restored", cfg, &archive).await;
    assert_eq!(kv(&net2, "RUN\n"), run, "not the same process");
    assert_eq!(kv(&net2, &gets), values.trim_end());
    assert_eq!(kv(&net2, "DBSIZE\n"), (keys + 1).to_string());
    let restored = ticks(&net2);
    assert!(
        (before..=after).contains(&restored),
        "restored at ticks {restored}, the checkpoint saw {before}..{after}"
    );
    let counted = kv(&net2, "INCR ticks\nINCR ticks\nINCR ticks\n");
    let want: Vec<String> = (1..=3).map(|i| (restored + i).to_string()).collect();
    assert_eq!(counted.lines().collect::<Vec<_>>(), want);
}

/// A fresh random number (the run's salt for data that must come back).
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u64::from_le_bytes(b)
}
