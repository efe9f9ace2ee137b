"""Every message the gateway and a worker exchange: typed msgspec structs, msgpack on the wire.

This is the only module both sides import. One ZeroMQ PUSH/PULL pair per worker carries it:
the gateway PUSHes `ToWorker` messages, the worker PUSHes `FromWorker` messages back. Request
ids (`rid`) multiplex many streams over the pair. Outputs are batched per engine step (one
`Outputs` frame per decode step, carrying a `Delta` for every sequence that advanced), never
one frame per token per request. Add a field here or nowhere.
"""

from __future__ import annotations

from typing import Any

import msgspec

# ---------------------------------------------------------------- gateway -> worker


class _Msg(msgspec.Struct, tag_field="t", array_like=True, omit_defaults=True, gc=False):
    pass


class Load(_Msg, tag="load"):
    """Load a model into this (so far empty) worker. Answered by `Ready` or `Error(rid=0)`."""

    name: str
    type: str  # llm | vlm | embedding | tts | stt
    path: str
    dtype: str = "auto"
    max_batch: int = 16
    context_length: int | None = None  # override of the model's own window
    memory_limit_bytes: int | None = None  # this worker's share of the ceiling (MLX limit)
    prompt_cache_bytes: int | None = None  # KV kept across requests; None: default, 0: off
    # The prompt cache's disk tier: the directory ("" = none) and its byte budget.
    prompt_cache_disk: str = ""
    prompt_cache_disk_bytes: int = 0
    warm_prompts: list[str] = []  # system prompts prefilled into the prompt cache at load
    kv_bits: int = 0  # 4 or 8: keys and values stored quantized; 0: full precision
    kv_group_size: int = 64
    warmup: str = "auto"  # the batch shapes run before Ready: auto | off | minimal | full
    adapters: dict[str, str] = {}  # LoRA adapters served by this worker: name -> directory
    speculative: str = ""  # ngram | draft: speculative decoding; "" = off
    spec_tokens: int = 4  # tokens proposed per step
    spec_draft_path: str = ""  # method draft: the draft model (same tokenizer) and its dtype
    spec_draft_dtype: str = "auto"


class Generate(_Msg, tag="gen"):
    """One text-generation request. Exactly one of `messages` (chat) or `prompt` is set."""

    rid: int
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # the client's bound; None: `default_max_tokens`
    # The bound when the client sent none (models.yaml `max_tokens`, else the gateway's
    # `default_max_tokens`), cut to what the context window leaves; None: up to the window.
    default_max_tokens: int | None = None
    # Sampling; None = not given: the worker takes the model's own defaults
    # (generation_config.json, then GGUF metadata, then fallbacks for small models).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, tests), as vLLM's flag
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = {}
    # Tool calling: OpenAI-shaped `tools` rendered by the chat template; `tool_choice` is
    # "auto" | "required" | a function name (forcing one call through constrained decoding).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"
    tool_parser: str = "auto"  # models.yaml `tool_parser`: auto = from the chat template
    reasoning_parser: str | list[str] = "auto"  # models.yaml `reasoning_parser`
    # Structured output: a JSON schema the output must match ({} = any JSON object).
    json_schema: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    count_only: bool = False  # tokenize, answer one Delta with prompt_tokens, generate nothing
    adapter: str = ""  # the LoRA adapter (Load.adapters / AddAdapter name) to decode with


class Cancel(_Msg, tag="cancel"):
    """Drop request `rid` (client went away); the worker frees its sequence at once."""

    rid: int


class TrimCache(_Msg, tag="trim"):
    """Memory pressure: drop prompt-cache entries (least recently used first) until at most
    `max_bytes` remain. Answered by the next Heartbeat's figures."""

    max_bytes: int


class Shutdown(_Msg, tag="shutdown"):
    """Exit now. The gateway drains before it sends this."""


class Embed(_Msg, tag="embed"):
    """Embed each of `texts` (or of `token_ids`, pre-tokenized inputs): one `Embeddings`
    answers. `dimensions` shortens the vectors (then renormalised); `truncate` cuts inputs
    longer than the model's window instead of refusing them."""

    rid: int
    texts: list[str] = []
    token_ids: list[list[int]] = []
    dimensions: int | None = None
    truncate: bool = False


class Transcribe(_Msg, tag="stt"):
    """Speech to text. `audio` is mono float32 little-endian PCM at 16 kHz (the gateway
    decodes and resamples). Answered by one `Transcription`."""

    rid: int
    audio: bytes
    task: str = "transcribe"  # transcribe | translate (to English)
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False


class Speak(_Msg, tag="tts"):
    """Text to speech. Answered by `AudioChunk`s as the audio is generated, the last `final`."""

    rid: int
    text: str
    voice: str | None = None
    speed: float = 1.0


class AddAdapter(_Msg, tag="addad"):
    """Load LoRA adapter `name` from directory `path` beside the base weights (replacing one
    of that name). Answered by `AdapterDone` or an Error."""

    rid: int
    name: str
    path: str


class RemoveAdapter(_Msg, tag="rmad"):
    """Forget adapter `name`; refused (Error "conflict") while a sequence decodes with it."""

    rid: int
    name: str


class Train(_Msg, tag="train"):
    """Fine-tune the loaded base (a worker loaded with type "train") with mlx-lm's LoRA
    trainer on `data_dir`'s train.jsonl (and valid.jsonl, if there), writing the adapter to
    `adapter_dir`. Answered by `TrainEvent`s, the last `final`, or an Error."""

    rid: int
    data_dir: str
    adapter_dir: str
    iters: int
    batch_size: int = 4
    learning_rate: float = 1e-5
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = 0  # the last N blocks get LoRA layers; 0: mlx-lm's 16 (or all); -1: all
    max_seq_length: int = 2048
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    mask_prompt: bool = False
    seed: int = 0


class Fuse(_Msg, tag="fuse"):
    """Merge the LoRA adapter in `adapter_dir` into the loaded base (type "train") and save
    the whole model to `output_dir`. Answered by one final `TrainEvent` ("fused")."""

    rid: int
    adapter_dir: str
    output_dir: str


ToWorker = (Load | Generate | Cancel | TrimCache | Shutdown | Embed | Transcribe | Speak
            | AddAdapter | RemoveAdapter | Train | Fuse)
# Messages that start a request (each carries a fresh `rid`).
REQUESTS = (Generate, Embed, Transcribe, Speak, Train, Fuse)

# ---------------------------------------------------------------- worker -> gateway


class Hello(_Msg, tag="hello"):
    """Sent once the process is up and MLX is imported, before any model is loaded."""

    pid: int
    memory_bytes: int


class Ready(_Msg, tag="ready"):
    """The model is loaded and the worker accepts requests."""

    pid: int
    context_length: int
    load_seconds: float
    memory_bytes: int
    device: str = ""


class Warming(_Msg, tag="warming"):
    """The weights are loaded; the worker now runs its batch shapes once (a GPU compiles
    kernels for each) and says Ready after. Only sent for the full warm-up."""

    pid: int
    load_seconds: float
    memory_bytes: int


class TokenLogprob(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One generated token's log-probability, with the most likely alternatives when asked."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = []


class Delta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """New text for one request from one engine step. `finish_reason` set on its last delta."""

    rid: int
    text: str = ""
    completion_tokens: int = 0  # total so far
    prompt_tokens: int = 0
    finish_reason: str | None = None  # stop | length | cancelled
    logprobs: list[TokenLogprob] | None = None  # the tokens of this step, when asked
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason "stop")
    # First delta only: how the gateway parses this output. `tool_parser` names the tool-call
    # format ("" = none); `reasoning` is the [start, end] pair of thinking markers ([] = none),
    # `thinking` whether the prompt already opened a thought.
    tool_parser: str = ""
    reasoning: list[str] = []
    thinking: bool = False
    cached_tokens: int = 0  # first delta: prompt tokens served from the prompt cache


class Outputs(_Msg, tag="out"):
    items: list[Delta]


class Error(_Msg, tag="err"):
    """A request (or, with rid 0, the load itself) failed. `code` is one of ERROR_CODES."""

    rid: int
    code: str
    message: str


class Heartbeat(_Msg, tag="hb"):
    memory_bytes: int
    in_flight: int
    queued: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prompt_cache_bytes: int = 0  # KV held for later requests (counted in memory_bytes too)
    prompt_cache_entries: int = 0
    prompt_cache_disk_bytes: int = 0  # this model's entries in the disk tier (not memory)
    prompt_cache_hit_tokens: int = 0  # since load: prompt tokens served from the cache
    prompt_cache_miss_tokens: int = 0  # since load: prompt tokens prefilled
    spec_proposed: int = 0  # since load: speculative tokens proposed, and accepted
    spec_accepted: int = 0
    spec_active: bool = False  # speculating now (off while it does not pay)


class Pulse(_Msg, tag="pulse"):
    """Liveness from the worker's pulse thread, every PULSE_INTERVAL_S whatever the loop is
    doing: one step may rightly take minutes (a GPU's first kernels compile inside it), and
    that is not a hung worker."""


class Embeddings(_Msg, tag="emb"):
    """The vectors of one `Embed`, in input order: each float32 little-endian, L2-normalised."""

    rid: int
    data: list[bytes]
    prompt_tokens: int


class Transcription(_Msg, tag="txt"):
    """The result of one `Transcribe`. Segments and words carry start/end in seconds."""

    rid: int
    text: str
    language: str = ""
    duration: float = 0.0
    segments: list[dict[str, Any]] = []
    words: list[dict[str, Any]] = []


class AudioChunk(_Msg, tag="pcm"):
    """Generated speech for one `Speak`: mono float32 little-endian PCM. The last is `final`
    (it may be empty)."""

    rid: int
    pcm: bytes
    sample_rate: int
    final: bool = False


class AdapterDone(_Msg, tag="addone"):
    """An AddAdapter or RemoveAdapter took effect; `adapters` lists those now loaded."""

    rid: int
    adapters: list[str] = []


class TrainEvent(_Msg, tag="trev"):
    """A training job's progress: `kind` is "training" (set up: sizes in `detail`), "progress"
    (one report: mean loss since the last, throughput), "val" (validation loss), "saving",
    then the `final` one, "saved" (or "fused" for a Fuse), with the directory in `path`."""

    rid: int
    kind: str
    iteration: int = 0
    loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    iterations_per_second: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int = 0
    peak_memory_bytes: int = 0
    path: str = ""
    detail: dict[str, Any] = {}
    final: bool = False


FromWorker = (Hello | Warming | Ready | Outputs | Error | Heartbeat | Pulse | Embeddings
              | Transcription | AudioChunk | AdapterDone | TrainEvent)
# One-shot or chunked answers to a request, other than text `Outputs` (routed by `rid`).
RESULTS = (Embeddings, Transcription, AudioChunk, AdapterDone, TrainEvent)

# Error codes a worker may send, each mapped to one HTTP status by the gateway.
ERROR_CODES = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "not_found": 404,  # e.g. an adapter this worker does not hold
    "conflict": 409,
    "unsupported": 400,
    "overloaded": 429,
    "load_failed": 503,
    "internal": 500,
}

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)
