//! The server's edges, probed with the hand-written NBD client (`common::client`) over a plain
//! Unix socket: the option replies, the bounds on requests (EINVAL, ENOSPC, an oversized write
//! closing the connection), pipelining, NBD_CMD_DISC, export I/O errors, and what happens when
//! an export's machine powers off or the server shuts down.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::client::*;
use common::{Server, powered_off_text, unknown_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIB: u64 = 1024 * 1024;

fn fill(path: &Path, byte: u8, len: u64) {
    std::fs::write(path, vec![byte; len as usize]).expect("fill backing file");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn options_get_the_spec_replies_and_negotiation_goes_on() {
    let server = Server::start(&[("disk0", MIB), ("disk1", 2 * MIB)]).await;
    let mut client = Client::connect(&server.socket).await;

    for option in [
        0x4242,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
    ] {
        let reply = client.ask(option, b"").await;
        assert_eq!(reply.kind, REP_ERR_UNSUP, "option {option}: {reply:?}");
    }
    let reply = client.ask(OPT_STARTTLS, b"").await;
    assert_eq!(reply.kind, REP_ERR_POLICY, "{reply:?}");
    let reply = client.ask(OPT_LIST, b"junk").await;
    assert_eq!(reply.kind, REP_ERR_INVALID, "{reply:?}");
    // Option data past the bound is read and discarded, not allocated: negotiation goes on.
    let reply = client.ask(0x4242, &vec![0u8; 100 * 1024]).await;
    assert_eq!(reply.kind, REP_ERR_TOO_BIG, "{reply:?}");
    let reply = client.ask(OPT_INFO, &[0, 0, 0, 200, b'x']).await;
    assert_eq!(reply.kind, REP_ERR_INVALID, "{reply:?}");

    client.option(OPT_LIST, b"").await;
    let mut listed = Vec::new();
    loop {
        let reply = client.option_reply().await;
        match reply.kind {
            REP_SERVER => {
                let len = u32::from_be_bytes(reply.data[..4].try_into().expect("4")) as usize;
                let name = String::from_utf8(reply.data[4..4 + len].to_vec()).expect("utf-8");
                let description = String::from_utf8(reply.data[4 + len..].to_vec()).expect("utf-8");
                listed.push((name, description));
            }
            REP_ACK => break,
            other => panic!("unexpected LIST reply {other}: {reply:?}"),
        }
    }
    listed.sort();
    assert_eq!(
        listed,
        [
            ("disk0".to_owned(), "test disk disk0".to_owned()),
            ("disk1".to_owned(), "test disk disk1".to_owned())
        ]
    );

    let items = client
        .info_or_go(
            OPT_INFO,
            "disk1",
            &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        )
        .await
        .expect("INFO succeeds");
    let export = &items[&INFO_EXPORT];
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().expect("8")),
        2 * MIB
    );
    let flags = u16::from_be_bytes([export[8], export[9]]);
    let expected =
        TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
    assert_eq!(flags, expected, "transmission flags {flags:#x}");
    assert_eq!(flags & TF_SEND_TRIM, 0);
    assert_eq!(items[&INFO_NAME], b"disk1");
    assert_eq!(items[&INFO_DESCRIPTION], b"test disk disk1");
    let sizes: Vec<u32> = items[&INFO_BLOCK_SIZE]
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4")))
        .collect();
    assert_eq!(sizes, [1, 4096, MAX_PAYLOAD]);

    let refused = client.opt_go("nosuch").await.expect_err("unknown export");
    assert_eq!(refused.kind, REP_ERR_UNKNOWN);
    assert_eq!(refused.text(), unknown_text("nosuch"));

    // After all that, GO still works and the connection serves.
    let (size, _) = client.opt_go("disk0").await.expect("GO");
    assert_eq!(size, MIB);
    let reply = client.read(0, 4096).await;
    assert_eq!(reply.error, 0);
    assert_eq!(reply.data, vec![0u8; 4096]);
    server.stop().await;
}

#[tokio::test]
async fn handshake_edges() {
    let server = Server::start(&[("disk0", MIB)]).await;

    // A client that doesn't speak fixed newstyle is dropped.
    let mut client = Client::connect_raw(&server.socket).await;
    client.send(&0u32.to_be_bytes()).await;
    client.expect_closed(PATIENCE).await;

    // So is one setting a client flag that doesn't exist.
    let mut client = Client::connect_raw(&server.socket).await;
    client
        .send(&(C_FIXED_NEWSTYLE | 1 << 7).to_be_bytes())
        .await;
    client.expect_closed(PATIENCE).await;

    // ABORT is acknowledged, then the server closes.
    let mut client = Client::connect(&server.socket).await;
    let reply = client.ask(OPT_ABORT, b"").await;
    assert_eq!(reply.kind, REP_ACK);
    client.expect_closed(PATIENCE).await;

    // A bad option magic ends the session.
    let mut client = Client::connect(&server.socket).await;
    client.send(&[0u8; 16]).await;
    client.expect_closed(PATIENCE).await;

    // The option count is bounded.
    let mut client = Client::connect(&server.socket).await;
    let mut closed = false;
    let mut answered = 0;
    for _ in 0..=1024 {
        let mut option = IHAVEOPT.to_be_bytes().to_vec();
        option.extend_from_slice(&[0, 0, 0x42, 0x42, 0, 0, 0, 0]);
        if client.stream.write_all(&option).await.is_err() {
            closed = true;
            break;
        }
        let mut magic = [0u8; 8];
        match tokio::time::timeout(PATIENCE, client.stream.read_exact(&mut magic)).await {
            Ok(Ok(_)) => {
                assert_eq!(u64::from_be_bytes(magic), REPLY_MAGIC);
                let _ = client.exact(8).await;
                let len = client.u32().await;
                let _ = client.exact(len as usize).await;
                answered += 1;
            }
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => panic!("no answer to an option"),
        }
    }
    assert!(closed, "1025 options were all answered");
    assert_eq!(answered, 1024, "the bound is 1024 options");
    server.stop().await;
}

#[tokio::test]
async fn export_name_honours_no_zeroes_and_closes_on_unknown_names() {
    let server = Server::start(&[("disk0", MIB)]).await;
    fill(&server.lab.path("disk0"), 0x3c, MIB);

    for (client_flags, trailer) in [(C_FIXED_NEWSTYLE | C_NO_ZEROES, 0), (C_FIXED_NEWSTYLE, 124)] {
        let mut client = Client::connect_raw(&server.socket).await;
        client.send(&client_flags.to_be_bytes()).await;
        client.option(OPT_EXPORT_NAME, b"disk0").await;
        assert_eq!(client.u64().await, MIB);
        let flags = client.u16().await;
        assert_eq!(flags & TF_HAS_FLAGS, TF_HAS_FLAGS);
        assert_eq!(client.exact(trailer).await, vec![0u8; trailer]);
        // The stream is in step: the next bytes are the reply to this read.
        let reply = client.read(0, 16).await;
        assert_eq!((reply.error, reply.data), (0, vec![0x3c; 16]));
    }

    let mut client = Client::connect(&server.socket).await;
    client.option(OPT_EXPORT_NAME, b"nosuch").await;
    client.expect_closed(PATIENCE).await;
    server.stop().await;
}

#[tokio::test]
async fn out_of_bounds_requests_are_refused_and_the_connection_goes_on() {
    let size = MIB;
    let server = Server::start(&[("disk0", size)]).await;
    let backing = server.lab.path("disk0");
    fill(&backing, 0x11, size);
    let (mut client, announced, _) = Client::go(&server.socket, "disk0").await;
    assert_eq!(announced, size);

    // A read past the end: EINVAL, and no payload follows.
    assert_eq!(client.read(size - 512, 1024).await.error, EINVAL);
    assert_eq!(client.read(u64::MAX - 10, 100).await.error, EINVAL);
    // A write past the end: ENOSPC; its payload is consumed and nothing is written.
    client.write(0, 7, size - 512, &[0xee; 1024]).await;
    let reply = client.reply(0).await;
    assert_eq!((reply.cookie, reply.error), (7, ENOSPC));
    let zeroes_past_end = client.call(0, CMD_WRITE_ZEROES, size - 1, 2).await;
    assert_eq!(zeroes_past_end.error, ENOSPC);
    assert!(
        std::fs::read(&backing).expect("read backing") == vec![0x11; size as usize],
        "a refused write changed the backing file"
    );
    // Lengths of zero, over the maximum payload, unknown commands and flags: EINVAL.
    assert_eq!(client.read(0, 0).await.error, EINVAL);
    assert_eq!(client.read(0, MAX_PAYLOAD + 1).await.error, EINVAL);
    client.write(0, 7, 0, &[]).await;
    assert_eq!(client.reply(0).await.error, EINVAL);
    for command in [CMD_TRIM, CMD_BLOCK_STATUS, 42] {
        assert_eq!(
            client.call(0, command, 0, 4096).await.error,
            EINVAL,
            "command {command}"
        );
    }
    assert_eq!(
        client.call(CMD_FLAG_DF, CMD_READ, 0, 4096).await.error,
        EINVAL
    );
    assert_eq!(client.call(1 << 9, CMD_FLUSH, 0, 0).await.error, EINVAL);
    client.write(CMD_FLAG_NO_HOLE, 7, 0, &[0xee; 512]).await;
    assert_eq!(
        client.reply(0).await.error,
        EINVAL,
        "NO_HOLE is for WRITE_ZEROES only"
    );
    assert_eq!(client.call(0, CMD_CACHE, size, 1).await.error, EINVAL);
    assert_eq!(client.call(0, CMD_CACHE, 0, 4096).await.error, 0);

    // And still the connection serves, in step.
    let reply = client.read(size - 4096, 4096).await;
    assert_eq!((reply.error, reply.data), (0, vec![0x11; 4096]));
    client.write(CMD_FLAG_FUA, 8, 0, &[0x22; 4096]).await;
    assert_eq!(client.reply(0).await.error, 0);
    let mut head = vec![0u8; 4096];
    std::fs::File::open(&backing)
        .expect("open")
        .read_exact_at(&mut head, 0)
        .expect("read");
    assert_eq!(head, vec![0x22; 4096]);
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_write_is_refused_and_the_connection_closed() {
    let server = Server::start(&[("disk0", MIB)]).await;
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;
    // Only the header: a server that tried to read (or allocate) the payload would hang here.
    client.request(0, CMD_WRITE, 9, 0, MAX_PAYLOAD + 1).await;
    let reply = client.reply(0).await;
    assert_eq!((reply.cookie, reply.error), (9, EINVAL));
    client.expect_closed(PATIENCE).await;

    // A bad request magic closes the connection too.
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;
    client.send(&[0u8; 28]).await;
    client.expect_closed(PATIENCE).await;
    server.stop().await;
}

#[tokio::test]
async fn pipelined_requests_each_get_their_reply_and_disc_finishes_them() {
    let blocks = 64u64;
    let server = Server::start(&[("disk0", blocks * 4096)]).await;
    let backing = server.lab.path("disk0");
    fill(&backing, 0xff, blocks * 4096);
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;

    // Every write sent before any reply is read; odd blocks zeroed instead.
    let mut batch = Vec::new();
    for block in 0..blocks {
        let offset = block * 4096;
        if block % 2 == 0 {
            batch.extend(Client::request_bytes(0, CMD_WRITE, block, offset, 4096));
            batch.extend(pattern(4096, block as u8));
        } else {
            let flags = if block % 4 == 1 {
                CMD_FLAG_NO_HOLE
            } else {
                CMD_FLAG_FUA
            };
            batch.extend(Client::request_bytes(
                flags,
                CMD_WRITE_ZEROES,
                block,
                offset,
                4096,
            ));
        }
    }
    client.send(&batch).await;
    let mut cookies = Vec::new();
    for _ in 0..blocks {
        let reply = client.reply(0).await;
        assert_eq!(reply.error, 0, "{reply:?}");
        cookies.push(reply.cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (0..blocks).collect::<Vec<_>>());
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await.error, 0);

    // Pipelined reads come back matched by cookie, whatever their order.
    let mut batch = Vec::new();
    for block in 0..blocks {
        batch.extend(Client::request_bytes(
            0,
            CMD_READ,
            1000 + block,
            block * 4096,
            4096,
        ));
    }
    client.send(&batch).await;
    for _ in 0..blocks {
        let reply = client.reply(4096).await;
        assert_eq!(reply.error, 0);
        let block = reply.cookie - 1000;
        let expected = if block % 2 == 0 {
            pattern(4096, block as u8)
        } else {
            vec![0; 4096]
        };
        assert!(reply.data == expected, "block {block} read back wrong");
    }

    // Writes followed at once by DISC: all are done and answered before the close.
    let mut batch = Vec::new();
    for block in 0..8u64 {
        batch.extend(Client::request_bytes(
            0,
            CMD_WRITE,
            2000 + block,
            block * 4096,
            4096,
        ));
        batch.extend(vec![0x77; 4096]);
    }
    batch.extend(Client::request_bytes(0, CMD_DISC, 3000, 0, 0));
    client.send(&batch).await;
    for _ in 0..8 {
        assert_eq!(client.reply(0).await.error, 0);
    }
    client.expect_closed(PATIENCE).await;
    let data = std::fs::read(&backing).expect("read backing");
    assert!(
        data[..8 * 4096].iter().all(|&b| b == 0x77),
        "writes before DISC were lost"
    );
    server.stop().await;
}

#[tokio::test]
async fn export_io_errors_map_to_nbd_errors() {
    let server = Server::start(&[("disk0", MIB)]).await;
    let export = server.lab.export("disk0");
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;

    *export.fail_with.lock().expect("lock") = Some(std::io::ErrorKind::Other);
    assert_eq!(client.read(0, 4096).await.error, EIO);
    *export.fail_with.lock().expect("lock") = Some(std::io::ErrorKind::StorageFull);
    client.write(0, 7, 0, &[1; 4096]).await;
    assert_eq!(client.reply(0).await.error, ENOSPC);
    *export.fail_with.lock().expect("lock") = None;
    assert_eq!(client.read(0, 4096).await.error, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_powered_off_export_answers_eshutdown_then_closes_and_is_refused() {
    let server = Server::start(&[("disk0", MIB), ("disk1", MIB)]).await;
    let export = server.lab.export("disk0");
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;
    let (mut bystander, _, _) = Client::go(&server.socket, "disk1").await;

    // A read in flight (the machine hangs) when the machine powers off: ESHUTDOWN.
    export.stall_reads.store(true, Ordering::SeqCst);
    client.request(0, CMD_READ, 1, 0, 4096).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.lab.power_off("disk0");
    let reply = client.reply(4096).await;
    assert_eq!((reply.cookie, reply.error), (1, ESHUTDOWN));
    // The next requests too (a write's payload still consumed), then the server closes.
    assert_eq!(client.read(0, 4096).await.error, ESHUTDOWN);
    client.write(0, 2, 0, &[9; 4096]).await;
    let reply = client.reply(0).await;
    assert_eq!((reply.cookie, reply.error), (2, ESHUTDOWN));
    let margin = Duration::from_secs(5);
    client
        .expect_closed(failback_nbd::SHUTDOWN_LINGER + margin)
        .await;
    assert!(
        std::fs::read(server.lab.path("disk0"))
            .expect("read")
            .iter()
            .all(|&b| b == 0),
        "a write after the power-off reached the disk"
    );

    // While it is off, a new GO is refused with the lab's text; other disks are untouched.
    let mut late = Client::connect(&server.socket).await;
    let refused = late.opt_go("disk0").await.expect_err("powered off");
    assert_eq!(refused.kind, REP_ERR_UNKNOWN);
    assert_eq!(refused.text(), powered_off_text("disk0"));
    assert_eq!(bystander.read(0, 4096).await.error, 0);

    // A client that sends DISC on ESHUTDOWN (as the spec asks) is let go at once.
    export.stall_reads.store(false, Ordering::SeqCst);
    server.lab.power_on("disk0");
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;
    assert_eq!(client.read(0, 4096).await.error, 0);
    server.lab.power_off("disk0");
    assert_eq!(client.read(0, 4096).await.error, ESHUTDOWN);
    client.request(0, CMD_DISC, 3, 0, 0).await;
    let took = client.expect_closed(PATIENCE).await;
    assert!(
        took < failback_nbd::SHUTDOWN_LINGER,
        "closing after DISC took {took:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn server_shutdown_answers_eshutdown_and_serve_unix_returns() {
    let server = Server::start(&[("disk0", MIB)]).await;
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;
    let mut negotiating = Client::connect(&server.socket).await;
    server.shutdown.cancel();
    assert_eq!(client.read(0, 4096).await.error, ESHUTDOWN);
    client
        .expect_closed(failback_nbd::SHUTDOWN_LINGER + PATIENCE)
        .await;
    negotiating.expect_closed(PATIENCE).await;
    // serve_unix returns once every connection is gone, and accepts no more.
    let socket = server.socket.clone();
    server.stop().await;
    assert!(
        UnixStream::connect(&socket).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn a_client_that_reads_no_replies_cannot_hold_up_shutdown() {
    let server = Server::start(&[("disk0", 16 * MIB)]).await;
    let (mut client, _, _) = Client::go(&server.socket, "disk0").await;
    // Far more read data asked for than the socket buffers hold, and none of it read.
    let mut batch = Vec::new();
    for cookie in 0..256u64 {
        batch.extend(Client::request_bytes(
            0,
            CMD_READ,
            cookie,
            (cookie % 16) * MIB,
            1 << 20,
        ));
    }
    client.send(&batch).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Server::stop fails the test if serve_unix hasn't returned within 10 s.
    server.stop().await;
    drop(client);
}

/// The hand-written client checked against a reference server, nbdkit (Debian's `nbdkit`,
/// its `memory` plugin): the answers the tests above demand of this server are the ones
/// nbdkit gives, so they test the protocol rather than the client's own reading of it.
#[tokio::test]
async fn the_test_client_agrees_with_the_reference_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbdkit.sock");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let _nbdkit = tokio::process::Command::new("nbdkit")
        .args(["-f", "--log=null", "-U", socket_arg, "memory", "size=1M"])
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("nbdkit: {e}; install Debian's `nbdkit` package (scripts/test-deps)")
        });
    let deadline = Instant::now() + PATIENCE;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "nbdkit did not listen on {socket:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut client = Client::connect(&socket).await;
    let reply = client.ask(0x4242, b"").await;
    assert_eq!(reply.kind, REP_ERR_UNSUP, "{reply:?}");
    let reply = client.ask(OPT_LIST, b"junk").await;
    assert_eq!(reply.kind, REP_ERR_INVALID, "{reply:?}");
    let (size, flags) = client.opt_go("").await.expect("GO");
    assert_eq!(size, MIB);
    assert_eq!(flags & TF_HAS_FLAGS, TF_HAS_FLAGS);

    client.write(CMD_FLAG_FUA, 1, 4096, &pattern(4096, 3)).await;
    assert_eq!(client.reply(0).await.error, 0);
    let reply = client.read(4096, 4096).await;
    assert_eq!((reply.error, reply.data), (0, pattern(4096, 3)));
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, 4096, 512).await.error, 0);
    assert_eq!(client.read(4096, 512).await.data, vec![0; 512]);
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await.error, 0);
    assert_eq!(client.read(MIB - 512, 1024).await.error, EINVAL);
    client.write(0, 2, MIB - 512, &[0xee; 1024]).await;
    assert_eq!(client.reply(0).await.error, ENOSPC);
    assert_eq!(
        client
            .call(0, CMD_WRITE_ZEROES, MIB - 512, 1024)
            .await
            .error,
        ENOSPC
    );
    assert_eq!(client.call(0, 42, 0, 4096).await.error, EINVAL);
    assert_eq!(client.read(0, 16).await.error, 0, "still in step");
    client.request(0, CMD_DISC, 3, 0, 0).await;
    client.expect_closed(PATIENCE).await;
}
