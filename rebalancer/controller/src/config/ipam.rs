//! `[ipam]`: the container address blocks the controller leases to the agents
//! (`daemon/ipam.rs`; docs/deploy.md §3 "Container addresses").

use std::net::Ipv4Addr;
use std::time::Duration;

use rebalancer_ipam::Pool;
use serde::Deserialize;
use toml::Spanned;

/// `[ipam]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpam {
    /// Lease blocks (default true). Agents with `ipam = "local"` take none either way.
    pub enabled: Option<bool>,
    /// The cluster's container subnet; inside every agent's `container_subnet`.
    pub subnet: Option<Spanned<String>>,
    /// Prefix length of one block (default 26: 64 addresses).
    pub block_prefix: Option<Spanned<u8>>,
    /// An agent asks for another block below this many free addresses (default 8).
    pub low_water: Option<Spanned<u32>>,
    /// Seconds an agent may stay unreachable before its node counts as gone (default 600).
    pub grace_s: Option<Spanned<u64>>,
}

/// Validated `[ipam]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpamConfig {
    pub enabled: bool,
    pub pool: Pool,
    pub low_water: u32,
    pub grace: Duration,
}

/// A bad `[ipam]` value: (span, key, message), turned into a positioned error by `config.rs`.
pub type Invalid = (std::ops::Range<usize>, &'static str, String);

impl RawIpam {
    pub fn validate(&self) -> Result<IpamConfig, Invalid> {
        let (subnet, span) = match &self.subnet {
            Some(s) => (s.get_ref().as_str(), s.span()),
            None => ("198.19.0.0/20", 0..0),
        };
        let bad = |m: String| (span.clone(), "ipam.subnet", m);
        let (a, p) = subnet
            .split_once('/')
            .ok_or_else(|| bad(format!("'{subnet}' is not ADDRESS/PREFIX")))?;
        let base: Ipv4Addr = a
            .parse()
            .map_err(|_| bad(format!("'{a}' is not an IPv4 address")))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| bad(format!("'/{p}' is not a prefix length in 8..=30")))?;
        if u32::from(base) & !(u32::MAX << (32 - prefix)) != 0 {
            return Err(bad(format!("{base} has host bits set for /{prefix}")));
        }
        let block = self
            .block_prefix
            .as_ref()
            .map(|b| *b.get_ref())
            .unwrap_or(26);
        let pool = Pool::new(base, prefix, block).map_err(|e| {
            let span = self
                .block_prefix
                .as_ref()
                .map(|b| b.span())
                .unwrap_or(span.clone());
            (span, "ipam.block_prefix", e.to_string())
        })?;
        let low_water = match &self.low_water {
            None => 8,
            Some(v) if *v.get_ref() < pool.addresses(1).count() as u32 => *v.get_ref(),
            Some(v) => {
                return Err((
                    v.span(),
                    "ipam.low_water",
                    format!(
                        "{} is not below the {} addresses of one /{block} block",
                        v.get_ref(),
                        pool.addresses(1).count()
                    ),
                ))
            }
        };
        let grace = match &self.grace_s {
            None => Duration::from_secs(600),
            Some(v) if (10..=30 * 86_400).contains(v.get_ref()) => {
                Duration::from_secs(*v.get_ref())
            }
            Some(v) => {
                return Err((
                    v.span(),
                    "ipam.grace_s",
                    format!("{} is outside 10..=2592000", v.get_ref()),
                ))
            }
        };
        Ok(IpamConfig {
            enabled: self.enabled.unwrap_or(true),
            pool,
            low_water,
            grace,
        })
    }
}
