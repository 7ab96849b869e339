//! Sessions per client: one address cannot take every slot.
//!
//! `max_sessions` bounds the whole listener; without a bound per client,
//! one host opening that many sockets (and trickling a byte now and then)
//! would lock every other sender out. A client is one IPv4 address or one
//! IPv6 /64 (a host gets a whole /64, so counting single IPv6 addresses
//! would bound nothing). The trusted relays are exempt, as Postfix exempts
//! `mynetworks`: behind a relay, all mail comes from one address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;

/// Who counts as one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    /// The first 64 bits of the address.
    V6(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The open sessions of each client, shared by the accept loop and the
/// [`ClientSlot`]s it hands out.
#[derive(Debug)]
pub(super) struct Clients {
    limit: usize,
    exempt: Vec<IpNet>,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// One session of a client; its count goes down when the session ends.
#[derive(Debug)]
pub(super) struct ClientSlot {
    key: Option<ClientKey>,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl Clients {
    pub(super) fn new(limit: usize, exempt: Vec<IpNet>) -> Self {
        Self {
            limit,
            exempt,
            open: Arc::default(),
        }
    }

    /// A slot for one more session of `ip`, or `None` when that client
    /// already has `limit` open.
    pub(super) fn admit(&self, ip: IpAddr) -> Option<ClientSlot> {
        let ip = ip.to_canonical();
        if self.exempt.iter().any(|net| net.contains(&ip)) {
            return Some(ClientSlot {
                key: None,
                open: self.open.clone(),
            });
        }
        let key = ClientKey::of(ip);
        let mut open = lock(&self.open);
        let count = open.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            key: Some(key),
            open: self.open.clone(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

/// The map holds plain counts: a panic elsewhere cannot leave it half-changed.
fn lock(open: &Mutex<HashMap<ClientKey, usize>>) -> MutexGuard<'_, HashMap<ClientKey, usize>> {
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_ipv6_slash_64_is_one_client_and_slots_come_back() {
        let clients = Clients::new(2, vec![]);
        let first = clients.admit(ip("2001:db8:1:2::1")).unwrap();
        let _second = clients.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(clients.admit(ip("2001:db8:1:2::3")).is_none());
        assert!(clients.admit(ip("2001:db8:1:3::1")).is_some());
        drop(first);
        assert!(clients.admit(ip("2001:db8:1:2::3")).is_some());
    }

    #[test]
    fn ipv4_mapped_counts_as_ipv4_and_trusted_relays_are_exempt() {
        let clients = Clients::new(1, vec!["10.0.0.0/8".parse().unwrap()]);
        let _held = clients.admit(ip("192.0.2.1")).unwrap();
        assert!(clients.admit(ip("::ffff:192.0.2.1")).is_none());
        let relays: Vec<_> = (0..5).map(|_| clients.admit(ip("10.1.2.3"))).collect();
        assert!(relays.iter().all(Option::is_some));
    }
}
