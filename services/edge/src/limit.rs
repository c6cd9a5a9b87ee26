//! Part B's optional per-IP limit on upgrades: an address that has asked
//! for more upgrades than the limit within a minute gets `429 Too Many
//! Requests` with `Retry-After`, before its subprotocol is looked at.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window a limit counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Addresses are swept of ended windows once there are this many.
const SWEEP_AT: usize = 4096;

/// Counts upgrades per address in fixed windows.
#[derive(Debug)]
pub(crate) struct UpgradeLimit {
    /// Upgrades one address may ask for per window; 0: no limit.
    per_window: u32,
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    by_address: HashMap<IpAddr, Window>,
    /// The size at which ended windows are swept next: twice what a sweep
    /// left, so a flood of addresses costs a sweep per doubling.
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    upgrades: u32,
}

impl UpgradeLimit {
    pub(crate) fn new(per_window: u32) -> Self {
        UpgradeLimit {
            per_window,
            windows: Mutex::new(Windows {
                by_address: HashMap::new(),
                sweep_at: SWEEP_AT,
            }),
        }
    }

    /// Counts an upgrade from `address` at `now`; over the limit, the
    /// whole seconds (at least 1) until its window ends.
    pub(crate) fn admit(&self, address: IpAddr, now: Instant) -> Result<(), u64> {
        if self.per_window == 0 {
            return Ok(());
        }
        let address = counted_as(address);
        let mut windows = self.windows.lock().expect("upgrade limit lock");
        if windows.by_address.len() >= windows.sweep_at {
            windows
                .by_address
                .retain(|_, w| now.saturating_duration_since(w.started) < WINDOW);
            windows.sweep_at = (windows.by_address.len() * 2).max(SWEEP_AT);
        }
        let window = windows.by_address.entry(address).or_insert(Window {
            started: now,
            upgrades: 0,
        });
        let elapsed = now.saturating_duration_since(window.started);
        if elapsed >= WINDOW {
            *window = Window {
                started: now,
                upgrades: 0,
            };
        }
        if window.upgrades >= self.per_window {
            let left = WINDOW.saturating_sub(elapsed);
            return Err((left.as_millis().div_ceil(1000) as u64).max(1));
        }
        window.upgrades += 1;
        Ok(())
    }
}

/// The address a limit counts under: an IPv6 address by its /64, the
/// smallest network a host is given (else one host would have 2^64
/// addresses, each with a count of its own); an IPv4-mapped one as IPv4.
fn counted_as(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_over_the_limit_waits_for_its_window() {
        let limit = UpgradeLimit::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!(limit.admit(a, t0), Ok(()));
        assert_eq!(limit.admit(a, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(limit.admit(a, t0 + Duration::from_secs(1)), Err(59));
        assert_eq!(limit.admit(a, t0 + Duration::from_millis(59_500)), Err(1));
        assert_eq!(limit.admit(a, t0 + Duration::from_millis(59_999)), Err(1));
        // Another address has its own count.
        assert_eq!(limit.admit(b, t0 + Duration::from_secs(2)), Ok(()));
        // A new window starts the count again.
        assert_eq!(limit.admit(a, t0 + WINDOW), Ok(()));
        assert_eq!(limit.admit(a, t0 + WINDOW), Ok(()));
        assert!(limit.admit(a, t0 + WINDOW).is_err());
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let limit = UpgradeLimit::new(1);
        let t0 = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_host: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let neighbour: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(limit.admit(one, t0), Ok(()));
        assert!(limit.admit(same_host, t0).is_err());
        assert_eq!(limit.admit(neighbour, t0), Ok(()));
        assert_eq!(limit.admit("10.0.0.1".parse().unwrap(), t0), Ok(()));
        assert!(limit.admit(mapped, t0).is_err());
    }

    #[test]
    fn no_limit_counts_nothing() {
        let limit = UpgradeLimit::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            assert_eq!(limit.admit(a, Instant::now()), Ok(()));
        }
        assert!(limit.windows.lock().unwrap().by_address.is_empty());
    }

    #[test]
    fn ended_windows_are_swept_as_addresses_pile_up() {
        let limit = UpgradeLimit::new(1);
        let t0 = Instant::now();
        for n in 0..SWEEP_AT as u32 {
            let address = IpAddr::from(n.to_be_bytes());
            assert_eq!(limit.admit(address, t0), Ok(()));
        }
        let later = t0 + WINDOW;
        assert_eq!(limit.admit("10.9.9.9".parse().unwrap(), later), Ok(()));
        let windows = limit.windows.lock().unwrap();
        assert_eq!(windows.by_address.len(), 1);
        assert_eq!(windows.sweep_at, SWEEP_AT);
    }
}
