//! TUN → encrypt → UDP: the outbound thread and its GSO runs.

use super::*;

/// One encrypted datagram in a batch buffer: `out[start..start + len]`, to `dst` from
/// `src_ip`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Outgoing {
    pub(super) dst: SocketAddr,
    pub(super) src_ip: Option<IpAddr>,
    pub(super) start: usize,
    pub(super) len: usize,
}

/// TUN → encrypt → UDP.
pub(super) fn outbound(shared: &Shared, events: &Sender<Event>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
    // Not `vec![vec![..]; n]`: cloning would write (and so map) every page of every buffer.
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; MAX_PACKET])
        .collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    // Encrypted datagrams are written back to back, so a run of equal-sized ones to the same
    // peer is already the contiguous buffer a GSO send wants.
    let mut out = vec![0u8; IDEAL_BATCH_SIZE * (MAX_PACKET + crate::packet::DATA_OVERHEAD)];
    let mut sends: Vec<Outgoing> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    // ICMP unreachable answers for packets no peer can take, written back to the TUN device.
    let mut icmp_bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + crate::unreachable::MAX_V6))
        .collect();
    let mut icmp_gro = GROTable::default();
    // The TUN device is blocking: one syscall per super-packet, no poll in front of it. On
    // shutdown the process exits under this thread.
    while !shared.stopping() {
        let n = match shared
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
        {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) if tun_gone(&e) => {
                let _ = events.send(Event::InterfaceGone);
                return;
            }
            Err(e) => {
                // A malformed offload packet from the kernel: skip it, keep going.
                tracing::debug!(error = %e, "TUN read");
                continue;
            }
        };
        let now = Instant::now();
        sends.clear();
        let mut cursor = 0;
        let mut icmp = 0;
        let has_pending = {
            let (mut gate, mut core) = shared.gate_and_core();
            for (buf, &size) in bufs.iter_mut().zip(&sizes).take(n) {
                if let Some(g) = gate.as_deref_mut() {
                    if !g.to_peer(now, &*core, &buf[..size]) {
                        continue;
                    }
                }
                let room = &mut out[cursor..];
                // The padding goes into `buf` behind the packet (it has MAX_PACKET bytes).
                match core.handle_tun_buffer(now, buf, size, room) {
                    Action::ToNetwork {
                        dst,
                        src_ip,
                        offset,
                        len,
                    } => {
                        // boringtun writes at the start of the buffer; moving in place would
                        // still cost a memmove of the whole datagram.
                        if offset != 0 {
                            room.copy_within(offset..offset + len, 0);
                        }
                        sends.push(Outgoing {
                            dst,
                            src_ip,
                            start: cursor,
                            len,
                        });
                        cursor += len;
                    }
                    Action::Unreachable { offset, len, .. } => {
                        let answer = &mut icmp_bufs[icmp];
                        answer.clear();
                        answer.resize(VIRTIO_NET_HDR_LEN, 0);
                        answer.extend_from_slice(&room[offset..offset + len]);
                        icmp += 1;
                    }
                    _ => {}
                }
            }
            core.has_pending()
        };
        send_runs(shared, &shared.sockets(), &out, &sends);
        if icmp > 0 {
            if let Err(e) =
                shared
                    .tun
                    .send_multiple(&mut icmp_gro, &mut icmp_bufs[..icmp], VIRTIO_NET_HDR_LEN)
            {
                tracing::debug!(error = %e, "TUN write of ICMP unreachable");
            }
        }
        if has_pending {
            shared.flush_pending();
        }
    }
}

/// Sends `sends` (datagrams within `out`), merging each run of datagrams to the same
/// destination from the same source with the same size (the last may be shorter) into one
/// GSO send.
pub(super) fn send_runs(shared: &Shared, sockets: &Sockets, out: &[u8], sends: &[Outgoing]) {
    let max_segments = sockets.max_gso_segments().max(1);
    let mut i = 0;
    while i < sends.len() {
        let Outgoing {
            dst,
            src_ip,
            start,
            len: seg,
        } = sends[i];
        let mut end = start + seg;
        let mut j = i + 1;
        while j < sends.len() && j - i < max_segments {
            let next = sends[j];
            if next.dst != dst
                || next.src_ip != src_ip
                || next.start != end
                || next.len > seg
                || end + next.len - start > MAX_GSO_BYTES
            {
                break;
            }
            end += next.len;
            j += 1;
            if next.len < seg {
                break;
            }
        }
        if j - i > 1 && !sockets.gso_fits(dst, seg) {
            // Larger than the path: one datagram per send, fragmented by the kernel.
            for o in &sends[i..j] {
                send_logged(
                    shared,
                    sockets,
                    &Transmit {
                        destination: o.dst,
                        ecn: None,
                        contents: &out[o.start..o.start + o.len],
                        segment_size: None,
                        src_ip: o.src_ip,
                    },
                );
            }
            i = j;
            continue;
        }
        let segment_size = (j - i > 1).then_some(seg);
        send_logged(
            shared,
            sockets,
            &Transmit {
                destination: dst,
                ecn: None,
                contents: &out[start..end],
                segment_size,
                src_ip,
            },
        );
        i = j;
    }
}
