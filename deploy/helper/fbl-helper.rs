//! `fbl-helper`: the few things the container lab needs inside images that have no shell and
//! no tools (the offline images hold only the lab's binaries and their shared libraries).
//!
//! Standard library only, so `deploy/build-images` compiles it with plain `rustc` (no crates,
//! nothing downloaded).
//!
//! ```text
//! fbl-helper probe-tls ADDR...     every ADDR completes a TLS ClientHello -> ServerHello
//! fbl-helper probe-h2c ADDR...     every ADDR answers the HTTP/2 preface with SETTINGS
//! fbl-helper publish-trust FROM TO [--timeout SECS]
//!                                  wait for FROM/ca.pem and FROM/passphrase, copy them to TO
//! fbl-helper own UID DIR...        make each DIR (not what it holds) owned by UID:UID
//! ```
//!
//! `probe-tls` is the healthcheck of the mutual-TLS components. A plain TCP connect is not
//! enough: every component binds its port first and serves only after it has enrolled with
//! the configuration server, so the kernel accepts connections long before anything answers.
//! A ServerHello comes from the component's TLS stack itself (rustls sends it before it asks
//! for the client certificate), so the probe needs no credentials. It does not call
//! `grpc.health.v1.Health/Check`: that needs a client certificate from the lab CA.
//!
//! `probe-h2c` is the healthcheck of vpn-link's plaintext control API.
//!
//! `own` runs once as root before the components: Docker creates a new volume's root owned by
//! root unless the image has the mount point, and a topology's datastores are named by the
//! user, so their volumes are handed to the lab's user this way.
//!
//! `publish-trust` is the bootstrap: the configuration server keeps its CA and passphrase in
//! its own data volume (with the database and the CA key); the other components get only the
//! CA certificate and the passphrase, through a read-only `trust` volume.
//!
//! Exit status: 0 ok, 1 failed (the reason on stderr), 2 usage.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("probe-tls") if args.len() > 1 => each(&args[1..], probe_tls),
        Some("probe-h2c") if args.len() > 1 => each(&args[1..], probe_h2c),
        Some("publish-trust") if args.len() >= 3 => {
            let timeout = match args.get(3).map(String::as_str) {
                None => Ok(120),
                Some("--timeout") => args
                    .get(4)
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| "--timeout needs a number of seconds".to_string()),
                Some(other) => Err(format!("unexpected argument `{other}`")),
            };
            timeout.and_then(|t| {
                publish_trust(
                    Path::new(&args[1]),
                    Path::new(&args[2]),
                    Duration::from_secs(t),
                )
            })
        }
        Some("own") if args.len() > 2 => match args[1].parse::<u32>() {
            Ok(uid) => args[2..].iter().try_for_each(|d| {
                std::os::unix::fs::chown(d, Some(uid), Some(uid))
                    .map_err(|e| format!("cannot give {d} to uid {uid}: {e}"))
            }),
            Err(_) => Err(format!("`{}` is not a uid", args[1])),
        },
        _ => {
            eprintln!(
                "usage: fbl-helper probe-tls ADDR... | probe-h2c ADDR... | \
                 publish-trust FROM_DIR TO_DIR [--timeout SECS] | own UID DIR..."
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("fbl-helper: {e}");
        std::process::exit(1);
    }
}

fn each(addrs: &[String], probe: fn(&str) -> Result<(), String>) -> Result<(), String> {
    for a in addrs {
        probe(a).map_err(|e| format!("{a}: {e}"))?;
    }
    Ok(())
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?;
    for sa in addrs {
        match TcpStream::connect_timeout(&sa, TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) => last = format!("cannot connect to {sa}: {e}"),
        }
    }
    Err(last)
}

/// A TLS 1.3 ClientHello (x25519 key share, the usual signature schemes, ALPN h2).
fn client_hello() -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    // supported_versions: TLS 1.3.
    ext(&mut exts, 0x002b, &[2, 0x03, 0x04]);
    // supported_groups: x25519, secp256r1.
    ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]);
    // signature_algorithms: ecdsa p256/p384, ed25519, rsa-pss, rsa-pkcs1.
    let schemes: [u16; 9] = [
        0x0403, 0x0503, 0x0807, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601,
    ];
    let mut sig = ((schemes.len() * 2) as u16).to_be_bytes().to_vec();
    for s in schemes {
        sig.extend_from_slice(&s.to_be_bytes());
    }
    ext(&mut exts, 0x000d, &sig);
    // key_share: x25519 with the base point as public key (a valid point; the handshake is
    // abandoned after the ServerHello anyway).
    let mut share = vec![0, 36, 0x00, 0x1d, 0, 32, 9];
    share.extend_from_slice(&[0u8; 31]);
    ext(&mut exts, 0x0033, &share);
    // ALPN: h2 (what the gRPC servers offer).
    ext(&mut exts, 0x0010, &[0, 3, 2, b'h', b'2']);

    let mut body = vec![0x03, 0x03];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_le_bytes();
    body.extend_from_slice(&seed);
    body.extend_from_slice(&seed); // 32 bytes of "random"
    body.push(32);
    body.extend_from_slice(&seed);
    body.extend_from_slice(&seed); // legacy session id
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);

    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn probe_tls(addr: &str) -> Result<(), String> {
    let mut s = connect(addr)?;
    s.write_all(&client_hello())
        .map_err(|e| format!("sending ClientHello: {e}"))?;
    let mut head = [0u8; 6];
    s.read_exact(&mut head)
        .map_err(|e| format!("no TLS answer (not serving yet?): {e}"))?;
    match head {
        [0x16, 0x03, _, _, _, 0x02] => Ok(()),
        [0x15, 0x03, _, _, _, _] => {
            let mut desc = [0u8; 1];
            let _ = s.read_exact(&mut desc);
            Err(format!("TLS alert {} instead of a ServerHello", desc[0]))
        }
        other => Err(format!("not a TLS ServerHello: {other:02x?}")),
    }
}

fn probe_h2c(addr: &str) -> Result<(), String> {
    let mut s = connect(addr)?;
    let mut msg = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    msg.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]); // empty SETTINGS
    s.write_all(&msg)
        .map_err(|e| format!("sending the HTTP/2 preface: {e}"))?;
    let mut frame = [0u8; 9];
    s.read_exact(&mut frame)
        .map_err(|e| format!("no HTTP/2 answer: {e}"))?;
    if frame[3] != 0x04 {
        return Err(format!("first frame is type {} , not SETTINGS", frame[3]));
    }
    Ok(())
}

fn publish_trust(from: &Path, to: &Path, timeout: Duration) -> Result<(), String> {
    let files = ["ca.pem", "passphrase"];
    let deadline = Instant::now() + timeout;
    let ready = || {
        files.iter().all(|f| {
            std::fs::metadata(from.join(f))
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        })
    };
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} and {} did not appear in {} within {timeout:?}: is the configuration \
                 server running? (docker logs fbl-cs)",
                files[0],
                files[1],
                from.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    for f in files {
        let src = from.join(f);
        let data =
            std::fs::read(&src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let tmp = to.join(format!(".{f}.tmp"));
        let dst = to.join(f);
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            let mut out = std::fs::File::create(&tmp)?;
            let mode = if f == "passphrase" { 0o600 } else { 0o644 };
            out.set_permissions(std::fs::Permissions::from_mode(mode))?;
            out.write_all(&data)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &dst)
        };
        write().map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
    }
    println!(
        "published {} and {} from {} to {}",
        files[0],
        files[1],
        from.display(),
        to.display()
    );
    Ok(())
}
