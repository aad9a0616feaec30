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
//! same session goes on inserting the next rows (the SysV segment of the
//! pod's IPC namespace recreated once, by the first restore); started in an
//! order CRIU cannot restore, the server is refused naming the segment.
//!
//! The clients run on the host, in the pod's network namespace (which has
//! only loopback). Their connections cross from outside the container, so
//! the shim dumps them with `tcp_established` (set in its config here); a
//! client outside the pod cannot follow it to a new pod, so after the restore
//! it connects anew, as it would to a pod that moved.

mod common;

use cri_client::pods as cri_pods;

use std::time::Duration;

use common::apps::{self, sh_in, sh_in_env, try_in, wait_for, Background};
use common::cri::Env;
use k8s_cri::v1::ContainerConfig;

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

/// Keys `key:I` = `value:I:SALT` for I < `keys`, written with redis-cli's pipe.
fn set_keys(env: &Env, net: &str, keys: u64, salt: u64) {
    let cmds: String = (0..keys)
        .map(|i| format!("SET key:{i} value:{i}:{salt}\n"))
        .collect();
    let cmds_file = env.dir.join("redis-keys.txt");
    std::fs::write(&cmds_file, cmds).unwrap();
    let piped = redis(net, &format!("--pipe < {}", cmds_file.display()));
    assert!(piped.contains(&format!("replies: {keys}")), "{piped}");
}

/// Every key [`set_keys`] wrote holds its value.
fn assert_keys(net: &str, keys: u64, salt: u64) {
    let names: Vec<String> = (0..keys).map(|i| format!("key:{i}")).collect();
    let values = redis(net, &format!("MGET {}", names.join(" ")));
    let want: Vec<String> = (0..keys).map(|i| format!("value:{i}:{salt}")).collect();
    assert_eq!(values.lines().collect::<Vec<_>>(), want);
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

    let (keys, salt) = (2000, common::rand_u64());
    set_keys(&env, &net, keys, salt);
    let run_id = info_field(&redis(&net, "INFO server"), "run_id");

    // A client at work: INCR every 10 ms on one connection, for ever.
    let client = Background::start(
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

    // The original and its client go on through the checkpoint.
    let m = apps::move_under_load(
        &mut env,
        &mut c,
        (&pod.0, &id),
        cfg,
        client,
        |_| ticks(&net),
        |after, now| *now > after + 5,
    )
    .await;
    let (before, after, net2) = (m.before, m.after, m.net);
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
    assert_keys(&net2, keys, salt);
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

/// 50 000 rows drawn now in `items`, with two indexes, and an empty `ticks`;
/// returns the rows' count and checksum.
fn create_items(net: &str) -> String {
    let salt = common::rand_u64();
    psql(
        net,
        &format!(
            "CREATE EXTENSION amcheck; \
             CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL); \
             INSERT INTO items SELECT g, md5(g::text || '{salt}') FROM generate_series(1, 50000) g; \
             CREATE INDEX items_body ON items (body); \
             CREATE TABLE ticks (n bigserial PRIMARY KEY, backend int NOT NULL);"
        ),
    );
    psql(
        net,
        "SELECT count(*) || ' ' || md5(string_agg(id || ':' || body, ',' ORDER BY id)) FROM items",
    )
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
    let items = create_items(&net);
    let started = psql(&net, "SELECT pg_postmaster_start_time()");

    let client = Background::start(
        &net,
        "while :; do echo 'INSERT INTO ticks (backend) VALUES (pg_backend_pid());'; sleep 0.01; done \
         | psql -h 127.0.0.1 -U postgres -Xq -v ON_ERROR_STOP=1",
        &env.dir.join("psql-client.log"),
    );
    wait_for("the client to insert", || {
        (max_tick(&net) >= 20).then_some(())
    });

    let m = apps::move_under_load(
        &mut env,
        &mut c,
        (&pod.0, &id),
        cfg,
        client,
        |_| max_tick(&net),
        |after, now| *now > after + 5,
    )
    .await;
    let (before, after, net2) = (m.before, m.after, m.net);
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
    let page = format!("page {}\n", common::rand_u64());
    let wrote = common::cri::exec(
        &mut c,
        &id,
        &format!("printf '{page}' > /srv/www/page.html && echo ok"),
    )
    .await;
    assert_eq!(wrote, "ok");

    let client = Background::start(
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

    let m = apps::move_under_load(
        &mut env,
        &mut c,
        (&pod.0, &id),
        cfg,
        client,
        |_| nginx_requests(&net),
        |after, now| *now > after + 10,
    )
    .await;
    let (before, after, net2) = (m.before, m.after, m.net);
    assert!(
        m.output.lines().skip(1).all(|l| l == "200 0"),
        "the connection broke: {}",
        m.output
    );
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

    let client = Background::start(
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

    // (every thread's count, the client's answers so far)
    let m = apps::move_under_load(
        &mut env,
        &mut c,
        (&pod.0, &id),
        cfg,
        client,
        |client| (jvm_counts(&net).1, client.output().lines().count()),
        |after, now| now.1 > after.1 + 10,
    )
    .await;
    let ((before, _), (after, _), net2) = (m.before, m.after, m.net);
    assert_eq!(before.len(), 4, "{before:?}");
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
    let salt = common::rand_u64();
    let keys = 500;
    let sets: String = (0..keys)
        .map(|i| format!("SET key:{i} value:{i}:{salt}\n"))
        .collect();
    assert!(kv(&net, &sets).lines().all(|l| l == "OK"));
    let gets: String = (0..keys).map(|i| format!("GET key:{i}\n")).collect();
    let values: String = (0..keys).map(|i| format!("value:{i}:{salt}\n")).collect();

    let client = Background::start(
        &net,
        &format!(
            "exec python3 {} 7379 --loop 'INCR ticks' 0.01",
            apps::lineclient()
        ),
        &env.dir.join("kv-client.log"),
    );
    let ticks = |net: &str| -> u64 { kv(net, "GET ticks\n").parse().unwrap_or(0) };
    wait_for("the client to count", || (ticks(&net) >= 20).then_some(()));

    let m = apps::move_under_load(
        &mut env,
        &mut c,
        (&pod.0, &id),
        cfg,
        client,
        |_| ticks(&net),
        |after, now| *now > after + 5,
    )
    .await;
    let (before, after, net2) = (m.before, m.after, m.net);
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

/// What the pod's psql client runs: once the table is there, one psql
/// session fed `INSERT … VALUES (i, pg_backend_pid())` for i = 1, 2, 3, … by
/// a shell loop, every 20 ms. `n` is the table's key: a number twice stops
/// the client (ON_ERROR_STOP).
const POD_CLIENT: &str = "until psql -h 127.0.0.1 -U postgres -XAtqc 'SELECT 1 FROM seq LIMIT 0' >/dev/null 2>&1; do sleep 0.2; done; \
     i=0; while :; do i=$((i+1)); echo \"INSERT INTO seq (n, backend) VALUES ($i, pg_backend_pid());\"; sleep 0.02; done \
     | psql -h 127.0.0.1 -U postgres -Xq -v ON_ERROR_STOP=1";

/// `seq` as the pod's client writes it.
#[derive(Debug, PartialEq)]
struct Seq {
    rows: u64,
    lowest: u64,
    highest: u64,
    sessions: u64,
    backend: u64,
}

fn seq_state(net: &str) -> Seq {
    let row = psql(
        net,
        "SELECT count(*), coalesce(min(n), 0), coalesce(max(n), 0), count(DISTINCT backend), coalesce(min(backend), 0) FROM seq",
    );
    let v: Vec<u64> = row.split('|').map(|x| x.parse().unwrap()).collect();
    Seq {
        rows: v[0],
        lowest: v[1],
        highest: v[2],
        sessions: v[3],
        backend: v[4],
    }
}

/// The pod `pgpod`: PostgreSQL (`db`) with a table `seq`, and the psql
/// client (`client`) inserting into it. Returns the pod, both containers,
/// the pod's network namespace and both configs.
async fn postgres_pod(
    env: &mut Env,
    c: &mut common::cri::Client,
) -> (String, [String; 2], String, Vec<ContainerConfig>) {
    let image = apps::image("postgres");
    let db_cfg = apps::config("db", &image, &[]);
    let client_cfg = apps::config("client", &image, &["/bin/sh", "-c", POD_CLIENT]);
    let (pod, db, net) = apps::run(env, c, "pgpod", db_cfg.clone()).await;
    wait_for("postgres to take connections", || {
        try_psql(&net, "SELECT 1")
    });
    psql(
        &net,
        "CREATE EXTENSION amcheck; CREATE TABLE seq (n int PRIMARY KEY, backend int NOT NULL)",
    );
    let client = common::cri::create(c, &pod, client_cfg.clone()).await;
    common::cri::start_container(c, &client).await;
    (pod.0, [db, client], net, vec![db_cfg, client_cfg])
}

/// The pod `pgpod` checkpointed with CheckpointPod while its client inserts.
struct PgCheckpoint {
    out: tempfile::TempDir,
    configs: Vec<ContainerConfig>,
    /// `seq` just before the checkpoint.
    before: Seq,
    /// The highest number just after it.
    after: u64,
}

/// Runs the pod `pgpod`, checkpoints it with `tcp-established` once its
/// client inserts, sees the original go on, and removes it.
async fn checkpointed_postgres_pod(env: &mut Env, c: &mut common::cri::Client) -> PgCheckpoint {
    let (pod, [db, client], net, configs) = postgres_pod(env, c).await;
    wait_for("the client to insert", || {
        (seq_state(&net).highest >= 20).then_some(())
    });
    let before = seq_state(&net);
    assert_eq!(before.sessions, 1);
    let out = common::out_dir();
    let req = cri_pods::CheckpointPodRequest {
        pod_sandbox_id: pod.clone(),
        output_path: out.path().to_string_lossy().into_owned(),
        container_ids: vec![db, client],
        options: [("tcp-established".to_string(), "true".to_string())].into(),
    };
    cri_pods::checkpoint_pod(env.channel().await, req, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("CheckpointPod: {e:?}"));
    let after = seq_state(&net).highest;
    wait_for("the original to go on", || {
        (seq_state(&net).highest > after + 5).then_some(())
    });
    apps::remove_pod(env, c, &pod).await;
    PgCheckpoint {
        out,
        configs,
        before,
        after,
    }
}

/// RestorePod of the checkpoint into a new pod `pgpod-restored`: the pod
/// and its containers, `db` then `client`, created and not started.
async fn restore_postgres_pod(env: &mut Env, ckpt: &PgCheckpoint) -> (String, Vec<String>) {
    let sandbox = env.sandbox_config("pgpod-restored", false);
    std::fs::create_dir_all(&sandbox.log_directory).unwrap();
    let req = cri_pods::RestorePodRequest {
        checkpoint_path: ckpt.out.path().to_string_lossy().into_owned(),
        config: Some(sandbox),
        runtime_handler: String::new(),
        options: Default::default(),
        container_configs: ckpt.configs.clone(),
    };
    let r = cri_pods::restore_pod(env.channel().await, req, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("RestorePod: {e:?}"));
    env.pods.push(r.pod_sandbox_id.clone());
    let names: Vec<&str> = r
        .restored_containers
        .iter()
        .map(|x| x.name.as_str())
        .collect();
    assert_eq!(names, ["db", "client"]);
    let ids = r
        .restored_containers
        .into_iter()
        .map(|x| x.container_id)
        .collect();
    (r.pod_sandbox_id, ids)
}

/// A pod of PostgreSQL and a psql client container inserting numbered rows
/// over the pod's loopback in one session. CheckpointPod (with
/// `tcp-established`) takes both at one cut while the client inserts;
/// RestorePod brings them into a new pod. Each container's checkpoint holds
/// the pod's IPC namespace with PostgreSQL's SysV segment: the first restore
/// recreates it, the second finds it there and leaves it out
/// (src/restore/ipc.rs). Started, the server first (its end of the session
/// is held until the client's is back), the same session (the same backend
/// PID) goes on inserting: the numbers run on from where the checkpoint left
/// off, with none missing and none twice; the rows committed before the
/// checkpoint are there, the database takes a new session's writes, and
/// removing the pod leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_of_postgres_and_its_psql_client_goes_on_in_the_same_session_after_restore_pod() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "postgres");
    let mut c = env.client().await;
    let ckpt = checkpointed_postgres_pod(&mut env, &mut c).await;
    let (before, after) = (&ckpt.before, ckpt.after);

    let (pod2, ids) = restore_postgres_pod(&mut env, &ckpt).await;
    for id in &ids {
        common::cri::start_container(&mut c, id).await;
    }
    let net2 = apps::netns(&env, &ids[0]);
    let restored = wait_for("the restored postgres to take connections", || {
        try_psql(&net2, "SELECT 1")?;
        Some(seq_state(&net2))
    });
    assert!(
        (before.highest..=after).contains(&restored.highest),
        "restored with rows up to {}, the checkpoint saw {}..{after}",
        restored.highest,
        before.highest
    );
    // Rows the restored session inserted, well past what the checkpoint saw.
    wait_for("the restored client to insert", || {
        (seq_state(&net2).highest > after + 20).then_some(())
    });
    assert_same_session_went_on(&net2, before);
    remove_all(&mut env, &mut c, &pod2, &ids).await;
}

/// The same pod restored, but the client started first: its restore
/// recreates PostgreSQL's segment in the new pod's IPC namespace, and the
/// server's, whose processes attach that segment, is refused naming it
/// (CRIU attaches a restored process only to a segment it creates), rather
/// than fail inside CRIU. Removing the pod leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_restore_that_would_attach_postgres_to_a_segment_it_did_not_create_is_refused() {
    let mut env = Env::start_configured(SETTINGS);
    apps::import(&env, "postgres");
    let mut c = env.client().await;
    let ckpt = checkpointed_postgres_pod(&mut env, &mut c).await;
    let (pod2, ids) = restore_postgres_pod(&mut env, &ckpt).await;
    common::cri::start_container(&mut c, &ids[1]).await;
    let err = c
        .start_container(k8s_cri::v1::StartContainerRequest {
            container_id: ids[0].clone(),
        })
        .await
        .expect_err("the server's restore onto the client's segment");
    assert!(
        err.message()
            .contains("restore refused: its processes attach SysV shm id"),
        "{err:?}"
    );
    remove_all(&mut env, &mut c, &pod2, &ids).await;
}

/// Every number from 1 on is there once, each inserted by the session the
/// checkpoint had; the index is whole; a new session writes.
fn assert_same_session_went_on(net: &str, before: &Seq) {
    let now = seq_state(net);
    assert_eq!(
        (now.lowest, now.rows),
        (1, now.highest),
        "the numbers 1..={} are not all there once",
        now.highest
    );
    assert_eq!(
        (now.sessions, now.backend),
        (1, before.backend),
        "another session inserted: not the client's own session going on"
    );
    assert_eq!(
        psql(net, "SELECT bt_index_check('seq_pkey', true)"),
        "",
        "amcheck"
    );
    let wrote = psql(
        net,
        "CREATE TABLE probe AS SELECT g FROM generate_series(1, 100) g; SELECT count(*) FROM probe",
    );
    assert_eq!(wrote, "100");
}

/// The container's state as ContainerStatus reports it.
async fn container_state(c: &mut common::cri::Client, id: &str) -> i32 {
    let r = c
        .container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    r.status.map_or(-1, |s| s.state)
}

/// Removes the restored containers and their pod: no pod, container or
/// restore is left.
async fn remove_all(env: &mut Env, c: &mut common::cri::Client, pod: &str, ids: &[String]) {
    use k8s_cri::v1 as cri;
    for id in ids {
        c.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
        // containerd 1.6 can answer StopContainer before its exit event
        // marks the container exited; RemoveContainer then says "still
        // running". Remove once the status says exited, as kubelet does.
        let t = std::time::Instant::now();
        while container_state(c, id).await != cri::ContainerState::ContainerExited as i32 {
            assert!(t.elapsed() < Duration::from_secs(30), "{id} never exited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    }
    apps::remove_pod(env, c, pod).await;
    assert!(env.restores().is_empty(), "left {:?}", env.restores());
    let pods = c
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap();
    let ctrs = c
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap();
    assert_eq!(
        (
            pods.into_inner().items.len(),
            ctrs.into_inner().containers.len()
        ),
        (0, 0),
        "a pod or container was left"
    );
}
