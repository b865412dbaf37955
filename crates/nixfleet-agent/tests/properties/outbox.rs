//! The outbox against a model of a connection that breaks mid-batch: every
//! line and status arrives in order, and only what was not acknowledged
//! arrives twice.

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Line {
        len: usize,
    },
    Status,
    /// The writer takes a batch and writes it; then the dashboard
    /// acknowledges it, or the connection breaks after the dashboard got
    /// the first `received` frames of it.
    Batch {
        max_bytes: usize,
        broken: Option<usize>,
    },
    /// The dashboard acknowledges everything written so far.
    Acknowledge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop_oneof![0usize..40, 0usize..3000].prop_map(|len| Op::Line { len }),
        1 => Just(Op::Status),
        3 => (prop_oneof![1usize..200, 1usize..20_000], prop::option::weighted(0.2, 0usize..50))
            .prop_map(|(max_bytes, broken)| Op::Batch { max_bytes, broken }),
        1 => Just(Op::Acknowledge),
    ]
}

/// What one frame was: a line or a status, with its number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    Line(u64),
    Status(u64),
}

fn classify(item: &Item) -> Frame {
    let v: Value = serde_json::from_str(&item.frame).unwrap();
    let n = v["payload"]["n"].as_u64().unwrap();
    match v["type"].as_str() {
        Some("output") => Frame::Line(n),
        _ => Frame::Status(n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(500)))]

    #[test]
    fn outbox_delivers_every_frame_in_order_and_repeats_only_after_a_break(
        ops in prop::collection::vec(op(), 0..200),
    ) {
        let outbox = Outbox::default();
        let (mut lines, mut statuses) = (0u64, 0u64);
        let mut received: Vec<Frame> = Vec::new();
        let mut batch = Vec::new();
        let mut resend_budget = 0usize;
        // Written and not acknowledged: what a break may send again.
        let mut unacknowledged = 0usize;
        let mut last_written = None;
        for op in &ops {
            match *op {
                Op::Line { len } => {
                    let frame = json!({"type": "output", "payload": {"n": lines, "line": "x".repeat(len)}}).to_string();
                    outbox.push(Item::from_log(frame, 1, lines + 1));
                    lines += 1;
                }
                Op::Status => {
                    outbox.push_frame(json!({"type": "status", "payload": {"n": statuses}}).to_string());
                    statuses += 1;
                }
                Op::Batch { max_bytes, broken } => {
                    batch.clear();
                    outbox.take_batch(max_bytes, &mut batch);
                    match broken {
                        None => {
                            received.extend(batch.iter().map(classify));
                            outbox.confirm_written();
                            unacknowledged += batch.len();
                            last_written = batch.last().map(|i| i.seq).or(last_written);
                        }
                        Some(got) => {
                            received.extend(batch.iter().take(got).map(classify));
                            resend_budget += unacknowledged + got.min(batch.len());
                            unacknowledged = 0;
                            last_written = None;
                            outbox.requeue_in_flight();
                        }
                    }
                }
                Op::Acknowledge => {
                    if let Some(seq) = last_written {
                        outbox.acknowledge(seq);
                    }
                    unacknowledged = 0;
                }
            }
        }
        while !outbox.is_empty() {
            batch.clear();
            outbox.take_batch(64 * 1024, &mut batch);
            received.extend(batch.iter().map(classify));
            outbox.confirm_written();
            if let Some(last) = batch.last() {
                outbox.acknowledge(last.seq);
            }
        }

        // Frames arrive in order; a repeat goes back, a new frame is the
        // next one; nothing is skipped.
        let (mut next_line, mut next_status) = (0u64, 0u64);
        let mut repeats = 0usize;
        for frame in &received {
            match *frame {
                Frame::Line(n) if n == next_line => next_line += 1,
                Frame::Status(n) if n == next_status => next_status += 1,
                Frame::Line(n) if n < next_line => repeats += 1,
                Frame::Status(n) if n < next_status => repeats += 1,
                other => prop_assert!(false, "{:?} skips ahead (next line {}, next status {})", other, next_line, next_status),
            }
        }
        prop_assert_eq!(next_line, lines, "lines lost");
        prop_assert_eq!(next_status, statuses, "statuses lost");
        prop_assert!(repeats <= resend_budget, "{} repeats, {} frames were in flight on broken connections", repeats, resend_budget);
    }
}
