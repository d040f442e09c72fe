// ACKs of a single range are the common case here, not a mistaken `vec![a; n]`.
#![allow(clippy::single_range_in_vec_init)]

use super::*;
use proptest::prelude::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn at(n: u64) -> Instant {
    Instant::ZERO + ms(n)
}

/// An RTT estimator with a settled 100 ms RTT, no variance and no ACK delay allowance:
/// loss_delay = 112.5 ms, pto_period = 101 ms (the 1 ms granularity floor).
fn settled() -> RttEstimator {
    let mut rtt = RttEstimator::new(ms(333), Duration::ZERO);
    for _ in 0..200 {
        rtt.update(ms(100), Duration::ZERO);
    }
    assert_eq!(rtt.var(), Duration::ZERO);
    rtt
}

/// Sends `n` data packets of 1000 bytes, `gap` apart from `start`; payload = packet number.
fn send(sp: &mut SentPackets<u64>, n: u64, start: Instant, gap: Duration) {
    for i in 0..n {
        let pn = sp.next_packet_number();
        assert_eq!(
            sp.on_sent(SentInfo::data(start + gap * i as u32, 1000), pn),
            pn
        );
    }
}

fn numbers(ps: &[SentPacket<u64>]) -> Vec<u64> {
    ps.iter().map(|p| p.number).collect()
}

fn ack(
    sp: &mut SentPackets<u64>,
    ranges: &[Range<u64>],
    now: Instant,
    rtt: &mut RttEstimator,
) -> AckOutcome<u64> {
    let out = sp.on_ack(ranges.iter().cloned(), Duration::ZERO, now, rtt);
    check_invariants(sp);
    out
}

fn check_invariants(sp: &SentPackets<u64>) {
    let in_flight: u64 = sp
        .outstanding()
        .filter(|(_, i, _)| i.in_flight)
        .map(|(_, i, _)| u64::from(i.size))
        .sum();
    assert_eq!(sp.bytes_in_flight(), in_flight);
    let eliciting = sp.outstanding().filter(|(_, i, _)| i.ack_eliciting).count();
    assert_eq!(sp.has_ack_eliciting_in_flight(), eliciting > 0);
    for (pn, _, &payload) in sp.outstanding() {
        assert_eq!(pn, payload);
        assert!(pn < sp.next_packet_number());
    }
    // The slot ring: both ends outstanding, and few tombstones (bounded growth).
    assert_eq!(sp.outstanding().count(), sp.len());
    assert!(sp.packets.front().is_none_or(|s| s.packet.is_some()));
    assert!(sp.packets.back().is_none_or(|s| s.packet.is_some()));
    assert!(
        sp.packets.len() <= sp.len() + PACKET_THRESHOLD as usize,
        "{} slots for {} packets",
        sp.packets.len(),
        sp.len()
    );
}

#[test]
fn numbers_count_up_and_acks_remove_packets() {
    let mut sp = SentPackets::new();
    let mut rtt = RttEstimator::default();
    send(&mut sp, 5, at(0), ms(1));
    assert_eq!(sp.next_packet_number(), 5);
    assert_eq!(sp.bytes_in_flight(), 5000);
    let out = ack(&mut sp, &[3..5, 0..1], at(100), &mut rtt);
    assert_eq!(numbers(&out.newly_acked), vec![0, 3, 4]);
    assert_eq!(out.newly_acked[1].payload, 3);
    assert_eq!(sp.largest_acked(), Some(4));
    // 1 is 3 below the largest acknowledged: lost by the packet threshold; 2 is not yet.
    assert_eq!(numbers(&out.lost.packets), vec![1]);
    assert_eq!(sp.bytes_in_flight(), 1000);
    // Duplicates change nothing.
    let out = ack(&mut sp, &[0..5], at(101), &mut rtt);
    assert_eq!(numbers(&out.newly_acked), vec![2]);
    let out = ack(&mut sp, &[0..5], at(102), &mut rtt);
    assert!(out.newly_acked.is_empty() && !out.rtt_sample_taken);
    assert!(sp.is_empty());
}

#[test]
fn rtt_sample_rules_of_rfc_9002_5_1() {
    let mut sp = SentPackets::new();
    let mut rtt = RttEstimator::default();
    send(&mut sp, 2, at(0), ms(10)); // 0 @ 0 ms, 1 @ 10 ms
    let pn = sp.on_sent(SentInfo::ack_only(at(20), 50), 2); // 2: ACK-only
    assert_eq!(pn, 2);

    // Largest acknowledged (1) newly acknowledged and ack-eliciting: a sample of 90 ms.
    let out = ack(&mut sp, &[1..2], at(100), &mut rtt);
    assert!(out.rtt_sample_taken);
    assert_eq!(rtt.latest(), ms(90));
    // Largest acknowledged (1) is not new: no sample even though 0 is newly acknowledged.
    let out = ack(&mut sp, &[0..2], at(150), &mut rtt);
    assert_eq!(numbers(&out.newly_acked), vec![0]);
    assert!(!out.rtt_sample_taken);
    // Only a non-ack-eliciting packet newly acknowledged: no sample.
    let out = ack(&mut sp, &[2..3], at(200), &mut rtt);
    assert_eq!(numbers(&out.newly_acked), vec![2]);
    assert!(!out.rtt_sample_taken);
    assert_eq!(rtt.latest(), ms(90));
}

#[test]
fn ack_delay_reaches_the_estimator() {
    let mut sp = SentPackets::new();
    let mut rtt = RttEstimator::new(ms(333), ms(25));
    send(&mut sp, 2, at(0), ms(100));
    sp.on_ack([0..1], ms(20), at(50), &mut rtt);
    sp.on_ack([1..2], ms(20), at(170), &mut rtt);
    // Second sample 70 ms, minus 20 ms of delay (70 >= min_rtt 50 + 20): adjusted 50.
    assert_eq!(rtt.smoothed(), ms(50));
}

#[test]
fn time_threshold_arms_the_loss_timer() {
    let rtt = &mut settled();
    let mut sp = SentPackets::new();
    assert_eq!(
        SentPackets::<u64>::loss_delay(rtt),
        Duration::from_micros(112_500)
    );
    send(&mut sp, 3, at(0), ms(10)); // 0 @ 0, 1 @ 10, 2 @ 20
    let out = ack(&mut sp, &[2..3], at(120), rtt);
    // latest_rtt = 100 ms; 0 was sent 120 ms ago > 112.5 ms: lost. 1 (110 ms ago) is not yet.
    assert_eq!(numbers(&out.lost.packets), vec![0]);
    assert_eq!(
        sp.loss_time(),
        Some(at(10) + Duration::from_micros(112_500))
    );
    assert_eq!(sp.next_timeout(rtt), sp.loss_time());
    // Early wake-up: nothing.
    assert_eq!(sp.on_timeout(at(122), rtt), None);
    let deadline = sp.loss_time().unwrap();
    match sp.on_timeout(deadline, rtt) {
        Some(Timeout::Lost(report)) => {
            assert_eq!(numbers(&report.packets), vec![1]);
            assert_eq!(report.congestion_event, Some(at(10)));
        }
        other => panic!("expected a loss, got {other:?}"),
    }
    assert_eq!(sp.loss_time(), None);
    check_invariants(&sp);
}

#[test]
fn time_threshold_uses_the_larger_of_smoothed_and_latest_rtt_and_granularity() {
    let mut rtt = settled();
    rtt.update(ms(200), Duration::ZERO); // latest 200, smoothed 112.5
    assert_eq!(SentPackets::<u64>::loss_delay(&rtt), ms(225));
    let mut tiny = RttEstimator::new(Duration::from_micros(10), Duration::ZERO);
    tiny.update(Duration::from_micros(10), Duration::ZERO);
    assert_eq!(SentPackets::<u64>::loss_delay(&tiny), GRANULARITY);
}

#[test]
fn pto_backs_off_exponentially_and_resets_on_ack() {
    let rtt = &mut settled();
    let mut sp = SentPackets::new();
    assert_eq!(sp.next_timeout(rtt), None);
    send(&mut sp, 2, at(0), ms(5)); // last ack-eliciting at 5 ms
    let period = rtt.pto_period();
    assert_eq!(period, ms(101));
    assert_eq!(sp.next_timeout(rtt), Some(at(5) + period));
    assert_eq!(sp.on_timeout(at(5) + (period - ms(1)), rtt), None);
    assert_eq!(sp.on_timeout(at(5) + period, rtt), Some(Timeout::Probe));
    assert_eq!(sp.pto_count(), 1);
    assert_eq!(sp.next_timeout(rtt), Some(at(5) + period * 2));
    assert_eq!(sp.on_timeout(at(5) + period * 2, rtt), Some(Timeout::Probe));
    assert_eq!(sp.next_timeout(rtt), Some(at(5) + period * 4));
    // A probe is sent; its acknowledgement resets the backoff.
    let probe_time = at(5) + period * 2;
    sp.on_sent(SentInfo::data(probe_time, 1000), 2);
    let out = ack(&mut sp, &[2..3], probe_time + ms(100), rtt);
    assert_eq!(out.newly_acked.len(), 1);
    assert_eq!(sp.pto_count(), 0);
    // 0 and 1 were sent long ago: lost by time.
    assert_eq!(numbers(&out.lost.packets), vec![0, 1]);
    assert_eq!(sp.next_timeout(rtt), None);
}

#[test]
fn pto_backoff_saturates() {
    let rtt = settled();
    let mut sp = SentPackets::new();
    send(&mut sp, 1, at(0), ms(1));
    for _ in 0..100 {
        sp.on_pto();
    }
    let deadline = sp.pto_deadline(&rtt).unwrap();
    assert_eq!(
        deadline,
        at(0) + rtt.pto_period() * (1 << MAX_PTO_BACKOFF_EXPONENT)
    );
}

#[test]
fn pto_backoff_stops_at_the_configured_cap_but_never_below_one_period() {
    let rtt = settled(); // period 101 ms
    let mut sp = SentPackets::new();
    sp.set_max_pto_interval(ms(350));
    send(&mut sp, 1, at(0), ms(1));
    let period = rtt.pto_period();
    let waits: Vec<Duration> = (0..5)
        .map(|_| {
            let w = sp.pto_deadline(&rtt).unwrap() - at(0);
            sp.on_pto();
            w
        })
        .collect();
    assert_eq!(waits, [period, period * 2, ms(350), ms(350), ms(350)]);
    // A cap shorter than one period does not make probes come faster than the period.
    sp.set_max_pto_interval(ms(10));
    assert_eq!(sp.pto_deadline(&rtt), Some(at(0) + period));
}

#[test]
fn no_pto_without_ack_eliciting_packets_in_flight() {
    let rtt = settled();
    let mut sp = SentPackets::new();
    sp.on_sent(SentInfo::ack_only(at(0), 40), 0);
    let padding = SentInfo {
        ack_eliciting: false,
        ..SentInfo::data(at(1), 1200)
    };
    sp.on_sent(padding, 1);
    assert_eq!(sp.bytes_in_flight(), 1200);
    assert_eq!(sp.next_timeout(&rtt), None);
    assert_eq!(sp.on_timeout(at(100_000), &rtt), None);
}

/// With a settled 100 ms RTT (no variance, no ACK delay): sends packet 0 and gets it
/// acknowledged (the first RTT sample of this tracker), then sends `n` more `gap` apart from
/// t = 1 s. The persistent congestion period is 3 × (100 ms + 1 ms) = 303 ms.
fn after_first_sample(n: u64, gap: Duration) -> (SentPackets<u64>, RttEstimator) {
    let mut rtt = settled();
    let mut sp = SentPackets::new();
    send(&mut sp, 1, at(0), ms(1));
    ack(&mut sp, &[0..1], at(100), &mut rtt);
    send(&mut sp, n, at(1_000), gap);
    assert_eq!(rtt.pto_period() * PERSISTENT_CONGESTION_THRESHOLD, ms(303));
    (sp, rtt)
}

/// Acknowledges only the last packet sent, 100 ms after it was sent (keeping the RTT
/// estimate unchanged), plus `extra` ranges.
fn ack_last(
    sp: &mut SentPackets<u64>,
    rtt: &mut RttEstimator,
    extra: &[Range<u64>],
) -> AckOutcome<u64> {
    let last = sp.next_packet_number() - 1;
    let sent = sp.outstanding().next_back().unwrap().1.time_sent;
    let mut ranges = extra.to_vec();
    ranges.push(last..last + 1);
    ack(sp, &ranges, sent + ms(100), rtt)
}

#[test]
fn persistent_congestion_of_rfc_9002_7_6() {
    let gap = Duration::from_micros(50_500);
    // Packets 1..=8, 50.5 ms apart; 8 is acknowledged; 1..=7 are lost, and 1 and 7 were sent
    // exactly 303 ms apart: not *more* than the period.
    let (mut sp, mut rtt) = after_first_sample(8, gap);
    let out = ack_last(&mut sp, &mut rtt, &[]);
    assert_eq!(numbers(&out.lost.packets), (1..=7).collect::<Vec<_>>());
    assert!(!out.lost.persistent_congestion);
    assert_eq!(out.lost.congestion_event, Some(at(1_000) + gap * 6));

    // One more packet makes the span 353.5 ms.
    let (mut sp, mut rtt) = after_first_sample(9, gap);
    let out = ack_last(&mut sp, &mut rtt, &[]);
    assert_eq!(out.lost.packets.len(), 8);
    assert!(out.lost.persistent_congestion);
}

#[test]
fn an_acknowledged_packet_in_between_breaks_persistent_congestion() {
    let (mut sp, mut rtt) = after_first_sample(12, Duration::from_micros(50_500));
    // 5 is acknowledged with 12: the runs 1..=4 and 6..=11 each span less than 303 ms,
    // although 1 and 11 are 505 ms apart.
    let out = ack_last(&mut sp, &mut rtt, &[5..6]);
    assert_eq!(out.lost.packets.len(), 10);
    assert!(!out.lost.persistent_congestion);
}

#[test]
fn persistent_congestion_needs_an_rtt_sample_and_ack_eliciting_endpoints() {
    // No RTT sample before the losses: the packets sent before it do not count.
    let mut rtt = settled();
    let mut sp = SentPackets::new();
    send(&mut sp, 20, at(0), ms(100));
    let out = ack_last(&mut sp, &mut rtt, &[]);
    assert_eq!(out.lost.packets.len(), 19);
    assert!(out.rtt_sample_taken);
    assert!(!out.lost.persistent_congestion);

    // The only losses spanning the period begin with an MTU probe or an ACK-only packet.
    let (mut sp, mut rtt) = after_first_sample(0, ms(1));
    let probe = SentInfo {
        mtu_probe: true,
        ..SentInfo::data(at(1_000), 1400)
    };
    sp.on_sent(probe, 1);
    sp.on_sent(SentInfo::ack_only(at(1_050), 40), 2);
    sp.on_sent(SentInfo::data(at(1_800), 1000), 3);
    sp.on_sent(SentInfo::data(at(1_950), 1000), 4);
    sp.on_sent(SentInfo::data(at(2_000), 1000), 5);
    let out = ack_last(&mut sp, &mut rtt, &[]);
    assert_eq!(numbers(&out.lost.packets), vec![1, 2, 3, 4]);
    assert!(!out.lost.persistent_congestion);
    // The probe's loss is not a congestion signal; the event is dated by packet 4.
    assert_eq!(out.lost.congestion_event, Some(at(1_950)));
}

#[test]
fn mtu_probe_loss_alone_is_not_a_congestion_event() {
    let mut rtt = RttEstimator::default();
    let mut sp = SentPackets::new();
    let probe = SentInfo {
        mtu_probe: true,
        ..SentInfo::data(at(0), 1400)
    };
    sp.on_sent(probe, 0);
    send(&mut sp, 3, at(1), ms(1));
    let out = ack(&mut sp, &[1..4], at(100), &mut rtt);
    assert_eq!(numbers(&out.lost.packets), vec![0]);
    assert_eq!(out.lost.congestion_event, None);
}

#[test]
fn acks_of_unsent_packets_are_ignored_and_counted() {
    let mut rtt = RttEstimator::default();
    let mut sp = SentPackets::new();
    send(&mut sp, 3, at(0), ms(1));
    let before = sp.clone();
    for ranges in [vec![0..4], vec![1..2, 5..6], vec![0..u64::MAX]] {
        let out = ack(&mut sp, &ranges, at(50), &mut rtt);
        assert!(out.acked_unsent);
        assert!(out.newly_acked.is_empty() && out.lost.is_empty());
    }
    assert_eq!(sp.protocol_violations(), 3);
    assert!(!rtt.has_sample());
    let mut expected = before;
    expected.protocol_violations = 3;
    assert_eq!(sp, expected);
}

#[test]
fn empty_and_inverted_ranges_are_skipped() {
    let mut rtt = RttEstimator::default();
    let mut sp = SentPackets::new();
    send(&mut sp, 3, at(0), ms(1));
    #[allow(clippy::reversed_empty_ranges)]
    let out = ack(&mut sp, &[5..1, 2..2, u64::MAX..0, 1..2], at(50), &mut rtt);
    assert_eq!(numbers(&out.newly_acked), vec![1]);
    assert!(!out.acked_unsent);
    let out = ack(&mut sp, &[], at(60), &mut rtt);
    assert!(out.newly_acked.is_empty());
}

#[test]
fn ack_only_packets_are_tracked_up_to_a_bound() {
    let mut rtt = RttEstimator::default();
    let mut sp = SentPackets::new();
    for i in 0..(MAX_UNTRACKED_ACK_ONLY as u64 + 10) {
        assert_eq!(sp.on_sent(SentInfo::ack_only(at(i), 40), i), i);
    }
    assert_eq!(sp.len(), MAX_UNTRACKED_ACK_ONLY);
    // Acknowledging them frees room again.
    ack(&mut sp, &[0..100], at(5_000), &mut rtt);
    let pn = sp.next_packet_number();
    sp.on_sent(SentInfo::ack_only(at(5_001), 40), pn);
    assert!(sp.outstanding().any(|(n, _, _)| n == pn));
}

#[test]
fn drain_returns_everything_and_resets_timers() {
    let rtt = settled();
    let mut sp = SentPackets::new();
    send(&mut sp, 4, at(0), ms(1));
    let drained = sp.drain();
    assert_eq!(numbers(&drained), vec![0, 1, 2, 3]);
    assert_eq!(sp.bytes_in_flight(), 0);
    assert_eq!(sp.next_timeout(&rtt), None);
    assert_eq!(sp.next_packet_number(), 4);
    check_invariants(&sp);
}

// ---- property test: conservation and accounting under random ACK patterns ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_packet_ends_up_exactly_once(
        steps in proptest::collection::vec((1u64..6, proptest::collection::vec((0u64..40, 0u64..4), 0..4), 0u64..300), 1..40),
    ) {
        let mut rtt = RttEstimator::default();
        let mut sp: SentPackets<u64> = SentPackets::new();
        let mut now = at(0);
        let mut seen = std::collections::BTreeSet::new();
        for (sends, acks, advance) in steps {
            for _ in 0..sends {
                let pn = sp.next_packet_number();
                let eliciting = pn % 5 != 4;
                let info = SentInfo { ack_eliciting: eliciting, in_flight: eliciting, ..SentInfo::data(now, 1000 + (pn % 7) as u16) };
                sp.on_sent(info, pn);
            }
            now += ms(advance);
            let next = sp.next_packet_number();
            let ranges: Vec<Range<u64>> = acks.iter().map(|&(s, l)| s..(s + l).min(next)).collect();
            let out = ack(&mut sp, &ranges, now, &mut rtt);
            prop_assert!(!out.acked_unsent);
            for p in out.newly_acked.iter().chain(&out.lost.packets) {
                prop_assert!(seen.insert(p.number), "packet {} reported twice", p.number);
                prop_assert_eq!(p.number, p.payload);
            }
            for p in &out.newly_acked {
                prop_assert!(ranges.iter().any(|r| r.contains(&p.number)));
            }
            if let Some(Timeout::Lost(report)) = sp.on_timeout(now, &rtt) {
                for p in &report.packets {
                    prop_assert!(seen.insert(p.number));
                }
            }
            check_invariants(&sp);
        }
        for (pn, _, _) in sp.outstanding() {
            prop_assert!(!seen.contains(&pn));
        }
        prop_assert_eq!(seen.len() + sp.len(), sp.next_packet_number() as usize);
    }
}

#[test]
fn release_memory_forgets_only_pure_acks_and_only_when_nothing_else_is_out() {
    let mut rtt = settled();
    let mut sp = SentPackets::<u64>::new();
    send(&mut sp, 2, at(0), ms(1));
    sp.on_sent(SentInfo::ack_only(at(2), 50), 2);
    // Data in flight: nothing changes.
    assert!(!sp.has_spare_capacity());
    let before = sp.clone();
    sp.release_memory();
    assert_eq!(sp, before);
    // Once the data is acknowledged only the pure ACK is left: it is forgotten, the ring
    // freed, and a late acknowledgement of it is harmless.
    let out = ack(&mut sp, &[0..2], at(100), &mut rtt);
    assert_eq!(numbers(&out.newly_acked), [0, 1]);
    assert_eq!(sp.len(), 1);
    assert!(sp.has_spare_capacity());
    sp.release_memory();
    check_invariants(&sp);
    assert!(sp.is_empty() && !sp.has_spare_capacity());
    assert_eq!((sp.loss_time(), sp.next_timeout(&rtt)), (None, None));
    let out = ack(&mut sp, &[2..3], at(101), &mut rtt);
    assert!(out.newly_acked.is_empty() && !out.acked_unsent);
    // Numbering goes on.
    assert_eq!(sp.next_packet_number(), 3);
}
