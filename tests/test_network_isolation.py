"""Nothing leaves the machine at run time: `mmchat chat` and `mmchat serve` (with a request over loopback) run
with every outbound connection blocked except loopback, and pass.

Two layers, both on when the machine allows:
- a real block: a new user + network namespace (`unshare -rn`), whose only interface is loopback;
- an audit hook in every Python process (sitecustomize.py, sys.addaudithook) that refuses and records any
  socket connect/sendto/getaddrinfo to something other than loopback or a Unix socket. The test asserts that no
  attempt was recorded: a quietly swallowed connection error would still show up here.
Where unprivileged namespaces are not allowed, the audit hook alone does the blocking (and says so)."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HOOK = textwrap.dedent('''
    import ipaddress, json, os, socket, sys

    _LOG = os.environ["MMCHAT_NET_LOG"]

    def _loopback(host) -> bool:
        if isinstance(host, bytes):
            host = host.decode()
        if host is None or host in ("localhost", "", "ip6-localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def _hook(event, args):
        if event in ("socket.connect", "socket.sendto"):
            sock, address = args[0], args[-1]
            if sock.family == socket.AF_UNIX or not isinstance(address, tuple) or _loopback(address[0]):
                return
            target = address[0]
        elif event == "socket.getaddrinfo":
            if _loopback(args[0]):
                return
            target = args[0]
        else:
            return
        with open(_LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "event": event, "target": str(target),
                                "argv": sys.argv[:3]}) + "\\n")
        raise OSError(f"network access blocked in this test: {event} {target}")

    sys.addaudithook(_hook)
''')

# run inside the namespace: bring loopback up (it starts down), then the command; no `ip` binary needed
LO_UP = textwrap.dedent('''
    import fcntl, socket, struct, subprocess, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifreq = struct.pack("16sH14x", b"lo", 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, ifreq))[1]            # SIOCGIFFLAGS
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))             # SIOCSIFFLAGS, IFF_UP
    sys.exit(subprocess.call(sys.argv[1:]))
''')

SERVE_DRIVER = textwrap.dedent('''
    import subprocess, sys, time
    import httpx, openai
    port = 18437
    proc = subprocess.Popen([sys.executable, "-m", "mmchat", "serve", "--port", str(port), "--slots", "2"])
    try:
        for _ in range(900):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "Name the capital of France."}])
        print("ANSWER:", r.choices[0].message.content, r.usage.completion_tokens)
    finally:
        proc.terminate()
        print("SERVER EXIT:", proc.wait(60))
''')


def namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    """-> run(argv, **kw): a command with the network blocked except loopback; and the log of blocked attempts."""
    folder = tmp_path_factory.mktemp("netblock")
    (folder / "sitecustomize.py").write_text(HOOK)
    (folder / "lo_up.py").write_text(LO_UP)
    log = folder / "attempts.jsonl"
    log.touch()
    real = namespace_works()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "MMCHAT_NET_LOG": str(log), "PYTHONUNBUFFERED": "1", "NO_PROXY": "*"}

    def run(argv, extra_env=None, **kw):
        if real:
            argv = ["unshare", "-rn", sys.executable, str(folder / "lo_up.py"), *argv]
        return subprocess.run(argv, env={**env, **(extra_env or {})}, capture_output=True, text=True, **kw)

    run.real, run.log = real, log
    return run


def attempts(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_the_block_itself_works(isolated):
    """The harness blocks what it should: an outbound connect fails and is recorded; loopback works."""
    code = textwrap.dedent('''
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        socket.create_connection(srv.getsockname(), timeout=5).close()
        try:
            socket.create_connection(("93.184.216.34", 80), timeout=5)
            print("OUTBOUND CONNECTED")
        except OSError as e:
            print("OUTBOUND BLOCKED")
    ''')
    r = isolated([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OUTBOUND BLOCKED" in r.stdout
    seen = attempts(isolated.log)
    assert [a["target"] for a in seen] == ["93.184.216.34"]
    isolated.log.write_text("")
    if isolated.real:  # the namespace blocks even without the hook
        outbound_only = code.split("try:")[0].split("import socket")[0] + "import socket\ntry:" + code.split("try:")[1]
        r = subprocess.run(["unshare", "-rn", sys.executable, str(Path(isolated.log).parent / "lo_up.py"),
                            sys.executable, "-c", outbound_only], capture_output=True, text=True, timeout=60)
        assert "OUTBOUND BLOCKED" in r.stdout, r.stderr


@pytest.mark.slow
def test_chat_and_serve_run_with_the_network_blocked(isolated, smollm2_path, tmp_path):
    """The embedded model, from the local cache: a scripted terminal chat, then the server answering the `openai`
    client over loopback; no process tried to reach anything else."""
    scratch = {"XDG_DATA_HOME": str(tmp_path)}  # conversations go to a scratch store
    chat = isolated([sys.executable, "-m", "mmchat", "chat", "--plain", "--max-tokens", "8", "--temperature", "0"],
                    input="What is the capital of France?\n/quit\n", timeout=300, extra_env=scratch)
    assert chat.returncode == 0, chat.stderr
    shown = re.search(r"(\d+) tokens · [\d.]+ tokens/s", chat.stdout)  # the answer's figures line
    assert shown and 1 <= int(shown.group(1)) <= 8, chat.stdout
    driver = tmp_path / "driver.py"
    driver.write_text(SERVE_DRIVER)
    serve = isolated([sys.executable, str(driver)], timeout=400, extra_env=scratch)
    assert serve.returncode == 0, serve.stdout + serve.stderr
    assert "ANSWER:" in serve.stdout and "SERVER EXIT: 0" in serve.stdout
    answer = serve.stdout.split("ANSWER:")[1].split("\n")[0]
    assert "Paris" in answer and 1 <= int(answer.split()[-1]) <= 8  # the text, then its completion_tokens
    assert attempts(isolated.log) == []


def test_pull_says_it_uses_the_network():
    r = subprocess.run([sys.executable, "-m", "mmchat", "pull", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "network" in r.stdout.lower()
