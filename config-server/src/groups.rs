//! Replication groups: multi-VM crash- and app-consistent points that every member shares,
//! taken at the policy's intervals behind a two-phase barrier.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use failback_common::control::now_ms;
use failback_proto::pb::control::{HoldWrites, MakeTag, ReleaseWrites, command};
use tokio_util::sync::CancellationToken;

use crate::item::{ItemRow, ItemState, default_policy};
use crate::state::State;

/// How long members of a replication group may hold their writes for a multi-VM point: the
/// barrier must complete within it, or the point is abandoned.
const GROUP_HOLD: Duration = Duration::from_secs(3);

/// One multi-VM point, ASR's distributed consistency as a two-phase barrier: every member
/// holds its writes (phase one); only when all hold does each take the tag `id`, which ends
/// its hold (phase two). No write of any member completes between the first tag and the last,
/// so the members' points form one consistent cut. If a member cannot hold in time, the others
/// are released and no member gets the point (a partial multi-VM point would claim a
/// consistency it does not have).
async fn group_point(state: &State, group: &str, members: &[ItemRow], id: &str, kind: &str) {
    let holds = members.iter().map(|m| {
        let hold = state.sessions.command(
            &m.machine,
            command::Kind::HoldWrites(HoldWrites {
                item: m.id.clone(),
                id: id.to_string(),
                max_ms: GROUP_HOLD.as_millis() as u32,
                app_consistent: kind == "multi-vm-app",
            }),
        );
        async move {
            match tokio::time::timeout(GROUP_HOLD, hold).await {
                Ok(r) => r.map(|_| ()).map_err(|e| e.message().to_string()),
                Err(_) => Err(format!(
                    "`{}` did not hold its writes within {GROUP_HOLD:?}",
                    m.machine
                )),
            }
        }
    });
    let held = futures::future::join_all(holds).await;
    if let Some(e) = held.iter().find_map(|r| r.as_ref().err()) {
        tracing::warn!(%group, "{kind} point {id} abandoned: {e}");
        let releases = members
            .iter()
            .zip(&held)
            .filter(|(_, r)| r.is_ok())
            .map(|(m, _)| {
                state.sessions.command(
                    &m.machine,
                    command::Kind::ReleaseWrites(ReleaseWrites {
                        item: m.id.clone(),
                        id: id.to_string(),
                    }),
                )
            });
        futures::future::join_all(releases).await;
        return;
    }
    let tags = members.iter().map(|m| {
        state.sessions.command(
            &m.machine,
            command::Kind::MakeTag(MakeTag {
                item: m.id.clone(),
                id: id.to_string(),
                kind: kind.to_string(),
            }),
        )
    });
    for (m, r) in members.iter().zip(futures::future::join_all(tags).await) {
        if let Err(e) = r {
            tracing::warn!(%group, machine = %m.machine, "{kind} tag {id}: {}", e.message());
        }
    }
}

/// Coordinates the tags of replication groups: every Protected member gets the same tag id
/// at the policy's intervals, so they share points.
pub async fn tagger(state: Arc<State>, stop: CancellationToken) {
    let mut last: HashMap<(String, &'static str), i64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Ok((items, policies)) = state
            .store
            .call(|db| Ok((db.grouped_items()?, db.policies()?)))
            .await
        else {
            continue;
        };
        let mut groups: BTreeMap<String, Vec<ItemRow>> = BTreeMap::new();
        for i in items
            .into_iter()
            .filter(|i| !i.replication_group.is_empty() && i.state == ItemState::Protected)
        {
            groups
                .entry(i.replication_group.clone())
                .or_default()
                .push(i);
        }
        let now = now_ms();
        for (group, members) in groups {
            let policy = policies
                .iter()
                .find(|p| p.name == members[0].policy)
                .cloned()
                .unwrap_or_else(default_policy);
            for (kind, every_s) in [
                ("multi-vm-crash", policy.crash_interval_s),
                ("multi-vm-app", policy.app_interval_s),
            ] {
                if every_s == 0 {
                    continue;
                }
                let key = (group.clone(), kind);
                if last
                    .get(&key)
                    .is_some_and(|t| now - t < every_s as i64 * 1000)
                {
                    continue;
                }
                last.insert(key, now);
                let id = format!(
                    "{}-{group}-{now}",
                    if kind == "multi-vm-app" { "mva" } else { "mvc" }
                );
                group_point(&state, &group, &members, &id, kind).await;
            }
        }
    }
}
