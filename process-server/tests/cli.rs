//! The real `process-server` binary: bad config is refused naming file and key; an
//! unreachable configuration server is retried with backoff and said so in the log.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_process-server");

#[test]
fn malformed_config_names_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ps.toml");
    std::fs::write(&path, "name = \"ps-1\"\nsite = \"mars\"\n").expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ps.toml") && err.contains("site"), "{err}");

    std::fs::write(&path, "name = \"ps-1\"\nlisen = \"127.0.0.1:1\"\n").expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ps.toml") && err.contains("lisen"), "{err}");

    std::fs::write(&path, "name = \"ps 1\"\n[cs]\naddress = \"x:1\"\nenroll_address = \"x:2\"\nca_cert = \"ca.pem\"\n")
        .expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `name`"), "{err}");
}

#[test]
fn unreachable_configuration_server_is_retried_and_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    std::fs::write(dir.path().join("ca.pem"), "not used before connecting").expect("write");
    let path = dir.path().join("ps.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"ps-1\"\ndata_dir = \"{d}/data\"\nlisten = \"127.0.0.1:0\"\n[cs]\naddress = \"127.0.0.1:{port}\"\n\
             enroll_address = \"127.0.0.1:{port}\"\nca_cert = \"{d}/ca.pem\"\npassphrase = \"x\"\n",
            d = dir.path().display()
        ),
    )
    .expect("write");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut all = String::new();
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = tx.send(all.clone());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    while Instant::now() < deadline && log.matches("retrying in").count() < 2 {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            log = l;
        }
    }
    let still_running = child.try_wait().expect("wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "must keep retrying, not exit: {log}");
    assert!(
        log.contains("cannot reach the configuration server")
            && log.matches("retrying in").count() >= 2,
        "{log}"
    );
}
