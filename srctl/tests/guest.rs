//! Real guest software on protected disks, through the hosts' NBD exports (`srctl vm export`),
//! judged by third-party tools: fio writes checksummed blocks through vm1's export while it
//! replicates, a planned failover moves vm1 to Azure, and fio's `--verify_only` through the
//! Azure VM's export finds every block; the source's export is gone (no write can land on the
//! old side); an unknown export is refused by name; a write flushed through the export
//! survives `kill -9` of the host and is in the next point; a test failover's VM is exported
//! until its cleanup; over TCP (`nbd_listen`) only TLS with an operator's certificate gets in.
//! Needs Debian's `fio` and `libnbd-bin` (README's test command installs them).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn tool(name: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(name).is_file()));
    assert!(
        found,
        "{name} is missing: install the Debian package `{package}` (scripts/test-deps does)"
    );
    Command::new(name)
}

/// The NBD URI of `machine`'s disk0 as `srctl vm export` prints it, and the host serving it.
fn export(lab: &Path, machine: &str) -> Option<(String, String)> {
    let out = srctl(lab, &["vm", "export", machine, "--disk", "disk0", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v[0]["uri"].as_str()?.to_string(),
        v[0]["host"].as_str()?.to_string(),
    ))
}

/// fio's random 4 KiB writes with crc32c headers over the first 8 MiB (`extra`: e.g.
/// `--verify_only`).
fn fio(uri: &str, extra: &[&str]) -> std::process::Output {
    tool("fio", "fio")
        .args([
            "--name=guest",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--verify_state_save=0",
        ])
        .args(extra)
        .output()
        .expect("run fio")
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn fio_data_written_through_the_export_is_on_the_azure_vm_after_failover() {
    let lab_handle = Lab::up(&["--disk-size", "16MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");

    let (uri, host) = export(&lab, "vm1").expect("vm1's export");
    assert_eq!(host, "esx-1");
    assert!(
        uri.starts_with("nbd+unix:///disk0?socket=") && uri.ends_with("/nbd/vm1.sock"),
        "{uri}"
    );
    // Only the host's user may connect.
    let socket = uri.split("socket=").nth(1).expect("socket");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(socket).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{socket}");

    // An unknown export is refused, naming the disks there are.
    let unknown = uri.replace("///disk0?", "///disk9?");
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(&unknown)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        describe(&out).contains("has no disk `disk9`; its exports are: disk0"),
        "{}",
        describe(&out)
    );

    // fio writes (and reads back) checksummed blocks through the export while vm1 replicates.
    let out = fio(&uri, &[]);
    assert!(out.status.success(), "fio: {}", describe(&out));

    // Planned failover: the source shuts down after a final point; nothing is lost.
    ok(srctl(&lab, &["planned-failover", "vm1"]));
    let source =
        failback_common::vdisk::digest_path(&lab.join("datastores/ds-onprem/vm1/disk0.img"))
            .expect("source disk");
    let azure = failback_common::vdisk::digest_path(
        &lab.join("datastores/azure-storage/vms/vm1/disk0.img"),
    )
    .expect("azure disk");
    assert_eq!(source, azure, "planned failover must lose nothing");

    // The source's export closed with the shutdown: nothing can write to the old side.
    eventually("the source's socket gone", 30, || {
        !Path::new(socket).exists()
    });
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(&uri)
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "the old export still answers");

    // The Azure VM's disks are exported by azure-compute; fio finds every block it wrote.
    let mut azure_uri = String::new();
    eventually("vm1's export on azure-compute", 60, || {
        match export(&lab, "vm1") {
            Some((u, h)) if h == "azure-compute" => {
                azure_uri = u;
                true
            }
            _ => false,
        }
    });
    let out = fio(&azure_uri, &["--verify_only"]);
    assert!(
        out.status.success(),
        "fio --verify_only on the Azure VM: {}",
        describe(&out)
    );
}

/// A write flushed through the export is durable on the host: after `kill -9` of the host,
/// its bytes are on the machine's disk and in the next recovery point, verified byte-exact.
#[test]
fn a_flushed_write_survives_kill_9_of_the_host_and_is_in_the_next_point() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");
    let (uri, _) = export(&lab, "vm1").expect("vm1's export");

    // 1 MiB of random bytes at 3 MiB, copied in by nbdcopy, which flushes before it exits.
    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let image = dir.path().join("image");
    let mut whole = vec![0u8; 8 << 20];
    whole[3 << 20..4 << 20].copy_from_slice(&data);
    std::fs::write(&image, &whole).expect("image");
    let out = tool("nbdcopy", "libnbd-bin")
        .arg("--flush")
        .arg(&image)
        .arg(&uri)
        .output()
        .expect("nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", describe(&out));
    let written = now_ms();

    ok(srctl(&lab, &["lab", "kill", "esx-1"]));
    let disk = std::fs::read(lab.join("datastores/ds-onprem/vm1/disk0.img")).expect("disk");
    assert_eq!(
        &disk[3 << 20..4 << 20],
        &data[..],
        "the flushed write is on the host's disk"
    );
    ok(srctl(&lab, &["lab", "restart", "esx-1"]));
    verify_point_after(&lab, "vm1", written, "after kill -9 of the host");
    let (uri, _) = export(&lab, "vm1").expect("vm1's export after the restart");
    let back = dir.path().join("back");
    let out = tool("nbdcopy", "libnbd-bin")
        .arg(&uri)
        .arg(&back)
        .output()
        .expect("nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", describe(&out));
    assert_eq!(
        std::fs::read(&back).expect("back"),
        whole,
        "the export reads back what was written"
    );
}

/// Writes `[app_scripts.vm1]` with `pre` into esx-1's config and restarts the host.
fn set_pre_script(lab: &Path, pre: &str) {
    let config = lab.join("config/esx-1.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let text = match text.find("\n[app_scripts.vm1]") {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    let pre = toml::Value::String(pre.to_string());
    std::fs::write(
        &config,
        format!("{text}\n[app_scripts.vm1]\npre = {pre}\ntimeout = \"5s\"\n"),
    )
    .expect("write config");
    ok(srctl(lab, &["lab", "restart", "esx-1"]));
}

/// ASR's custom scripts: the pre script runs before every app-consistent point (and sees the
/// point's id); when it fails the point is crash-consistent and the item shows warning 78144
/// with the script's error, until an app-consistent point succeeds again.
#[test]
fn a_failing_pre_script_makes_the_point_crash_consistent_and_the_item_warns() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    set_pre_script(&lab, "echo 'database is locked' >&2; exit 3");
    ok(srctl(
        &lab,
        &[
            "policy",
            "create",
            "quick",
            "--crash-interval",
            "1s",
            "--app-interval",
            "2s",
        ],
    ));
    ok(srctl(&lab, &["item", "enable", "vm1", "--policy", "quick"]));
    eventually("the warning of a failed pre script", 90, || {
        let v = show(&lab, "vm1");
        v["health"] == "Warning"
            && v["health_errors"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e.as_str().is_some_and(|e| {
                        e.starts_with(
                            "78144: the last app-consistent point of vm1 is crash-consistent",
                        ) && e.contains("the pre script failed")
                            && e.contains("database is locked")
                    })
                })
            })
    });
    let kinds = |v: &Value| -> Vec<String> {
        v["recovery_points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["kind"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let v = show(&lab, "vm1");
    assert!(
        !kinds(&v).iter().any(|k| k.ends_with("app")),
        "no app-consistent point while the pre script fails: {:?}",
        kinds(&v)
    );

    // A pre script that works: app-consistent points, each announced to the script, and the
    // warning goes.
    let marker = lab.join("pre-script-ran");
    set_pre_script(
        &lab,
        &format!("echo \"$FBL_MACHINE $FBL_POINT\" >> {}", marker.display()),
    );
    let mut app_point = String::new();
    eventually("an app-consistent point and no warning", 90, || {
        let v = show(&lab, "vm1");
        let app = v["recovery_points"].as_array().and_then(|a| {
            a.iter()
                .rev()
                .find(|p| p["kind"].as_str().is_some_and(|k| k.ends_with("app")))
                .and_then(|p| p["id"].as_str().map(str::to_string))
        });
        match app {
            Some(id) if v["health"] == "Healthy" => {
                app_point = id;
                true
            }
            _ => false,
        }
    });
    let ran = std::fs::read_to_string(&marker).expect("the pre script ran");
    assert!(
        ran.lines().any(|l| l == format!("vm1 {app_point}")),
        "the pre script saw point {app_point}: {ran}"
    );
}

/// `srctl drill --guest KIND --json`: the four stages with real software on vm1's disk,
/// checked by its own tools at failover and at failback.
fn drill_with_guest(kind: &str) -> Value {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(SRCTL)
        .args([
            "drill",
            "--guest",
            kind,
            "--machines",
            "1",
            "--disk-size",
            "32MiB",
            "--json",
        ])
        .current_dir(tmp.path())
        .env_remove("FAILBACK_LAB")
        .output()
        .expect("drill");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("drill --guest {kind}: {}", describe(&out)));
    assert_eq!(report["ok"], true, "drill --guest {kind}: {report:#}");
    assert_eq!(report["guest"], kind);
    let checks = report["guest_checks"].as_array().expect("guest checks");
    let sites: Vec<(&str, &str, bool)> = checks
        .iter()
        .map(|c| {
            (
                c["stage"].as_str().unwrap_or(""),
                c["site"].as_str().unwrap_or(""),
                c["ok"] == true,
            )
        })
        .collect();
    assert_eq!(
        sites,
        vec![
            ("failover-to-azure", "azure", true),
            ("failback", "onprem", true)
        ],
        "{report:#}"
    );
    report
}

#[test]
fn the_drill_with_an_ext4_and_sqlite_guest_keeps_every_committed_row() {
    let report = drill_with_guest("fs");
    let details: Vec<&str> = report["guest_checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["detail"].as_str())
        .collect();
    assert_eq!(
        details,
        vec![
            "e2fsck clean; integrity ok; 100 of 100 rows",
            "e2fsck clean; integrity ok; 200 of 200 rows"
        ]
    );
}

#[test]
fn the_drill_with_a_fio_guest_verifies_every_region_written() {
    let report = drill_with_guest("fio");
    let details: Vec<&str> = report["guest_checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["detail"].as_str())
        .collect();
    assert_eq!(
        details,
        vec!["fio verified 1 region(s)", "fio verified 2 region(s)"]
    );
}

/// `fusermount3 -u DIR`, retried while the FUSE server still holds it (fuse2fs writes its
/// last metadata as it unmounts).
fn unmount(dir: &Path) {
    eventually(&format!("{} unmounted", dir.display()), 30, || {
        tool("fusermount3", "fuse3")
            .arg("-u")
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    });
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The recipe of docs/GUESTS.md under a live mount: a SQLite writer commits rows on ext4
/// (fuse2fs over nbdfuse over vm1's export) while vm1 replicates; the pre script stops it,
/// checkpoints the WAL and fsyncs (fuse2fs flushes the filesystem), and records the rows
/// committed. A failover to one of those app-consistent points, taken while the writer was
/// still writing, gives an Azure disk that e2fsck finds clean, with a database that SQLite
/// finds intact and exactly the rows committed before that pre script.
#[test]
fn an_app_consistent_point_of_a_live_ext4_and_sqlite_guest_fails_over_intact() {
    let lab_handle = Lab::up(&["--disk-size", "64MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    let g = lab.join("guest");
    let (nbd, fs, az, azfs) = (g.join("nbd"), g.join("fs"), g.join("az"), g.join("azfs"));
    for d in [&nbd, &fs, &az, &azfs] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let (pid, rows, db) = (g.join("writer.pid"), g.join("rows"), fs.join("app.db"));
    set_pre_script(
        &lab,
        &format!(
            "kill -STOP $(cat {pid}) 2>/dev/null; sqlite3 {db} 'PRAGMA wal_checkpoint(TRUNCATE)' >/dev/null \
             && python3 -c 'import os; os.fsync(os.open(\"{db}\", os.O_RDONLY))' \
             && cp {rows} {g}/rows-at-$FBL_POINT; st=$?; kill -CONT $(cat {pid}) 2>/dev/null; exit $st",
            pid = pid.display(),
            db = db.display(),
            rows = rows.display(),
            g = g.display()
        ),
    );
    ok(srctl(
        &lab,
        &[
            "vm",
            "attach",
            "vm1",
            "--disk",
            "disk0",
            nbd.to_str().expect("path"),
        ],
    ));
    run_ok(
        tool("mkfs.ext4", "e2fsprogs")
            .args(["-q", "-F"])
            .arg(nbd.join("disk")),
    );
    run_ok(
        tool("fuse2fs", "fuse2fs")
            .arg(nbd.join("disk"))
            .arg(&fs)
            .args(["-o", "fakeroot"]),
    );
    let writer = g.join("writer.py");
    std::fs::write(
        &writer,
        format!(
            "import sqlite3, os, time\n\
             db = sqlite3.connect('{db}', isolation_level=None)\n\
             db.execute('PRAGMA journal_mode=WAL')\n\
             db.execute('CREATE TABLE t(id INTEGER PRIMARY KEY, payload BLOB)')\n\
             for i in range(1, 4001):\n\
             \x20   db.execute('INSERT INTO t VALUES (?, randomblob(1000))', (i,))\n\
             \x20   open('{rows}.tmp', 'w').write(str(i))\n\
             \x20   os.rename('{rows}.tmp', '{rows}')\n\
             \x20   time.sleep(0.005)\n",
            db = db.display(),
            rows = rows.display()
        ),
    )
    .expect("writer");
    let mut child = tool("python3", "python3")
        .arg(&writer)
        .spawn()
        .expect("writer");
    std::fs::write(&pid, child.id().to_string()).expect("pid");
    ok(srctl(
        &lab,
        &[
            "policy",
            "create",
            "quick",
            "--crash-interval",
            "1s",
            "--app-interval",
            "2s",
        ],
    ));
    ok(srctl(&lab, &["item", "enable", "vm1", "--policy", "quick"]));

    // An app-consistent point its pre script saw while the writer was mid-way.
    let mut point = (String::new(), 0u64);
    eventually(
        "an app-consistent point taken while the writer writes",
        120,
        || {
            let v = show(&lab, "vm1");
            let found = v["recovery_points"].as_array().and_then(|a| {
                a.iter().find_map(|p| {
                    let id = p["id"].as_str()?;
                    if !p["kind"].as_str()?.ends_with("app") {
                        return None;
                    }
                    let n: u64 = std::fs::read_to_string(g.join(format!("rows-at-{id}")))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()?;
                    (n > 0 && n < 4000).then(|| (id.to_string(), n))
                })
            });
            match found {
                Some(p) => {
                    point = p;
                    true
                }
                None => false,
            }
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    unmount(&fs);
    unmount(&nbd);

    ok(srctl(&lab, &["failover", "vm1", "--point", &point.0]));
    eventually("vm1's export on azure-compute", 60, || {
        export(&lab, "vm1").is_some_and(|(_, h)| h == "azure-compute")
    });
    ok(srctl(
        &lab,
        &[
            "vm",
            "attach",
            "vm1",
            "--disk",
            "disk0",
            az.to_str().expect("path"),
        ],
    ));
    run_ok(tool("e2fsck", "e2fsprogs").arg("-fn").arg(az.join("disk")));
    run_ok(
        tool("fuse2fs", "fuse2fs")
            .arg(az.join("disk"))
            .arg(&azfs)
            .args(["-o", "ro,fakeroot"]),
    );
    let found = run_ok(
        tool("sqlite3", "sqlite3")
            .arg(format!(
                "file:{}?immutable=1",
                azfs.join("app.db").display()
            ))
            .arg("PRAGMA integrity_check; SELECT count(*) || '|' || max(id) FROM t;"),
    );
    unmount(&azfs);
    unmount(&az);
    assert_eq!(
        found,
        format!("ok\n{n}|{n}\n", n = point.1),
        "the database at point {} (rows committed before its pre script: {})",
        point.0,
        point.1
    );
}

/// A test failover's VM (`vm1-Test`, in the test network) is exported by azure-compute like
/// any VM: fio verifies through it what was written on-premises before the point, writes to
/// it stay in the test VM, and cleaning up the test failover ends its export. The source
/// keeps replicating and serving its own export all along.
#[test]
fn a_test_failover_vm_is_exported_until_the_cleanup() {
    let lab_handle = Lab::up(&["--disk-size", "16MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    protected_with_a_point(&lab, "vm1");
    let (uri, _) = export(&lab, "vm1").expect("vm1's export");
    let out = fio(&uri, &[]);
    assert!(out.status.success(), "fio: {}", describe(&out));
    let written = now_ms();
    let mut point = String::new();
    eventually("a point after fio's writes", 90, || {
        match point_after(&show(&lab, "vm1"), written) {
            Some(p) => {
                point = p;
                true
            }
            None => false,
        }
    });
    ok(srctl(&lab, &["test-failover", "vm1", "--point", &point]));

    let mut test_uri = String::new();
    eventually("vm1-Test's export on azure-compute", 60, || {
        match export(&lab, "vm1-Test") {
            Some((u, h)) if h == "azure-compute" => {
                test_uri = u;
                true
            }
            _ => false,
        }
    });
    assert!(test_uri.ends_with("/nbd/vm1-Test.sock"), "{test_uri}");
    let out = fio(&test_uri, &["--verify_only"]);
    assert!(
        out.status.success(),
        "fio --verify_only on the test failover VM: {}",
        describe(&out)
    );
    // A write in the test VM does not reach the source.
    let source_before =
        std::fs::read(lab.join("datastores/ds-onprem/vm1/disk0.img")).expect("disk");
    let ones = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(ones.path(), vec![0xA5u8; 16 << 20]).expect("image");
    let out = tool("nbdcopy", "libnbd-bin")
        .arg("--flush")
        .arg(ones.path())
        .arg(&test_uri)
        .output()
        .expect("nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", describe(&out));
    let source_after = std::fs::read(lab.join("datastores/ds-onprem/vm1/disk0.img")).expect("disk");
    assert_eq!(
        source_before, source_after,
        "the test VM's writes stay in the test VM"
    );

    ok(srctl(&lab, &["test-failover-cleanup", "vm1"]));
    let socket = test_uri
        .split("socket=")
        .nth(1)
        .expect("socket")
        .to_string();
    eventually("vm1-Test's socket gone", 30, || {
        !Path::new(&socket).exists()
    });
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(&test_uri)
        .output()
        .expect("nbdinfo");
    assert!(
        !out.status.success(),
        "the cleaned-up VM's export still answers"
    );
    // The source was never touched: its export still works and it is still protected.
    let (uri, host) = export(&lab, "vm1").expect("vm1's export after the cleanup");
    assert_eq!(host, "esx-1");
    let out = fio(&uri, &["--verify_only"]);
    assert!(
        out.status.success(),
        "fio --verify_only on the source: {}",
        describe(&out)
    );
    assert_eq!(show(&lab, "vm1")["state"], "Protected");
}

/// `nbd_listen` in a host's config: every running machine's disks also over TCP, TLS required
/// (`nbds://`), for operators' certificates only. nbdcopy writes through it (the write goes
/// through the capture path like any other); a plain `nbd://` client is told TLS is required;
/// a component's certificate (the host's own) is refused by name; an unknown machine is
/// refused naming the fix.
#[test]
fn tcp_exports_need_tls_and_an_operator_certificate() {
    let lab_handle = Lab::up(&["--disk-size", "8MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();
    let config = lab.join("config/esx-1.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("nbd_listen = \"127.0.0.1:0\"\n{text}")).expect("config");
    ok(srctl(&lab, &["lab", "restart", "esx-1"]));
    let mut tls_uri = String::new();
    let mut unix_uri = String::new();
    eventually("vm1's nbds:// export", 60, || {
        let out = srctl(&lab, &["vm", "export", "vm1", "--disk", "disk0", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        match (v[0]["tls_uri"].as_str(), v[0]["uri"].as_str()) {
            (Some(t), Some(u)) => {
                tls_uri = t.to_string();
                unix_uri = u.to_string();
                true
            }
            _ => false,
        }
    });
    assert!(
        tls_uri.starts_with("nbds://127.0.0.1:")
            && tls_uri.contains("/vm1/disk0?tls-certificates="),
        "{tls_uri}"
    );
    let certs = tls_uri.split("tls-certificates=").nth(1).expect("dir");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(Path::new(certs).join("client-key.pem"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    // Written over TLS, read back over the Unix socket: the same disk.
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image");
    let whole: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&image, &whole).expect("image");
    let out = tool("nbdcopy", "libnbd-bin")
        .arg("--flush")
        .arg(&image)
        .arg(&tls_uri)
        .output()
        .expect("nbdcopy");
    assert!(
        out.status.success(),
        "nbdcopy over nbds://: {}",
        describe(&out)
    );
    let back = dir.path().join("back");
    let out = tool("nbdcopy", "libnbd-bin")
        .arg(&unix_uri)
        .arg(&back)
        .output()
        .expect("nbdcopy");
    assert!(out.status.success(), "nbdcopy: {}", describe(&out));
    assert!(
        std::fs::read(&back).expect("back") == whole,
        "the TLS write is on the disk"
    );

    // Without TLS: refused, saying so.
    let address = tls_uri
        .trim_start_matches("nbds://")
        .split('/')
        .next()
        .expect("address");
    // (libnbd prints the server's message only with its debug output.)
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(format!("nbd://{address}/vm1/disk0"))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .expect("nbdinfo");
    assert!(
        !out.status.success(),
        "plain NBD answered: {}",
        describe(&out)
    );
    assert!(
        describe(&out).contains("TLS is required on this server"),
        "{}",
        describe(&out)
    );

    // A component's certificate (the host's own, from the lab CA) is not an operator's.
    let host_id = lab.join("data/esx-1/identity");
    let component = dir.path().join("component-tls");
    std::fs::create_dir(&component).expect("dir");
    for (from, to) in [
        ("ca.pem", "ca-cert.pem"),
        ("cert.pem", "client-cert.pem"),
        ("key.pem", "client-key.pem"),
    ] {
        std::fs::copy(host_id.join(from), component.join(to)).expect("copy");
    }
    let as_component = format!(
        "{}?tls-certificates={}",
        tls_uri.split('?').next().expect("uri"),
        component.display()
    );
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(&as_component)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .expect("nbdinfo");
    assert!(
        !out.status.success(),
        "a host's certificate got in: {}",
        describe(&out)
    );
    assert!(
        describe(&out).contains("NBD exports are for operators"),
        "{}",
        describe(&out)
    );

    // An unknown machine: refused, naming the fix.
    let out = tool("nbdinfo", "libnbd-bin")
        .arg(tls_uri.replace("/vm1/disk0?", "/vm9/disk0?"))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("machine vm9 is not running on this host"),
        "{}",
        describe(&out)
    );
}
