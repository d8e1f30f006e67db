"""`mmchat chat --speak` and `/audio PATH` driven for real in a pseudo-terminal, with the embedded SmolLM2."""
import os
import sys

import pytest

from mmchat import registry
from mmchat.multimodal import audio, speech, speech_eval

pexpect = pytest.importorskip("pexpect")
pytestmark = [
    pytest.mark.skipif(audio.missing() is not None, reason=f"{audio.missing()} (the speech extra)"),
    pytest.mark.skipif(speech.espeak_missing() is not None, reason=str(speech.espeak_missing())),
]
QUESTION = "Can you write a short poem about the ocean?"


def spawn(model_path, home, bin_dir, *args):
    for shared in ("converted", "models"):  # converted and pulled weights: shared with the other tests
        (registry.home() / shared).mkdir(parents=True, exist_ok=True)
        if not (home / shared).exists():
            (home / shared).symlink_to(registry.home() / shared, target_is_directory=True)
    env = {**os.environ, "MMCHAT_HOME": str(home), "PATH": str(bin_dir), "PYTHONUNBUFFERED": "1",
           "TERM": "xterm-256color"}
    return pexpect.spawn(sys.executable, ["-m", "mmchat", "chat", "--model", str(model_path), *args], env=env,
                         encoding="utf-8", timeout=180, dimensions=(50, 200))


@pytest.mark.slow
def test_spoken_question_in_spoken_answer_out(smollm2_path, tmp_path):
    bin_dir = tmp_path / "bin"  # espeak-ng and no audio player: the answers must land in WAV files
    bin_dir.mkdir()
    (bin_dir / "espeak-ng").symlink_to(speech.shutil.which("espeak-ng"))
    clip = tmp_path / "question.wav"
    clip.write_bytes(speech.encode(*speech.synthesize(QUESTION, "espeak"), "wav"))
    child = spawn(smollm2_path, tmp_path, bin_dir, "--speak", "espeak", "--no-save", "--plain", "--temperature", "0",
                  "--max-tokens", "24")
    child.expect("speaking answers with the espeak voice \\(no audio player found: answers are written as WAV "
                 "files to (\\S+)\\)")
    child.expect_exact(">>> ")
    child.sendline(f"/audio {clip}")
    child.expect("> (.+?)\r?\n")
    heard = child.match.group(1).strip()
    assert speech_eval.word_errors(QUESTION, heard)[0] <= 2, heard
    child.expect(r"tokens/s · first token after")
    answer = child.before
    child.expect(r"\(no audio device: the spoken answer is in (\S+\.wav), ([\d.]+) s\)")
    wav, seconds = child.match.group(1), float(child.match.group(2))
    child.expect_exact(">>> ")
    said = audio.transcribe(wav, beam_size=1).text
    words = set(speech_eval.normalize(answer))
    assert seconds > 0.5 and len([w for w in speech_eval.normalize(said) if w in words]) >= 3, (answer, said)
    child.sendline(f"/audio {tmp_path / 'missing.wav'}")
    child.expect("error: no such audio file: .*missing.wav")
    (tmp_path / "notes.txt").write_text("not a sound")
    child.sendline(f"/audio {tmp_path / 'notes.txt'}")
    child.expect("error: notes.txt is not in a supported audio format")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_speak_with_an_unknown_voice_fails_before_loading(tmp_path):
    import subprocess
    r = subprocess.run([sys.executable, "-m", "mmchat", "chat", "--speak", "nobody"], capture_output=True,
                       text=True, env={**os.environ, "MMCHAT_HOME": str(tmp_path)}, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown voice 'nobody'" in r.stderr
    assert "loading" not in r.stderr
