#!/usr/bin/env python3
"""A vsva host client written from docs/protocol.md alone (Python 3, standard library).

Connects to `vsva host --socket PATH`, opens a VFIO container, sets the nesting IOMMU
model, shares a memfd as the VM's RAM, maps it for DMA, allocates and frees a PASID, and
prints what it did. With `--iommu smmuv3`, for a host started so, it then does what an
SMMUv3 VMM does instead of binding PASIDs (its guest owns the CD table and the
SubstreamIDs, so it needs no PASID from the host, though the host answers the request
as on VT-d): plugs in the device, attaches a CD table in the RAM (and sees one beyond the
RAM refused), and detaches it. Exits non-zero with a message on any failure.

Usage: client.py SOCKET [--iommu vtd|smmuv3]
"""

import array
import errno
import mmap
import os
import socket
import struct
import sys

MAGIC = b"VSVA"
VERSION = 1
REPLY = 0x8000
HELLO, IOCTL, READ, WRITE, ADD_MEMORY, SET_EVENTFD, STATE, DEVICE_ADD = range(1, 9)
FILE_VFIO_CONTAINER = 1

VFIO_GET_API_VERSION = 0x3B64
VFIO_SET_IOMMU = 0x3B66
VFIO_IOMMU_MAP_DMA = 0x3B71
VFIO_IOMMU_UNMAP_DMA = 0x3B72
VFIO_IOMMU_PASID_REQUEST = 0x3B7F
VFIO_IOMMU_ATTACH_PASID_TABLE = 0x3B7A
VFIO_IOMMU_DETACH_PASID_TABLE = 0x3B7B
VFIO_TYPE1_NESTING_IOMMU = 6
ALLOC, FREE = 1, 2
# iommu_pasid_table_config: version 1, format 1 (SMMUv3), config 1 (translate); its
# SMMUv3 data version 1.
PASID_TABLE_CFG_VERSION_1, IOMMU_PASID_FORMAT_SMMUV3, IOMMU_PASID_CONFIG_TRANSLATE = 1, 1, 1
PASID_TABLE_SMMUV3_CFG_VERSION_1 = 1
# The StreamIDs an SMMUv3 host gives its devices.
SMMU_STREAMS = range(0x100, 0x200)

STATE_FIELDS = (
    "connections allocated_bytes windows window_bytes pasids domain_ids devices "
    "page_request_routes page_request_sinks iotlb context_cache pasid_cache "
    "dma_mappings binds page_requests faults_unread strict_violations"
).split()


class HostError(Exception):
    pass


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.next_id = 1
        payload = struct.pack("<HHI", VERSION, VERSION, FILE_VFIO_CONTAINER)
        result, data = self.call(HELLO, payload)
        version, _, max_payload, in_flight, windows, window_bytes = struct.unpack(
            "<HHIIIQ", data
        )
        self.limits = dict(version=version, max_payload=max_payload,
                           max_in_flight=in_flight, max_windows=windows,
                           max_window_bytes=window_bytes)

    def call(self, kind, payload=b"", fds=()):
        rid = self.next_id
        self.next_id += 1
        frame = MAGIC + struct.pack("<HHII", VERSION, kind, rid, len(payload)) + payload
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([frame], anc)
        reply = self.sock.recv(16 + 65536 + 8)
        if len(reply) < 24:
            raise HostError("the host closed the connection")
        magic, version, rkind, rrid, length = struct.unpack("<4sHHII", reply[:16])
        if magic != MAGIC or version != VERSION or rkind != kind | REPLY or rrid != rid:
            raise HostError("a reply outside the protocol")
        if length != len(reply) - 16:
            raise HostError("a reply whose length is wrong")
        (result,) = struct.unpack("<q", reply[16:24])
        if result < 0:
            raise HostError("%s failed: %s" % (kind, os.strerror(-result)), -result)
        return result, reply[24:]

    def ioctl(self, cmd, arg=b""):
        return self.call(IOCTL, struct.pack("<I", cmd) + arg)

    def add_memory(self, fd, addr, size):
        self.call(ADD_MEMORY, struct.pack("<QQ", addr, size), fds=(fd,))

    def state(self):
        _, data = self.call(STATE)
        return dict(zip(STATE_FIELDS, struct.unpack("<%dQ" % len(STATE_FIELDS), data)))


def attach_pasid_table(base, pasid_bits, s1fmt=0, s1dss=1):
    """The argument of VFIO_IOMMU_ATTACH_PASID_TABLE: argsz, flags, then the config."""
    config = struct.pack(
        "<IIQBB6xIBB2x",
        PASID_TABLE_CFG_VERSION_1, IOMMU_PASID_FORMAT_SMMUV3, base, pasid_bits,
        IOMMU_PASID_CONFIG_TRANSLATE, PASID_TABLE_SMMUV3_CFG_VERSION_1, s1fmt, s1dss,
    )
    return struct.pack("<II", 8 + len(config), 0) + config


def pasids(c):
    """A PASID allocated and freed again."""
    pasid, _ = c.ioctl(VFIO_IOMMU_PASID_REQUEST, struct.pack("<IIII", 16, ALLOC, 1, 1000))
    held = c.state()
    print("allocated PASID", pasid, "host holds", held["pasids"], "PASIDs")
    c.ioctl(VFIO_IOMMU_PASID_REQUEST, struct.pack("<IIII", 16, FREE, pasid, pasid))
    after = c.state()
    if after["pasids"] != held["pasids"] - 1:
        sys.exit("the PASID was not freed: %r" % after)
    print("freed PASID", pasid)


def cd_table(c, size):
    """On an SMMUv3 host: the device plugged in, the guest's CD table attached and
    detached, one beyond the RAM refused."""
    before = c.state()
    sid, _ = c.call(DEVICE_ADD)
    if sid not in SMMU_STREAMS:
        sys.exit("StreamID %#x is not one of 0x100..0x200" % sid)
    held = c.state()
    if held["devices"] != before["devices"] + 1:
        sys.exit("the device is not attached: %r" % held)
    print("device at StreamID %#x, host holds %d VMIDs" % (sid, held["domain_ids"]))
    # A CD table of 16 descriptors (64 bytes each) at IPA 0x10000 of the RAM: the STE's
    # S1ContextPtr. The guest would fill it; the host only points its STE there.
    c.ioctl(VFIO_IOMMU_ATTACH_PASID_TABLE, attach_pasid_table(0x10000, 4))
    print("attached the CD table at IPA 0x10000")
    try:
        c.ioctl(VFIO_IOMMU_ATTACH_PASID_TABLE, attach_pasid_table(size, 4))
        sys.exit("a CD table beyond the RAM was attached")
    except HostError as e:
        print("a CD table beyond the RAM is refused:", errno.errorcode.get(e.args[1], e.args[1]))
    c.ioctl(VFIO_IOMMU_DETACH_PASID_TABLE)
    print("detached the CD table")


def main():
    args = sys.argv[1:]
    iommu = "vtd"
    if len(args) == 3 and args[1] == "--iommu" and args[2] in ("vtd", "smmuv3"):
        iommu = args[2]
    elif len(args) != 1:
        sys.exit("usage: client.py SOCKET [--iommu vtd|smmuv3]")
    c = Client(args[0])
    print("connected:", c.limits)
    result, _ = c.ioctl(VFIO_GET_API_VERSION)
    print("VFIO API version", result)
    c.ioctl(VFIO_SET_IOMMU, struct.pack("<Q", VFIO_TYPE1_NESTING_IOMMU))

    size = 2 << 20
    fd = os.memfd_create("client-py-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # The address of the mapping in this process (ctypes is standard library too).
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    c.add_memory(fd, addr, size)
    dma_map = struct.pack("<IIQQQ", 32, 3, addr, 0, size)
    c.ioctl(VFIO_IOMMU_MAP_DMA, dma_map)
    print("mapped %d bytes of RAM at IOVA 0" % size)

    pasids(c)
    if iommu == "smmuv3":
        cd_table(c, size)
    unmap = struct.pack("<IIQQ", 24, 0, 0, size)
    try:
        c.ioctl(VFIO_IOMMU_UNMAP_DMA, unmap)
    except HostError as e:
        sys.exit("unmap: %s" % e)
    print("ok")


if __name__ == "__main__":
    try:
        main()
    except (HostError, OSError) as e:
        sys.exit("client.py: %s" % e)
