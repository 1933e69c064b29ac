"""A codec pipeline: the ordered codecs a tensor's pieces pass through, recorded as JSON configs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardstore.codecs.base import Buffer, Codec, PieceInfo
from shardstore.codecs.registry import get_codec
from shardstore.errors import CodecError


@dataclass(frozen=True)
class Pipeline:
    codecs: tuple[Codec, ...]

    @classmethod
    def from_configs(cls, configs: Sequence[dict[str, Any]]) -> Pipeline:
        if not configs:
            raise CodecError("a codec pipeline needs at least one codec")
        return cls(tuple(get_codec(dict(c)) for c in configs))

    def configs(self) -> list[dict[str, Any]]:
        return [c.get_config() for c in self.codecs]

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.codecs)

    def stage_infos(self, info: PieceInfo) -> list[PieceInfo]:
        """The info each stage is handed, first to last."""
        infos = [info]
        for codec in self.codecs[:-1]:
            infos.append(codec.output_info(infos[-1]))
        return infos

    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        encoded: Buffer = data
        for codec, stage_info in zip(self.codecs, self.stage_infos(info), strict=True):
            encoded = codec.encode(encoded, stage_info)
        return bytes(encoded)

    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        infos = self.stage_infos(info)
        data: Buffer = encoded
        for index in range(len(self.codecs) - 1, -1, -1):
            # Only the first stage writes the caller's buffer; the rest are intermediates.
            data = self.codecs[index].decode(data, infos[index], out if index == 0 else None)
        return data
