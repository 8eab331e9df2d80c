"""migsec.transfer: VM state as streams over the record layer (placeholder doc, see below)."""
from migsec.transfer.extents import BLOCK, Extent, StreamDigest, bytes_digest, file_digest, iter_extents
from migsec.transfer.manifest import Manifest, ManifestEntry
from migsec.transfer.plane import (
    ACK_INTERVAL,
    MANIFEST_CHANNEL,
    Expected,
    PeerConnectionError,
    Progress,
    ReceiveResult,
    SendResult,
    TokenBucket,
    receive_streams,
    send_streams,
)
from migsec.transfer.sink import Staging, StreamSink
from migsec.transfer.source import KINDS, StreamSource, StreamSpec
