//! `srctl portal` in a real browser: Debian's headless Chromium driven through WebDriver
//! (chromedriver, from `chromium-driver`) by fantoccini. Without its token the portal answers
//! 401; with it the items page lists vm1 and vm2, shows "Failover completed" after a failover
//! without a reload, and the topology view shows ps-azure as not connected after `lab kill`.
//! A screenshot of each view is written next to the test's temporary files.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Kills a child process when dropped (a failed assertion included).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The status line of a plain GET (tried again if the connection is reset before any answer
/// arrived, as a loaded machine can make it).
fn status_of(base: &str, path: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut last = String::new();
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let read = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        if !out.is_empty() {
            return String::from_utf8_lossy(&out)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
        }
        last = format!("{read:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("GET {path}: no answer: {last}")
}

async fn text_of(client: &fantoccini::Client, id: &str) -> String {
    client
        .execute(
            &format!("const e = document.getElementById('{id}'); return e ? e.innerText : '';"),
            vec![],
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn until(
    client: &fantoccini::Client,
    what: &str,
    secs: u64,
    mut ok: impl FnMut(&str) -> bool,
    id: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = text_of(client, id).await;
        if ok(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: the page shows\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn shot(client: &fantoccini::Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    let dir = std::env::temp_dir().join("failback-portal-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_shows_the_lab_live_in_a_real_browser() {
    let lab = Lab::up(&["--machines", "2", "--disk-size", "8MiB"]);
    let dir = lab.dir.clone();
    for vm in ["vm1", "vm2"] {
        ok(srctl(&dir, &["item", "enable", vm]));
    }
    protected_with_a_point(&dir, "vm1");

    let mut portal = Command::new(SRCTL)
        .arg("--lab")
        .arg(&dir)
        .arg("portal")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("srctl portal");
    let out = portal.stdout.take().expect("stdout");
    let _portal = Killed(portal);
    let mut line = String::new();
    // Kept open while the portal runs: it writes a second line.
    let mut out = BufReader::new(out);
    out.read_line(&mut line).expect("the portal's URL");
    let url = line
        .trim()
        .strip_prefix("portal: ")
        .unwrap_or_else(|| panic!("no URL: {line}"))
        .to_string();
    let base = url.split("/?token=").next().expect("base").to_string();
    assert_eq!(
        std::fs::read_to_string(dir.join("operator/portal.url"))
            .expect("portal.url")
            .trim(),
        url
    );

    // Without the token: 401, for the page, the events and the data alike.
    for path in ["/", "/events", "/api/snapshot", "/?token=wrong"] {
        assert!(
            status_of(&base, path).contains("401"),
            "{path}: {}",
            status_of(&base, path)
        );
    }

    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("chromedriver: {e}; install Debian's `chromium-driver` (scripts/test-deps)")
        });
    let _driver = Killed(driver);
    eventually("chromedriver listens", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({"args": ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]}),
    );
    let client =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");

    // The token sets the cookie; the page then lists the items, live.
    client.goto(&url).await.expect("open the portal");
    until(
        &client,
        "vm1 and vm2 listed",
        30,
        |t| t.contains("vm1") && t.contains("vm2"),
        "items",
    )
    .await;
    assert!(
        !client
            .current_url()
            .await
            .expect("url")
            .as_str()
            .contains("token="),
        "the token leaves the address bar"
    );
    shot(&client, "items").await;

    // A failover shows up without a reload.
    ok(srctl(&dir, &["failover", "vm1"]));
    until(
        &client,
        "vm1 shows Failover completed",
        30,
        |t| t.lines().any(|l| l.contains("vm1")) && t.contains("Failover completed"),
        "items",
    )
    .await;
    shot(&client, "items-after-failover").await;

    client
        .find(fantoccini::Locator::Css("a[data-view=jobs]"))
        .await
        .expect("jobs tab")
        .click()
        .await
        .expect("click");
    until(
        &client,
        "the failover job listed",
        10,
        |t| t.contains("Failover"),
        "jobs",
    )
    .await;
    shot(&client, "jobs").await;

    client
        .find(fantoccini::Locator::Css("a[data-view=topology]"))
        .await
        .expect("topology tab")
        .click()
        .await
        .expect("click");
    until(
        &client,
        "ps-azure connected",
        10,
        |t| t.contains("ps-azure"),
        "main",
    )
    .await;
    ok(srctl(&dir, &["lab", "kill", "ps-azure"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cls = client
            .execute(
                "const e = document.querySelector('[data-component=\"ps-azure\"]'); return e ? e.className + ' ' + e.innerText : '';",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if cls.contains("not-connected") && cls.contains("not connected") {
            break;
        }
        assert!(Instant::now() < deadline, "ps-azure still shown as: {cls}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shot(&client, "topology-ps-azure-killed").await;
    client.close().await.expect("close");
}
