//! Which recovery points a target keeps (ASR's pruning rules, see ASR-FACTS.md):
//! everything newer than the retention window's start is a candidate; within the last two
//! hours every point is kept; beyond them one point per bucket is kept, the bucket size
//! depending on the retention window: up to 1 day -> 1 per hour; 2 to 7 days -> 1 per 2
//! hours; 8 to 15 days -> 1 per 2 hours for the first 7 days, then 1 per 4 hours. The newest
//! point is always kept.

use std::collections::HashSet;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The bucket width for a point `age_ms` old under a retention of `retention_ms`.
fn bucket_ms(retention_ms: i64, age_ms: i64) -> i64 {
    if retention_ms <= DAY {
        HOUR
    } else if retention_ms <= 7 * DAY || age_ms <= 7 * DAY {
        2 * HOUR
    } else {
        4 * HOUR
    }
}

/// Ids of the points to keep, given (id, time_ms) of every point, `now_ms` and the retention.
pub fn keep(points: &[(String, i64)], now_ms: i64, retention_ms: i64) -> HashSet<String> {
    let mut kept = HashSet::new();
    let mut seen_buckets = HashSet::new();
    let newest = points
        .iter()
        .max_by_key(|(_, t)| *t)
        .map(|(id, _)| id.clone());
    // Newest first, so each bucket keeps its latest point.
    let mut sorted: Vec<&(String, i64)> = points.iter().collect();
    sorted.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    for (id, t) in sorted {
        let age = now_ms - t;
        if age > retention_ms {
            continue;
        }
        if age <= 2 * HOUR {
            kept.insert(id.clone());
            continue;
        }
        let width = bucket_ms(retention_ms, age);
        if seen_buckets.insert((width, t.div_euclid(width))) {
            kept.insert(id.clone());
        }
    }
    if let Some(n) = newest {
        kept.insert(n);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(every_ms: i64, span_ms: i64, now: i64) -> Vec<(String, i64)> {
        (0..=span_ms / every_ms)
            .map(|i| {
                let t = now - i * every_ms;
                (format!("p{t}"), t)
            })
            .collect()
    }

    #[test]
    fn lab_retention_keeps_everything_inside_the_window() {
        let now = 100 * DAY;
        let p = points(5_000, 20 * 60_000, now);
        let k = keep(&p, now, 10 * 60_000);
        // 10 minutes of 5 s points (and the boundary one).
        assert_eq!(k.len(), 121);
    }

    #[test]
    fn one_day_keeps_two_hours_then_one_per_hour() {
        let now = 100 * DAY;
        let p = points(5 * 60_000, DAY, now);
        let k = keep(&p, now, DAY);
        let recent = p.iter().filter(|(_, t)| now - t <= 2 * HOUR).count();
        // 2 h of 5-minute points + one per hour for the remaining 22 h (bucket edges may add one).
        assert!(
            k.len() >= recent + 21 && k.len() <= recent + 23,
            "{}",
            k.len()
        );
    }

    #[test]
    fn fifteen_days_thin_to_four_hours_after_a_week() {
        let now = 100 * DAY;
        let p = points(HOUR, 15 * DAY, now);
        let k = keep(&p, now, 15 * DAY);
        let old: Vec<_> = p
            .iter()
            .filter(|(id, t)| now - t > 8 * DAY && k.contains(id))
            .collect();
        // Days 8 to 15 (7 days = 168 h) at one point per 4 hours: about 42.
        assert!((40..=44).contains(&old.len()), "{}", old.len());
        let week: Vec<_> = p
            .iter()
            .filter(|(id, t)| now - t > 2 * HOUR && now - t <= 7 * DAY && k.contains(id))
            .collect();
        // 2 h to 7 days (166 h) at one point per 2 hours: about 83.
        assert!((80..=86).contains(&week.len()), "{}", week.len());
    }

    #[test]
    fn the_newest_point_survives_even_past_retention() {
        let now = 100 * DAY;
        let p = vec![("old".to_string(), now - 2 * DAY)];
        assert!(keep(&p, now, HOUR).contains("old"));
    }
}
