#!/usr/bin/env python3
"""test-vlan-switch.py -- the town hall's switch for packaging/test-image.sh: an 802.1Q trunk
port and access ports, in user space.

    test-vlan-switch.py TRUNK VID=PORT [VID=PORT ...]

A frame that arrives on the access port PORT leaves on TRUNK tagged with VLAN VID; a frame that
arrives on TRUNK tagged with VID leaves on PORT untagged. Untagged frames on the trunk and tags
no port is configured for are dropped (counted on stderr when the switch stops), so whatever
reaches an access port was tagged by the appliance and whatever the appliance receives is
tagged: the appliance's own kernel (Debian's, with 8021q) does the real VLAN work on its side.

Why a program: the kernel that runs the image test may lack 802.1Q (CONFIG_VLAN_8021Q, bridge
vlan_filtering, act_vlan), as the machine this was written on does; AF_PACKET sockets need none
of them. The kernel may take a received tag out of the frame (it then reports it in
PACKET_AUXDATA); both ways are read. Frames this program sends itself are not read back.

Frames that leave a host through a veth or a virtio NIC often carry a checksum the sender left
to "the hardware" (TP_STATUS_CSUMNOTREADY): the kernel would complete it on the way out, but a
copy taken by a packet socket is sent on as it is, so this switch completes the TCP, UDP and
ICMPv6 checksums of such frames itself. Frames longer than an Ethernet frame (segmentation
offload) are dropped: the test's flows are small.
"""

import select
import signal
import socket
import struct
import sys

ETH_P_ALL = 0x0003
ETH_P_8021Q = 0x8100
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4
MAX_FRAME = 1514


def ones_complement(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_checksum(frame):
    """The frame with its TCP/UDP/ICMPv6 checksum computed (IPv4 or IPv6 without extension
    headers); other frames as they are."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        total = struct.unpack("!H", frame[16:18])[0]
        l4 = 14 + ihl
        end = 14 + total
        pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, end - l4)
    elif ethertype == 0x86DD and len(frame) >= 54:
        proto = frame[20]
        l4 = 54
        end = l4 + struct.unpack("!H", frame[18:20])[0]
        pseudo = frame[22:54] + struct.pack("!IxxxB", end - l4, proto)
    else:
        return frame
    offset = {6: 16, 17: 6, 58: 2}.get(proto)
    if offset is None or end > len(frame) or l4 + offset + 2 > end:
        return frame
    segment = bytearray(frame[l4:end])
    segment[offset:offset + 2] = b"\0\0"
    checksum = 0xFFFF - ones_complement(pseudo + bytes(segment))
    if proto == 17 and checksum == 0:
        checksum = 0xFFFF
    segment[offset:offset + 2] = struct.pack("!H", checksum)
    return frame[:l4] + bytes(segment) + frame[end:]


def open_port(name):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((name, 0))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    return s


def receive(s):
    """(vid or None, the frame without a tag), or None for a frame this host sent."""
    data, ancillary, _flags, addr = s.recvmsg(65536, socket.CMSG_SPACE(32))
    if addr[2] == PACKET_OUTGOING:
        return None
    vid = None
    partial = False
    for level, kind, cdata in ancillary:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(cdata) >= 20:
            status, _len, _snap, _mac, _net, tci, _tpid = struct.unpack("IIIHHHH", cdata[:20])
            if status & TP_STATUS_VLAN_VALID:
                vid = tci & 0x0FFF
            partial = bool(status & TP_STATUS_CSUMNOTREADY)
    if vid is None and len(data) >= 18 and struct.unpack("!H", data[12:14])[0] == ETH_P_8021Q:
        vid = struct.unpack("!H", data[14:16])[0] & 0x0FFF
        data = data[:12] + data[16:]
    if partial:
        data = complete_checksum(data)
    return vid, data


def main(argv):
    if len(argv) < 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    trunk_name = argv[1]
    ports = {}
    for spec in argv[2:]:
        vid, _, name = spec.partition("=")
        if not vid.isdigit() or not 1 <= int(vid) <= 4094 or not name:
            print("test-vlan-switch.py: %r is not VID=PORT (VID 1-4094)" % spec, file=sys.stderr)
            return 2
        ports[int(vid)] = name
    trunk = open_port(trunk_name)
    access = {vid: open_port(name) for vid, name in ports.items()}
    by_socket = {s.fileno(): vid for vid, s in access.items()}
    counts = {"tagged in": 0, "tagged out": 0, "dropped": 0}

    def stop(*_):
        print("test-vlan-switch.py: %s" % counts, file=sys.stderr, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([trunk] + list(access.values()), [], [])
        for s in readable:
            got = receive(s)
            if got is None:
                continue
            vid, frame = got
            if len(frame) > MAX_FRAME:
                counts["dropped"] += 1
                continue
            if s is trunk:
                if vid in access:
                    access[vid].send(frame)
                    counts["tagged in"] += 1
                else:
                    counts["dropped"] += 1
            else:
                port_vid = by_socket[s.fileno()]
                if vid is not None:
                    # A host on an access port that tags frames itself: not on this switch.
                    counts["dropped"] += 1
                    continue
                tagged = frame[:12] + struct.pack("!HH", ETH_P_8021Q, port_vid) + frame[12:]
                trunk.send(tagged)
                counts["tagged out"] += 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
