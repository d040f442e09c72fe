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

// ---- Coupled (multipath) congestion control: RFC 6356 LIA ----

/// One path of a multipath connection in [`Multi`]: window-limited rounds as in [`Flow`], and
/// optionally a deterministic loss rate (every `loss_every`-th packet of the path is lost).
struct SimPath {
    cc: CongestionController,
    rtt: RttEstimator,
    path_rtt: Duration,
    round_start: Instant,
    /// Packets sent in the current round, and how many of them have been acknowledged or lost.
    packets: u64,
    done: u64,
    loss_every: u64,
    /// Packets of this path acknowledged or lost so far.
    count: u64,
    /// Bytes acknowledged so far.
    delivered: u64,
}

impl SimPath {
    fn start_round(&mut self, at: Instant) {
        self.round_start = at;
        self.packets = self.cc.window().div_ceil(u64::from(MSS));
        self.done = 0;
        for _ in 0..self.packets {
            self.cc.on_packet_sent(at, u64::from(MSS));
        }
    }

    /// When the next ACK of the round arrives: ACKs are spread evenly over the round.
    fn next_event(&self) -> Instant {
        let nanos = self.path_rtt.as_nanos() * u128::from(self.done + 1) / u128::from(self.packets);
        self.round_start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// A multipath connection: one controller per path, all paths sending at once, every ACK
/// delivered in time order, each ACK coupled by LIA over all paths (or not).
struct Multi {
    paths: Vec<SimPath>,
    coupled: bool,
    now: Instant,
}

impl Multi {
    /// Fresh controllers (slow start) on paths with the given RTTs and loss intervals.
    fn new(alg: CongestionAlgorithm, paths: &[(Duration, u64)], coupled: bool) -> Multi {
        let flows = paths
            .iter()
            .map(|&(rtt, loss_every)| (Flow::new(alg, rtt), loss_every))
            .collect();
        Multi::from_flows(flows, coupled)
    }

    /// Continues the given single-path flows as the paths of one connection.
    fn from_flows(flows: Vec<(Flow, u64)>, coupled: bool) -> Multi {
        let now = flows
            .iter()
            .map(|(f, _)| f.now)
            .max()
            .unwrap_or(Instant::ZERO);
        let paths = flows
            .into_iter()
            .map(|(f, loss_every)| {
                let mut p = SimPath {
                    cc: f.cc,
                    rtt: f.rtt,
                    path_rtt: f.path_rtt,
                    round_start: now,
                    packets: 0,
                    done: 0,
                    loss_every,
                    count: 0,
                    delivered: 0,
                };
                p.start_round(now);
                p
            })
            .collect();
        Multi {
            paths,
            coupled,
            now,
        }
    }

    fn coupling(&self) -> Option<Coupling> {
        if !self.coupled {
            return None;
        }
        Coupling::lia(self.paths.iter().map(|p| (p.cc.window(), p.rtt.smoothed())))
    }

    fn total_window(&self) -> u64 {
        self.paths.iter().map(|p| p.cc.window()).sum()
    }

    /// Delivers the next ACK (or loss) in time order; returns the path, its window before and
    /// after, and the coupling used.
    fn step(&mut self) -> (usize, u64, u64, Option<Coupling>) {
        let (i, at) = self
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.next_event()))
            .min_by_key(|&(i, at)| (at, i))
            .expect("at least one path");
        self.now = at;
        let coupling = self.coupling();
        let p = &mut self.paths[i];
        let before = p.cc.window();
        p.count += 1;
        p.done += 1;
        if p.count.is_multiple_of(p.loss_every) {
            p.cc.on_congestion_event(at, p.round_start, false);
        } else {
            p.cc.on_ack_coupled(at, p.round_start, u64::from(MSS), &p.rtt, false, coupling);
            p.delivered += u64::from(MSS);
        }
        let after = p.cc.window();
        if p.done == p.packets {
            p.start_round(at);
        }
        (i, before, after, coupling)
    }

    /// Runs for `d` of virtual time.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    fn delivered(&self) -> Vec<u64> {
        self.paths.iter().map(|p| p.delivered).collect()
    }
}

const NO_LOSS: u64 = u64::MAX;

/// A controller of `alg` in congestion avoidance at about `window` bytes (slow start, one
/// loss, and the round in recovery), as the flow that got it there.
fn in_congestion_avoidance(alg: CongestionAlgorithm, rtt: Duration, window: u64) -> Flow {
    let mut f = Flow::new(alg, rtt);
    f.grow_then_lose(window);
    assert!(!f.cc.in_slow_start());
    f
}

/// RFC 6356 §3's alpha in floating point, for comparison.
fn reference_alpha(paths: &[(u64, Duration)]) -> f64 {
    let total: f64 = paths.iter().map(|&(w, _)| w as f64).sum();
    let max = paths
        .iter()
        .map(|&(w, r)| w as f64 / (r.as_secs_f64() * r.as_secs_f64()))
        .fold(0.0, f64::max);
    let sum: f64 = paths.iter().map(|&(w, r)| w as f64 / r.as_secs_f64()).sum();
    total * max / (sum * sum)
}

#[test]
fn lia_alpha_closed_forms() {
    // n identical paths: alpha = n w * (w / r^2) / (n w / r)^2 = 1/n, exactly, and the
    // coupled window cwnd_total / alpha is n^2 w.
    for n in 2..=6u64 {
        for (w, r) in [
            (12_000, ms(50)),
            (1_000_000, ms(3)),
            (2_400, Duration::from_micros(1)),
            (MAX_WINDOW, ms(600_000)),
        ] {
            let c = Coupling::lia((0..n).map(|_| (w, r))).unwrap();
            assert_eq!(c.total_window(), n * w);
            assert_eq!(c.coupled_window(), n * n * w, "n = {n}, w = {w}, r = {r:?}");
            assert_eq!(c.alpha(), 1.0 / n as f64);
        }
    }
    // Equal RTTs: alpha = max_i w_i / cwnd_total, so cwnd_total / alpha = total^2 / max.
    let c = Coupling::lia([(10_000, ms(20)), (30_000, ms(20))]).unwrap();
    assert_eq!(c.total_window(), 40_000);
    assert_eq!(c.coupled_window(), 53_333); // 40000^2 / 30000, rounded
    assert!((c.alpha() - 0.75).abs() < 1e-4);
    // Equal windows, RTTs r1 < r2: alpha = 2 r2^2 / (r1 + r2)^2 = 2 * 900 / 1600.
    let c = Coupling::lia([(12_000, ms(10)), (12_000, ms(30))]).unwrap();
    assert_eq!(c.coupled_window(), 21_333); // 24000 / 1.125, rounded
    // The general formula, against floating point.
    let cases: [&[(u64, Duration)]; 4] = [
        &[(12_000, ms(10)), (24_000, ms(30))],
        &[(2_400, ms(1)), (1_000_000, ms(1_000))],
        &[(50_000, ms(80)), (70_000, ms(45)), (3_000, ms(7))],
        &[
            (MAX_WINDOW, ms(100)),
            (MAX_WINDOW / 3, ms(250)),
            (2_400, ms(600_000)),
        ],
    ];
    for paths in cases {
        // The coupled window is cwnd_total / alpha rounded to whole bytes.
        let c = Coupling::lia(paths.iter().copied()).unwrap();
        let expected = c.total_window() as f64 / reference_alpha(paths);
        let got = c.coupled_window() as f64;
        assert!(
            (got - expected).abs() <= 0.5 + 1e-9 * expected,
            "{paths:?}: {got} vs {expected}"
        );
    }
}

#[test]
fn lia_needs_two_paths() {
    assert_eq!(Coupling::lia([]), None);
    assert_eq!(Coupling::lia([(12_000, ms(50))]), None);
    assert!(Coupling::lia([(12_000, ms(50)), (12_000, ms(50))]).is_some());
}

#[test]
fn lia_zero_rtt_and_zero_window_are_handled() {
    // A zero RTT counts as 1 µs.
    let zero = Coupling::lia([(12_000, Duration::ZERO), (12_000, Duration::from_micros(1))]);
    assert_eq!(zero.unwrap().alpha(), 0.5);
    let c = Coupling::lia([(12_000, Duration::ZERO), (12_000, Duration::ZERO)]).unwrap();
    assert_eq!(c.alpha(), 0.5);
    // A zero window counts as one byte; nothing divides by zero.
    let c = Coupling::lia([(0, Duration::ZERO), (0, Duration::ZERO)]).unwrap();
    assert_eq!((c.total_window(), c.coupled_window()), (2, 4));
    // RTTs beyond the clamp (about 6.4 days) all count alike.
    let c = Coupling::lia([
        (12_000, Duration::MAX),
        (12_000, Duration::from_secs(1 << 30)),
    ]);
    assert_eq!(c.unwrap().alpha(), 0.5);
}

/// `on_ack_coupled` without a coupling is `on_ack`, bit for bit, through slow start,
/// congestion avoidance, losses and application-limited periods.
#[test]
fn on_ack_coupled_without_coupling_is_on_ack() {
    for alg in both() {
        let mut plain = Flow::new(alg, ms(40));
        let mut other = CongestionController::new(alg, MSS);
        for round in 0..60u32 {
            let app_limited = round % 17 == 16;
            let reference = &mut plain;
            let mut acks = Vec::new();
            let sent = reference.now;
            reference.round_with(app_limited, |at, _, _| acks.push(at));
            for _ in &acks {
                other.on_packet_sent(sent, u64::from(MSS));
            }
            for at in acks {
                other.on_ack_coupled(at, sent, u64::from(MSS), &reference.rtt, app_limited, None);
            }
            if round % 13 == 12 {
                reference.loss(false);
                other.on_congestion_event(reference.now, reference.last_sent, false);
            }
            assert_eq!(reference.cc, other, "{alg:?} round {round}");
        }
        assert!(!plain.cc.in_slow_start());
    }
}

/// RFC 6356 §3 couples only congestion avoidance: slow start grows as uncoupled, however
/// small alpha is.
#[test]
fn coupled_slow_start_is_unaffected() {
    // Eight identical paths: alpha = 1/8, and cwnd_total / alpha = 64 windows, so congestion
    // avoidance would grow 64 times slower than uncoupled.
    let strong = Coupling::lia((0..8).map(|_| (12_000, ms(50)))).unwrap();
    assert_eq!(strong.coupled_window(), 64 * 12_000);
    for alg in both() {
        let mut f = Flow::new(alg, ms(50));
        let mut coupled = f.cc.clone();
        for _ in 0..6 {
            let sent = f.now;
            let mut acks = Vec::new();
            f.round_with(false, |at, _, _| acks.push(at));
            for _ in &acks {
                coupled.on_packet_sent(sent, u64::from(MSS));
            }
            for at in acks {
                coupled.on_ack_coupled(at, sent, u64::from(MSS), &f.rtt, false, Some(strong));
            }
            assert!(f.cc.in_slow_start());
            assert_eq!(f.cc, coupled, "{alg:?}");
        }
        // The loss response is per path too.
        f.loss(false);
        coupled.on_congestion_event(f.now, f.last_sent, false);
        assert_eq!(f.cc, coupled, "{alg:?}");
    }
}

/// Two identical paths in congestion avoidance: alpha = 1/2, so together they grow by
/// alpha = 1/2 datagram per RTT (RFC 6356 §3: "grow the total window by approximately
/// alpha*MSS per RTT"), where two uncoupled Reno flows grow by two. (Half, not one: a loss
/// halves only one path, a quarter of the total, so the equilibrium under a common loss rate
/// is one Reno flow's — see `coupled_paths_on_a_shared_bottleneck_take_one_flows_share`.)
#[test]
fn coupled_growth_of_two_equal_paths() {
    let rounds = 40u32;
    let run = |coupled: bool| {
        let flows = (0..2)
            .map(|_| {
                let f = in_congestion_avoidance(CongestionAlgorithm::NewReno, ms(50), 100 * 1200);
                (f, NO_LOSS)
            })
            .collect();
        let mut m = Multi::from_flows(flows, coupled);
        let w0 = m.total_window();
        if coupled {
            let c = m.coupling().unwrap();
            assert_eq!(c.alpha(), 0.5);
        }
        m.run_for(ms(50) * rounds);
        (m.total_window() - w0) as f64 / f64::from(MSS) / f64::from(rounds)
    };
    let coupled = run(true);
    let uncoupled = run(false);
    assert!(
        (0.4..=0.6).contains(&coupled),
        "coupled: {coupled} datagrams per RTT"
    );
    assert!(
        (1.9..=2.1).contains(&uncoupled),
        "uncoupled: {uncoupled} datagrams per RTT"
    );
}

/// With CUBIC, the coupling caps each ACK's increase by LIA's, even far out on the convex
/// part of the curve where uncoupled CUBIC grows much faster than Reno.
#[test]
fn coupled_cubic_growth_is_capped_by_lia() {
    let run = |coupled: bool| {
        let flows = [ms(100), ms(100)]
            .into_iter()
            .map(|rtt| {
                let mut f = in_congestion_avoidance(CongestionAlgorithm::Cubic, rtt, 300 * 1200);
                for _ in 0..120 {
                    f.round(); // 12 s, well past K (about 6 s): convex
                }
                (f, NO_LOSS)
            })
            .collect();
        let mut m = Multi::from_flows(flows, coupled);
        let w0 = m.total_window();
        let end = m.now + ms(2_000);
        while m.now < end {
            let (i, before, after, coupling) = m.step();
            if let Some(c) = coupling {
                // LIA: at most bytes * mss / max(cwnd_i, cwnd_total / alpha), plus one byte
                // for the window's truncation to whole bytes.
                let divisor = before.max(c.coupled_window());
                let cap = u64::from(MSS) * u64::from(MSS) / divisor + 1;
                assert!(
                    after - before <= cap,
                    "path {i}: {before} -> {after}, cap {cap}"
                );
            }
        }
        (m.total_window() - w0) as f64 / f64::from(MSS) / 20.0
    };
    let coupled = run(true);
    let uncoupled = run(false);
    assert!(coupled <= 0.55, "coupled: {coupled} datagrams per RTT");
    assert!(
        uncoupled > 10.0 * coupled,
        "uncoupled: {uncoupled} datagrams per RTT"
    );
}

/// Each ACK on path i grows it by the same amount per byte whatever its RTT, so a path with a
/// lower RTT, acknowledging more bytes per second, grows faster.
#[test]
fn coupled_lower_rtt_path_grows_faster() {
    for alg in both() {
        let flows = [ms(10), ms(30)]
            .into_iter()
            .map(|rtt| (in_congestion_avoidance(alg, rtt, 50 * 1200), NO_LOSS))
            .collect();
        let mut m = Multi::from_flows(flows, true);
        let w0: Vec<u64> = m.paths.iter().map(|p| p.cc.window()).collect();
        m.run_for(ms(1_000));
        let fast = m.paths[0].cc.window() - w0[0];
        let slow = m.paths[1].cc.window() - w0[1];
        assert!(
            fast > 2 * slow,
            "{alg:?}: fast path +{fast}, slow path +{slow}"
        );
    }
}

/// Throughput (bytes per second) of each path of a connection over `secs` seconds after a
/// warm-up.
fn throughput(m: &mut Multi, warmup_secs: u64, secs: u64) -> Vec<f64> {
    m.run_for(Duration::from_secs(warmup_secs));
    let start = m.delivered();
    m.run_for(Duration::from_secs(secs));
    m.delivered()
        .iter()
        .zip(start)
        .map(|(end, start)| (end - start) as f64 / secs as f64)
        .collect()
}

/// On a shared bottleneck every path sees the same loss rate. Two coupled paths then take
/// about what one single-path flow takes (RFC 6356 goal 2, "do no harm"), where two
/// uncoupled ones take about twice as much.
#[test]
fn coupled_paths_on_a_shared_bottleneck_take_one_flows_share() {
    let loss_every = 300;
    for alg in both() {
        let single = throughput(
            &mut Multi::new(alg, &[(ms(50), loss_every)], false),
            20,
            200,
        )[0];
        let total = |coupled| -> f64 {
            let mut m = Multi::new(alg, &[(ms(50), loss_every), (ms(50), loss_every)], coupled);
            throughput(&mut m, 20, 200).iter().sum()
        };
        let coupled = total(true) / single;
        let uncoupled = total(false) / single;
        assert!(
            (0.8..=1.25).contains(&coupled),
            "{alg:?}: coupled takes {coupled} single flows"
        );
        assert!(
            uncoupled > 1.7,
            "{alg:?}: uncoupled takes {uncoupled} single flows"
        );
    }
}

/// Every path gets the same increase per acknowledged byte while its decrease follows its own
/// loss rate, so LIA moves traffic to the less congested path, much more than uncoupled
/// flows (whose windows only go as 1/sqrt(p)).
#[test]
fn coupled_traffic_moves_to_the_less_congested_path() {
    let share = |coupled| {
        let mut m = Multi::new(
            CongestionAlgorithm::NewReno,
            &[(ms(50), 1_000), (ms(50), 100)],
            coupled,
        );
        let t = throughput(&mut m, 20, 200);
        t[0] / (t[0] + t[1])
    };
    let coupled = share(true);
    let uncoupled = share(false);
    assert!(
        coupled > 0.85,
        "coupled: {coupled} on the less congested path"
    );
    assert!(
        coupled > uncoupled + 0.05,
        "coupled {coupled} vs uncoupled {uncoupled}"
    );
}

/// At a common loss rate, LIA's equilibrium gives every path the same window, so the path
/// with the lower RTT carries the larger share of the traffic.
#[test]
fn coupled_lower_rtt_path_gets_the_larger_share() {
    for alg in both() {
        let mut m = Multi::new(alg, &[(ms(10), 300), (ms(80), 300)], true);
        let t = throughput(&mut m, 20, 200);
        assert!(t[0] > 3.0 * t[1], "{alg:?}: {t:?}");
    }
}

mod lia_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any windows and RTTs, however extreme: no panic, and within the clamps the result is
        /// the formula's up to rounding; the coupling then drives a controller without overflow.
        #[test]
        fn lia_never_overflows(
            paths in prop::collection::vec(
                (
                    prop_oneof![
                        Just(0u64),
                        Just(u64::MAX),
                        Just(MAX_WINDOW),
                        128u64..=MAX_WINDOW,
                        any::<u64>(),
                    ],
                    prop_oneof![
                        Just(Duration::ZERO),
                        Just(Duration::MAX),
                        (1u64..=1u64 << 39).prop_map(Duration::from_micros),
                        (0u64..u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
                    ],
                ),
                0..10,
            ),
            bytes in prop_oneof![Just(u64::MAX), 0u64..1 << 50],
        ) {
            let c = Coupling::lia(paths.iter().copied());
            prop_assert_eq!(c.is_some(), paths.len() >= 2);
            let Some(c) = c else { return Ok(()) };
            let n = paths.len() as u64;
            let clamped: Vec<(u64, Duration)> = paths
                .iter()
                .map(|&(w, r)| {
                    let micros = u64::try_from(r.as_micros()).unwrap_or(u64::MAX).clamp(1, 1 << 39);
                    (w.clamp(1, MAX_WINDOW), Duration::from_micros(micros))
                })
                .collect();
            prop_assert_eq!(c.total_window(), clamped.iter().map(|p| p.0).sum::<u64>());
            // alpha >= 1/n: the coupled window is at most n * cwnd_total (plus rounding).
            prop_assert!(c.coupled_window() >= 1);
            prop_assert!(c.coupled_window() <= n * c.total_window() + n);
            let expected = c.total_window() as f64 / reference_alpha(&clamped);
            let got = c.coupled_window() as f64;
            prop_assert!(
                (got - expected).abs() <= 1.0 + expected * 1e-4,
                "coupled window {} vs {}", got, expected
            );
            for alg in both() {
                let mut cc = CongestionController::new(alg, MSS);
                let rtt = RttEstimator::default();
                let t = Instant::ZERO + ms(1);
                cc.on_congestion_event(t, t, false);
                for i in 1..4u64 {
                    let at = t + ms(i);
                    cc.on_ack_coupled(at, at, bytes, &rtt, false, Some(c));
                    prop_assert!(cc.window() <= MAX_WINDOW);
                }
            }
        }
    }
}
