//! Coalescing of a component's reports on its control stream (the sending side of
//! `ReportBatch`). A report taken from the outbox when none was sent for [`LINGER`] goes at
//! once, alone; reports that follow within [`LINGER`] of the last sending wait for it and go
//! together, up to [`MAX_REPORTS`] a message. Anything else (a command's result, a renewal)
//! first sends the reports held, so the order the component produced is the order the CS
//! sees. A quiet component's reports are never delayed; a target reporting the points of a
//! thousand items sends a message every 50 ms instead of several hundred a second (each a
//! TLS record and an HTTP/2 frame the CS's runtime wakes for).

use std::time::{Duration, Instant};

use failback_proto::pb::control::{ComponentMessage, Report, ReportBatch, component_message};

/// How long reports that follow a sending wait for company.
pub const LINGER: Duration = Duration::from_millis(50);
/// Most reports in one message (the CS accepts up to 1,024).
pub const MAX_REPORTS: usize = 256;

/// Reports held for the next sending, and when the last one went.
#[derive(Default)]
pub struct Coalescer {
    held: Vec<Report>,
    last_sent: Option<Instant>,
}

impl Coalescer {
    /// Takes `m` from the outbox at `now`; returns what to send now, in order.
    pub fn push(&mut self, m: ComponentMessage, now: Instant) -> Vec<ComponentMessage> {
        match m.kind {
            Some(component_message::Kind::Report(r)) => {
                let quiet = self.held.is_empty()
                    && self
                        .last_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= LINGER);
                self.held.push(r);
                if quiet || self.held.len() >= MAX_REPORTS {
                    self.flush(now).into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            kind => {
                let mut out: Vec<ComponentMessage> = self.flush(now).into_iter().collect();
                out.push(ComponentMessage { kind });
                out
            }
        }
    }

    /// When the reports held are due to be sent (None: none are held).
    pub fn due(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        Some(match self.last_sent {
            Some(t) => t + LINGER,
            None => Instant::now(),
        })
    }

    /// The reports held, as one message (a lone report as itself), sent at `now`.
    pub fn flush(&mut self, now: Instant) -> Option<ComponentMessage> {
        let kind = match self.held.len() {
            0 => return None,
            1 => component_message::Kind::Report(self.held.remove(0)),
            _ => component_message::Kind::Reports(ReportBatch {
                reports: std::mem::take(&mut self.held),
            }),
        };
        self.last_sent = Some(now);
        Some(ComponentMessage { kind: Some(kind) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failback_proto::pb::control::{CommandResult, PointAdded, report};

    fn point(id: &str) -> ComponentMessage {
        ComponentMessage {
            kind: Some(component_message::Kind::Report(Report {
                kind: Some(report::Kind::PointAdded(PointAdded {
                    item: "vm1-1".into(),
                    id: id.into(),
                    ..Default::default()
                })),
            })),
        }
    }

    /// The point ids in what was sent, message by message.
    fn ids(sent: &[ComponentMessage]) -> Vec<Vec<String>> {
        let of = |r: &Report| match &r.kind {
            Some(report::Kind::PointAdded(p)) => p.id.clone(),
            _ => "?".into(),
        };
        sent.iter()
            .map(|m| match &m.kind {
                Some(component_message::Kind::Report(r)) => vec![of(r)],
                Some(component_message::Kind::Reports(b)) => b.reports.iter().map(of).collect(),
                Some(component_message::Kind::Result(_)) => vec!["result".into()],
                _ => vec!["?".into()],
            })
            .collect()
    }

    #[test]
    fn a_quiet_report_goes_at_once_and_a_burst_goes_together_when_due() {
        let mut c = Coalescer::default();
        let t0 = Instant::now();
        assert_eq!(ids(&c.push(point("a"), t0)), [["a"]]);
        assert_eq!(c.due(), None);
        // Within LINGER of that sending: held until it is due.
        assert!(c.push(point("b"), t0 + LINGER / 5).is_empty());
        assert!(c.push(point("c"), t0 + LINGER / 2).is_empty());
        assert_eq!(c.due(), Some(t0 + LINGER));
        let sent: Vec<ComponentMessage> = c.flush(t0 + LINGER).into_iter().collect();
        assert_eq!(ids(&sent), [["b", "c"]]);
        assert_eq!(c.due(), None);
        // Quiet again for LINGER: the next one goes at once.
        assert_eq!(ids(&c.push(point("d"), t0 + LINGER * 3)), [["d"]]);
    }

    #[test]
    fn another_message_sends_the_held_reports_first() {
        let mut c = Coalescer::default();
        let t0 = Instant::now();
        c.push(point("a"), t0);
        assert!(c.push(point("b"), t0).is_empty());
        let result = ComponentMessage {
            kind: Some(component_message::Kind::Result(CommandResult::default())),
        };
        assert_eq!(ids(&c.push(result, t0)), [vec!["b"], vec!["result"]]);
    }

    #[test]
    fn a_full_batch_goes_without_waiting() {
        let mut c = Coalescer::default();
        let t0 = Instant::now();
        c.push(point("first"), t0);
        let mut sent = Vec::new();
        for i in 0..MAX_REPORTS {
            sent.extend(c.push(point(&i.to_string()), t0));
        }
        assert_eq!(sent.len(), 1);
        assert_eq!(ids(&sent)[0].len(), MAX_REPORTS);
        assert_eq!(c.due(), None);
    }
}
