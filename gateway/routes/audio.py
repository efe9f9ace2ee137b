"""Audio routes (OpenAI): POST /v1/audio/transcriptions, /v1/audio/translations, /v1/audio/speech.

Transcriptions take multipart form data as the OpenAI SDK sends it (file, model, language,
prompt, temperature, response_format, timestamp_granularities[]); the gateway decodes the file
(`audio_codec`), so a wrong format or an empty file is a 400 before any model loads, and the
worker gets 16 kHz PCM. Speech streams the worker's audio chunks as they are generated (wav and
pcm), or encodes the whole clip (flac, mp3, opus).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mlx_gw.gateway.errors import BadRequest, GatewayError
from mlx_gw.gateway.state import SUPERVISOR
from mlx_gw.gateway.translate import audio_codec
from mlx_gw.gateway.translate.schemas import decode, keep_alive_param
from mlx_gw.worker.protocol import AudioChunk, Speak, Transcribe, Transcription

routes = web.RouteTableDef()
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_SPEECH_CHARS = 4096  # OpenAI's limit on `input`
DEFAULT_RATE = 24000  # OpenAI's sample rate, for a clip with no audio in it


async def _form(request: web.Request) -> dict[str, Any]:
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send the audio as multipart/form-data with a 'file' field (as the "
                         "OpenAI SDK does)", param="file")
    try:
        form = await request.post()
    except HttpProcessingError as e:  # aiohttp's multipart parser on a malformed part
        raise BadRequest(f"The multipart body is malformed: {e.message}", param="file") from None
    except ValueError as e:
        raise BadRequest(f"The multipart body is malformed: {e}", param="file") from None
    fields: dict[str, Any] = {}
    for key, value in form.items():
        if key in ("timestamp_granularities[]", "timestamp_granularities"):
            fields.setdefault("timestamp_granularities", []).append(str(value))
        else:
            fields[key] = value
    return fields


def _str(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a text field", param=key)
    return value


async def _transcribe(request: web.Request, task: str) -> web.Response:
    route = request.path
    fields = await _form(request)
    name = _str(fields, "model")
    if name is None:
        raise BadRequest("'model' is required", param="model")
    sup = request.app[SUPERVISOR]
    model = sup.resolve(name, route)
    upload = fields.get("file")
    if upload is None or isinstance(upload, str):
        raise BadRequest("'file' is required: the audio file to transcribe", param="file")
    fmt = _str(fields, "response_format") or "json"
    if fmt not in FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(FORMATS)}",
                         param="response_format")
    try:
        temperature = float(_str(fields, "temperature") or 0)
    except ValueError:
        raise BadRequest("temperature must be a number", param="temperature") from None
    if not 0 <= temperature <= 1:
        raise BadRequest("temperature must be between 0 and 1", param="temperature")
    grains = fields.get("timestamp_granularities", [])
    if any(g not in ("word", "segment") for g in grains):
        raise BadRequest("timestamp_granularities may hold 'word' and 'segment'",
                         param="timestamp_granularities")
    audio = await audio_codec.decode_upload(upload.file.read(), upload.filename or "file")
    msg = Transcribe(rid=0, audio=audio, task=task,
                     language=_str(fields, "language") if task == "transcribe" else None,
                     prompt=_str(fields, "prompt"), temperature=temperature,
                     word_timestamps="word" in grains)
    keep_alive = keep_alive_param(_str(fields, "keep_alive"))
    async with sup.lease(model, keep_alive) as handle:
        result = await handle.call(msg)
    assert isinstance(result, Transcription)
    return _shape(result, fmt, task, model.name, "word" in grains)


def _shape(r: Transcription, fmt: str, task: str, model: str, words: bool) -> web.Response:
    if fmt == "text":
        return web.Response(text=r.text + "\n", content_type="text/plain")
    if fmt in ("srt", "vtt"):
        return web.Response(text=_subtitles(r.segments, fmt), content_type="text/plain")
    usage = {"type": "duration", "seconds": max(1, round(r.duration))}
    if fmt == "json":
        return web.json_response({"text": r.text, "usage": usage})
    keep = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob")
    body: dict[str, Any] = {
        "task": task, "language": r.language, "duration": round(r.duration, 3), "text": r.text,
        "segments": [{k: s[k] for k in keep if k in s} for s in r.segments], "usage": usage,
    }
    if words:
        body["words"] = r.words
    return web.json_response(body)


def _stamp(t: float, sep: str) -> str:
    ms = round(t * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _subtitles(segments: list[dict[str, Any]], fmt: str) -> str:
    sep = "," if fmt == "srt" else "."
    out = ["WEBVTT\n"] if fmt == "vtt" else []
    for i, seg in enumerate(segments, 1):
        span = f"{_stamp(seg['start'], sep)} --> {_stamp(seg['end'], sep)}"
        text = str(seg.get("text", "")).strip()
        out.append(f"{i}\n{span}\n{text}\n" if fmt == "srt" else f"{span}\n{text}\n")
    return "\n".join(out)


@routes.post("/v1/audio/transcriptions")
async def transcriptions(request: web.Request) -> web.Response:
    return await _transcribe(request, "transcribe")


@routes.post("/v1/audio/translations")
async def translations(request: web.Request) -> web.Response:
    return await _transcribe(request, "translate")


# ---------------------------------------------------------------- text to speech


class SpeechRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str
    voice: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: str | None = None
    keep_alive: str | int | float | None = None


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.StreamResponse:
    req = decode(await request.read(), SpeechRequest)
    sup = request.app[SUPERVISOR]
    model = sup.resolve(req.model, "/v1/audio/speech")
    if not req.input.strip():
        raise BadRequest("'input' must not be empty", param="input")
    if len(req.input) > MAX_SPEECH_CHARS:
        raise BadRequest(f"'input' is longer than {MAX_SPEECH_CHARS} characters", param="input")
    if not 0.25 <= req.speed <= 4.0:
        raise BadRequest("speed must be between 0.25 and 4.0", param="speed")
    fmt = req.response_format
    audio_codec.check_format(fmt)
    msg = Speak(rid=0, text=req.input, voice=req.voice, speed=req.speed)
    resp: web.StreamResponse | None = None
    async with sup.lease(model, keep_alive_param(req.keep_alive)) as handle:
        chunks = handle.results(msg)
        whole: list[bytes] = []
        rate = 0
        try:
            async for chunk in chunks:
                assert isinstance(chunk, AudioChunk)
                rate = chunk.sample_rate or rate
                if fmt not in audio_codec.STREAMED:
                    whole.append(chunk.pcm)
                    continue
                if not chunk.pcm:
                    continue
                if resp is None:  # the first chunk: headers (errors before it keep a status)
                    resp = web.StreamResponse(headers={
                        "Content-Type": audio_codec.CONTENT_TYPES[fmt],
                        "X-Sample-Rate": str(rate)})
                    await resp.prepare(request)
                    if fmt == "wav":
                        await resp.write(audio_codec.wav_header(rate))
                if chunk.pcm:
                    await resp.write(audio_codec.to_pcm16(chunk.pcm))
        except GatewayError:
            if resp is None:
                raise
            await resp.write_eof()  # mid-stream: the audio ends early (no way to say more)
            return resp
        finally:
            await chunks.aclose()
    if resp is not None:
        await resp.write_eof()
        return resp
    rate = rate or DEFAULT_RATE  # no audio at all: an empty clip
    if fmt in audio_codec.STREAMED:
        body = audio_codec.wav_header(rate) if fmt == "wav" else b""
    else:
        body = await asyncio.to_thread(audio_codec.encode_whole, fmt, b"".join(whole), rate)
    return web.Response(body=body, content_type=audio_codec.CONTENT_TYPES[fmt])
