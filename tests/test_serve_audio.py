"""The server's speech routes and input_audio parts, driven by the official `openai` client against a real
`mmchat serve` process (a tiny random Llama: its answers are gibberish but exact under greedy decoding)."""
import base64
import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import folder, start_server, stop_server  # noqa: E402,F401 - folder: the tiny model fixture

from mmchat.multimodal import audio, speech, speech_eval  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # a server, Whisper and a voice to load: about 40 s in all
    pytest.mark.skipif(audio.missing() is not None, reason=f"{audio.missing()} (the speech extra)"),
    pytest.mark.skipif(speech.espeak_missing() is not None and speech.piper_missing() is not None,
                       reason="no voice to make the spoken clips: pip install 'mmchat[speech]' or apt-get install "
                              "espeak-ng"),
]
KEY = "audio-key"
QUESTION = "Please remind me to call my sister tomorrow morning."


@pytest.fixture(scope="module")
def server(folder):
    proc, base = start_server(str(folder), "--api-key", KEY)
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def clip() -> bytes:
    """QUESTION spoken, as a WAV file (espeak-ng where it is installed: instant and always the same)."""
    voice = "espeak" if speech.espeak_missing() is None else "joe"
    return speech.encode(*speech.synthesize(QUESTION, voice), "wav")


def test_transcription_through_the_openai_client(client, clip):
    r = client.audio.transcriptions.create(model="whisper-tiny.en", file=("question.wav", clip, "audio/wav"))
    errors, words = speech_eval.word_errors(QUESTION, r.text)
    assert errors <= 2, r.text
    text = client.audio.transcriptions.create(model="whisper-tiny.en", file=("q.wav", clip), response_format="text")
    assert text.strip() == r.text
    verbose = client.audio.transcriptions.create(model="whisper-tiny.en", file=("q.wav", clip),
                                                 response_format="verbose_json")
    assert verbose.text == r.text and abs(verbose.duration - len(audio.decode_audio(clip)) / 16000) < 0.05
    srt = client.audio.transcriptions.create(model="whisper-tiny.en", file=("q.wav", clip), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and verbose.segments[0].text in srt
    mp3 = speech.encode(audio.decode_audio(clip), 16000, "mp3")  # the same speech as MP3
    assert speech_eval.word_errors(QUESTION, client.audio.transcriptions.create(
        model="whisper-1", file=("q.mp3", mp3)).text)[0] <= 2


def test_chat_with_input_audio_answers_the_transcript(client, clip, folder):
    heard = client.audio.transcriptions.create(model="whisper-tiny.en", file=("q.wav", clip)).text
    spoken = [{"role": "user", "content": [
        {"type": "text", "text": "Answer this:"},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"}}]}]
    typed = [{"role": "user", "content": "Answer this:" + heard}]
    kw = dict(model=folder.name, temperature=0, max_tokens=12)
    by_voice = client.chat.completions.create(messages=spoken, **kw)
    by_text = client.chat.completions.create(messages=typed, **kw)
    assert by_voice.choices[0].message.content == by_text.choices[0].message.content
    assert by_voice.usage.prompt_tokens == by_text.usage.prompt_tokens > 15  # the transcript reached the model


def test_speech_endpoint_speaks_the_input(client, server):
    r = client.audio.speech.create(model="tts-1", voice="alloy", input=QUESTION, response_format="wav")
    wav = r.read()
    assert audio.sniff(wav) == "wav"
    assert speech_eval.word_errors(QUESTION, audio.transcribe(wav, beam_size=1).text)[0] <= 2
    mp3 = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.").read()  # OpenAI's default
    assert audio.sniff(mp3) == "mp3" and 0.3 < len(audio.decode_audio(mp3)) / 16000 < 3
    pcm = httpx.post(server + "/v1/audio/speech", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "tts-1", "input": "Hello there.", "voice": "nova", "response_format": "pcm"})
    assert pcm.headers["content-type"] == "audio/pcm" and 0.3 < len(pcm.content) / 2 / 24000 < 3


@pytest.mark.parametrize("name,data,code,message", [
    ("notes.txt", b"this is not audio at all", 400, "not in a supported audio format"),
    ("broken.wav", b"RIFF\x24\0\0\0WAVEfmt " + b"\x01" * 10, 400, "corrupt"),
    ("broken.mp3", b"ID3" + bytes(range(256)) * 16, 400, "corrupt or not audio"),
    ("empty.wav", b"", 400, "is empty"),
])
def test_bad_uploads_get_one_line_400(client, name, data, code, message):
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper-tiny.en", file=(name, data))
    assert e.value.status_code == code
    err = e.value.body
    assert message in err["message"] and "\n" not in err["message"] and err["param"] == "file"


def test_fifty_megabyte_upload_is_refused(server):
    big = b"RIFF" + b"\0" * (50 * 2**20)
    r = httpx.post(server + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"},
                   files={"file": ("big.wav", big, "audio/wav")}, data={"model": "whisper-tiny.en"}, timeout=120)
    assert r.status_code == 413
    err = r.json()["error"]
    assert "50.0 MB" in err["message"] and "25 MB" in err["message"] and err["code"] == "file_too_large"
    # as base64 in a chat message it is over the body limit
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(big).decode(), "format": "wav"}}
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                   json={"model": "x", "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 413 and "request body" in r.json()["error"]["message"]


def test_bad_audio_requests(client, clip, folder):
    def part(data: str, fmt: str = "wav"):
        return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}

    cases = [
        ([{"role": "user", "content": [part("not base64!!")]}], "not valid base64"),
        ([{"role": "user", "content": [part(base64.b64encode(b"hello, just text").decode())]}],
         "not in a supported audio format"),
        ([{"role": "user", "content": [part(base64.b64encode(clip).decode(), "aiff")]}], "format 'aiff'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [part(base64.b64encode(clip).decode())]}],
         "user messages"),
    ]
    for messages, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=folder.name, messages=messages, max_tokens=2)
        assert message in e.value.body["message"], e.value.body
    with pytest.raises(openai.NotFoundError, match="whisper-tiny.en"):
        client.audio.transcriptions.create(model="whisper-large-v3", file=("q.wav", clip))
    with pytest.raises(openai.BadRequestError, match="English only"):
        client.audio.transcriptions.create(model="whisper-tiny.en", file=("q.wav", clip), language="de")
    with pytest.raises(openai.BadRequestError, match="unknown voice 'bob'"):
        client.audio.speech.create(model="tts-1", voice="bob", input="hi")
    with pytest.raises(openai.BadRequestError, match="'instructions' is not supported"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="hi", instructions="whisper")
    with pytest.raises(openai.BadRequestError, match="at most 4096"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="word " * 1000)
