//! The server judged by real third-party NBD clients: `nbdinfo` and `nbdcopy` (Debian's
//! `libnbd-bin`) and fio's `nbd` engine (`fio`). Each test starts the server on a Unix socket
//! in a temporary directory, serving exports backed by real files, and checks what the tool
//! reports and what lands in the backing files.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{Server, describe, json, judge, powered_off_text, random_bytes, unknown_text};

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_and_flags_and_lists_every_export() {
    let disk0_size = 8 * MIB + 4096; // not a power of two: the size must be exact
    let server = Server::start(&[("disk0", disk0_size), ("disk1", MIB)]).await;

    let uri = server.uri("disk0");
    let output = judge("nbdinfo", "libnbd-bin", &["--json", &uri], &[]).await;
    assert!(output.status.success(), "nbdinfo: {}", describe(&output));
    let info = json(&output);
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{info}");
    let export = &exports[0];
    assert_eq!(export["export-name"], "disk0", "{info}");
    assert_eq!(export["export-size"], disk0_size, "{info}");
    assert_eq!(export["description"], "test disk disk0", "{info}");
    for (flag, expected) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_zero", true),
        ("can_multi_conn", true),
        ("can_trim", false),
    ] {
        assert_eq!(export[flag], expected, "{flag} in {info}");
    }
    assert_eq!(export["block_size_minimum"], 1, "{info}");
    assert_eq!(export["block_size_preferred"], 4096, "{info}");
    assert_eq!(export["block_size_maximum"], 32 * MIB, "{info}");

    let any = server.uri("");
    let output = judge("nbdinfo", "libnbd-bin", &["--list", "--json", &any], &[]).await;
    assert!(
        output.status.success(),
        "nbdinfo --list: {}",
        describe(&output)
    );
    let listed = json(&output);
    let mut exports: Vec<(String, u64)> = listed["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| {
            let name = e["export-name"].as_str().expect("export-name").to_owned();
            (name, e["export-size"].as_u64().expect("export-size"))
        })
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        [("disk0".to_owned(), disk0_size), ("disk1".to_owned(), MIB)],
        "{listed}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_powered_off_export_is_refused_with_the_refusal_text() {
    let server = Server::start(&[("disk0", MIB)]).await;
    // libnbd prints the server's option error message only in its debug output.
    let debug = [("LIBNBD_DEBUG", "1")];

    let uri = server.uri("nosuch");
    let output = judge("nbdinfo", "libnbd-bin", &[&uri], &debug).await;
    assert!(
        !output.status.success(),
        "nbdinfo succeeded: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&unknown_text("nosuch")),
        "refusal text missing: {}",
        describe(&output)
    );

    server.lab.power_off("disk0");
    let uri = server.uri("disk0");
    let output = judge("nbdinfo", "libnbd-bin", &[&uri], &debug).await;
    assert!(
        !output.status.success(),
        "nbdinfo succeeded: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&powered_off_text("disk0")),
        "refusal text missing: {}",
        describe(&output)
    );

    server.lab.power_on("disk0");
    let output = judge("nbdinfo", "libnbd-bin", &["--size", &uri], &[]).await;
    assert!(output.status.success(), "nbdinfo: {}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        MIB.to_string()
    );
    server.stop().await;
}

/// Writes a source image: random data, a sparse hole (which nbdcopy sends as zeroes), more
/// random data.
fn write_sparse_source(path: &Path, size: u64) -> Vec<u8> {
    let file = std::fs::File::create(path).expect("create source");
    file.set_len(size).expect("size source");
    let third = size / 3;
    let head = random_bytes(third as usize);
    let tail = random_bytes((size - 2 * third) as usize);
    file.write_all_at(&head, 0).expect("write head");
    file.write_all_at(&tail, 2 * third).expect("write tail");
    let mut expected = head;
    expected.resize(2 * third as usize, 0);
    expected.extend_from_slice(&tail);
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_random_bytes() {
    let size = 24 * MIB;
    let server = Server::start(&[("disk0", size)]).await;
    // Junk everywhere first, so the hole only reads back as zeroes if the server zeroed it.
    let backing = server.lab.path("disk0");
    std::fs::write(&backing, vec![0xa5u8; size as usize]).expect("fill backing file");

    let source = server.dir.path().join("source.img");
    let expected = write_sparse_source(&source, size);
    let uri = server.uri("disk0");
    let source_arg = source.to_str().expect("utf-8 path");
    let output = judge("nbdcopy", "libnbd-bin", &["--flush", source_arg, &uri], &[]).await;
    assert!(output.status.success(), "nbdcopy in: {}", describe(&output));
    assert!(
        std::fs::read(&backing).expect("read backing") == expected,
        "the backing file differs from the copied image"
    );

    let copy = server.dir.path().join("copy.img");
    let copy_arg = copy.to_str().expect("utf-8 path");
    std::fs::File::create(&copy).expect("create copy");
    let output = judge("nbdcopy", "libnbd-bin", &[&uri, copy_arg], &[]).await;
    assert!(
        output.status.success(),
        "nbdcopy out: {}",
        describe(&output)
    );
    assert!(
        std::fs::read(&copy).expect("read copy") == expected,
        "the image copied back out differs from the one copied in"
    );
    server.stop().await;
}

fn fio_args<'a>(uri: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--name=nbd-verify",
        "--ioengine=nbd",
        uri,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=4M",
        "--verify=crc32c",
        // No verify-state file left in the working directory by the failing run.
        "--verify_state_save=0",
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verifies_what_it_wrote_and_catches_corruption() {
    let server = Server::start(&[("disk0", 8 * MIB)]).await;
    let uri = format!("--uri={}", server.uri("disk0"));

    let output = judge("fio", "fio", &fio_args(&uri, &[]), &[]).await;
    assert!(
        output.status.success(),
        "fio write+verify: {}",
        describe(&output)
    );

    let output = judge("fio", "fio", &fio_args(&uri, &["--verify_only"]), &[]).await;
    assert!(
        output.status.success(),
        "fio --verify_only: {}",
        describe(&output)
    );

    // Corrupt one 4k block in the backing file: the judge must now fail.
    let backing = std::fs::File::options()
        .write(true)
        .open(server.lab.path("disk0"))
        .expect("open backing file");
    let corrupted_block = MIB + 4096 * 7;
    backing
        .write_all_at(&[0x5au8; 64], corrupted_block + 100)
        .expect("corrupt a block");
    drop(backing);
    let output = judge("fio", "fio", &fio_args(&uri, &["--verify_only"]), &[]).await;
    assert!(
        !output.status.success(),
        "fio --verify_only passed over a corrupted block: {}",
        describe(&output)
    );
    let text = describe(&output);
    assert!(
        text.contains("verify failed") && text.contains(&format!("offset {corrupted_block}")),
        "fio failed, but not on the corrupted block: {text}"
    );
    server.stop().await;
}
