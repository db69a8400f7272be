//! Gratuitous ARP over an AF_PACKET socket, sent after a container moved to this node.

use std::net::Ipv4Addr;

use crate::error::AgentError;

const ETH_P_ARP: u16 = 0x0806;

/// Builds a broadcast gratuitous ARP request announcing `ip` at `mac`.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero; target protocol address = sender (gratuitous).
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// MAC address of `ifname` in the caller's network namespace (SIOCGIFHWADDR; /sys/class/net
/// would show the namespace that mounted sysfs, not ours).
fn mac_of(ifname: &str) -> Result<[u8; 6], AgentError> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(AgentError::Internal(format!(
            "interface name {ifname} too long"
        )));
    }
    // SAFETY: plain socket(2); checked below and owned by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(AgentError::Io {
            what: "socket".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr inside req, which outlives the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&owned),
            libc::SIOCGIFHWADDR,
            &mut req,
        )
    };
    if r != 0 {
        return Err(AgentError::Io {
            what: format!("SIOCGIFHWADDR {ifname}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel filled ifru_hwaddr for SIOCGIFHWADDR.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

/// Sends `count` gratuitous ARPs for `ip` out of `ifname` (blocking; call off the runtime).
pub fn announce(
    ifname: &str,
    ip: Ipv4Addr,
    count: u32,
    gap: std::time::Duration,
) -> Result<(), AgentError> {
    let mac = mac_of(ifname)?;
    broadcast(
        ifname,
        ETH_P_ARP,
        &frame(mac, ip),
        count,
        gap,
        "gratuitous ARP",
    )
}

/// Sends `count` copies of the Ethernet `frame` of EtherType `protocol` to the broadcast
/// address out of `ifname`, `gap` apart (blocking; call off the runtime). `what` names the
/// frame in errors. The AF_PACKET socket receives nothing (protocol 0).
pub fn broadcast(
    ifname: &str,
    protocol: u16,
    frame: &[u8],
    count: u32,
    gap: std::time::Duration,
    what: &str,
) -> Result<(), AgentError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let cname = std::ffi::CString::new(ifname)
        .map_err(|_| AgentError::Internal("interface name has NUL".into()))?;
    // SAFETY: cname is a valid C string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(AgentError::Io {
            what: format!("no interface {ifname}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: plain socket(2); protocol 0 receives nothing. Checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(AgentError::Io {
            what: "AF_PACKET socket".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for i in 0..count {
        // SAFETY: frame and addr outlive the call; the lengths are theirs.
        let r = unsafe {
            libc::sendto(
                owned.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(AgentError::Io {
                what: format!("send {what} on {ifname}"),
                source: std::io::Error::last_os_error(),
            });
        }
        if i + 1 < count && !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let f = frame(mac, Ipv4Addr::new(198, 19, 16, 5));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[198, 19, 16, 5]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[198, 19, 16, 5]);
    }
}
