//! Shape tests for both controllers, on a deterministic ack-clocked model with virtual time.

use core::time::Duration;

use super::*;

const MSS: u16 = 1200;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A window-limited flow over a path with a fixed RTT, in rounds: each round sends one window
/// of MSS-sized packets at the round's start; their ACKs (one per packet) arrive spread evenly
/// over the round, the last exactly one RTT after the send, when the next round starts. (The
/// controller only sees send times and ACK times, so spreading ACKs over the round rather than
/// over the following RTT keeps time moving forward without changing what it computes.)
struct Flow {
    cc: CongestionController,
    rtt: RttEstimator,
    path_rtt: Duration,
    now: Instant,
    /// When the last round's packets were sent.
    last_sent: Instant,
}

impl Flow {
    fn new(algorithm: CongestionAlgorithm, path_rtt: Duration) -> Flow {
        let mut rtt = RttEstimator::new(path_rtt, Duration::ZERO);
        rtt.update(path_rtt, Duration::ZERO);
        Flow {
            cc: CongestionController::new(algorithm, MSS),
            rtt,
            path_rtt,
            now: Instant::ZERO + ms(1),
            last_sent: Instant::ZERO,
        }
    }

    /// One round: sends a window at `now`, delivers every ACK (calling `each(ack_time,
    /// window_before, window_after)`), and leaves `now` one RTT later.
    fn round_with(&mut self, app_limited: bool, mut each: impl FnMut(Instant, u64, u64)) {
        let sent = self.now;
        let packets = self.cc.window().div_ceil(u64::from(MSS));
        for _ in 0..packets {
            self.cc.on_packet_sent(sent, u64::from(MSS));
        }
        for i in 0..packets {
            let at = sent + self.path_rtt * (i + 1) as u32 / packets as u32;
            let before = self.cc.window();
            self.cc
                .on_ack(at, sent, u64::from(MSS), &self.rtt, app_limited);
            each(at, before, self.cc.window());
        }
        self.now = sent + self.path_rtt;
        self.last_sent = sent;
    }

    fn round(&mut self) {
        self.round_with(false, |_, _, _| {});
    }

    /// A loss of a packet sent in the round that just ended, detected now.
    fn loss(&mut self, persistent: bool) {
        self.cc
            .on_congestion_event(self.now, self.last_sent, persistent);
    }

    /// Slow start until the window reaches `bytes`, then a loss; then the one round whose
    /// packets were sent during recovery.
    fn grow_then_lose(&mut self, bytes: u64) {
        while self.cc.window() < bytes {
            self.round();
        }
        self.loss(false);
        self.round();
    }
}

fn both() -> [CongestionAlgorithm; 2] {
    [CongestionAlgorithm::NewReno, CongestionAlgorithm::Cubic]
}

#[test]
fn window_rules_of_rfc_9002_7_2() {
    assert_eq!(initial_window(1200), 12_000);
    assert_eq!(initial_window(1500), 14_720);
    assert_eq!(initial_window(9000), 18_000);
    assert_eq!(minimum_window(1200), 2_400);
    for alg in both() {
        let cc = CongestionController::new(alg, 1200);
        assert_eq!(cc.algorithm(), alg);
        assert_eq!(cc.window(), 12_000);
        assert_eq!(cc.ssthresh(), u64::MAX);
        assert!(cc.in_slow_start());
        // Absurd datagram sizes are raised to the floor.
        let cc = CongestionController::new(alg, 0);
        assert_eq!(cc.max_datagram_size(), MIN_DATAGRAM_SIZE);
        assert_eq!(cc.window(), 10 * u64::from(MIN_DATAGRAM_SIZE));
    }
}

#[test]
fn slow_start_doubles_per_rtt() {
    for alg in both() {
        let mut f = Flow::new(alg, ms(50));
        for _ in 0..5 {
            let w = f.cc.window();
            f.round();
            assert_eq!(f.cc.window(), 2 * w, "{alg:?}");
        }
    }
}

#[test]
fn loss_reduces_by_the_algorithms_factor() {
    for (alg, factor) in [
        (CongestionAlgorithm::NewReno, 0.5),
        (CongestionAlgorithm::Cubic, 0.7),
    ] {
        let mut f = Flow::new(alg, ms(50));
        f.round();
        f.round();
        let w = f.cc.window();
        f.loss(false);
        let expected = (w as f64 * factor) as u64;
        assert_eq!(f.cc.window(), expected, "{alg:?}");
        assert_eq!(f.cc.ssthresh(), expected, "{alg:?}");
        assert!(!f.cc.in_slow_start());
    }
}

#[test]
fn reduction_never_goes_below_the_minimum_window() {
    for alg in both() {
        let mut cc = CongestionController::new(alg, MSS);
        let mut now = Instant::ZERO;
        for _ in 0..20 {
            now += ms(100);
            cc.on_congestion_event(now, now, false);
        }
        assert_eq!(cc.window(), minimum_window(MSS), "{alg:?}");
    }
}

#[test]
fn one_reduction_per_recovery_period() {
    for alg in both() {
        let mut cc = CongestionController::new(alg, MSS);
        let t0 = Instant::ZERO + ms(10);
        let t1 = t0 + ms(100);
        cc.on_congestion_event(t1, t0, false);
        let w = cc.window();
        assert!(cc.in_recovery(t0) && cc.in_recovery(t1));
        assert!(!cc.in_recovery(t1 + Duration::from_nanos(1)));
        // More losses of packets sent before recovery started: no further reduction.
        cc.on_congestion_event(t1 + ms(5), t0 + ms(50), false);
        cc.on_congestion_event(t1 + ms(10), t1, false);
        assert_eq!(cc.window(), w, "{alg:?}");
        // ACKs of packets sent before recovery started do not grow the window either.
        let rtt = RttEstimator::default();
        cc.on_ack(t1 + ms(20), t0 + ms(90), 100_000, &rtt, false);
        assert_eq!(cc.window(), w, "{alg:?}");
        // A loss of a packet sent after recovery started is a new congestion event.
        cc.on_congestion_event(t1 + ms(200), t1 + ms(1), false);
        assert!(cc.window() < w, "{alg:?}");
    }
}

#[test]
fn persistent_congestion_collapses_to_the_minimum_window() {
    for alg in both() {
        let mut f = Flow::new(alg, ms(50));
        for _ in 0..4 {
            f.round();
        }
        f.loss(true);
        assert_eq!(f.cc.window(), minimum_window(MSS), "{alg:?}");
        // B.8 ends the recovery period: the next ACK grows the window (slow start, as
        // ssthresh was set by the congestion event).
        assert!(f.cc.in_slow_start());
        assert!(!f.cc.in_recovery(f.last_sent));
        f.round();
        assert_eq!(f.cc.window(), 2 * minimum_window(MSS), "{alg:?}");
        // Even while already in recovery, persistent congestion still collapses the window.
        f.loss(false);
        f.loss(true);
        assert_eq!(f.cc.window(), minimum_window(MSS), "{alg:?}");
    }
}

#[test]
fn application_limited_acks_do_not_grow_the_window() {
    for alg in both() {
        let mut f = Flow::new(alg, ms(50));
        let w = f.cc.window();
        f.round_with(true, |_, _, _| {});
        assert_eq!(f.cc.window(), w, "{alg:?} slow start");
        f.grow_then_lose(100_000);
        f.round();
        let w = f.cc.window();
        f.round_with(true, |_, _, _| {});
        assert_eq!(f.cc.window(), w, "{alg:?} congestion avoidance");
    }
}

#[test]
fn new_reno_adds_one_datagram_per_window_acknowledged() {
    let mut f = Flow::new(CongestionAlgorithm::NewReno, ms(50));
    f.grow_then_lose(200_000);
    for _ in 0..10 {
        let w = f.cc.window();
        // Exactly one window of bytes acknowledged per round: packets are `MSS` and windows
        // stay multiples of it here.
        assert_eq!(w % u64::from(MSS), 0);
        f.round();
        assert_eq!(f.cc.window(), w + u64::from(MSS));
    }
}

#[test]
fn mtu_update_and_path_change() {
    for alg in both() {
        let mut f = Flow::new(alg, ms(50));
        f.loss(false);
        f.loss(true);
        assert_eq!(f.cc.window(), 2_400);
        f.cc.on_mtu_update(1400);
        assert_eq!(f.cc.max_datagram_size(), 1400);
        assert_eq!(f.cc.window(), 2_800, "{alg:?}");
        f.cc.on_path_change();
        assert_eq!(f.cc, CongestionController::new(alg, 1400), "{alg:?}");
    }
}

#[test]
fn huge_acks_saturate_at_max_window() {
    for alg in both() {
        let mut cc = CongestionController::new(alg, MSS);
        let rtt = RttEstimator::default();
        let t = Instant::ZERO + ms(1);
        for _ in 0..3 {
            cc.on_ack(t, t, u64::MAX, &rtt, false);
        }
        assert_eq!(cc.window(), MAX_WINDOW, "{alg:?}");
        cc.on_congestion_event(t, t, false);
        for _ in 0..3 {
            cc.on_ack(t + ms(1), t + ms(1), u64::MAX, &rtt, false);
        }
        assert!(cc.window() <= MAX_WINDOW, "{alg:?}");
    }
}

// ---- CUBIC shapes ----

fn cubic(f: &Flow) -> &Cubic {
    match &f.cc {
        CongestionController::Cubic(c) => c,
        CongestionController::NewReno(_) => unreachable!(),
    }
}

/// With a window of 1000 datagrams and a 100 ms RTT, CUBIC is well outside the Reno-friendly
/// region. After a loss the window must come back to W_max at time K after the stage began,
/// growing concavely before and convexly after.
#[test]
fn cubic_returns_to_w_max_at_k_concave_then_convex() {
    let mut f = Flow::new(CongestionAlgorithm::Cubic, ms(100));
    let w_loss = 1000 * u64::from(MSS);
    while f.cc.window() < w_loss {
        f.round();
    }
    // Trim to exactly W = 1000 datagrams by a loss and a collapse-free reset of the numbers:
    // the window at the loss is what W_max records.
    let w_at_loss = f.cc.window();
    f.loss(false);
    assert_eq!(cubic(&f).w_max(), w_at_loss);
    f.round(); // packets sent during recovery
    assert_eq!(f.cc.window(), (w_at_loss as f64 * 0.7) as u64);

    // K = cbrt((W_max - cwnd_epoch) / C) in segments = cbrt(0.3 W_max / 0.4).
    let w_max_seg = w_at_loss as f64 / f64::from(MSS);
    let k = (0.3 * w_max_seg / 0.4).cbrt();
    let mut samples: Vec<(f64, f64)> = Vec::new(); // (t since stage start, window)
    let mut start: Option<Instant> = None;
    while samples.last().is_none_or(|&(t, _)| t < 2.0 * k) {
        f.round_with(false, |at, before, after| {
            let s = *start.get_or_insert(at);
            samples.push(((at - s).as_secs_f64(), after as f64));
            // §4.4/§4.5 bound: growth per ACK is at most half the bytes acknowledged.
            assert!(after >= before && after - before <= u64::from(MSS) / 2);
        });
    }
    let got_k = cubic(&f).k().unwrap().as_secs_f64();
    assert!((got_k - k).abs() < 1e-9, "K = {got_k}, expected {k}");

    let window_at = |t: f64| -> f64 {
        samples
            .iter()
            .find(|&&(st, _)| st >= t)
            .map(|&(_, w)| w)
            .unwrap()
    };
    let at_k = window_at(k);
    let err = (at_k - w_at_loss as f64).abs() / w_at_loss as f64;
    assert!(err < 0.01, "window at K = {at_k}, W_max = {w_at_loss}");

    // Growth over successive half-second slices: shrinking before K, growing after.
    let slice = 0.5;
    let growth = |t: f64| window_at(t + slice) - window_at(t);
    let mut t = 0.0;
    let mut before_k = Vec::new();
    while t + slice < k - 0.5 {
        before_k.push(growth(t));
        t += slice;
    }
    assert!(
        before_k.windows(2).all(|w| w[1] < w[0]),
        "not concave: {before_k:?}"
    );
    let mut t = k + 0.5;
    let mut after_k = Vec::new();
    while t + slice < 2.0 * k - 1.0 {
        after_k.push(growth(t));
        t += slice;
    }
    assert!(
        after_k.windows(2).all(|w| w[1] > w[0]),
        "not convex: {after_k:?}"
    );
    assert!(window_at(2.0 * k - 1.0) > 1.1 * w_at_loss as f64);
}

/// On a short-RTT, small-window path the cubic curve barely moves within a few RTTs, and the
/// Reno estimate (α ≈ 0.53 datagrams per RTT, RFC 9438 §4.3) must carry the window.
#[test]
fn cubic_reno_friendly_region() {
    let mut f = Flow::new(CongestionAlgorithm::Cubic, ms(1));
    f.grow_then_lose(20 * u64::from(MSS));
    let w0 = f.cc.window() as f64 / f64::from(MSS);
    for _ in 0..10 {
        f.round();
    }
    let w10 = f.cc.window() as f64 / f64::from(MSS);
    // Pure CUBIC would add ~0.002 datagrams over 10 ms; Reno-friendly adds ~0.53 per RTT.
    let per_rtt = (w10 - w0) / 10.0;
    assert!(
        (0.4..=0.7).contains(&per_rtt),
        "grew {per_rtt} datagrams per RTT from {w0}"
    );
}

#[test]
fn cubic_fast_convergence_lowers_w_max() {
    let mut f = Flow::new(CongestionAlgorithm::Cubic, ms(100));
    f.grow_then_lose(100 * u64::from(MSS));
    let w_max = cubic(&f).w_max();
    f.round();
    let w = f.cc.window();
    assert!(w < w_max);
    f.loss(false);
    // The window did not get back to W_max: W_max = cwnd * (1 + β) / 2.
    assert_eq!(cubic(&f).w_max(), (w as f64 * 0.85) as u64);
}

#[test]
fn cubic_after_persistent_congestion_starts_with_k_zero() {
    let mut f = Flow::new(CongestionAlgorithm::Cubic, ms(100));
    f.grow_then_lose(100 * u64::from(MSS));
    f.loss(false);
    f.loss(true);
    let ssthresh = f.cc.ssthresh();
    while f.cc.in_slow_start() {
        f.round();
    }
    let w = f.cc.window();
    f.round();
    // RFC 9438 §4.8: K = 0 and W_max = the window when congestion avoidance began (at the
    // first ACK above ssthresh, within the last slow-start round).
    assert_eq!(cubic(&f).k(), Some(Duration::ZERO));
    assert!((ssthresh..=w).contains(&cubic(&f).w_max()));
}

/// RFC 9438 §5.8: `t` excludes application-limited and idle periods, so after a quiet spell
/// the window resumes growing from where the curve was, not from far up the convex branch.
#[test]
fn cubic_clock_stops_while_application_limited_or_idle() {
    let run = |app_limited_rounds: usize, idle: Duration| {
        let mut f = Flow::new(CongestionAlgorithm::Cubic, ms(100));
        f.grow_then_lose(200 * u64::from(MSS));
        for _ in 0..10 {
            f.round();
        }
        for _ in 0..app_limited_rounds {
            f.round_with(true, |_, _, _| {});
        }
        // No sends and no ACKs at all.
        f.now += idle;
        for _ in 0..10 {
            f.round();
        }
        f.cc.window()
    };
    let reference = run(0, Duration::ZERO);
    for (rounds, idle) in [(50, Duration::ZERO), (0, ms(30_000)), (50, ms(30_000))] {
        let w = run(rounds, idle);
        let diff = (w as f64 - reference as f64).abs() / reference as f64;
        assert!(
            diff < 0.01,
            "{rounds} app-limited rounds, {idle:?} idle: {w} vs {reference}"
        );
    }
    // Without the correction, 30 s on the cubic clock would have blown the window up.
    assert!(reference < 400 * u64::from(MSS));
}
