"""Wall-clock helpers: the store keeps epoch seconds, the API speaks google.protobuf.Timestamp."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp


def now() -> float:
    return time.time()


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def seconds_of(stamp: Timestamp) -> float:
    return float(stamp.ToNanoseconds()) / 1e9
