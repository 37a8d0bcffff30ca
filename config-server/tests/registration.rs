//! Registration against a real configuration server on ephemeral ports: enrollment and its
//! refusals, per-RPC roles, foreign certificates, reconnection after a CS restart, backup
//! and restore, and a database of the first schema upgraded in place.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use config_server::{ConfigServer, CsConfig};
use failback_common::enroll::{CsSettings, EnrollError, enroll_once};
use failback_common::identity::{Identity, Role, Site};
use failback_common::tls::{Credentials, describe_error};
use failback_proto::pb::operator::{
    Component, ListInfraRequest, ListItemsRequest, ListJobsRequest, PlanRequest,
    operator_client::OperatorClient,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Cs {
    dir: PathBuf,
    enroll: String,
    api: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Cs {
    /// Starts a CS with its data in `dir`, on the given ports (0 = ephemeral).
    async fn start(dir: &Path, enroll_port: u16, api_port: u16) -> Cs {
        Cs::start_with(dir, enroll_port, api_port, "").await
    }

    /// [`Cs::start`] with the `advertise` setting.
    async fn start_with(dir: &Path, enroll_port: u16, api_port: u16, advertise: &str) -> Cs {
        let config = CsConfig {
            data_dir: dir.to_path_buf(),
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(1000),
            advertise: advertise.to_string(),
            ..CsConfig::default()
        };
        Cs::start_config(dir, enroll_port, api_port, config).await
    }

    /// [`Cs::start`] with a config of the caller's.
    async fn start_config(dir: &Path, enroll_port: u16, api_port: u16, config: CsConfig) -> Cs {
        failback_common::tls::install_crypto_provider();
        let enroll = TcpListener::bind(("127.0.0.1", enroll_port))
            .await
            .expect("bind enroll");
        let api = TcpListener::bind(("127.0.0.1", api_port))
            .await
            .expect("bind api");
        let enroll_addr = enroll.local_addr().expect("addr").to_string();
        let api_addr = api.local_addr().expect("addr").to_string();
        let server = ConfigServer::open(config).expect("open cs");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(enroll, api, shutdown.clone()));
        Cs {
            dir: dir.to_path_buf(),
            enroll: enroll_addr,
            api: api_addr,
            shutdown,
            task,
        }
    }

    fn settings(&self) -> CsSettings {
        CsSettings {
            address: self.api.clone(),
            enroll_address: self.enroll.clone(),
            ca_cert: self.dir.join("ca.pem"),
            passphrase_file: Some(self.dir.join("passphrase")),
            ..Default::default()
        }
    }

    async fn enroll(&self, role: Role, name: &str) -> Credentials {
        enroll_once(&self.settings(), &Identity::new(role, Site::Onprem, name))
            .await
            .expect("enrollment succeeds")
    }

    /// Credentials for operator `name`, issued as on the CS host (`config-server operator add`).
    fn operator(&self, name: &str) -> Credentials {
        let out = self.dir.join(format!("operator-{name}"));
        let config = CsConfig {
            data_dir: self.dir.clone(),
            ..CsConfig::default()
        };
        config_server::add_operator(&config, name, &out).expect("operator add");
        Credentials::load_role(&out, Role::Operator)
            .expect("load")
            .expect("credentials written")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("cs ran cleanly");
    }
}

async fn list(api: &str, creds: &Credentials) -> Result<Vec<Component>, tonic::Status> {
    let channel = creds
        .endpoint(api, Role::ConfigServer, "cs")
        .expect("endpoint")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(describe_error(&e)))?;
    Ok(OperatorClient::new(channel)
        .list_infra(ListInfraRequest {})
        .await?
        .into_inner()
        .components)
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(api: &str, op: &Credentials, name: &str) -> Option<String> {
    list(api, op)
        .await
        .ok()?
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| c.status)
}

#[tokio::test]
async fn wrong_passphrase_is_refused_slowed_down_and_records_nothing_but_locks_nobody_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(dir.path(), 0, 0).await;
    let op = cs.operator("op");

    let mut wrong = cs.settings();
    wrong.passphrase_file = None;
    wrong.passphrase = Some("not-the-passphrase".into());
    let id = Identity::new(Role::ProcessServer, Site::Onprem, "ps-x");
    for _ in 0..5 {
        match enroll_once(&wrong, &id).await {
            Err(EnrollError::Refused { message, .. }) => {
                assert!(message.contains("wrong passphrase"), "{message}")
            }
            other => panic!("expected refusal, got {other:?}"),
        }
    }
    // Past the limit, a wrong passphrase is answered late and says so.
    let started = Instant::now();
    match enroll_once(&wrong, &id).await {
        Err(EnrollError::Refused { message, .. }) => {
            assert!(
                message.contains("too many failed enrollment attempts"),
                "{message}"
            )
        }
        other => panic!("expected rate limiting, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Another component from the same address, with the right passphrase, still gets in;
    // so does the name that was guessed at.
    cs.enroll(Role::MasterTarget, "mt-y").await;
    cs.enroll(Role::ProcessServer, "ps-x").await;
    let names: Vec<String> = list(&cs.api, &op)
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(names.contains(&"mt-y".to_string()), "{names:?}");
    cs.stop().await;
}

#[tokio::test]
async fn duplicate_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(dir.path(), 0, 0).await;
    cs.enroll(Role::ProcessServer, "ps-dup").await;
    let again = enroll_once(
        &cs.settings(),
        &Identity::new(Role::MasterTarget, Site::Azure, "ps-dup"),
    )
    .await;
    match again {
        Err(EnrollError::Refused { message, .. }) => {
            assert!(message.contains("already registered"), "{message}");
            assert!(message.contains("srctl infra remove ps-dup"), "{message}");
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    cs.stop().await;
}

#[tokio::test]
async fn wrong_role_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(dir.path(), 0, 0).await;
    let agent = cs.enroll(Role::Agent, "vm9").await;
    let err = list(&cs.api, &agent)
        .await
        .expect_err("an agent may not list the inventory");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("requires role operator"),
        "{}",
        err.message()
    );
    cs.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(a.path(), 0, 0).await;
    let other = Cs::start(b.path(), 0, 0).await;
    let foreign = other.operator("op");

    // A client of the other lab does not trust this CS ...
    let err = list(&cs.api, &foreign).await.expect_err("foreign CA");
    assert!(
        err.message()
            .contains("cannot be authenticated with given CA certificates"),
        "{}",
        err.message()
    );
    // ... and a foreign client certificate is refused by this CS even if the client trusts it.
    let mut mixed = foreign.clone();
    mixed.ca_pem = std::fs::read_to_string(a.path().join("ca.pem")).expect("ca");
    assert!(
        list(&cs.api, &mixed).await.is_err(),
        "a certificate from another CA must not get in"
    );
    // Enrollment with a pinned fingerprint that doesn't match the CA file is refused locally.
    let mut pinned = cs.settings();
    pinned.ca_fingerprint = Some("00".repeat(32));
    match enroll_once(&pinned, &Identity::new(Role::Host, Site::Onprem, "esx-9")).await {
        Err(EnrollError::CaMismatch { .. }) => {}
        other => panic!("expected CA mismatch, got {other:?}"),
    }
    other.stop().await;
    cs.stop().await;
}

fn ps_config(cs: &Cs, data: &Path) -> process_server::PsConfig {
    process_server::PsConfig {
        name: "ps-onprem".into(),
        site: Site::Onprem,
        data_dir: data.to_path_buf(),
        cs: cs.settings(),
        ..Default::default()
    }
}

#[tokio::test]
async fn component_reconnects_after_cs_restart_without_enrolling_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ps_dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(dir.path(), 0, 0).await;
    let op = cs.operator("op");
    let (enroll_port, api_port) = (
        cs.enroll
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("port"),
        cs.api
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("port"),
    );
    let ps_stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ps = tokio::spawn(process_server::run(
        ps_config(&cs, ps_dir.path()),
        listener,
        ps_stop.clone(),
    ));
    let api = cs.api.clone();
    eventually("ps-onprem connected", || {
        status_of(&api, &op, "ps-onprem").then_some_connected()
    })
    .await;
    let cert_before =
        std::fs::read_to_string(ps_dir.path().join("identity/cert.pem")).expect("cert");

    cs.stop().await;
    let cs = Cs::start(dir.path(), enroll_port, api_port).await;
    eventually("ps-onprem reconnected", || {
        status_of(&api, &op, "ps-onprem").then_some_connected()
    })
    .await;
    let cert_after =
        std::fs::read_to_string(ps_dir.path().join("identity/cert.pem")).expect("cert");
    assert_eq!(cert_before, cert_after, "the PS must not enroll again");

    // A stopped component shows "not connected" within a few heartbeat intervals.
    ps_stop.cancel();
    ps.await.expect("join").expect("ps ran cleanly");
    eventually("ps-onprem not connected", || async {
        status_of(&api, &op, "ps-onprem").await.as_deref() == Some("not connected")
    })
    .await;
    cs.stop().await;
}

#[tokio::test]
async fn backup_then_restore_serves_the_same_inventory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ps_dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(dir.path(), 0, 0).await;
    let op = cs.operator("op");
    let ps_stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ps = tokio::spawn(process_server::run(
        ps_config(&cs, ps_dir.path()),
        listener,
        ps_stop.clone(),
    ));
    let api = cs.api.clone();
    eventually("ps-onprem connected", || {
        status_of(&api, &op, "ps-onprem").then_some_connected()
    })
    .await;

    // Online backup while the CS runs.
    let backup = dir.path().join("backup.db");
    let cfg = CsConfig {
        data_dir: dir.path().to_path_buf(),
        ..CsConfig::default()
    };
    config_server::backup(&cfg, &backup).expect("backup");
    let before: Vec<(String, String, String)> = list(&cs.api, &op)
        .await
        .expect("list")
        .into_iter()
        .map(|c| (c.name, c.role, c.site))
        .collect();
    ps_stop.cancel();
    ps.await.expect("join").expect("ps ran");
    cs.stop().await;

    // A new CS restored from the copy has the same CA (the old operator certificate works),
    // the same passphrase and the same inventory.
    let restored_dir = tempfile::tempdir().expect("tempdir");
    let restored_cfg = CsConfig {
        data_dir: restored_dir.path().to_path_buf(),
        ..CsConfig::default()
    };
    config_server::restore(&restored_cfg, &backup, false).expect("restore");
    assert_eq!(
        std::fs::read_to_string(restored_dir.path().join("passphrase")).expect("passphrase"),
        std::fs::read_to_string(dir.path().join("passphrase")).expect("passphrase"),
    );
    let restored = Cs::start(restored_dir.path(), 0, 0).await;
    let after: Vec<(String, String, String)> = list(&restored.api, &op)
        .await
        .expect("list on the restored CS")
        .into_iter()
        .map(|c| (c.name, c.role, c.site))
        .collect();
    assert_eq!(before, after);
    assert!(after.iter().any(|(n, _, _)| n == "ps-onprem"));
    // Restoring over an existing database is refused and changes nothing.
    let err = config_server::restore(&restored_cfg, &backup, false).expect_err("must refuse");
    assert!(err.to_string().contains("already exists"), "{err}");
    restored.stop().await;
}

trait ConnectedExt {
    fn then_some_connected(self) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = Option<String>>> ConnectedExt for F {
    async fn then_some_connected(self) -> bool {
        self.await.as_deref() == Some("connected")
    }
}

#[tokio::test]
async fn infra_list_shows_the_cs_at_its_advertised_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start_with(dir.path(), 0, 0, "cs:7002").await;
    let op = cs.operator("op");
    let components = list(&cs.api, &op).await.expect("list");
    let me = components
        .iter()
        .find(|c| c.name == "cs")
        .expect("the CS lists itself");
    assert_eq!(me.address, "cs:7002", "not the bound address {}", cs.api);
    cs.stop().await;
}

/// A database written by the first releases (no schema version, job steps as tuples) is
/// upgraded when a CS starts on it, and the CS serves the inventory it held.
#[tokio::test]
async fn a_database_of_the_first_schema_is_upgraded_and_keeps_its_inventory() {
    // A CS of today makes the CA and the passphrase, and enrolls the operator.
    let fresh = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(fresh.path(), 0, 0).await;
    let op = cs.operator("op");
    cs.stop().await;

    // The old database: the first schema with a lab in it, and today's CA, passphrase and
    // operator row copied over.
    let old = tempfile::tempdir().expect("tempdir");
    let db = old.path().join("cs.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch(include_str!("fixtures/schema-v1.sql"))
            .expect("old schema and data");
        conn.execute(
            "ATTACH DATABASE ?1 AS fresh",
            [fresh.path().join("cs.db").display().to_string()],
        )
        .expect("attach");
        conn.execute_batch(
            "INSERT INTO settings SELECT key, value FROM fresh.settings;
             INSERT INTO components(name, role, site, cert_fingerprint, enrolled_at_ms)
               SELECT name, role, site, cert_fingerprint, enrolled_at_ms FROM fresh.components
               WHERE name = 'op';
             DETACH DATABASE fresh;",
        )
        .expect("copy the CA");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(
            version, 0,
            "the fixture is unversioned, as the first releases were"
        );
    }

    let cs = Cs::start(old.path(), 0, 0).await;
    let names: Vec<String> = list(&cs.api, &op)
        .await
        .expect("infra on the upgraded database")
        .into_iter()
        .map(|c| c.name)
        .collect();
    for n in ["ps-onprem", "esx-1", "vm1", "op"] {
        assert!(names.iter().any(|x| x == n), "{n} kept: {names:?}");
    }
    let mut client = OperatorClient::new(
        op.endpoint(&cs.api, Role::ConfigServer, "cs")
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    let items = client
        .list_items(ListItemsRequest::default())
        .await
        .expect("items")
        .into_inner()
        .items;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (items[0].id.as_str(), items[0].state.as_str()),
        ("vm1-1", "Protected")
    );
    assert_eq!(
        items[0]
            .points
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        ["crash-1", "app-1"]
    );
    let jobs = client
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("jobs")
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, "Succeeded");
    assert_eq!(
        jobs[0]
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.state.as_str(), s.time_ms))
            .collect::<Vec<_>>(),
        [
            ("Prepare the target", "Succeeded", 1700000001000),
            ("Initial replication", "Succeeded", 1700000004000)
        ]
    );
    let plan = client
        .show_plan(PlanRequest { name: "p1".into() })
        .await
        .expect("plan")
        .into_inner();
    assert_eq!(
        plan.members
            .iter()
            .map(|m| (m.machine.as_str(), m.group))
            .collect::<Vec<_>>(),
        [("vm1", 2)]
    );
    cs.stop().await;
    let version: i64 = rusqlite::Connection::open(&db)
        .expect("open")
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, config_server::SCHEMA_VERSION);
}

/// Whether `path` can be read by the unprivileged user `nobody` (through util-linux's
/// `runuser`; as root a read proves nothing). `None` where that can't be tried.
fn nobody_reads(path: &Path) -> Option<bool> {
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(path)
        .output()
        .ok()?;
    Some(out.status.success())
}

/// The CA key, the passphrase, the database with its WAL, backups and private keys are
/// readable by the service user only, checked by reading them as another user.
#[tokio::test]
async fn secrets_are_readable_only_by_the_service_user() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tempdir");
    let open = |p: &Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod")
    };
    open(root.path());
    let control = root.path().join("public.txt");
    std::fs::write(&control, "anyone may read this").expect("write");
    if !(is_root() && nobody_reads(&control) == Some(true)) {
        eprintln!("SKIP: reading as another user needs root and runuser (util-linux)");
        return;
    }
    let data = root.path().join("cs");
    let cs = Cs::start(&data, 0, 0).await;
    let op = cs.operator("op");
    let op_dir = root.path().join("op");
    op.save(&op_dir).expect("save");
    let backup = root.path().join("backup.db");
    let cfg = CsConfig {
        data_dir: data.clone(),
        ..CsConfig::default()
    };
    config_server::backup(&cfg, &backup).expect("backup");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the CS data directory");
    assert_eq!(
        mode(&op_dir.join("identity")),
        0o700,
        "an identity directory"
    );
    // With the directories opened up, the files' own modes still keep them private.
    open(&data);
    open(&op_dir.join("identity"));
    let wal = data.join("cs.db-wal");
    assert!(wal.exists(), "the CS runs in WAL mode");
    for secret in [
        data.join("cs.db"),
        wal,
        data.join("passphrase"),
        backup.clone(),
        op_dir.join("identity/key.pem"),
    ] {
        assert_eq!(
            nobody_reads(&secret),
            Some(false),
            "{} must not be readable by another user (mode {:o})",
            secret.display(),
            mode(&secret)
        );
    }
    cs.stop().await;

    // A backup others can read is refused on restore, unless forced.
    std::fs::set_permissions(&backup, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let target = CsConfig {
        data_dir: root.path().join("restored"),
        ..CsConfig::default()
    };
    let e = config_server::restore(&target, &backup, false).expect_err("refused");
    assert!(e.to_string().contains("readable by others"), "{e}");
    assert!(
        !target.db_path().exists(),
        "a refused restore writes nothing"
    );
    config_server::restore(&target, &backup, true).expect("forced");
    assert_eq!(mode(&target.db_path()), 0o600);
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test]
async fn a_client_refuses_a_server_of_another_role_even_with_the_right_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cs = Cs::start(dir.path(), 0, 0).await;
    // An agent's certificate serving on a port, pretending to be the process server `x-ps`.
    let impostor = cs.enroll(Role::Agent, "x-ps").await;
    let trust = failback_common::trust::Trust::new();
    let secured = failback_common::server::Secured::new(
        impostor
            .server_config(trust.clone())
            .expect("server config"),
        trust,
        Default::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let router =
        failback_common::server::builder().add_service(failback_common::server::health_service());
    tokio::spawn(failback_common::server::serve(
        router,
        listener,
        secured,
        stop.clone(),
    ));
    let client = cs.enroll(Role::ProcessServer, "x-client").await;
    let err = client
        .endpoint(&addr, Role::ProcessServer, "x-ps")
        .expect("endpoint")
        .connect()
        .await
        .expect_err("a process server's client must not accept an agent's certificate");
    let message = describe_error(&err);
    assert!(
        message.contains("not the component (name and role) expected"),
        "{message}"
    );
    // The same server dialed as what it is: accepted (the refusal above is the role's).
    client
        .endpoint(&addr, Role::Agent, "x-ps")
        .expect("endpoint")
        .connect()
        .await
        .expect("dialed as an agent, the certificate verifies");
    stop.cancel();
    cs.stop().await;
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// The scale the listener caps must hold (issue 14's load): a thousand machines enroll at once
/// from one address (more handshakes than the 512 a listener lets wait: some are evicted and
/// retried, none locked out), keep their control streams, and all reconnect after a CS restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_components_enroll_and_reconnect_from_one_address() {
    use failback_common::control::{ControlHandle, Dial, spawn};
    use failback_common::renewal::CredentialsCell;
    const N: usize = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = CsConfig {
        data_dir: dir.path().to_path_buf(),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(10),
        ..CsConfig::default()
    };
    let cs = Cs::start_config(dir.path(), 0, 0, config.clone()).await;
    let op = cs.operator("op");
    let (enroll_port, api_port) = (port_of(&cs.enroll), port_of(&cs.api));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (settings, api, stop) = (cs.settings(), cs.api.clone(), stop.clone());
        tasks.spawn(async move {
            let id = Identity::new(Role::Agent, Site::Onprem, format!("load-{i}"));
            let mut tries = 0;
            let creds = loop {
                tries += 1;
                match enroll_once(&settings, &id).await {
                    Ok(c) => break c,
                    Err(EnrollError::Unreachable { .. }) if tries < 50 => {
                        tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                    }
                    Err(e) => panic!("{id} could not enroll after {tries} tries: {e}"),
                }
            };
            let cell = CredentialsCell::new(creds, None).expect("cell");
            let base = failback_common::component::hello(&id);
            let (handle, _task): (ControlHandle, _) = spawn(
                Dial { cell, address: api },
                std::sync::Arc::new(move || base.clone()),
                failback_common::trust::Trust::new(),
                stop,
            );
            (handle, tries)
        });
    }
    let mut handles = Vec::with_capacity(N);
    let mut retried = 0;
    while let Some(joined) = tasks.join_next().await {
        let (handle, tries) = joined.expect("enrolled");
        retried += usize::from(tries > 1);
        handles.push(handle);
    }
    let enrolled = started.elapsed();
    let connected = |api: String, op: Credentials| async move {
        list(&api, &op).await.is_ok_and(|all| {
            all.iter()
                .filter(|c| c.name.starts_with("load-") && c.status == "connected")
                .count()
                == N
        })
    };
    eventually("a thousand control streams", || {
        connected(cs.api.clone(), op.clone())
    })
    .await;
    let all_connected = started.elapsed();

    cs.stop().await;
    let restarted = Instant::now();
    let cs = Cs::start_config(dir.path(), enroll_port, api_port, config).await;
    eventually("a thousand control streams after the CS restart", || {
        connected(cs.api.clone(), op.clone())
    })
    .await;
    eprintln!(
        "{N} components from one address: enrolled in {enrolled:?} ({retried} retried an \
         evicted or refused handshake), all connected after {all_connected:?}, all reconnected \
         {:?} after the CS restart",
        restarted.elapsed()
    );
    stop.cancel();
    drop(handles);
    cs.stop().await;
}
