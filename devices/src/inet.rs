//! Internet checksums (RFC 1071) and the IPv4 checks NICs offload: the
//! e1000's transmit insertion and receive verdicts, and virtio-net's
//! `DATA_VALID`. Frames are untrusted input: every field is bounds-checked
//! against the frame, and a frame too short or malformed to check is simply
//! not checked.

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType (TPID) of an IEEE 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// IPv4 protocol numbers of the transport checksums checked here.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The one's-complement sum of `data` as big-endian 16-bit words (a last
/// odd byte padded with zero) added to `sum`, folded to 16 bits. Reads
/// 32-bit words into a 64-bit accumulator: 2^16 = 1 modulo 0xffff, so the
/// fold at the end gives the same sum as word-by-word end-around carries.
pub fn ones_sum(sum: u32, data: &[u8]) -> u32 {
    let mut acc = u64::from(sum);
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut rest = words.remainder().chunks_exact(2);
    for h in &mut rest {
        acc += u64::from(u16::from_be_bytes([h[0], h[1]]));
    }
    if let [b] = rest.remainder() {
        acc += u64::from(*b) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u32
}

/// Fold a one's-complement sum to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The big-endian 16-bit field at `at`, if the buffer holds it.
pub fn get_be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// What checking an Ethernet frame's IPv4 checksums found: `None` for a
/// checksum not checked (not IPv4, not TCP or UDP, a fragment, a UDP
/// datagram sent without a checksum, or too short to tell).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Checksums {
    /// The IPv4 header checksum is right.
    pub header: Option<bool>,
    /// The TCP or UDP checksum (with its pseudo-header) is right.
    pub transport: Option<bool>,
}

/// Check the IPv4 header and TCP/UDP checksums of `frame` (an Ethernet
/// frame without FCS; one 802.1Q tag with TPID `vlan_tpid` is skipped).
pub fn check_ipv4(frame: &[u8], vlan_tpid: u16) -> Ipv4Checksums {
    let mut r = Ipv4Checksums::default();
    let l3 = if get_be16(frame, 12) == Some(vlan_tpid) {
        18
    } else {
        14
    };
    if get_be16(frame, l3 - 2) != Some(ETHERTYPE_IPV4) {
        return r;
    }
    let Some(&vihl) = frame.get(l3) else {
        return r;
    };
    let ihl = usize::from(vihl & 0xf) * 4;
    let total = usize::from(get_be16(frame, l3 + 2).unwrap_or(0));
    if vihl >> 4 != 4 || ihl < 20 || total < ihl || l3 + total > frame.len() {
        return r;
    }
    let ip = &frame[l3..l3 + total];
    r.header = Some(fold(ones_sum(0, &ip[..ihl])) == 0xffff);
    let fragment = get_be16(ip, 6).unwrap_or(0) & 0x3fff != 0;
    let proto = ip[9];
    let l4 = &ip[ihl..];
    let checkable = match proto {
        IPPROTO_TCP => l4.len() >= 20,
        IPPROTO_UDP => l4.len() >= 8 && get_be16(l4, 6) != Some(0),
        _ => false,
    };
    if checkable && !fragment {
        let pseudo = ones_sum(0, &ip[12..20]) + u32::from(proto) + l4.len() as u32;
        r.transport = Some(fold(ones_sum(pseudo, l4)) == 0xffff);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ones_sum_matches_word_by_word(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            start in 0u32..0x1_0000,
        ) {
            let mut reference = start;
            for pair in data.chunks(2) {
                let word = u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
                reference += word;
                reference = (reference & 0xffff) + (reference >> 16);
            }
            prop_assert_eq!(fold(ones_sum(start, &data)), fold(reference));
        }

        /// Any bytes, any length: a verdict or none, never a panic.
        #[test]
        fn any_frame_is_checked_without_panic(
            data in proptest::collection::vec(any::<u8>(), 0..120),
            ipv4 in any::<bool>(),
        ) {
            let mut f = data;
            if ipv4 && f.len() > 15 {
                f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                f[14] = 0x45;
            }
            let _ = check_ipv4(&f, ETHERTYPE_VLAN);
        }
    }

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(ones_sum(0, &d)), 0xddf2);
    }
}
