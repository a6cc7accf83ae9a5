"""A GGUF model's layers, from the file's own tensor table.

The `gguf` package (PyPI, an optional extra: not in Debian) maps the file and reads its
metadata and tensor table without loading any weight. A layer's size is the sum of its
`blk.{i}.*` tensors; `output` and `output_norm` go with the last GPU, `token_embd`
stays on the CPU (llama.cpp's placement, see lmproxy.layerplan). The KV cache a layer
needs per token comes from the attention metadata (f16 keys and values, llama.cpp's
default cache type).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "install the gguf package, `pip install gguf` (lmproxy's `gguf` extra)"
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.")
F16_BYTES = 2


class GgufError(Exception):
    """The file cannot be read as a GGUF model here; the message says why."""


@dataclass(frozen=True)
class ModelLayers:
    path: str
    size_bytes: int  # the whole file
    architecture: str
    layers: tuple[int, ...]  # bytes of each block, blk.0 first
    output_bytes: int  # output and output_norm: with the last offloaded layer
    embedding_bytes: int  # token_embd: stays on the CPU
    context_length: int | None  # what the model was trained for
    kv_bytes_per_token: tuple[int, ...] | None  # each layer's K+V cache per token (f16)

    def kv_bytes(self, layer: int, context: int) -> int:
        """The KV cache one layer holds for a context of `context` tokens."""
        return 0 if self.kv_bytes_per_token is None else self.kv_bytes_per_token[layer] * context


def read_layers(path: str) -> ModelLayers:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GgufError(f"the gguf package is not installed: {INSTALL_HINT}") from None
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as error:
        raise GgufError(f"{path} is not a GGUF file lmproxy can read: {error}") from None
    fields = {name: field.contents() for name, field in reader.fields.items()}
    architecture = str(fields.get("general.architecture", ""))
    tensors = {str(t.name): int(t.n_bytes) for t in reader.tensors}
    return layers_of(path, os.path.getsize(path), architecture, fields, tensors)


def layers_of(
    path: str,
    size: int,
    architecture: str,
    fields: Mapping[str, Any],
    tensors: Mapping[str, int],
) -> ModelLayers:
    """The model's layers from its metadata and tensor sizes (pure, for the tests)."""
    count = fields.get(f"{architecture}.block_count")
    blocks = [
        int(match.group(1)) for name in tensors if (match := _LAYER_TENSOR.match(name)) is not None
    ]
    n_layer = int(count) if isinstance(count, int) else (max(blocks) + 1 if blocks else 0)
    if n_layer == 0:
        raise GgufError(f"{path} has no layers (no {architecture}.block_count, no blk.* tensor)")
    sizes = [0] * n_layer
    output = embedding = 0
    for name, n_bytes in tensors.items():
        match = _LAYER_TENSOR.match(name)
        if match is not None and int(match.group(1)) < n_layer:
            sizes[int(match.group(1))] += n_bytes
        elif name.startswith("token_embd"):
            embedding += n_bytes
        else:
            output += n_bytes  # output, output_norm, and whatever else is not a layer
    context = fields.get(f"{architecture}.context_length")
    return ModelLayers(
        path=path,
        size_bytes=size,
        architecture=architecture,
        layers=tuple(sizes),
        output_bytes=output,
        embedding_bytes=embedding,
        context_length=int(context) if isinstance(context, int) else None,
        kv_bytes_per_token=_kv_per_token(architecture, fields, n_layer),
    )


def _kv_per_token(
    architecture: str, fields: Mapping[str, Any], n_layer: int
) -> tuple[int, ...] | None:
    """Each layer's K and V cache per token, in bytes (f16); None when the metadata
    does not say (then no KV cache is counted)."""

    def per_layer(name: str) -> list[int] | None:
        value = fields.get(f"{architecture}.{name}")
        if isinstance(value, int):
            return [value] * n_layer
        if isinstance(value, list) and len(value) == n_layer:
            return [int(v) for v in value]
        return None

    embedding, heads = per_layer("embedding_length"), per_layer("attention.head_count")
    heads_kv = per_layer("attention.head_count_kv") or heads
    if embedding is None or heads is None or heads_kv is None:
        return None
    keys = per_layer("attention.key_length")
    values = per_layer("attention.value_length")
    result = []
    for i in range(n_layer):
        if heads[i] == 0:
            result.append(0)  # a layer without attention (some hybrid models)
            continue
        head = embedding[i] // heads[i]
        key, value = (keys[i] if keys else head), (values[i] if values else head)
        result.append((key + value) * heads_kv[i] * F16_BYTES)
    return tuple(result)
