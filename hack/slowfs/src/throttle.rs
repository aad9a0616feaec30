//! A token bucket for the bytes written: tokens come in at `rate` bytes per
//! second, up to `burst`. A writer takes its tokens at once, into debt if
//! need be, and sleeps the debt off; so the writers after it wait their turn
//! behind it, and the rate holds however many write at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttle {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

struct State {
    /// Negative while writers are in debt.
    tokens: f64,
    at: Instant,
}

impl Throttle {
    /// `rate` bytes per second (> 0); the bucket starts full with `burst` bytes.
    pub fn new(rate: f64, burst: u64) -> Throttle {
        assert!(rate > 0.0, "the rate must be positive");
        Throttle {
            rate,
            burst: burst as f64,
            state: Mutex::new(State {
                tokens: burst as f64,
                at: Instant::now(),
            }),
        }
    }

    /// Blocks until `n` bytes may pass.
    pub fn take(&self, n: u64) {
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Takes `n` tokens as of `now`: how long the caller must wait for them.
    fn reserve(&self, n: u64, now: Instant) -> Duration {
        let mut s = self.state.lock().unwrap();
        let earned = now.saturating_duration_since(s.at).as_secs_f64() * self.rate;
        s.tokens = (s.tokens + earned).min(self.burst) - n as f64;
        s.at = now.max(s.at);
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_passes_at_once_and_the_rest_waits_its_share() {
        let t = Throttle::new(1000.0, 500);
        let now = Instant::now();
        assert_eq!(t.reserve(500, now), Duration::ZERO);
        // 1000 bytes at 1000 B/s with an empty bucket: one second.
        assert_eq!(t.reserve(1000, now), Duration::from_secs(1));
        // The next writer queues behind the first one's debt.
        assert_eq!(t.reserve(500, now), Duration::from_millis(1500));
    }

    #[test]
    fn tokens_come_back_with_time_but_never_beyond_the_burst() {
        let t = Throttle::new(1000.0, 500);
        let now = Instant::now();
        assert_eq!(t.reserve(500, now), Duration::ZERO);
        let later = now + Duration::from_secs(10);
        assert_eq!(t.reserve(500, later), Duration::ZERO);
        assert_eq!(t.reserve(100, later), Duration::from_millis(100));
    }
}
