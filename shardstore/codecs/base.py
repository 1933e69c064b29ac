"""What every codec is: a frozen dataclass with an id, a JSON config, encode and decode.

Modelled on numcodecs: ``get_config()`` returns a JSON-able dict that includes
``"id"``, and :func:`shardstore.codecs.registry.get_codec` turns it back into an
equal codec. A codec id names one byte format forever: to change the format,
register a new id and keep the old class able to decode.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from shardstore.errors import CodecError
from shardstore.format.dtypes import nbytes

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class PieceInfo:
    """What a codec may know about the bytes it is handed: their dtype and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Codec(ABC):
    """One step of the encode/decode pipeline.

    Subclasses are frozen dataclasses whose fields are the config. They must be
    safe to call from several threads at once: decode runs in a pool.
    """

    codec_id: ClassVar[str]
    # A lossless codec gives back every bit; the CLI and inspect report which is which.
    lossless: ClassVar[bool] = True

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": self.codec_id}
        config.update(dataclasses.asdict(self))
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields - {"id"}
        if unknown:
            raise CodecError(f"codec {cls.codec_id}: unknown config keys {sorted(unknown)}")
        kwargs = {k: v for k, v in config.items() if k != "id"}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"codec {cls.codec_id}: bad config {config}: {exc}") from None

    def output_info(self, info: PieceInfo) -> PieceInfo:
        """What the next codec in a pipeline is handed, known before any data is seen.

        Only codecs whose output has a fixed dtype and shape (a quantizer, a
        delta) can be followed by another; an entropy coder's output size
        depends on the data, so it must come last.
        """
        raise CodecError(f"codec {self.codec_id} must be the last in a pipeline")

    @abstractmethod
    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        """Encode ``data`` (exactly ``info.nbytes`` little-endian bytes)."""

    @abstractmethod
    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        """Decode to exactly ``info.nbytes`` bytes.

        When ``out`` is given (a writable, C-contiguous byte view of that size)
        the result is written there and ``out`` is returned, so that callers can
        decode straight into their destination buffer. A codec must never
        produce more than ``info.nbytes`` bytes (no decompression bombs) and
        raises :class:`CodecError` on any malformed stream.
        """


def check_out(out: memoryview | None, size: int, codec_id: str) -> memoryview:
    """Return a writable byte view of ``size`` bytes: ``out`` itself or a new buffer."""
    if out is None:
        return memoryview(bytearray(size))
    view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
    if view.nbytes != size or view.readonly:
        raise CodecError(f"codec {codec_id}: output buffer must be {size} writable bytes")
    return view
