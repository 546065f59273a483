//! UDP → decrypt → TUN: the receive threads (one per lane), hairpinned packets, GRO writes.

use super::*;

/// Which of a family's two receive queues a receive thread serves (see [`Sockets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Data messages (and everything, where there is no handshake socket).
    Data = 0,
    /// Handshake initiations and responses, cookie replies, and anything not a data message.
    Handshakes = 1,
}

/// UDP → decrypt → TUN, for the sockets of one [`Lane`]. Both lanes take the same path
/// through the core (which decides by message type anyway); they differ in the queue they
/// drain.
pub(super) fn inbound(shared: &Shared, events: &Sender<Event>, lane: Lane) {
    let mut rx = vec![0u8; quinn_udp::BATCH_SIZE * RX_SLOT];
    let mut metas = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
    // Capacity for a full 64 KiB coalesced packet: tun-rs appends GRO segments to the first
    // buffer of a flow and uses its capacity as the limit.
    let mut tun_bufs: Vec<Vec<u8>> = (0..TUN_WRITE_BATCH)
        .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
        .collect();
    let mut gro = GROTable::default();
    let mut replies: Vec<Queued> = Vec::new();
    let mut hairpin = Hairpin::new(shared.has_gate());
    while !shared.stopping() {
        let sockets = shared.sockets();
        let socks = match lane {
            Lane::Data => [sockets.v4.as_ref(), sockets.v6.as_ref()],
            Lane::Handshakes => [sockets.hs_v4.as_ref(), sockets.hs_v6.as_ref()],
        };
        let [v4, v6] = socks.map(|s| s.map_or(-1, |u| u.sock.as_raw_fd()));
        let changed = &shared.sockets_changed[lane as usize].0;
        let wake = changed.as_raw_fd();
        let ready = match sys::wait_ready(&[v4, v6, wake], false, POLL_MS) {
            Ok(r) => r,
            Err(e) => {
                let _ = events.send(Event::Fatal(format!("poll on UDP sockets: {e}")));
                return;
            }
        };
        if ready & 0b100 != 0 {
            // Drain the wake-up (poll said it is readable, so this does not block) and reload.
            let _ = (&*changed).read(&mut [0u8; 64]);
            continue;
        }
        for (i, udp) in socks
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, (*s)?)))
        {
            let state = udp.state.load();
            if ready & (1 << i) == 0 {
                continue;
            }
            loop {
                let n = {
                    let mut chunks = rx.chunks_mut(RX_SLOT);
                    let mut iovs: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
                        std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                    match state.recv((&udp.sock).into(), &mut iovs, &mut metas) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::debug!(error = %e, "UDP receive");
                            break;
                        }
                    }
                };
                let has_pending = decrypt_batch(
                    shared,
                    &rx,
                    &metas[..n],
                    &mut tun_bufs,
                    &mut gro,
                    &mut replies,
                    &mut hairpin,
                );
                send_each(shared, &sockets, replies.drain(..));
                hairpin.flush(shared, &sockets);
                if has_pending {
                    shared.flush_pending();
                }
                if n < quinn_udp::BATCH_SIZE {
                    // The socket is most likely drained: go back to poll rather than pay a
                    // recvmmsg that only says EAGAIN (a third of receive syscalls otherwise).
                    break;
                }
            }
        }
    }
}

/// Packets from one peer to another (a home office printing in its town hall): a hub sends
/// them on itself, encrypted for the destination peer, instead of through the TUN device and
/// back. So every packet the hub reads from its TUN device comes from the data-centre side,
/// and the firewall can refuse those with a tunnel peer's source address (issue 14).
struct Hairpin {
    out: Vec<u8>,
    sends: Vec<Outgoing>,
    cursor: usize,
}

/// Room for encrypted peer-to-peer packets per receive batch before they are sent.
const HAIRPIN_BYTES: usize = 1 << 20;

impl Hairpin {
    fn new(hub: bool) -> Self {
        Self {
            out: vec![0u8; if hub { HAIRPIN_BYTES } else { 0 }],
            sends: Vec::new(),
            cursor: 0,
        }
    }

    /// Whether a packet of `len` bytes still fits (always, where there is no hairpin: spokes
    /// and the wireguard-go-compatible mode).
    fn has_room(&self, len: usize) -> bool {
        self.out.is_empty()
            || self.out.len() - self.cursor
                >= (len + crate::core::PADDING_MULTIPLE + crate::packet::DATA_OVERHEAD)
                    .max(crate::core::MIN_OUT_BUF)
    }

    /// Encrypts `packet` for the peer that owns its destination.
    fn push(&mut self, core: &mut Core, now: Instant, packet: &[u8]) {
        let room = &mut self.out[self.cursor..];
        if let Action::ToNetwork {
            dst,
            src_ip,
            offset,
            len,
        } = core.handle_tun_packet(now, packet, room)
        {
            if offset != 0 {
                room.copy_within(offset..offset + len, 0);
            }
            self.sends.push(Outgoing {
                dst,
                src_ip,
                start: self.cursor,
                len,
            });
            self.cursor += len;
        }
    }

    fn flush(&mut self, shared: &Shared, sockets: &Sockets) {
        if !self.sends.is_empty() {
            send_runs(shared, sockets, &self.out, &self.sends);
        }
        self.sends.clear();
        self.cursor = 0;
    }
}

/// Decrypts one receive batch into `tun_bufs` and writes them to the TUN device (with GRO);
/// a hub's peer-to-peer packets go to `hairpin`. Returns whether the core queued datagrams (a
/// handshake completed).
fn decrypt_batch(
    shared: &Shared,
    rx: &[u8],
    metas: &[RecvMeta],
    tun_bufs: &mut [Vec<u8>],
    gro: &mut GROTable,
    replies: &mut Vec<Queued>,
    hairpin: &mut Hairpin,
) -> bool {
    let now = Instant::now();
    // The kernel stamps each datagram as it arrives (SO_TIMESTAMPNS, which quinn-udp turns on):
    // how long it waited in the queue tells the core whether an initiation is still worth an
    // answer. One clock read per batch.
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut k = 0;
    let (mut gate, mut core) = shared.gate_and_core();
    for (slot, meta) in metas.iter().enumerate() {
        let waited = queue_wait(wall, meta.timestamp);
        let train = &rx[slot * RX_SLOT..slot * RX_SLOT + meta.len.min(RX_SLOT)];
        for datagram in train.chunks(meta.stride.max(1)) {
            if k == tun_bufs.len() || !hairpin.has_room(datagram.len()) {
                // Full: write what we have without holding the core meanwhile.
                drop(core);
                drop(gate);
                write_tun(shared, tun_bufs, k, gro);
                hairpin.flush(shared, &shared.sockets());
                k = 0;
                (gate, core) = shared.gate_and_core();
            }
            let buf = &mut tun_bufs[k];
            buf.resize(
                VIRTIO_NET_HDR_LEN + datagram.len().max(crate::core::MIN_OUT_BUF),
                0,
            );
            let out = &mut buf[VIRTIO_NET_HDR_LEN..];
            match core.handle_received(now, waited, meta.addr, meta.dst_ip, datagram, out) {
                Action::ToTun { peer, offset, len } => {
                    if let Some(g) = gate.as_deref_mut() {
                        let start = VIRTIO_NET_HDR_LEN + offset;
                        let inner = &buf[start..start + len];
                        if !g.from_peer(now, peer, &*core, inner) {
                            continue;
                        }
                        let to_peer = IpHeader::parse(inner).and_then(|h| core.route(h.dst));
                        if to_peer.is_some() {
                            hairpin.push(&mut core, now, inner);
                            continue;
                        }
                    }
                    if offset != 0 {
                        buf.copy_within(
                            VIRTIO_NET_HDR_LEN + offset..VIRTIO_NET_HDR_LEN + offset + len,
                            VIRTIO_NET_HDR_LEN,
                        );
                    }
                    buf.truncate(VIRTIO_NET_HDR_LEN + len);
                    k += 1;
                }
                Action::ToNetwork {
                    dst,
                    src_ip,
                    offset,
                    len,
                } => {
                    let start = VIRTIO_NET_HDR_LEN + offset;
                    replies.push(Queued {
                        dst,
                        src_ip,
                        bytes: buf[start..start + len].to_vec(),
                    });
                }
                Action::Nothing | Action::Drop(_) | Action::Unreachable { .. } => {}
            }
        }
    }
    let has_pending = core.has_pending();
    drop(core);
    drop(gate);
    write_tun(shared, tun_bufs, k, gro);
    has_pending
}

/// How long a datagram stamped `arrived` (since the Unix epoch, by the kernel) waited until
/// `wall`; zero when it carries no stamp or the wall clock stepped back meanwhile.
pub(super) fn queue_wait(wall: Duration, arrived: Option<Duration>) -> Duration {
    arrived.map_or(Duration::ZERO, |t| wall.saturating_sub(t))
}

fn write_tun(shared: &Shared, tun_bufs: &mut [Vec<u8>], k: usize, gro: &mut GROTable) {
    if k == 0 {
        return;
    }
    if let Err(e) = shared
        .tun
        .send_multiple(gro, &mut tun_bufs[..k], VIRTIO_NET_HDR_LEN)
    {
        tracing::debug!(error = %e, "TUN write");
    }
}
