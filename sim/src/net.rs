//! Links without per-pair state: latency from synthetic geographic
//! coordinates, bandwidth from each host's own uplink and downlink.
//!
//! A host is a point on the globe (drawn within its region) plus an access
//! latency. The one-way latency between two hosts is their great-circle
//! distance over `km_per_ms` plus both access latencies, computed when
//! needed, so a mesh of n hosts keeps O(n) state. Each host's uplink and
//! downlink is a FIFO: a message waits for the messages ahead of it on the
//! sender's uplink and the receiver's downlink, and moves at the slower of
//! the two (a per-host share of bandwidth, not a per-link one).

use crate::{engine::Time, rng::Rng, scenario::Region};

const EARTH_KM: f64 = 6371.0;

/// Where a host is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    /// Unit vector.
    xyz: [f64; 3],
    /// One-way access latency, ms.
    access_ms: f64,
}

impl Place {
    /// A host drawn in one of `regions` (by share), with an access latency
    /// uniform in `access_ms`.
    pub(crate) fn draw(rng: &mut Rng, regions: &[Region], access_ms: [f64; 2]) -> Place {
        let r = &regions[rng.weighted(regions.iter().map(|r| r.share.max(0.0)))];
        let d = r.radius_km * rng.f64().sqrt();
        let bearing = rng.range_f64(0.0, std::f64::consts::TAU);
        let lat = (r.lat + d * bearing.cos() / 111.2).clamp(-89.0, 89.0);
        let lon = r.lon + d * bearing.sin() / (111.2 * lat.to_radians().cos().max(0.05));
        let (la, lo) = (lat.to_radians(), lon.to_radians());
        Place {
            xyz: [la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()],
            access_ms: rng.range_f64(access_ms[0], access_ms[1].max(access_ms[0])),
        }
    }

    /// Great-circle distance, km.
    pub(crate) fn km(&self, other: &Place) -> f64 {
        let dot: f64 = self.xyz.iter().zip(&other.xyz).map(|(a, b)| a * b).sum();
        EARTH_KM * dot.clamp(-1.0, 1.0).acos()
    }

    /// One-way latency to `other`, ms.
    pub(crate) fn one_way_ms(&self, other: &Place, km_per_ms: f64) -> f64 {
        self.km(other) / km_per_ms.max(1e-9) + self.access_ms + other.access_ms
    }
}

/// A host's uplink and downlink.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    up_bps: f64,
    down_bps: f64,
    up_free: Time,
    down_free: Time,
}

impl Link {
    pub(crate) fn new(up_mbps: f64, down_mbps: f64) -> Link {
        Link {
            up_bps: up_mbps.max(1e-3) * 1e6,
            down_bps: down_mbps.max(1e-3) * 1e6,
            up_free: Time::ZERO,
            down_free: Time::ZERO,
        }
    }
}

/// Sends `bytes` from `from` to `to` at `now` over a path of `one_way`
/// latency; returns when the last byte arrives. The message leaves when
/// the sender's uplink is free, moves at the slower of the two links, and
/// is delivered no sooner than the receiver's downlink can take it.
pub(crate) fn send(from: &mut Link, to: &mut Link, bytes: u64, now: Time, one_way: Time) -> Time {
    let bits = bytes as f64 * 8.0;
    let start = now.max(from.up_free);
    from.up_free = start + Time::from_secs(bits / from.up_bps);
    let through = Time::from_secs(bits / from.up_bps.min(to.down_bps));
    let arrive =
        (start + through + one_way).max(to.down_free + Time::from_secs(bits / to.down_bps));
    to.down_free = arrive;
    arrive
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64) -> Place {
        let (la, lo) = (f64::to_radians(lat), f64::to_radians(lon));
        Place {
            xyz: [la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()],
            access_ms: 1.0,
        }
    }

    #[test]
    fn latency_grows_with_distance() {
        // Paris – New York: ~5,840 km.
        let (paris, ny) = (at(48.86, 2.35), at(40.71, -74.0));
        assert!((paris.km(&ny) - 5840.0).abs() < 30.0, "{}", paris.km(&ny));
        assert!((paris.one_way_ms(&ny, 100.0) - 60.4).abs() < 0.5);
        assert_eq!(paris.km(&paris), 0.0);
    }

    #[test]
    fn regions_hold_their_hosts() {
        let mut rng = Rng::new(1, 0);
        let region = Region {
            name: "r".into(),
            share: 1.0,
            lat: 50.0,
            lon: 10.0,
            radius_km: 500.0,
        };
        let centre = at(50.0, 10.0);
        for _ in 0..1000 {
            let p = Place::draw(&mut rng, std::slice::from_ref(&region), [1.0, 2.0]);
            assert!(p.km(&centre) <= 510.0);
            assert!((1.0..=2.0).contains(&p.access_ms));
        }
    }

    #[test]
    fn messages_queue_on_the_slower_link() {
        let mut a = Link::new(8.0, 8.0); // 1 MB/s
        let mut b = Link::new(80.0, 80.0);
        let lat = Time::from_ms(10.0);
        // 1 MB at 1 MB/s: 1 s, plus the latency.
        let t1 = send(&mut a, &mut b, 1_000_000, Time::ZERO, lat);
        assert_eq!(t1, Time::from_secs(1.01));
        // A second message waits for the first on a's uplink.
        let t2 = send(&mut a, &mut b, 1_000_000, Time::ZERO, lat);
        assert_eq!(t2, Time::from_secs(2.01));
        // b's downlink is fast: a message from b to a waits on a's downlink.
        let t3 = send(&mut b, &mut a, 1_000_000, Time::ZERO, lat);
        assert_eq!(t3, Time::from_secs(1.01));
    }
}
