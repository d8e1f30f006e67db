"""Speech in (decoding, Whisper tiny.en through faster-whisper) and out (Piper, espeak-ng), on real weights.

The spoken clips are made here by the voices themselves, so the expected text is known."""
import io
import os
import sys
import wave

import numpy as np
import pytest

from mmchat.errors import MMChatError
from mmchat.multimodal import audio, speech, speech_eval

needs_whisper = pytest.mark.skipif(audio.missing() is not None, reason=f"{audio.missing()} (the speech extra)")
needs_av = pytest.mark.skipif(audio.missing() is not None, reason="PyAV comes with the speech extra: "
                              "pip install 'mmchat[speech]'")
needs_piper = pytest.mark.skipif(speech.piper_missing() is not None, reason=f"{speech.piper_missing()} (the speech extra)")
needs_espeak = pytest.mark.skipif(speech.espeak_missing() is not None, reason=str(speech.espeak_missing()))


def tone(freq=440.0, seconds=1.0, rate=44100, channels=1, width=2) -> bytes:
    """A sine tone as a PCM WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    ints = np.round(x * (2 ** (8 * width - 1) - 1)).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = np.stack([(ints >> s) & 0xFF for s in (0, 8, 16)], axis=1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype(f"<i{width}").tobytes()
    frames = np.frombuffer(raw, np.uint8).reshape(len(t), width)
    frames = np.repeat(frames, channels, axis=0).tobytes()  # the same sound in every channel
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


def peak_hz(x: np.ndarray, rate: int = audio.SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum) * rate / len(x))


# -- decoding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,channels,rate", [(2, 1, 44100), (1, 1, 8000), (3, 2, 48000), (4, 1, 16000),
                                                 (2, 2, 22050)])
def test_pcm_wav_decodes_to_16k_mono(width, channels, rate):
    x = audio.decode_audio(tone(440, 1.0, rate, channels, width))
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - audio.SAMPLE_RATE) <= 1
    assert abs(peak_hz(x) - 440) < 3
    assert 0.4 < np.abs(x).max() < 0.6  # the amplitude survives bit depth, channels and resampling


def test_downsampling_does_not_fold_high_sound_into_speech():
    """A 12 kHz tone is above the 8 kHz that 16 kHz audio can hold: it must vanish, not alias to 4 kHz."""
    x = audio.decode_audio(tone(12000, 1.0, 44100))
    assert np.abs(x[160:-160]).max() < 0.05  # (the first and last 10 ms hold the filter's edge)


@needs_av
@pytest.mark.parametrize("fmt", ["mp3", "flac", "opus", "aac"])
def test_other_formats_decode_through_pyav(fmt):
    t = np.arange(22050) / 22050
    data = speech.encode((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050, fmt)
    assert audio.sniff(data) in {"mp3": ("mp3",), "flac": ("flac",), "opus": ("ogg",), "aac": ("mp3",)}[fmt]
    x = audio.decode_audio(data)
    assert abs(peak_hz(x) - 440) < 5
    assert 0.9 < len(x) / audio.SAMPLE_RATE < 1.2  # codecs pad a little


@pytest.mark.parametrize("data,message", [
    (b"", "is empty"),
    (b"just some text, no sound at all", "not in a supported audio format"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not in a supported audio format"),
    (tone()[:30], "corrupt or truncated WAV"),
    (b"RIFF\x24\0\0\0WAVEjunk" + b"\0" * 40, "corrupt WAV"),
])
def test_bad_audio_gives_one_line_error(data, message):
    with pytest.raises(MMChatError, match=message) as e:
        audio.decode_audio(data, "upload.wav")
    assert "\n" not in str(e.value)


@needs_av
@pytest.mark.parametrize("head", [b"OggS", b"ID3", b"fLaC", b"\x1aE\xdf\xa3"])
def test_corrupt_compressed_audio_gives_one_line_error(head):
    data = head + bytes(range(256)) * 8
    with pytest.raises(MMChatError, match="corrupt or not audio|no audio stream") as e:
        audio.decode_audio(data, "clip")
    assert "\n" not in str(e.value)


def test_too_large_audio_is_refused_before_decoding(tmp_path):
    big = tmp_path / "long.wav"
    big.write_bytes(tone()[:44] + b"\0" * (audio.MAX_AUDIO_BYTES + 1))
    with pytest.raises(MMChatError, match="the limit is 25 MB"):
        audio.load_audio(big)
    with pytest.raises(MMChatError, match="no such audio file"):
        audio.load_audio(tmp_path / "missing.wav")


def test_word_error_rate():
    assert speech_eval.word_errors("What color is it?", "what color is it") == (0, 4)
    assert speech_eval.word_errors("the red square", "the bed square too") == (2, 3)  # a substitution, an insertion
    assert speech_eval.word_errors("a b c d", "a d") == (2, 4)
    assert speech_eval.word_errors("well-known words", "well known words") == (0, 3)


# -- speech out --------------------------------------------------------------------------------------------------
def test_voice_names():
    if speech.espeak_missing() is None:
        assert speech.resolve_voice("espeak") == "espeak"
        assert speech.resolve_voice("alloy", model="espeak-ng") == "espeak"
    for bad, message in [("nobody", "unknown voice 'nobody'"), (None, "unknown speech model")]:
        with pytest.raises(MMChatError, match=message):
            speech.resolve_voice(bad, model="tts-9" if bad is None else None)
    with pytest.raises(MMChatError, match="at most 4096"):
        speech.synthesize("word " * 1000)
    with pytest.raises(MMChatError, match="speed"):
        speech.synthesize("hi", speed=9)
    with pytest.raises(MMChatError, match="no text"):
        speech.synthesize("   ")


def test_markdown_is_not_read_aloud():
    said = speech.speakable("**Paris** is the [capital](http://x.org).\n```python\nprint(1)\n```\n# Done")
    assert said == "Paris is the capital. (code) Done"


@needs_espeak
def test_espeak_voice_makes_speech_of_the_right_length():
    short, rate = speech.synthesize("Hello.", "espeak")
    long, rate2 = speech.synthesize("Hello. This is a much longer sentence with many more words in it.", "espeak")
    assert rate == rate2 == 22050 and short.dtype == np.float32
    assert 0.2 < len(short) / rate < 2 and len(long) > 3 * len(short)
    slow, _ = speech.synthesize("Hello. This is a much longer sentence with many more words in it.", "espeak",
                                speed=0.5)
    assert len(slow) > 1.5 * len(long)
    pcm = speech.encode(long, rate, "pcm")  # OpenAI's raw pcm: 16-bit at 24 kHz
    assert abs(len(pcm) / 2 / speech.PCM_RATE - len(long) / rate) < 0.01


@needs_espeak
def test_speaker_writes_wav_files_when_there_is_no_player(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.path.dirname(speech.shutil.which('espeak-ng'))}")
    if any(speech.shutil.which(p[0]) for p in speech.PLAYERS):
        pytest.skip("an audio player lives next to espeak-ng")
    speaker = speech.Speaker("espeak", folder=tmp_path / "spoken")
    assert "no audio player found" in speaker.describe() and str(tmp_path / "spoken") in speaker.describe()
    note = speaker.say("**Hello** there.")
    files = list((tmp_path / "spoken").glob("answer-*.wav"))
    assert len(files) == 1 and str(files[0]) in note
    x = audio.load_audio(files[0])
    assert 0.3 < len(x) / audio.SAMPLE_RATE < 3


# -- speech in, on spoken clips ----------------------------------------------------------------------------------
@needs_whisper
@needs_piper
@pytest.mark.slow
def test_piper_speech_is_transcribed_with_low_word_error_rate():
    result = speech_eval.evaluate("joe")
    assert result["words"] == 75
    assert result["wer"] <= 0.15, result["samples"]  # measured 4-5% (benchmarks/RESULTS-speech.md)


@needs_whisper
@needs_espeak
@pytest.mark.slow
def test_espeak_speech_is_transcribed_with_sane_word_error_rate():
    result = speech_eval.evaluate("espeak")
    assert result["wer"] <= 0.30, result["samples"]  # measured 9-13%: espeak-ng is harder to hear


@needs_whisper
@needs_espeak
def test_transcribe_from_path_and_samples_agree(tmp_path):
    x, rate = speech.synthesize("Please remind me to call my sister tomorrow morning.", "espeak")
    path = tmp_path / "clip.wav"
    path.write_bytes(speech.encode(x, rate, "wav"))
    by_path = audio.transcribe(path, beam_size=1)
    by_samples = audio.transcribe(audio.load_audio(path), beam_size=1)
    assert by_path.text == by_samples.text
    assert speech_eval.word_errors("Please remind me to call my sister tomorrow morning.", by_path.text)[0] <= 2
    assert abs(by_path.duration - len(x) / rate) < 0.01
    with pytest.raises(MMChatError, match="unknown transcription model"):
        audio.transcribe(path, model="whisper-large")


def test_speech_extra_is_named_when_missing(monkeypatch):
    """Without the extra (faster_whisper and piper made unimportable) the errors name it."""
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    monkeypatch.setitem(sys.modules, "piper", None)
    assert "pip install 'mmchat[speech]'" in audio.missing()
    assert "pip install 'mmchat[speech]'" in speech.piper_missing()
    with pytest.raises(audio.NotInstalled, match=r"needs faster-whisper: pip install 'mmchat\[speech\]'"):
        audio.transcribe(tone())
    with pytest.raises(audio.NotInstalled, match="needs piper-tts"):
        speech.synthesize("hello", "joe")
    from mmchat.serve.audio import _bad_audio
    assert _bad_audio(audio.NotInstalled("x"), "file").status == 501  # the server's answer: not the client's fault


@needs_whisper
@needs_espeak
@pytest.mark.slow
def test_cli_speak_and_transcribe(tmp_path):
    import subprocess

    def mmchat(*args):
        return subprocess.run([sys.executable, "-m", "mmchat", *args], capture_output=True, text=True, timeout=300)
    out = tmp_path / "said.mp3"
    r = mmchat("speak", "--voice", "espeak", "--out", str(out), "Translate this sentence into French for me.")
    assert r.returncode == 0 and out.exists() and audio.sniff(out.read_bytes()) == "mp3", r.stderr
    r = mmchat("transcribe", str(out))
    assert r.returncode == 0 and speech_eval.word_errors("Translate this sentence into French for me.",
                                                         r.stdout)[0] <= 1, r.stdout
    r = mmchat("speak", "--out", str(tmp_path / "x.txt"), "hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "write .wav, .mp3" in r.stderr
