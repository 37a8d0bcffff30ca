//! The real `mobility-agent` binary refuses a bad host configuration before doing anything,
//! naming the file and the key. (Also: every component crate has an integration test, so
//! `cargo test --workspace` builds every binary the lab tests start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mobility-agent");

fn run(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("esx.toml");
    std::fs::write(&path, toml).expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CS: &str =
    "[cs]\naddress = \"127.0.0.1:1\"\nenroll_address = \"127.0.0.1:2\"\nca_cert = \"ca.pem\"\n";

#[test]
fn machine_on_an_unknown_datastore_is_refused() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\n{CS}[[datastore]]\nname = \"ds-a\"\npath = \"/tmp/ds-a\"\n\
         [[machine]]\nname = \"vm1\"\ndatastore = \"ds-b\"\ndisk = [{{ id = \"disk0\", size = \"1 MiB\" }}]\n"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("esx.toml") && err.contains("machine[0].datastore") && err.contains("ds-b"),
        "{err}"
    );
}

#[test]
fn disk_size_must_be_whole_blocks() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\n{CS}[[datastore]]\nname = \"ds-a\"\npath = \"/tmp/ds-a\"\n\
         [[machine]]\nname = \"vm1\"\ndatastore = \"ds-a\"\ndisk = [{{ id = \"disk0\", size = 1000 }}]\n"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("machine[0].disk[0].size"), "{err}");
}

#[test]
fn duplicate_machine_names_are_refused() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\n{CS}[[datastore]]\nname = \"ds-a\"\npath = \"/tmp/ds-a\"\n\
         [[machine]]\nname = \"vm1\"\ndatastore = \"ds-a\"\n[[machine]]\nname = \"vm1\"\ndatastore = \"ds-a\"\n"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("machine[1].name") && err.contains("duplicate"),
        "{err}"
    );
}

#[test]
fn an_nbd_listen_that_is_no_address_is_refused() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\nnbd_listen = \"localhost\"\n{CS}"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("esx.toml")
            && err.contains("nbd_listen")
            && err.contains("`localhost` is not an address and port"),
        "{err}"
    );
}

#[test]
fn a_replication_budget_under_1_mib_is_refused() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\nreplication_budget = \"64 KiB\"\n{CS}"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("replication_budget") && err.contains("at least 1 MiB"),
        "{err}"
    );
}

#[test]
fn a_replication_budget_over_the_machines_memory_is_refused() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\nreplication_budget = \"64 PiB\"\n{CS}"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("replication_budget") && err.contains("more than this machine's memory"),
        "{err}"
    );
}

#[test]
fn an_app_script_without_time_is_refused() {
    let (code, err) = run(&format!(
        "name = \"esx-9\"\n{CS}[app_scripts.vm1]\npre = \"true\"\ntimeout = \"0s\"\n"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("app_scripts.vm1.timeout") && err.contains("must be positive"),
        "{err}"
    );
}
