//! CUBIC congestion control (RFC 9438).
//!
//! Below `ssthresh` the window grows as in slow start. Above it, within a *congestion
//! avoidance stage* that starts at `t_epoch`, the window follows (in segments, `t` in seconds)
//!
//! ```text
//! W_cubic(t) = C * (t - K)^3 + W_max          (RFC 9438 §4.2, Figure 1)
//! K = cbrt((W_max - cwnd_epoch) / C)          (Figure 2)
//! ```
//!
//! with `C = 0.4`: concave up to `W_max` (the window at the last congestion event), flat
//! around it, convex beyond it. A Reno estimate `W_est` runs alongside and wins when it is
//! larger (the Reno-friendly region, §4.3). On congestion the window is multiplied by
//! `β = 0.7` (§4.6), and `W_max` is lowered further if the window never got back to the
//! previous `W_max` (fast convergence, §4.7).
//!
//! Windows are `f64` bytes. The per-ACK arithmetic uses only `+ − × ÷`, which IEEE 754 rounds
//! exactly, so it is reproducible on any conforming hardware (no `powi`, whose precision Rust
//! leaves unspecified). `cbrt` comes from the platform's libm and may differ in the last bit
//! between platforms; it runs only when a stage starts, and its result `K` is part of the
//! state, so a controller exported from one host continues identically on another.

use core::time::Duration;

use super::{Coupling, MAX_WINDOW, Recovery, clamp_mss, initial_window, minimum_window};
use crate::Instant;
use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};
use crate::transport::rtt::RttEstimator;
use crate::transport::{Nanos, OptInstant};

/// `C` (RFC 9438 §4.1.1, chosen in §5.1): aggressiveness of the cubic curve, in segments
/// per second³.
const C: f64 = 0.4;
/// `β_cubic` (RFC 9438 §4.1.1, §4.6): the multiplicative decrease factor.
const BETA: f64 = 0.7;
/// `α_cubic = 3 * (1 - β) / (1 + β)` (RFC 9438 §4.3): Reno-friendly additive increase.
const ALPHA: f64 = 3.0 * (1.0 - BETA) / (1.0 + BETA);

/// CUBIC (RFC 9438) with fast convergence. Plain data; use it through
/// [`CongestionController`](super::CongestionController), whose methods document the call
/// order.
#[derive(Clone, Debug, PartialEq)]
pub struct Cubic {
    /// `SMSS`, bytes.
    mss: u16,
    /// `cwnd`, bytes. Kept fractional so that small per-ACK increments accumulate.
    cwnd: f64,
    /// `ssthresh`, bytes; `u64::MAX` is "infinite".
    ssthresh: u64,
    recovery: Recovery,
    /// `W_max`, bytes: the window at the last congestion event, possibly lowered by fast
    /// convergence. 0 before any congestion event.
    w_max: f64,
    /// `cwnd_prior`, bytes: the window just before the last reduction (§4.3: `α_cubic`
    /// becomes 1 once `W_est` reaches it).
    cwnd_prior: f64,
    /// `W_est`, bytes: the Reno-friendly estimate (§4.3). Meaningful only within a stage.
    w_est: f64,
    /// The current congestion avoidance stage; `None` until the first eligible ACK after
    /// entering congestion avoidance.
    epoch: Option<Epoch>,
    /// Set after persistent congestion: the next stage starts with `K = 0` and `W_max` equal
    /// to the window at its start (§4.8).
    restart_after_timeout: bool,
    /// When the current application-limited period began, if one is in progress; its length
    /// is excluded from `t` (§5.8).
    app_limited_since: OptInstant,
    /// The latest send or ACK, to recognise idle periods (§5.8).
    last_activity: OptInstant,
    /// The smoothed RTT at the latest ACK: a gap longer than this with neither sends nor ACKs
    /// counts as idle.
    idle_threshold: Nanos,
}

/// A congestion avoidance stage.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Epoch {
    /// `t_epoch`, shifted forward by the application-limited periods within the stage.
    start: Instant,
    /// `K`, seconds.
    k: f64,
}

impl Cubic {
    /// A controller for datagrams of at most `max_datagram_size` bytes, at the initial window.
    pub fn new(max_datagram_size: u16) -> Cubic {
        let mss = clamp_mss(max_datagram_size);
        Cubic {
            mss,
            cwnd: initial_window(mss) as f64,
            ssthresh: u64::MAX,
            recovery: Recovery::default(),
            w_max: 0.0,
            cwnd_prior: 0.0,
            w_est: 0.0,
            epoch: None,
            restart_after_timeout: false,
            app_limited_since: OptInstant::NONE,
            last_activity: OptInstant::NONE,
            idle_threshold: Nanos::of(Duration::MAX),
        }
    }

    /// See [`CongestionController::window`](super::CongestionController::window).
    pub fn window(&self) -> u64 {
        // `cwnd` stays within [2 * mss, MAX_WINDOW], so the conversion is exact in range.
        self.cwnd as u64
    }

    /// See [`CongestionController::ssthresh`](super::CongestionController::ssthresh).
    pub fn ssthresh(&self) -> u64 {
        self.ssthresh
    }

    /// See
    /// [`CongestionController::max_datagram_size`](super::CongestionController::max_datagram_size).
    pub fn max_datagram_size(&self) -> u16 {
        self.mss
    }

    /// `W_max` in bytes (0 before the first congestion event).
    pub fn w_max(&self) -> u64 {
        self.w_max as u64
    }

    /// `K` of the current congestion avoidance stage: the time from the stage's start until
    /// the window returns to `W_max` (RFC 9438 §4.2). `None` outside a stage.
    pub fn k(&self) -> Option<Duration> {
        self.epoch
            .and_then(|e| Duration::try_from_secs_f64(e.k).ok())
    }

    /// See [`CongestionController::on_packet_sent`](super::CongestionController::on_packet_sent).
    ///
    /// RFC 9438 §5.8 requires `t` to exclude idle periods. Most are already excluded through
    /// the `app_limited` flag of [`on_ack`](Self::on_ack), but a sender that stops while its
    /// window is full sees no application-limited ACK before going quiet. So, as Linux does
    /// when transmission restarts, a send after more than one smoothed RTT with neither sends
    /// nor ACKs shifts the stage's start forward by the quiet time.
    pub fn on_packet_sent(&mut self, now: Instant, _bytes: u64) {
        if let (Some(last), Some(epoch), None) = (
            self.last_activity.get(),
            self.epoch.as_mut(),
            self.app_limited_since.get(),
        ) {
            let quiet = now - last;
            if quiet > self.idle_threshold.get() {
                epoch.start += quiet;
            }
        }
        self.last_activity = now.into();
    }

    /// See [`CongestionController::on_ack`](super::CongestionController::on_ack).
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent_time: Instant,
        bytes: u64,
        rtt: &RttEstimator,
        app_limited: bool,
    ) {
        self.on_ack_coupled(now, sent_time, bytes, rtt, app_limited, None);
    }

    /// See
    /// [`CongestionController::on_ack_coupled`](super::CongestionController::on_ack_coupled):
    /// RFC 6356 defines LIA over Reno, so here the coupling caps CUBIC's increase by LIA's,
    /// and the Reno-friendly estimate `W_est` grows at the coupled Reno rate.
    pub fn on_ack_coupled(
        &mut self,
        now: Instant,
        sent_time: Instant,
        bytes: u64,
        rtt: &RttEstimator,
        app_limited: bool,
        coupling: Option<Coupling>,
    ) {
        self.last_activity = now.into();
        self.idle_threshold = Nanos::of(rtt.smoothed());
        if self.recovery.contains(sent_time) {
            return;
        }
        if app_limited {
            // §5.8: no growth, and `t` must not include this period.
            if self.epoch.is_some() && self.app_limited_since.is_none() {
                self.app_limited_since = now.into();
            }
            return;
        }
        let since = core::mem::take(&mut self.app_limited_since).get();
        if let (Some(since), Some(epoch)) = (since, self.epoch.as_mut()) {
            epoch.start += now - since;
        }
        let acked = bytes as f64;
        if self.cwnd < self.ssthresh as f64 {
            // §4.10: slow start below ssthresh.
            self.cwnd = (self.cwnd + acked).min(MAX_WINDOW as f64);
            return;
        }
        let mss = f64::from(self.mss);
        let epoch = match self.epoch {
            Some(epoch) => epoch,
            None => self.start_epoch(now),
        };

        // §4.2: t is the time since the stage began; the target is where the curve will be
        // one RTT from now, clamped to [cwnd, 1.5 * cwnd] so the window never shrinks on an
        // ACK and grows by at most half the acknowledged bytes.
        let t = (now - epoch.start).as_secs_f64();
        let w_cubic = |t: f64| {
            let d = t - epoch.k;
            C * d * d * d * mss + self.w_max
        };

        // RFC 6356 §3 when coupled: Reno's increase `acked * mss / cwnd` becomes
        // `acked * mss / max(cwnd, cwnd_total / alpha)`. Uncoupled, the divisor is `cwnd`.
        let reno_divisor = match coupling {
            Some(c) => self.cwnd.max(c.coupled_window() as f64),
            None => self.cwnd,
        };

        // §4.3: W_est += α * segments_acked / cwnd (in segments), i.e. α * acked * mss / cwnd
        // bytes; α becomes 1 once W_est has reached the window before the last reduction.
        // When coupled, W_est follows the coupled Reno increase instead.
        let alpha = if self.w_est >= self.cwnd_prior {
            1.0
        } else {
            ALPHA
        };
        self.w_est += alpha * acked * mss / reno_divisor;

        let next = if w_cubic(t) < self.w_est {
            // Reno-friendly region: cwnd = W_est. (Taking the max keeps an ACK from ever
            // shrinking the window when W_est lags a window the cubic curve already reached.)
            self.cwnd.max(self.w_est)
        } else {
            // §4.4 (concave) and §4.5 (convex): cwnd += (target - cwnd) / cwnd per segment
            // acknowledged.
            let srtt = rtt.smoothed().as_secs_f64();
            let target = w_cubic(t + srtt).clamp(self.cwnd, 1.5 * self.cwnd);
            self.cwnd + (target - self.cwnd) * acked / self.cwnd
        };
        // Coupled: no more than LIA's increase for this ACK.
        let next = match coupling {
            Some(_) => next.min(self.cwnd + acked * mss / reno_divisor),
            None => next,
        };
        self.cwnd = next.min(MAX_WINDOW as f64);
    }

    /// Starts a congestion avoidance stage at `now` (RFC 9438 §4.2, §4.3, §4.8).
    fn start_epoch(&mut self, now: Instant) -> Epoch {
        let cwnd_epoch = self.cwnd;
        let k = if self.restart_after_timeout || self.w_max <= cwnd_epoch {
            // §4.8 (after a timeout: "K is set to 0, and W_max is set to the congestion window
            // size at the beginning of the current congestion avoidance stage"), and the same
            // when the window already exceeds W_max (leaving slow start without any congestion
            // event): the curve starts flat at the current window and turns convex.
            self.w_max = cwnd_epoch;
            self.cwnd_prior = cwnd_epoch;
            0.0
        } else {
            // Figure 2, with W_max and cwnd_epoch converted to segments.
            ((self.w_max - cwnd_epoch) / f64::from(self.mss) / C).cbrt()
        };
        self.restart_after_timeout = false;
        self.w_est = cwnd_epoch;
        let epoch = Epoch { start: now, k };
        self.epoch = Some(epoch);
        epoch
    }

    /// See
    /// [`CongestionController::on_congestion_event`](super::CongestionController::on_congestion_event).
    pub fn on_congestion_event(&mut self, now: Instant, sent_time: Instant, persistent: bool) {
        let min = minimum_window(self.mss) as f64;
        if !self.recovery.contains(sent_time) {
            self.recovery.start = now.into();
            // §4.7 fast convergence: a window that did not get back to W_max means the
            // available capacity shrank; release more of it.
            self.w_max = if self.cwnd < self.w_max {
                self.cwnd * (1.0 + BETA) / 2.0
            } else {
                self.cwnd
            };
            self.cwnd_prior = self.cwnd;
            // §4.6: ssthresh = cwnd * β (the window rather than the flight size, as the RFC
            // allows), at least the minimum window (RFC 9002 §7.2 keeps two datagrams, where
            // RFC 9438 would allow one).
            let reduced = (self.cwnd * BETA).max(min);
            self.ssthresh = reduced as u64;
            self.cwnd = reduced;
            self.epoch = None;
            self.app_limited_since = OptInstant::NONE;
            self.restart_after_timeout = false;
        }
        if persistent {
            // RFC 9002 §7.6.2 / Appendix B.8, and RFC 9438 §4.8 for the next stage.
            self.cwnd = min;
            self.recovery.start = OptInstant::NONE;
            self.epoch = None;
            self.app_limited_since = OptInstant::NONE;
            self.restart_after_timeout = true;
        }
    }

    /// See [`CongestionController::on_mtu_update`](super::CongestionController::on_mtu_update).
    pub fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mss = clamp_mss(new_mtu);
        self.cwnd = self.cwnd.max(minimum_window(self.mss) as f64);
        // K was computed in the old segment size; start the stage afresh.
        if self.epoch.take().is_some() {
            self.app_limited_since = OptInstant::NONE;
        }
    }

    /// See [`CongestionController::in_recovery`](super::CongestionController::in_recovery).
    pub fn in_recovery(&self, sent_time: Instant) -> bool {
        self.recovery.contains(sent_time)
    }

    /// See [`CongestionController::on_path_change`](super::CongestionController::on_path_change).
    pub fn on_path_change(&mut self) {
        *self = Cubic::new(self.mss);
    }
}

/// Snapshot encoding: `mss u16 | cwnd f64 | ssthresh u64 | recovery start | W_max f64 |
/// cwnd_prior f64 | W_est f64 | epoch (flag u8, start, K f64) | restart flag u8 |
/// app-limited since | last activity | idle threshold u64 ns`. Floats are written as their
/// bits, so a controller continues bit for bit.
impl Cubic {
    /// Writes the state.
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        w.u16(self.mss);
        w.f64(self.cwnd);
        w.u64(self.ssthresh);
        w.opt_instant(self.recovery.start.get());
        w.f64(self.w_max);
        w.f64(self.cwnd_prior);
        w.f64(self.w_est);
        match self.epoch {
            None => w.u8(0),
            Some(e) => {
                w.u8(1);
                w.instant(e.start);
                w.f64(e.k);
            }
        }
        w.bool(self.restart_after_timeout);
        w.opt_instant(self.app_limited_since.get());
        w.opt_instant(self.last_activity.get());
        w.duration(self.idle_threshold.get());
    }

    /// Reads what [`encode`](Self::encode) wrote; non-finite numbers and a window outside
    /// `0..=MAX_WINDOW` are refused.
    pub(crate) fn decode(r: &mut BlockReader<'_>) -> Result<Cubic, SnapshotError> {
        let mss = super::decode_mss(r)?;
        let cwnd = r.f64()?;
        r.check(
            (minimum_window(mss) as f64..=MAX_WINDOW as f64).contains(&cwnd),
            "congestion window",
        )?;
        let ssthresh = r.u64()?;
        let recovery = Recovery {
            start: r.opt_instant()?.into(),
        };
        let (w_max, cwnd_prior, w_est) = (r.f64()?, r.f64()?, r.f64()?);
        let epoch = match r.u8()? {
            0 => None,
            1 => Some(Epoch {
                start: r.instant()?,
                k: r.f64()?,
            }),
            _ => return Err(r.malformed("cubic epoch flag")),
        };
        Ok(Cubic {
            mss,
            cwnd,
            ssthresh,
            recovery,
            w_max,
            cwnd_prior,
            w_est,
            epoch,
            restart_after_timeout: r.bool()?,
            app_limited_since: r.opt_instant()?.into(),
            last_activity: r.opt_instant()?.into(),
            idle_threshold: Nanos::of(r.duration()?),
        })
    }
}
