//! A container's `/32` node route added and removed over rtnetlink, in-process.
//!
//! Both sit on a migration's critical path (the source withdraws its route while the tree is
//! frozen, the destination adds its own before the client's packets can reach the restored
//! tree); an `ip route` process costs 3–5 ms there on a quiet 2-core node and 20 ms under
//! load, one netlink request well under a millisecond. [`crate::netns`] falls back to `ip` when
//! this fails. Same routes as `ip route replace ADDR/32 dev VETH` and `ip route del ADDR/32 dev
//! VETH`: main table, boot protocol, link scope.

use std::net::Ipv4Addr;
use std::time::Duration;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

use crate::error::AgentError;

/// What to do with the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOp {
    /// Create, or replace an existing route to the same address.
    Replace,
    Delete,
}

const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;
const RTA_HDR: usize = 4;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_LINK: u8 = 253;
/// In a delete: any scope.
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// How long the kernel may take to answer (it answers at once; this only bounds a bug).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// The request for `op` on `dst/32 dev <ifindex>`, sequence number `seq`. Pure.
pub fn route_request(op: RouteOp, seq: u32, dst: Ipv4Addr, ifindex: u32) -> Vec<u8> {
    let len = NLMSG_HDR + RTMSG + 2 * (RTA_HDR + 4);
    let (kind, flags, protocol, scope, rtype) = match op {
        RouteOp::Replace => (
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            RTPROT_BOOT,
            RT_SCOPE_LINK,
            RTN_UNICAST,
        ),
        // As `ip route del`: every field left 0 (or NOWHERE) matches any value.
        RouteOp::Delete => (
            RTM_DELROUTE,
            NLM_F_REQUEST | NLM_F_ACK,
            0,
            RT_SCOPE_NOWHERE,
            0,
        ),
    };
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
                                              // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    m.extend_from_slice(&[
        libc::AF_INET as u8,
        32,
        0,
        0,
        RT_TABLE_MAIN,
        protocol,
        scope,
        rtype,
    ]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&((RTA_HDR + 4) as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&dst.octets());
    m.extend_from_slice(&((RTA_HDR + 4) as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_OIF.to_ne_bytes());
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m
}

/// The kernel's answer to request `seq`: `Ok(())` for an acknowledgement, `Err(errno)` for a
/// refusal, `None` when `buf` holds no answer to `seq`. Pure.
pub fn ack_of(buf: &[u8], seq: u32) -> Option<Result<(), i32>> {
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let word = |at: usize| -> Option<[u8; 4]> { buf.get(at..at + 4)?.try_into().ok() };
        let len = u32::from_ne_bytes(word(off)?) as usize;
        let kind = u16::from_ne_bytes(buf.get(off + 4..off + 6)?.try_into().ok()?);
        let got_seq = u32::from_ne_bytes(word(off + 8)?);
        if len < NLMSG_HDR || off + len > buf.len() {
            return None;
        }
        if kind == NLMSG_ERROR && got_seq == seq {
            let code = i32::from_ne_bytes(word(off + NLMSG_HDR)?);
            return Some(if code == 0 { Ok(()) } else { Err(-code) });
        }
        // Messages are 4-byte aligned.
        off += (len + 3) & !3;
    }
    None
}

/// Applies `op` to the node route `dst/32 dev <dev>` in the caller's network namespace.
pub fn host_route(op: RouteOp, dst: Ipv4Addr, dev: &str) -> Result<(), AgentError> {
    let what = |how: &str| format!("netlink {op:?} route {dst}/32 dev {dev}: {how}");
    let io = |how: &str, e: nix::Error| AgentError::Io {
        what: what(how),
        source: e.into(),
    };
    let ifindex = nix::net::if_::if_nametoindex(dev).map_err(|e| io("no such device", e))?;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| io("socket", e))?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(ANSWER_WITHIN.as_secs() as i64, 0),
    )
    .map_err(|e| io("receive timeout", e))?;
    let seq = 1;
    let req = route_request(op, seq, dst, ifindex);
    use std::os::fd::AsRawFd;
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| io("send", e))?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| io("answer", e))?;
        match ack_of(&buf[..n], seq) {
            Some(Ok(())) => return Ok(()),
            Some(Err(errno)) => {
                return Err(AgentError::Io {
                    what: what("refused"),
                    source: std::io::Error::from_raw_os_error(errno),
                })
            }
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_request_carries_the_route_as_ip_route_replace_does() {
        let m = route_request(RouteOp::Replace, 7, Ipv4Addr::new(198, 19, 32, 10), 42);
        assert_eq!(m.len(), 44);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap_or_default()),
            44
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWROUTE);
        assert_eq!(
            u16::from_ne_bytes([m[6], m[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(
            u32::from_ne_bytes(m[8..12].try_into().unwrap_or_default()),
            7
        );
        // family, /32, table main, boot, link scope, unicast
        assert_eq!(&m[16..24], &[2, 32, 0, 0, 254, 3, 253, 1]);
        assert_eq!(u16::from_ne_bytes([m[28], m[29]]), 8);
        assert_eq!(u16::from_ne_bytes([m[30], m[31]]), RTA_DST);
        assert_eq!(&m[32..36], &[198, 19, 32, 10]);
        assert_eq!(u16::from_ne_bytes([m[38], m[39]]), RTA_OIF);
        assert_eq!(
            u32::from_ne_bytes(m[40..44].try_into().unwrap_or_default()),
            42
        );
    }

    #[test]
    fn a_delete_request_matches_any_protocol_scope_and_type() {
        let m = route_request(RouteOp::Delete, 1, Ipv4Addr::new(198, 19, 32, 10), 3);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_DELROUTE);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&m[16..24], &[2, 32, 0, 0, 254, 0, 255, 0]);
    }

    fn error_msg(seq: u32, code: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&code.to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b
    }

    #[test]
    fn answers_are_read_for_their_own_request_only() {
        assert_eq!(ack_of(&error_msg(1, 0), 1), Some(Ok(())));
        assert_eq!(
            ack_of(&error_msg(1, -libc::ESRCH), 1),
            Some(Err(libc::ESRCH))
        );
        assert_eq!(ack_of(&error_msg(2, 0), 1), None);
        let mut two = error_msg(5, 0);
        two.extend(error_msg(1, -libc::EEXIST));
        assert_eq!(ack_of(&two, 1), Some(Err(libc::EEXIST)));
        assert_eq!(ack_of(&[1, 2, 3], 1), None);
        // A length that runs past the buffer is not read.
        let mut cut = error_msg(1, 0);
        cut.truncate(20);
        assert_eq!(ack_of(&cut, 1), None);
    }
}
