"""Audio files in and out of the gateway, in Python: no MLX here.

`decode_upload` turns an uploaded file into mono float32 PCM at 16 kHz (what Whisper wants):
WAV, FLAC, OGG (and MP3 where libsndfile has it) through soundfile, other formats through the
ffmpeg program when it is installed, else a 400 that says what to install. `Encoder` turns
generated float32 PCM into the response_format asked for: wav and pcm stream chunk by chunk,
flac/mp3/opus are encoded by libsndfile once the audio is complete. numpy and soundfile come
with the `stt` and `tts` extras and are imported on first use.
"""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import struct
from typing import Any

from mlx_gw.gateway.errors import BadRequest, Unavailable

TARGET_RATE = 16000
FFMPEG_TIMEOUT_S = 120.0
INSTALL_FFMPEG = ("install ffmpeg for other formats (apt-get install ffmpeg, brew install "
                  "ffmpeg) or send WAV, FLAC or OGG")


def _libs() -> tuple[Any, Any]:
    try:
        import numpy as np
        import soundfile as sf
    except ImportError as e:
        raise Unavailable(f"audio needs numpy and soundfile in the gateway ({e}): "
                          "pip install 'mlx-gw[stt]'", code="missing_dependency") from None
    return np, sf


def _resample(x, rate: int, target: int):
    np, _ = _libs()
    if rate == target:
        return x
    try:
        from scipy.signal import resample_poly
    except ImportError:  # linear interpolation: fine for speech, no extra dependency
        n = max(1, round(len(x) * target / rate))
        return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)
    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def _decode_sync(data: bytes) -> tuple[Any, int] | None:
    np, sf = _libs()
    try:
        x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None
    return x.mean(axis=1).astype(np.float32), int(rate)


async def _ffmpeg(data: bytes, filename: str):
    np, _ = _libs()
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise BadRequest(f"cannot decode the audio file '{filename}': mlx-gw reads WAV, FLAC and "
                         f"OGG itself; {INSTALL_FFMPEG}", code="unsupported_audio_format",
                         param="file")
    proc = await asyncio.create_subprocess_exec(
        exe, "-nostdin", "-loglevel", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1",
        "-ar", str(TARGET_RATE), "pipe:1", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), FFMPEG_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BadRequest(f"decoding '{filename}' with ffmpeg took longer than "
                         f"{FFMPEG_TIMEOUT_S:.0f}s", param="file") from None
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip().splitlines()[-1:] or ["unknown error"]
        raise BadRequest(f"cannot decode the audio file '{filename}': ffmpeg says: {why[0]}",
                         code="unsupported_audio_format", param="file")
    return np.frombuffer(out, dtype=np.float32)


async def decode_upload(data: bytes, filename: str) -> bytes:
    """The upload as mono float32 little-endian PCM at 16 kHz; a 400 when it is not audio."""
    if not data:
        raise BadRequest(f"the audio file '{filename}' is empty", param="file")
    decoded = await asyncio.to_thread(_decode_sync, data)
    if decoded is None:
        pcm = await _ffmpeg(data, filename)
    else:
        x, rate = decoded
        pcm = await asyncio.to_thread(_resample, x, rate, TARGET_RATE)
    if len(pcm) == 0:
        raise BadRequest(f"the audio file '{filename}' holds no samples", param="file")
    return pcm.astype("<f4").tobytes()


# ---------------------------------------------------------------- encoding (text to speech)

STREAMED = ("wav", "pcm")
CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac",
                 "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac"}
_SF_FORMATS = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
               "opus": ("OGG", "OPUS")}


def check_format(fmt: str) -> None:
    """A 400 now (before any work) when `fmt` cannot be produced here."""
    if fmt in STREAMED:
        return
    if fmt not in CONTENT_TYPES:
        raise BadRequest(f"response_format must be one of {', '.join(CONTENT_TYPES)}",
                         param="response_format")
    _, sf = _libs()
    container, subtype = _SF_FORMATS.get(fmt, ("", ""))
    if not container or subtype not in sf.available_subtypes(container):
        raise BadRequest(f"response_format '{fmt}' needs an encoder this installation lacks "
                         "(libsndfile has none for it); use wav, pcm, flac, mp3 or opus where "
                         "available", code="unsupported_audio_format", param="response_format")


def wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes set to the maximum, as
    streaming servers do; players read to the end)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def to_pcm16(chunk: bytes) -> bytes:
    np, _ = _libs()
    x = np.frombuffer(chunk, dtype=np.float32)
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def encode_whole(fmt: str, pcm: bytes, rate: int) -> bytes:
    """The complete audio in a container libsndfile writes (flac, mp3, opus)."""
    np, sf = _libs()
    container, subtype = _SF_FORMATS[fmt]
    x = np.frombuffer(pcm, dtype=np.float32)
    if fmt == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
        x, rate = _resample(x, rate, 48000), 48000
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=container, subtype=subtype)
    return buf.getvalue()
