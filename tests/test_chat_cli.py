"""qt-chat driven through its real stdin/stdout, as a person at a terminal would."""

import subprocess
import sys


def chat(ckpt, lines, *flags):
    return subprocess.run([sys.executable, "-m", "qt_serve.cli", "--model", str(ckpt), "--temperature", "0",
                           "--max-tokens", "12", *flags], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=300)


def test_multi_turn_commands_and_eof(tiny_ckpt):
    r = chat(tiny_ckpt, ["To be", "", "/system Be brief.", "again", "/reset", "/bogus", "/help", "last"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 3
    assert "(system prompt set; conversation cleared)" in r.stdout
    assert "(conversation cleared)" in r.stdout and "unknown command /bogus" in r.stdout
    assert "/system TEXT" in r.stdout  # help text
    assert r.stderr.count("tok/s") == 3 and "Traceback" not in r.stderr


def test_overlong_conversation_keeps_running(tiny_ckpt):
    r = chat(tiny_ckpt, ["word " * 200, "short"], "--max-seq-len", "64")
    assert r.returncode == 0
    assert "error: the prompt is" in r.stdout and "(try /reset)" in r.stdout
    assert r.stdout.count("bot> ") == 2  # the second message still gets a reply
