//! Shared helpers of the vpn-link integration tests: a link with one route on ephemeral
//! ports, stopped cleanly, and polling its status.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use failback_proto::pb::link::LinkStatus;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use vpn_link::{Link, LinkHandle, Route, ServeError, Settings, Site};

pub const PROMPTLY: Duration = Duration::from_secs(5);
pub const POLL: Duration = Duration::from_millis(10);

pub struct Running {
    pub handle: LinkHandle,
    pub route: SocketAddr,
    pub control: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let served = tokio::time::timeout(PROMPTLY, self.task)
            .await
            .expect("link stops promptly")
            .expect("serve task");
        served.expect("serve returns Ok");
    }

    pub fn set(&self, f: impl FnOnce(&mut Settings)) {
        self.handle
            .update_settings(|s| {
                f(s);
                Ok::<(), ()>(())
            })
            .expect("update settings");
    }
}

/// A link with one route `r` from `site` to `connect`, serving on ephemeral ports.
pub async fn start_link(site: Site, connect: SocketAddr) -> Running {
    let link = Link::bind(vec![Route::new(
        "r",
        site,
        "127.0.0.1:0",
        connect.to_string(),
    )])
    .await
    .expect("bind link");
    let route = link.route_addr("r").expect("route addr");
    let handle = link.handle();
    let control_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind control");
    let control = control_listener.local_addr().expect("control addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(link.serve(control_listener, None, async {
        let _ = stopped.await;
    }));
    Running {
        handle,
        route,
        control,
        stop,
        task,
    }
}

/// Polls `handle.status()` until `pred` holds.
pub async fn eventually(handle: &LinkHandle, what: &str, pred: impl Fn(&LinkStatus) -> bool) {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let status = handle.status();
        if pred(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {status:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
